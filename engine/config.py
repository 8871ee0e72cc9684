"""Typed configuration: plain YAML mapped onto dataclasses.

Every section is a dataclass whose defaults are the paper's values (method.md). ``load_config`` reads an
optional YAML file, applies ``--set a.b=value`` overrides and validates everything against the dataclass
types; an unknown key or a wrong type is rejected with its dotted name before any work starts.
This module holds the machinery and the engine's sections; ``alpnet.config`` adds the trainer's sections.
"""
from __future__ import annotations

import copy
import dataclasses
import datetime
import difflib
import math
import re
import types
import typing
from pathlib import Path
from typing import Any, Union

import yaml

from engine import ranges


class ConfigError(ValueError):
    """A configuration key or value is invalid; the message names the dotted key."""


class _WrongType(ConfigError):
    """A value of the wrong kind for its key, keeping what the key takes so that a union can name the types
    of all its members in one message."""

    def __init__(self, key: str, expected: str, value: Any) -> None:
        super().__init__(f"{key}: expected {expected}, got {type(value).__name__} {value!r}")
        self.key, self.expected, self.got = key, expected, f"{type(value).__name__} {value!r}"

    def __reduce__(self):                     # pickles as the plain error it reads as
        return ConfigError, self.args


# --------------------------------------------------------------------------------------------- sections
@dataclasses.dataclass
class DataConfig:
    """Where volumes come from. ``input`` is a NIfTI folder/file, a raw CHAOS folder, or ``phantom``."""
    input: str = "phantom"
    phantom_volumes: int = 20
    phantom_seed: int = 0

    def __post_init__(self) -> None:
        if self.phantom_volumes < 1:
            raise ConfigError(f"data.phantom_volumes: must be >= 1, got {self.phantom_volumes}")
        if self.phantom_seed < 0:
            raise ConfigError(f"data.phantom_seed: must be >= 0, got {self.phantom_seed}")


ZSCORE_MODES = ("volume", "robust")


def check_ranges(section: str, obj: object, table: dict) -> None:
    """Refuse ``section.name`` values outside their ``engine.ranges.Range`` (the methods' tables are the ones
    the public functions check too); the loader has already checked the types."""
    found = ranges.violation(table, {name: getattr(obj, name) for name in table})
    if found is not None:
        name, rng, value = found
        raise ConfigError(f"{section}.{name}: must be {rng.text()}, got {value!r}")


@dataclasses.dataclass
class PrepareConfig:
    """Slice preparation (method.md 1.3-1.6)."""
    fg_threshold: float = 50.0 + 1e-4   # body mask: raw intensity > threshold (CHAOS-T2 setting)
    size: int = 256                      # in-plane size after centre crop / pad
    clip_percentile: float = 99.5        # raw CHAOS DICOM only: bright-tail clip before resampling
    target_spacing: list[float] = dataclasses.field(default_factory=lambda: [1.25, 1.25, 7.7])
    # "volume": (x - mean) / std over the whole volume (method.md 1.5, the reference). "robust": (x - median) /
    # (IQR / 1.349) over the body voxels (raw > fg_threshold), a scale that one large bright lesion barely
    # moves (CHAOS scan 36: README, Dice section); opt-in, not the paper's.
    zscore: str = "volume"

    def __post_init__(self) -> None:
        # NaN or an infinity passed the loader's float check and stopped preprocess with a traceback in its
        # warm-up ("no finite voxel"); any finite value, negative ones included, is a valid threshold
        if not math.isfinite(self.fg_threshold):
            raise ConfigError(f"prepare.fg_threshold: must be a finite number, got {self.fg_threshold!r}")
        if self.zscore not in ZSCORE_MODES:
            raise ConfigError(f"prepare.zscore: {self.zscore!r} is not one of {', '.join(ZSCORE_MODES)}")
        check_ranges("prepare", self, {"size": ranges.Range(1, integer=True),
                                       "clip_percentile": ranges.Range(0, strict=True, maximum=100)})
        if len(self.target_spacing) != 3 or not all(math.isfinite(s) and s > 0 for s in self.target_spacing):
            raise ConfigError(f"prepare.target_spacing: must be 3 numbers > 0 (mm), got {self.target_spacing!r}")


