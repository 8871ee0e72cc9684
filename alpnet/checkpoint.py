"""Training checkpoints: atomic save, validated load, and the model rebuilt for evaluation.

A checkpoint is a ``torch.save`` dict of plain types and tensors (it loads with ``weights_only=True``)::

    format        int, CHECKPOINT_FORMAT
    iteration     int, iterations completed
    model         state dict            optimizer / scheduler / scaler   state dicts (scaler may be None)
    config        dict, engine.config.to_dict(cfg) of the run (every section)
    store         dict: path, method, params, code_version, schema_version, settings_hash, complete,
                  store_slices, training_slices, ... (what the episodes came from)
    rng           dict: torch, cuda (list), numpy (list form), python (tuple)
    totals        dict of cumulative counters (prototype fallbacks, id redraws, episodes)
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from engine.volume import one_line

if TYPE_CHECKING:
    from alpnet.config import ModelConfig
    from alpnet.model import ALPNet

CHECKPOINT_FORMAT = 1


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or unusable; ``str`` is one line naming the file."""


def save_checkpoint(path: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, fsync, then ``os.replace``.

    A crash at any moment leaves either the previous checkpoint or the new one, never a torn file.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = dict(state, format=CHECKPOINT_FORMAT)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            torch.save(state, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def read_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> dict[str, Any]:
    """Load the raw checkpoint dict; one-line ``CheckpointError`` for a missing, corrupt or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        state = torch.load(path, map_location=device, weights_only=True)
    except Exception as exc:  # pickle/zip errors of many types: one line
        raise CheckpointError(f"{path}: not a readable checkpoint ({one_line(exc, sentence=True)})") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint written by `cli.py train` (no model/config entries)")
    if state.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: checkpoint format {state.get('format')!r}, this code reads "
                              f"{CHECKPOINT_FORMAT}")
    return state


def model_config(cfg_dict: dict[str, Any]) -> ModelConfig:
    """The ``ModelConfig`` recorded in a checkpoint's config dict (validated like a config file)."""
    from alpnet.config import ModelConfig
    from engine.config import from_dict
    return from_dict(ModelConfig, dict(cfg_dict.get("model", {})), "model")


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu"
                    ) -> tuple[ALPNet, dict[str, Any], dict[str, Any]]:
    """Rebuild the trained model for evaluation.

    Parameters
    ----------
    path : checkpoint file written by ``alpnet.train``
    device : where the model goes (``"cpu"``, ``"cuda"``, a ``torch.device``)

    Returns
    -------
    model : alpnet.model.ALPNet in eval mode on ``device``
    cfg_dict : dict, the full resolved config of the training run
    meta : dict with ``iteration``, ``store`` (path, method, params, ...), ``totals``, ``path``
    """
    from alpnet.model import ALPNet
    state = read_checkpoint(path, "cpu")
    mcfg = model_config(state["config"])
    mcfg.pretrained = ""          # weights come from the checkpoint, never from the original file
    model = ALPNet(mcfg, quiet=True)
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model.encoder={mcfg.encoder!r} "
                              f"({str(exc).splitlines()[0]})") from None
    model.to(device).eval()
    meta = {"iteration": int(state.get("iteration", 0)), "store": state.get("store", {}),
            "totals": state.get("totals", {}), "path": str(path)}
    return model, state["config"], meta
