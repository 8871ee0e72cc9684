"""The valid range of every pseudo-label method parameter, in one table.

Two layers refuse a value out of range and both read this table, so they cannot drift apart: the config
(``engine.config``: the dotted key, before any work starts and before ``--overwrite`` discards a store) and
the public functions (``engine.superpixels.slic``, ``engine.recipes``: the function and the argument, for
callers that never see a config). Each layer words its own message around ``Range.text``. No imports beyond
the standard library: the config must load without numba.
"""
from __future__ import annotations

import dataclasses
import math
import numbers


def _number(x: float) -> str:
    """``0.5``, ``20``, and a large whole bound in full (a seed's 4294967295, which ``:g`` writes 4.29497e+09)."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


@dataclasses.dataclass(frozen=True)
class Range:
    """Values ``>= minimum`` (``> minimum`` when ``strict``), ``<= maximum`` when given, whole when ``integer``."""
    minimum: float
    strict: bool = False
    maximum: float | None = None
    integer: bool = False

    def text(self) -> str:
        """The bounds in words, e.g. ``> 0``, ``>= 1``, ``> 0 and <= 1``."""
        bound = f"{'>' if self.strict else '>='} {_number(self.minimum)}"
        return bound + (f" and <= {_number(self.maximum)}" if self.maximum is not None else "")

    def is_kind(self, value: object) -> bool:
        """Whether ``value`` is a finite real number, a whole one when ``integer`` (never a bool)."""
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(float(value)):
            return False
        return not self.integer or float(value) == int(value)

    def holds(self, value: object) -> bool:
        """Whether ``value`` is of the right kind (``is_kind``) and within the bounds."""
        if not self.is_kind(value):
            return False
        v = float(value)
        if v < self.minimum or (self.strict and v == self.minimum):
            return False
        return self.maximum is None or v <= self.maximum


SLIC = {
    "n_segments": Range(1, integer=True),
    "compactness": Range(0, strict=True),
    "max_num_iter": Range(1, integer=True),
    "sigma": Range(0),
    "min_size_factor": Range(0),
    "max_size_factor": Range(0, strict=True),
    "search_radius": Range(0, strict=True),
    "spread_iter": Range(0, integer=True),
}
FELZENSZWALB = {
    "scale": Range(0, strict=True),
    "sigma": Range(0),
    "min_size": Range(0, integer=True),
}
MEANSHIFT = {
    "kernel_size": Range(1),              # skimage's quickshift needs a kernel of at least one pixel
    "max_dist": Range(0, strict=True),
    "ratio": Range(0, strict=True, maximum=1),   # skimage: "between 0 and 1"
    "sigma": Range(0),
}
METHODS = {"slic": SLIC, "felzenszwalb": FELZENSZWALB, "meanshift": MEANSHIFT}


def violation(table: dict[str, Range], values: dict) -> tuple[str, Range, object] | None:
    """The first ``(name, range, value)`` whose value does not hold, or None; ``values`` maps names of
    ``table`` to values, and None (an optional parameter left unset) passes."""
    for name, value in values.items():
        rng = table[name]
        if value is not None and not rng.holds(value):
            return name, rng, value
    return None


def check(where: str, table: dict[str, Range], values: dict) -> None:
    """Raise ``ValueError("<where> <name> must be [an integer] <bounds>, got <value>")`` for the first value
    that does not hold (:func:`violation`)."""
    found = violation(table, values)
    if found is not None:
        name, rng, value = found
        kind = "an integer " if rng.integer else ""
        raise ValueError(f"{where} {name} must be {kind}{rng.text()}, got {value!r}")
