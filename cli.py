"""Command line: preprocess | train | evaluate | inspect | demo.

Parsing and dispatch only; the work lives in ``engine`` and ``alpnet``, imported lazily so that
``preprocess`` and ``inspect`` start fast and never import torch.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import sys

# Set when cli.py runs as a script: the cyclic garbage collector stays off until the command's modules are
# imported (``_call``). See ``_end_of_imports``.
_GC_OFF_FOR_IMPORTS = False


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", metavar="FILE", help="YAML config file (default: built-in defaults)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config value, e.g. --set superpixels.slic.n_segments=60 (repeatable)")


class _Version(argparse.Action):
    """``--version``: the project's version, git revision and source digest, and its libraries' versions (what
    a bug report needs; every run also writes them next to its outputs). Looked up only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the versions of this project and of its libraries, and exit")

    def __call__(self, parser, namespace, values, option_string=None):
        import importlib.metadata
        from engine.runinfo import git_revision, source_digest, versions
        try:
            own = importlib.metadata.version("slic-alpnet")
        except importlib.metadata.PackageNotFoundError:
            own = "(not installed)"
        print(f"slic-alpnet {own} (git {git_revision()}, sources {source_digest()})")
        print(", ".join(f"{name} {version}" for name, version in versions().items()))
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cli.py", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action=_Version)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("preprocess", help="compute superpixel pseudo-labels into an HDF5 store",
                       description="Read volumes, normalise slices, compute superpixels in parallel and "
                                   "commit them to a crash-safe, resumable HDF5 store.")
    p.add_argument("--input", help="NIfTI folder/file, raw CHAOS folder, or 'phantom' "
                                   "(default: data.input = phantom)")
    p.add_argument("--out", help="store path (default: engine.out = data/store.h5)")
    p.add_argument("--threads", type=int, help="compute workers (default: all cores)")
    p.add_argument("--backend", choices=["threads", "processes"], help="worker kind (default: threads)")
    p.add_argument("--method", choices=["slic", "felzenszwalb", "meanshift"],
                   help="pseudo-label method (default: slic)")
    p.add_argument("--batch", type=int, help="slices per commit (default: 16 per worker, at least 128)")
    p.add_argument("--overwrite", action="store_true",
                   help="discard an existing store whose settings differ, instead of refusing")
    p.add_argument("--no-progress", action="store_true", help="plain log lines instead of a progress bar")
    _config_args(p)

    p = sub.add_parser("inspect", help="summarise a store, or list the volumes of a data source",
                       description="inspect STORE: one-screen summary, integrity check and run history of a store. "
                                   "inspect --data PATH: list the volumes a source yields.")
    p.add_argument("store", nargs="?", help="store file (e.g. data/store.h5)")
    p.add_argument("--data", help="list the volumes of this source instead (folder, file or 'phantom')")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--quick", action="store_true",
                   help="check the tables and every batch's mapping, without reading each slice's pixels")
    p.add_argument("--volume", help="with --slice and --png: volume id of the overlay")
    p.add_argument("--slice", type=int, help="with --volume and --png: slice index z")
    p.add_argument("--png", help="write a superpixel/label overlay of one slice to this PNG file (a name ending "
                                 "in .png)")
    _config_args(p)

    p = sub.add_parser("train", help="self-supervised ALPNet training streamed from a store",
                       description="Train ALPNet on superpixel episodes read from a store.")
    p.add_argument("--store", help="store to train from (default: train.store)")
    p.add_argument("--out", help="run folder (default: train.out)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto (cuda when available)")
    p.add_argument("--resume", action="store_true", help="continue from the run folder's last checkpoint")
    _config_args(p)

    p = sub.add_parser("evaluate", help="1-way 1-shot evaluation (Dice per organ)",
                       description="Evaluate a checkpoint with the Roy et al. C-chunk protocol on labelled "
                                   "volumes; --baseline support-copy needs no checkpoint.")
    p.add_argument("--checkpoint", help="model checkpoint (.pt) from `train`")
    p.add_argument("--baseline", choices=["support-copy"], help="evaluate a reference that needs no model")
    p.add_argument("--data", help="folder of image_<id>/label_<id> NIfTI volumes, or 'phantom'")
    p.add_argument("--fold", help="fold index 0..4 or 'all' (default: evaluate.fold)")
    p.add_argument("--setting", type=int, choices=[1, 2], help="1 or 2 (default: from the checkpoint)")
    p.add_argument("--out", help="report folder (default: evaluate.out)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="default: auto")
    _config_args(p)

    p = sub.add_parser("demo", help="preprocess, train and evaluate on the built-in phantom",
                       description="The whole job on the built-in synthetic phantom, CPU-sized.")
    p.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    _config_args(p)
    return parser


def _load_config(args: argparse.Namespace):
    from alpnet.config import load  # torch-free
    return load(args.config, args.overrides)


def _call(module_name: str, func_name: str, *a, **kw) -> int:
    """Call ``module.func``; a part that does not exist yet says so in one line (exit 2)."""
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        _end_of_imports()
    except (ImportError, AttributeError) as exc:
        if isinstance(exc, ImportError) and exc.name not in (module_name, None):
            raise
        print(f"{module_name}.{func_name}: not built yet", file=sys.stderr)
        return 2
    return int(func(*a, **kw) or 0)


def _end_of_imports() -> None:
    """Turn the garbage collector back on once a command's modules are loaded, and leave the objects they
    made (hundreds of thousands: numba, scipy, nibabel, h5py, torch) out of every later collection.

    With the collector on, those imports ran ~300 young and 2 full collections in a CHAOS preprocess, and
    none came later: the whole command took 1.50 s against 1.43 s this way, ``evaluate --baseline`` 3.69
    against 3.40 s (2-core VM, README "Design notes"). Only a script run turns it off (``__main__``), so a
    program that calls ``main`` keeps its own settings."""
    global _GC_OFF_FOR_IMPORTS
    if _GC_OFF_FOR_IMPORTS:
        _GC_OFF_FOR_IMPORTS = False
        gc.freeze()
        gc.enable()


def _usage_error(command: str, text: str) -> int:
    """One line ``command: text`` on stderr; the exit status of bad input (2)."""
    print(f"{command}: {text}", file=sys.stderr)
    return 2


def _check_out(command: str, option: str, path: str | None, folder: bool) -> int:
    """0, or the one-line error (2) when ``path`` is an existing file where a folder is needed: the run folder
    itself (``folder``), or a parent of the store file (not ``folder``).

    A run folder given as an existing file, or under one, ended in ``train: File exists (errno 17): PATH`` or
    ``Not a directory``, exit 1, and only once the model and the data were loaded; a store under a file in
    ``cannot create its folder: File exists``."""
    if not path:
        return 0
    from pathlib import Path

    from engine.runinfo import not_a_folder
    blocker = not_a_folder(path, itself=folder)
    if blocker is None:
        return 0
    where = "is a file" if Path(blocker) == Path(path) else f"{blocker} is a file"
    return _usage_error(command, f"{option} {path}: {where}, not a folder")


def _apply(cfg_section, **values) -> None:
    for key, value in values.items():
        if value is not None:
            setattr(cfg_section, key, value)


def cmd_preprocess(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    for option, value in (("--threads", args.threads), ("--batch", args.batch)):
        if value is not None and value < 0:        # named as typed, not as engine.threads / engine.batch
            return _usage_error("preprocess", f"{option}: must be >= 0 (0: automatic), got {value}")
    _apply(cfg.data, input=args.input)
    _apply(cfg.engine, out=args.out, threads=args.threads, backend=args.backend, batch=args.batch)
    _apply(cfg.superpixels, method=args.method)
    cfg.engine.__post_init__()
    cfg.superpixels.__post_init__()
    if _check_out("preprocess", "--out" if args.out else "engine.out", cfg.engine.out, folder=False):
        return 2
    return _call("engine.pipeline", "preprocess", cfg, overwrite=args.overwrite,
                 progress=not args.no_progress)


def cmd_inspect(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if args.data:
        return _call("engine.sources", "describe", args.data, cfg, as_json=args.json)
    if not args.store:
        print("inspect: give a STORE file, or --data PATH to list a source's volumes", file=sys.stderr)
        return 2
    if args.png and (args.volume is None or args.slice is None):
        print("inspect: --png needs --volume ID and --slice Z", file=sys.stderr)
        return 2
    if not args.png and (args.volume is not None or args.slice is not None):
        # without this, the one-screen summary came out and the slice asked for was silently ignored
        print("inspect: --volume and --slice choose the slice of an overlay: add --png FILE", file=sys.stderr)
        return 2
    if args.png:
        # matplotlib chose the format from the name: "o" was written as o.png and a folder F as F.png beside it
        # (both reported as written to the name given, exit 0), and "o.xyz" ended in a traceback
        from pathlib import Path
        if Path(args.png).is_dir():
            return _usage_error("inspect", f"--png {args.png}: a folder; give a file name ending in .png")
        if Path(args.png).suffix.lower() != ".png":
            return _usage_error("inspect", f"--png {args.png}: give a file name ending in .png")
    return _call("engine.inspect", "inspect_store", args.store, as_json=args.json, volume=args.volume,
                 z=args.slice, png=args.png, read_pixels=not args.quick)


def cmd_train(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    _apply(cfg.train, store=args.store, out=args.out, device=args.device)
    if _check_out("train", "--out" if args.out else "train.out", cfg.train.out, folder=True):
        return 2
    return _call("alpnet.train", "main", cfg, resume=args.resume)


def cmd_evaluate(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if not args.checkpoint and not args.baseline:
        print("evaluate: give --checkpoint CKPT or --baseline support-copy", file=sys.stderr)
        return 2
    _apply(cfg.evaluate, data=args.data, fold=args.fold, out=args.out)
    if _check_out("evaluate", "--out" if args.out else "evaluate.out", cfg.evaluate.out, folder=True):
        return 2
    return _call("alpnet.evaluate", "main", cfg, checkpoint=args.checkpoint, baseline=args.baseline,
                 setting=args.setting, device=args.device or "auto")


def cmd_demo(args: argparse.Namespace) -> int:
    cfg = _load_config(args)
    if _check_out("demo", "--out", args.out, folder=True):
        return 2
    return _call("alpnet.demo", "main", cfg, out=args.out)


HANDLERS = {"preprocess": cmd_preprocess, "inspect": cmd_inspect, "train": cmd_train,
            "evaluate": cmd_evaluate, "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ENGINE_COMMANDS:
        quiet_blas_pools()
    from engine.config import ConfigError
    try:
        code = HANDLERS[args.command](args)
        silence(closed_outputs())        # a command that went on without its console (train, preprocess)
        return code
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        closed = closed_outputs() if isinstance(exc, BrokenPipeError) else []
        if closed:
            silence(closed)
            return EXIT_OUTPUT_CLOSED
        # The machine rather than the input (a read-only or full disk; a path under a file was refused before,
        # by _check_out): one line too.
        from engine.store_format import error_text
        print(f"{args.command}: {error_text(exc)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as exc:                 # Ctrl-C, or SIGTERM during a preprocess run
        from engine.stops import stop_status
        code, word = stop_status(exc)
        print(word, file=sys.stderr)
        return code


# The exit status of a command whose reader went away (``| head``), as a shell reports a tool that SIGPIPE ended.
EXIT_OUTPUT_CLOSED = 141


def closed_outputs() -> list:
    """Those of stdout and stderr that nothing reads any more (a pipe whose reader has exited); empty where
    the system cannot tell (no ``poll``).

    A broken pipe raised by other pipes (the processes backend's, say) keeps its error line: only a closed
    stdout or stderr is taken as the user's ``| head``.
    """
    import select
    if not hasattr(select, "poll"):
        return []
    closed = []
    for stream in (sys.stdout, sys.stderr):
        try:
            poller = select.poll()
            poller.register(stream.fileno(), select.POLLOUT)
            if any(events & select.POLLERR for _, events in poller.poll(0)):
                closed.append(stream)
        except (AttributeError, OSError, ValueError):   # replaced or closed streams (tests, embedding)
            continue
    return closed


def silence(streams: list) -> None:
    """Send ``streams`` (closed outputs) to ``/dev/null``: no message, as tools that SIGPIPE ends give none,
    and no complaint from the interpreter when it flushes stdout at exit (which would also turn the exit
    status into 120)."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
    except OSError:
        return
    for stream in streams:
        try:
            os.dup2(devnull, stream.fileno())
        except (AttributeError, OSError, ValueError):
            pass
    os.close(devnull)


# Commands that read and write only through ``engine`` (no torch): they end their process without the
# interpreter's teardown, see the end of this file.
ENGINE_COMMANDS = ("preprocess", "inspect")


def quiet_blas_pools() -> None:
    """One OpenBLAS thread for numpy and scipy, unless the user chose otherwise; call before importing numpy.

    Loading numpy and scipy starts one OpenBLAS pool each, and every pool thread spins for ~65 ms of CPU right
    after the import (measured here: numpy + scipy.ndimage cost 0.36 CPU s with the default pools against
    0.17 s with one thread). On a small machine those spins take a core from the engine's start. The engine
    makes no BLAS call large enough to use a pool (the phantom's matrix products ran as fast with one thread).
    """
    import os
    if "numpy" not in sys.modules:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def can_skip_teardown() -> bool:
    """True when ending the process with ``os._exit`` loses nothing: no HDF5 file is open for writing (HDF5
    holds a written file's metadata in memory until the file is closed). Everything else the engine's commands
    write is closed, and every commit synced, before they return."""
    h5py = sys.modules.get("h5py")
    if h5py is None:
        return True
    try:
        return all(f.get_intent() == h5py.h5f.ACC_RDONLY for f in h5py.h5f.get_obj_ids(types=h5py.h5f.OBJ_FILE))
    except Exception:                                # an h5py without these calls: take the normal exit
        return False


if __name__ == "__main__":
    if gc.isenabled():
        gc.disable()
        _GC_OFF_FOR_IMPORTS = True
    code = main()
    # Tearing the interpreter down (garbage-collecting the objects of numba, scipy, nibabel and h5py) took
    # 0.2-0.3 s after the work of a CHAOS preprocess here (1.70 -> 1.50 s for the whole command). The engine's
    # commands skip it; train, evaluate and demo exit normally (torch and its DataLoader workers clean up).
    if sys.argv[1:2] and sys.argv[1] in ENGINE_COMMANDS and can_skip_teardown():
        import os
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        except OSError:                              # a closed pipe (`| head`): nothing left to say anyway
            pass
        os._exit(code)
    sys.exit(code)
