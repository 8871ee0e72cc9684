"""Provenance written next to every output: resolved config, command line, git revision, versions."""
from __future__ import annotations

import hashlib
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


# The code a result depends on, fingerprinted without git (a copied checkout may carry an older .git, or none).
SOURCE_GLOBS = ("cli.py", "engine/**/*.py", "alpnet/**/*.py", "benchmarks/*.py")


def source_digest(root: str | Path | None = None) -> str:
    """First 12 hex digits of a SHA-256 over the project's Python sources under ``root`` (default: this
    checkout): each file's relative path and bytes, in path order.

    Two checkouts with the same digest ran the same code, whatever their git metadata says; to find the
    commit of a result, compare with ``python -m engine.runinfo DIR`` on ``git archive COMMIT`` extracted
    into DIR.
    """
    root = Path(root) if root is not None else Path(__file__).resolve().parent.parent
    if not (root / "engine").is_dir():
        raise FileNotFoundError(f"{root}: no engine/ folder here, not a checkout of this project")
    files = sorted({p.relative_to(root).as_posix() for g in SOURCE_GLOBS for p in root.glob(g)
                    if p.is_file() and "__pycache__" not in p.parts})
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.encode() + b"\0" + (root / rel).read_bytes() + b"\0")
    return h.hexdigest()[:12]


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
            "sources": source_digest(), "host": platform.node(), "versions": versions(), "config": config or {}}


def write_run_info(out_dir: str | Path, config: dict[str, Any], name: str = "run") -> Path:
    """Write ``<name>.config.yaml`` (resolved config) and ``<name>.info.json`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / f"{name}.config.yaml", yaml.safe_dump(config, sort_keys=False))
    path = out_dir / f"{name}.info.json"
    write_text_atomic(path, json.dumps(run_info(config), indent=2))
    return path


def not_a_folder(path: str | Path, itself: bool) -> str | None:
    """The nearest existing part of ``path`` (``path`` itself first when ``itself``, then its parents) when it is
    not a folder, so that an error can name the file standing where a folder is needed; None when that part
    is a folder or nothing exists."""
    p = Path(path)
    for part in ((p,) if itself else ()) + tuple(p.parents):
        if part.exists():
            return None if part.is_dir() else str(part)
    return None


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


if __name__ == "__main__":
    # python -m engine.runinfo [DIR]: the source digest of a checkout (default: this one)
    try:
        print(source_digest(sys.argv[1] if len(sys.argv) > 1 else None))
    except FileNotFoundError as exc:
        sys.exit(f"runinfo: {exc}")
