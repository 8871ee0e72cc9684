"""Provenance written next to every output: resolved config, command line, git revision, versions."""
from __future__ import annotations

import importlib.metadata
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import yaml

_PACKAGES = ("numpy", "scipy", "scikit-image", "numba", "h5py", "nibabel", "pydicom", "torch", "torchvision")


def git_revision() -> str:
    """Short git revision of the project checkout, with ``+dirty`` when it has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=5).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return (rev or "unknown") + ("+dirty" if dirty else "")


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for name in _PACKAGES:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "absent"
    return out


def run_info(config: dict[str, Any] | None = None) -> dict[str, Any]:
    return {"command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "git": git_revision(),
            "host": platform.node(), "versions": versions(), "config": config or {}}


def write_run_info(out_dir: str | Path, config: dict[str, Any], name: str = "run") -> Path:
    """Write ``<name>.config.yaml`` (resolved config) and ``<name>.info.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{name}.config.yaml", yaml.safe_dump(config, sort_keys=False))
    path = out_dir / f"{name}.info.json"
    write_text_atomic(path, json.dumps(run_info(config), indent=2))
    return path


def write_text_atomic(path: str | Path, text: str) -> None:
    """``path`` holds either its old content or all of ``text``, also when the disk fills up on the way; a
    failure names ``path`` (a failed ``write`` names no file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError as exc:
        tmp.unlink(missing_ok=True)
        # a failed write() names no file: name the one meant
        raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
