"""Stops from outside a run: Ctrl-C (SIGINT) and SIGTERM, and the exit status and word each ends with.

Kept apart from ``engine.pipeline`` so that the command line can name a stop without importing the engine.
"""
from __future__ import annotations

import signal
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from types import FrameType


class Terminated(KeyboardInterrupt):
    """SIGTERM (``kill``, a job scheduler's stop or time limit): the run stops as on Ctrl-C, keeping and
    recording what it committed, releasing the store; exit status 143 (128 + SIGTERM)."""


def raise_terminated(signum: int, frame: FrameType | None) -> None:
    """SIGTERM handler: turn the signal into :class:`Terminated` in the main thread."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)    # a second SIGTERM must not break the orderly stop
    raise Terminated()


def stop_status(exc: KeyboardInterrupt) -> tuple[int, str]:
    """Exit status and a word for the user: 143 for SIGTERM, 130 (128 + SIGINT) for Ctrl-C."""
    if isinstance(exc, Terminated):
        return 143, "terminated (SIGTERM)"
    return 130, "interrupted (Ctrl-C)"
