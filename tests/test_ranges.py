"""One table of parameter ranges (engine.ranges) behind both the config and the public functions."""
from __future__ import annotations

import numpy as np
import pytest

from engine import ranges
from alpnet.config import load as load_config
from engine.config import ConfigError
from engine.recipes import felzenszwalb_pseudolabels, meanshift_pseudolabels
from engine.superpixels import slic

IMG = np.random.default_rng(0).random((16, 16)).astype(np.float32) * 100
FG = np.ones((16, 16), bool)
CALLS = {
    "slic": lambda **kw: slic(IMG, **kw),
    "felzenszwalb": lambda **kw: felzenszwalb_pseudolabels(IMG, FG, **kw),
    "meanshift": lambda **kw: meanshift_pseudolabels(IMG, FG, **kw),
}
CASES = [(method, name, rng) for method, table in ranges.METHODS.items() for name, rng in table.items()]


def outside(rng: ranges.Range) -> list:
    """Values just outside ``rng``: its minimum when strict, one below otherwise, and above its maximum."""
    low = rng.minimum if rng.strict else rng.minimum - 1
    out = [int(low) if rng.integer else float(low)]
    if rng.maximum is not None:
        out.append(rng.maximum + 0.5)
    return out


@pytest.mark.parametrize("method,name,rng", CASES, ids=[f"{m}.{n}" for m, n, _ in CASES])
def test_config_and_function_refuse_the_same_values(method, name, rng):
    for bad in outside(rng):
        with pytest.raises(ConfigError, match=rf"^superpixels\.{method}\.{name}: must be {rng.text()}, got "):
            load_config(None, [f"superpixels.{method}.{name}={bad}"])
        with pytest.raises(ValueError, match=rf"{name} must be "):
            CALLS[method](**{name: bad})


@pytest.mark.parametrize("method,name,rng", CASES, ids=[f"{m}.{n}" for m, n, _ in CASES])
def test_the_bounds_themselves_follow_the_rule(method, name, rng):
    assert rng.holds(rng.minimum) is not rng.strict
    if rng.maximum is not None:
        assert rng.holds(rng.maximum)
    value = rng.minimum + 1
    load_config(None, [f"superpixels.{method}.{name}={value}"])          # accepted: no error


def test_range_words_and_kinds():
    assert ranges.Range(0, strict=True, maximum=1).text() == "> 0 and <= 1"
    assert ranges.Range(1, integer=True).text() == ">= 1"
    whole = ranges.Range(0, integer=True)
    assert whole.holds(3) and whole.holds(3.0) and not whole.holds(2.5) and not whole.holds(True)
    assert not ranges.Range(0).holds(float("nan")) and not ranges.Range(0).holds("1")
    with pytest.raises(ValueError, match=r"^felzenszwalb min_size must be an integer >= 0, got 2\.5$"):
        ranges.check("felzenszwalb", ranges.FELZENSZWALB, {"min_size": 2.5})
    ranges.check("slic", ranges.SLIC, {"search_radius": None})             # unset optional parameter passes


def test_meanshift_ratio_above_one_is_refused_by_the_function_as_by_the_config():
    with pytest.raises(ValueError, match=r"^meanshift ratio must be > 0 and <= 1, got 1\.5$"):
        meanshift_pseudolabels(IMG, FG, ratio=1.5)