@dataclasses.dataclass
class SlicConfig:
    # 30 segments per slice (about 27 inside the body): the superpixel size of the SSL-ALPNet Felzenszwalb
    # recipe (median ~1340 px), which keeps ALPNet's local foreground prototypes alive in ~5% of episodes;
    # K=50 aligns better (BR 0.737 vs 0.693) but starves them (0.4%). benchmarks/superpixel_quality.py.
    n_segments: int = 30
    compactness: float = 0.1
    # Iterations, measured (organ slices, m=0.1, 2S x 2S windows): at K=50 boundary recall stops rising at 8
    # (0.723 at 5, 0.736 at 8, 0.737 at 10), but at K=30 the larger superpixels need more (159 slices: BR 0.667
    # at 8, 0.673 at 10, scikit-image maskSLIC 0.677; all 558: 0.693 at 10 vs maskSLIC 0.689), so the default
    # keeps scikit-image's 10.
    max_num_iter: int = 10
    sigma: float = 0.0
    min_size_factor: float = 0.5
    max_size_factor: float = 3.0
    mask: bool = True                    # maskSLIC: seeds and labels restricted to the body mask
    # Added with the numba SLIC (keyword-only options of engine.superpixels.slic; the paper gives none),
    # chosen by measurement on the same slices (benchmarks/kernels.py): a 2S x 2S search window with S the seed
    # spacing in the body (1.0; None would be scikit-image's 4S x 4S window of the full-image grid) segments as
    # well for ~60% of the work, and spending the iterations on SLIC itself instead of maskSLIC's colour-blind
    # seed-spreading pass (0; scikit-image runs max_num_iter of them) gives a higher boundary recall per unit
    # of time (0.737 vs 0.729 for 10 + 0 vs 5 + 5 iterations).
    search_radius: float = 1.0
    spread_iter: int = 0

    def __post_init__(self) -> None:
        # checked here too, so that a bad value stops a run before any work (and before --overwrite discards
        # a store)
        check_ranges("superpixels.slic", self, ranges.SLIC)


@dataclasses.dataclass
class FelzenszwalbConfig:
    scale: float = 1.0
    sigma: float = 1.0
    min_size: int = 400
    faithful: bool = False               # True: reproduce SSL-ALPNet's relabelling quirks (id gaps)

    def __post_init__(self) -> None:
        check_ranges("superpixels.felzenszwalb", self, ranges.FELZENSZWALB)


@dataclasses.dataclass
class MeanShiftConfig:
    kernel_size: float = 8.0
    max_dist: float = 40.0
    ratio: float = 0.5
    sigma: float = 1.0

    def __post_init__(self) -> None:
        check_ranges("superpixels.meanshift", self, ranges.MEANSHIFT)


@dataclasses.dataclass
class SuperpixelConfig:
    method: str = "slic"                 # slic | felzenszwalb | meanshift
    slic: SlicConfig = dataclasses.field(default_factory=SlicConfig)
    felzenszwalb: FelzenszwalbConfig = dataclasses.field(default_factory=FelzenszwalbConfig)
    meanshift: MeanShiftConfig = dataclasses.field(default_factory=MeanShiftConfig)

    def __post_init__(self) -> None:
        if self.method not in ("slic", "felzenszwalb", "meanshift"):
            raise ConfigError(f"superpixels.method: {self.method!r} is not one of slic, felzenszwalb, meanshift")


