"""Writing matplotlib figures: one way for every plot of the project (inspect, training, reports, benchmarks)."""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from matplotlib.figure import Figure


def save_figure(fig: Figure, path: str | Path, dpi: int) -> Path:
    """Lay out ``fig``, write it to ``path`` (parent folders created) at ``dpi`` and close it; returns the path.

    Closing matters: pyplot keeps every open figure alive, and long runs (one overlay per scan and organ)
    would otherwise accumulate them.
    """
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=dpi)
    finally:
        plt.close(fig)        # also when the write fails: a caller that goes on must not keep the figure
    return path