@dataclasses.dataclass
class EngineConfig:
    backend: str = "threads"             # threads | processes
    threads: int = 0                     # compute workers; 0 = all cores
    # slices per commit; 0 = 16 per worker, at least 128 (engine.pipeline.batch_size). A kill loses at most one
    # batch, and every batch costs its workers a fixed wait at the barrier (its last slices, the commit), whose
    # share grows with the workers: on 16 cores 128 beat 64 by 6-37%
    # (benchmarks/results/device-h200-2026-11-26b/scaling-16core-batch64-1349.json), and at 16 workers 256 beat
    # 128 by 18% (processes) and 3% (threads), with no gain at 6 (device-h200-2026-11-26d/call2-ab/summary.md)
    batch: int = 0
    queue_slices: int = 256              # bound of the work queue (slices in flight)
    out: str = "data/store.h5"
    # none | gzip-N | maps-gzip-N, encoded in the workers (engine.store_codec docstring: the measurements):
    # maps-gzip-1 = image raw float32, superpixels/fg/label deflate level 1
    compression: str = "maps-gzip-1"
    # volumes loaded ahead: read + prepared by the workers themselves, at most this many at a time (memory:
    # one prepared volume each); 0 = as many as workers, 2..8. At 16 workers 12 and 16 ran slower than 8 and
    # used 140-400 MB more (benchmarks/results/device-h200-2026-11-27-s28/README.md).
    readers: int = 0
    # threads backend: slices of one volume a worker takes at once and computes in one GIL-free call, while
    # the queue holds that many for every worker (engine.schedule.WorkQueue.get); 1 = one slice per call.
    # Each call ends in a wait for the GIL, which grows with the threads: on the 2-core VM, 8 threads waited
    # 3.3 ms per slice one at a time and 1.8 ms with runs of 4, and ran 5% faster (README, design notes)
    run_slices: int = 4

    def __post_init__(self) -> None:
        import re
        if self.backend not in ("threads", "processes"):
            raise ConfigError(f"engine.backend: {self.backend!r} is not one of threads, processes")
        for name in ("threads", "readers", "batch"):
            if getattr(self, name) < 0:
                raise ConfigError(f"engine.{name}: must be >= 0 (0: automatic), got {getattr(self, name)!r}")
        check_ranges("engine", self, {"queue_slices": ranges.Range(1, integer=True),
                                      "run_slices": ranges.Range(1, maximum=64, integer=True)})
        if not re.fullmatch(r"none|(maps-)?gzip-[1-9]", self.compression):
            raise ConfigError(f"engine.compression: {self.compression!r} is not one of none, gzip-1..9, "
                              f"maps-gzip-1..9")


# --------------------------------------------------------------------------------------------- machinery
def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check ``value`` against type hint ``tp`` (int promotes to float), recursing into containers."""
    origin = typing.get_origin(tp)
    if isinstance(value, _Override):
        value = value.raw if tp is str else value.value
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return from_dict(tp, _mapping(value, key), key)
    if origin in (Union, types.UnionType):
        return _coerce_union(value, typing.get_args(tp), key)
    if origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise _WrongType(key, "a list", value)
        (item_tp, *_) = typing.get_args(tp) or (Any,)
        return [_coerce(v, item_tp, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        ktp, vtp = typing.get_args(tp) or (Any, Any)
        return {_coerce(k, ktp, f"{key}"): _coerce(v, vtp, f"{key}.{k}") for k, v in _mapping(value, key).items()}
    if tp is float:
        return _coerce_float(value, key)
    if tp in _SCALARS:
        expected = _SCALARS[tp]
        # bool is an int in Python, but true/false is not an integer in a config
        if not isinstance(value, tp) or (tp is int and isinstance(value, bool)):
            raise _WrongType(key, expected, value)
        return value
    raise ConfigError(f"{key}: unsupported type {_type_name(tp)}")


_SCALARS = {int: "an integer", bool: "true/false", str: "a string"}


def _mapping(value: Any, key: str) -> dict:
    """``value`` when it is a mapping, else the config error naming ``key``."""
    if not isinstance(value, dict):
        raise _WrongType(key, "a mapping", value)
    return value


def _coerce_union(value: Any, args: tuple, key: str) -> Any:
    """``value`` as the first member type of the union that takes it; else one error naming every member type
    (``expected a string or an integer, got float 1.5``), or the first member's error when they differ in kind.
    """
    if isinstance(value, _Override):            # a union takes the value YAML read, as a file would give it
        value = value.value
    if value is None and type(None) in args:
        return None
    errors: list[ConfigError] = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(value, arg, key)
        except ConfigError as exc:
            errors.append(exc)
    # the first member's error alone read "evaluate.fold: expected a string, got float 1.5", though an integer
    # is what the key takes there
    if len(errors) > 1 and all(isinstance(e, _WrongType) and e.key == key for e in errors):
        raise ConfigError(f"{key}: expected {' or '.join(e.expected for e in errors)}, got {errors[0].got}")
    raise ConfigError(str(errors[0]) if errors else f"{key}: invalid value {value!r}")


def _coerce_float(value: Any, key: str) -> float:
    """A number (int or float, not bool) as a float."""
    if isinstance(value, str):
        # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as the number it spells
        try:
            return float(value)
        except ValueError:
            pass
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _WrongType(key, "a number", value)
    return float(value)


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass ``cls`` from a mapping; unknown keys and wrong types raise ``ConfigError``."""
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    dotted = (lambda k: f"{prefix}.{k}" if prefix else k)
    unknown = [k for k in data if k not in names]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), sorted(names), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{dotted(unknown[0])}: unknown key (allowed: {', '.join(sorted(names))}){hint}")
    kwargs = {k: _coerce(v, hints[k], dotted(k)) for k, v in data.items()}
    try:
        return cls(**kwargs)
    except ConfigError as exc:
        raise ConfigError(f"{prefix + ': ' if prefix and not str(exc).startswith(prefix) else ''}{exc}") from None


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config dataclass (for YAML dumps and checkpoints)."""
    return dataclasses.asdict(cfg)


def parse_override(text: str) -> tuple[list[str], Any]:
    """``"a.b=value"`` -> (["a", "b"], value parsed as YAML, so 3 -> int, true -> bool, [1,2] -> list)."""
    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE, e.g. train.iterations=200")
    key, raw = text.split("=", 1)
    parts = key.strip().split(".")
    if not all(parts):
        raise ConfigError(f"--set {text!r}: empty key component")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return parts, value


@dataclasses.dataclass(frozen=True, repr=False)
class _Override:
    """A ``--set`` value that YAML read as a number, a bool or a date, with the text typed: a key that takes a
    string gets the text (``--set train.out=123``, ``evaluate.label=no`` were refused as "expected a string,
    got int 123" / "bool False"), every other key the value read."""
    value: Any
    raw: str

    def __repr__(self) -> str:                  # error messages show what YAML read, as for a file
        return repr(self.value)


def _typed_override(text: str) -> tuple[list[str], Any]:
    parts, value = parse_override(text)
    if isinstance(value, (bool, int, float, datetime.date)):
        value = _Override(value, text.split("=", 1)[1].strip())
    return parts, value


def merge_override(data: dict, parts: list[str], value: Any) -> None:
    node = data
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"{'.'.join(parts[:i + 1])}: is a value, not a section")
        node = child
    node[parts[-1]] = value


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, second: int):
        super().__init__(f"key {key!r} is given twice (lines {first} and {second}): YAML would keep only the last")


class _UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping: a config with two ``train:`` sections
    would otherwise lose the whole first one."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict:
    lines: dict = {}
    for key_node, _ in node.value:
        if key_node.tag == "tag:yaml.org,2002:merge":     # ``<<: *base``: its keys may be overridden here
            continue
        key = loader.construct_object(key_node, deep=True)
        line = key_node.start_mark.line + 1
        try:
            hash(key)
        except TypeError:          # ``? [a, b]``: construct_mapping refuses it as a YAML error ("unhashable key")
            break
        if key in lines:
            raise _DuplicateKey(key, lines[key], line)
        lines[key] = line
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def _yaml_problem(exc: yaml.YAMLError) -> str:
    """``line L, column C: problem`` of a YAML error (its first line alone, e.g. "while parsing a flow
    sequence", names neither the problem nor where it is)."""
    problem = getattr(exc, "problem", None)
    mark = getattr(exc, "problem_mark", None)
    if problem and mark is not None:
        return f"line {mark.line + 1}, column {mark.column + 1}: {problem}"
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def load_config(cls: type, path: str | Path | None = None, overrides: list[str] | None = None) -> Any:
    """Load ``cls`` from an optional YAML file plus ``a.b=value`` overrides, validated."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if path.is_dir():
            raise ConfigError(f"{path}: a folder, not a config file")
        if not path.is_file():
            raise ConfigError(f"{path}: config file not found")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:      # a binary file (a checkpoint, a store) given as the config
            raise ConfigError(f"{path}: not a YAML text file (not UTF-8: byte {exc.start})") from None
        except OSError as exc:                 # unreadable (permissions): still the user's input, one line
            raise ConfigError(f"{path}: cannot read the config file ({exc.strerror or exc})") from None
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{path}: not valid YAML ({_yaml_problem(exc)})") from None
        except _DuplicateKey as exc:
            raise ConfigError(f"{path}: {exc}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping of sections")
    from_file = copy.deepcopy(data)
    for text in overrides or []:
        merge_override(data, *_typed_override(text))
    try:
        return from_dict(cls, data)
    except ConfigError as exc:
        # name the file when the file alone has the same fault (not when a --set brought it in)
        if path is None or _fault(cls, from_file) != str(exc):
            raise
        raise ConfigError(f"{path}: {exc}") from None


def _fault(cls: type, data: dict) -> str | None:
    """The message ``from_dict(cls, data)`` refuses ``data`` with, or None."""
    try:
        from_dict(cls, data)
    except ConfigError as exc:
        return str(exc)
    return None
