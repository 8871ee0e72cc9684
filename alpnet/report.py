"""Evaluation outputs: ``results.json``, ``results.md`` (the paper's Table I layout), overlay PNGs, and a merge
of several ``results.json`` into one table.

``python -m alpnet.report A/results.json B/results.json --labels SLIC Felzenszwalb --out table.md``
merges runs: results given the same label become one row (e.g. the kidney and the liver/spleen models of
setting 2, or one method evaluated fold by fold); the mean over scans is recomputed from the per-scan Dice.
With ``--average-repeats``, results of one label that score the same scans (trainings with other seeds) are
averaged per scan first.
Each row after the first is then compared with the first on the scans both scored (mean difference with a
bootstrap interval over scans, and how often each is higher).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from alpnet.protocol import summarise
from engine.figures import save_figure
from engine.runinfo import write_text_atomic

# Table I of the paper (method.md section 0): Abd-MRI (CHAOS T2-SPIR), 1-way 1-shot, setting 2, Dice in percent,
# mean of 5 folds. Printed beside our rows, always labelled as the paper's numbers.
PAPER_ROWS = [
    ("SE-Net", "yes", {"LK": 62.11, "RK": 61.32, "SPLEEN": 51.80, "LIVER": 27.43}, 50.66),
    ("vanilla PANet", "yes", {"LK": 53.45, "RK": 38.64, "SPLEEN": 50.90, "LIVER": 42.26}, 46.33),
    ("MeanShift-ALPNet", "no", {"LK": 50.03, "RK": 46.25, "SPLEEN": 56.44, "LIVER": 42.78}, 48.88),
    ("SSL-ALPNet (Felzenszwalb)", "no", {"LK": 73.63, "RK": 78.39, "SPLEEN": 67.02, "LIVER": 73.05}, 73.02),
    ("SLIC-ALPNet (the paper)", "no", {"LK": 82.53, "RK": 82.04, "SPLEEN": 80.61, "LIVER": 80.35}, 81.38),
]
CHAOS_ORDER = ["LK", "RK", "SPLEEN", "LIVER"]          # the column order of Table I
DISPLAY = {"LK": "LK", "RK": "RK", "SPLEEN": "Spleen", "LIVER": "Liver"}


class ReportError(ValueError):
    """A results file cannot be read or merged; one line naming the file and the problem."""


# --------------------------------------------------------------------------------------------- helpers
def jsonable(obj: Any) -> Any:
    """Plain JSON types: numpy scalars/arrays converted, NaN/Inf -> None, tuple keys joined."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


def _num(v: Any) -> float:
    return float("nan") if v is None else float(v)


def column_order(names: Sequence[str]) -> list[str]:
    """Table I order (LK, RK, Spleen, Liver) for the CHAOS organs, then any other class in given order."""
    names = list(dict.fromkeys(names))
    return [c for c in CHAOS_ORDER if c in names] + [c for c in names if c not in CHAOS_ORDER]


def _pct(v: float) -> str:
    """Dice in [0, 1] -> percent with 2 decimals; '–' for a missing value."""
    return "–" if v is None or not math.isfinite(v) else f"{100.0 * v:.2f}"


def per_scan_dice(results: Mapping) -> dict[str, dict[str, float]]:
    """``{organ: {"<fold>:<scan>": Dice}}`` of every scored (fold, scan) of one ``results.json``."""
    out: dict[str, dict[str, float]] = {}
    for f in results["folds"]:
        for organ, e in f["organs"].items():
            for sid, s in e["scans"].items():
                if "dice" in s:
                    out.setdefault(organ, {})[f"{f['fold']}:{sid}"] = _num(s["dice"])
    return out


def _folds_text(folds: Sequence[int], n_folds: int) -> str:
    folds = sorted(set(int(k) for k in folds))
    if len(folds) == n_folds:
        return f"all {n_folds}"
    return ", ".join(str(k) for k in folds)


# --------------------------------------------------------------------------------------------- tables
def _row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def table(rows: Sequence[dict], columns: Sequence[str], with_paper: bool) -> str:
    """Markdown table in Table I's layout.

    ``rows``: dicts with ``label``, ``source``, ``setting``, ``folds``, ``organs`` ({organ: Dice 0-1}),
    ``mean`` (0-1), ``partial`` (the mean covers only some columns).
    """
    head = ["method", "source", "setting", "folds"] + [DISPLAY.get(c, c) for c in columns] + ["Mean"]
    lines = [_row(head), _row(["---"] * 4 + ["---:"] * (len(columns) + 1))]
    if with_paper:
        for name, manual, organs, mean in PAPER_ROWS:
            lines.append(_row([name, f"paper, Table I (manual labels: {manual})", "2", "all 5"]
                              + [f"{organs[c]:.2f}" if c in organs else "–" for c in columns]
                              + [f"{mean:.2f}"]))
    for r in rows:
        mean = _pct(r["mean"]) + ("*" if r.get("partial") and math.isfinite(r["mean"]) else "")
        lines.append(_row([f"**{r['label']}**", r["source"], str(r["setting"] or "–"), r["folds"]]
                          + [_pct(r["organs"].get(c)) for c in columns] + [mean]))
    return "\n".join(lines)


def _pool(results_list: Sequence[Mapping], label: str, average_repeats: bool) -> tuple[dict, int]:
    """Per-scan Dice of results given one label: ``({organ: {"<fold>:<scan>": Dice}}, repeats)``.

    Without ``average_repeats`` an (organ, fold:scan) given twice is an error; with it, each is the mean over
    the results that scored it (repeated trainings, e.g. seeds), and every one must be scored equally often,
    so that no scan weighs more than another in the row's mean.
    """
    values: dict[str, dict[str, list[float]]] = {}
    for res in results_list:
        for organ, scans in per_scan_dice(res).items():
            dst = values.setdefault(organ, {})
            for key, d in scans.items():
                if key in dst and not average_repeats:
                    raise ReportError(f"{label}: organ {organ} of (fold:scan) {key} appears in two results given "
                                      "the same label (pass --average-repeats if they are repeated trainings)")
                dst.setdefault(key, []).append(d)
    counts = {len(v) for scans in values.values() for v in scans.values()}
    if len(counts) > 1:
        organ, key = next((o, k) for o, scans in values.items() for k, v in scans.items() if len(v) == min(counts))
        raise ReportError(f"{label}: uneven repeats: organ {organ} of (fold:scan) {key} is scored {min(counts)} "
                          f"times, others {max(counts)}")
    pooled = {organ: {key: float(np.mean(v)) for key, v in scans.items()} for organ, scans in values.items()}
    return pooled, max(counts, default=1)


def _row_of(results_list: Sequence[Mapping], label: str, source: str, average_repeats: bool = False) -> dict:
    """One table row from one or more results (same label): per-scan Dice pooled, then summarised."""
    pooled, repeats = _pool(results_list, label, average_repeats)
    folds: list[int] = []
    settings = set()
    for res in results_list:
        folds += list(res["folds_evaluated"])
        settings.add(res.get("setting"))
    all_cols = column_order([c for r in results_list for c in r["all_classes"]])
    evaluated = [c for c in all_cols if pooled.get(c)]
    s = summarise(pooled, evaluated)
    n_folds = int(results_list[0]["n_folds"])
    setting = "/".join(str(x) for x in sorted(settings, key=str)) if settings != {None} else None
    if repeats > 1:
        source += f", mean of {repeats} trainings per scan"
    return {"label": label, "source": source, "setting": setting, "folds": _folds_text(folds, n_folds),
            "organs": s["organs"], "mean": s["mean"], "partial": len(evaluated) < len(all_cols),
            "n_scans": s["n_scans"], "pooled": pooled}


def fold_mean(pooled: Mapping[str, Mapping[str, float]], classes: Sequence[str]) -> dict:
    """The paper's averaging (method.md 5.3): per organ the mean over folds of each fold's mean over its scans.

    The table's rows weigh every scan once (``summarise``); the two agree when every fold scores the same
    number of scans, and differ otherwise (unequal folds, an organ skipped in some scans).
    Returns ``{"organs": {organ: Dice or NaN}, "mean": mean over organs with a value}``.
    """
    organs = {}
    for c in classes:
        per_fold: dict[str, list[float]] = {}
        for key, d in pooled.get(c, {}).items():
            if d is not None and math.isfinite(d):
                per_fold.setdefault(key.split(":")[0], []).append(d)
        organs[c] = float(np.mean([np.mean(v) for v in per_fold.values()])) if per_fold else float("nan")
    finite = [v for v in organs.values() if math.isfinite(v)]
    return {"organs": organs, "mean": float(np.mean(finite)) if finite else float("nan")}


def _fold_mean_lines(rows: Sequence[dict], columns: Sequence[str]) -> list[str]:
    """A note for each row whose mean of fold means would print differently from its mean over scans."""
    lines = []
    for r in rows:
        fm = fold_mean(r["pooled"], columns)
        counts: dict[tuple[str, str], int] = {}
        for organ, scans in r["pooled"].items():
            for key, d in scans.items():
                if d is not None and math.isfinite(d):
                    fold = (organ, key.split(":")[0])
                    counts[fold] = counts.get(fold, 0) + 1
        same = all(_pct(fm["organs"][c]) == _pct(r["organs"].get(c)) for c in columns) \
            and _pct(fm["mean"]) == _pct(r["mean"])
        if same or len(set(counts.values())) < 2:
            continue
        organs = ", ".join(f"{DISPLAY.get(c, c)} {_pct(fm['organs'][c])}" for c in columns
                           if math.isfinite(fm["organs"][c]))
        lines.append(f"- {r['label']}: the mean of the fold means (the paper's averaging) is {_pct(fm['mean'])} "
                     f"({organs}); the table weighs each scan once, and its folds score "
                     f"{min(counts.values())} to {max(counts.values())} scans per organ")
    return lines


BOOTSTRAP_SAMPLES = 10_000


def paired_difference(a: Mapping[str, Mapping[str, float]], b: Mapping[str, Mapping[str, float]],
                      samples: int = BOOTSTRAP_SAMPLES, seed: int = 0) -> dict | None:
    """Dice of ``a`` minus Dice of ``b`` on the (organ, fold:scan) pairs both scored.

    Scans are the unit of the interval: the organs of one scan share its support, its acquisition and its
    preparation, so their differences are not independent. Each scan's difference is the mean over the organs
    both scored on it; the interval resamples scans (percentile bootstrap, ``samples`` draws, fixed ``seed``:
    the same files always give the same text). The scans of one fold also share a trained model (one per fold
    and method), so the interval does not cover the spread between trainings; the count of folds on each
    side is the coarser check of that.

    Parameters
    ----------
    a, b : mapping organ -> {"<fold>:<scan>": Dice in [0, 1]}
        Pooled per-scan Dice of two rows (``per_scan_dice``, pooled over their results).

    Returns
    -------
    dict or None
        ``pairs``, ``scans`` (counts), ``mean`` (mean over scans of the per-scan difference, in Dice points),
        ``ci95`` (low, high) in Dice points, ``higher`` / ``lower`` ((organ, scan) pairs where ``a`` is above /
        below ``b``), ``scans_higher`` / ``scans_lower``, ``folds`` and ``folds_higher`` / ``folds_lower``
        (each fold's difference: the mean of its scans'); None when the two share no finite pair.
    """
    per_scan: dict[str, list[float]] = {}
    pairs = higher = lower = 0
    for organ, scans in a.items():
        for key, da in scans.items():
            db = b.get(organ, {}).get(key)
            if db is None or not (math.isfinite(da) and math.isfinite(db)):
                continue
            per_scan.setdefault(key, []).append(100.0 * (da - db))
            pairs += 1
            higher += da > db
            lower += da < db
    if not per_scan:
        return None
    scan_mean = {key: float(np.mean(v)) for key, v in sorted(per_scan.items())}
    d = np.array(list(scan_mean.values()))
    per_fold: dict[str, list[float]] = {}
    for key, m in scan_mean.items():
        per_fold.setdefault(key.split(":")[0], []).append(m)
    f = np.array([np.mean(v) for v in per_fold.values()])
    rng = np.random.default_rng(seed)
    boot = d[rng.integers(0, d.size, size=(samples, d.size))].mean(axis=1)
    lo, hi = np.percentile(boot, [2.5, 97.5])
    return {"pairs": pairs, "scans": int(d.size),
            "mean": float(d.mean()), "ci95": (float(lo), float(hi)), "higher": higher, "lower": lower,
            "scans_higher": int((d > 0).sum()), "scans_lower": int((d < 0).sum()), "folds": int(f.size),
            "folds_higher": int((f > 0).sum()), "folds_lower": int((f < 0).sum())}


def _comparison_lines(rows: Sequence[dict]) -> list[str]:
    """A line per row after the first: its paired difference from the first row (``paired_difference``)."""
    lines = []
    ref = rows[0]
    for r in rows[1:]:
        c = paired_difference(r["pooled"], ref["pooled"])
        if c is None:
            lines.append(f"- {r['label']} and {ref['label']}: no (organ, scan) scored by both")
            continue
        lo, hi = c["ci95"]
        lines.append(f"- {r['label']} minus {ref['label']}: {c['mean']:+.2f} Dice points (95% bootstrap interval "
                     f"over {c['scans']} scans: {lo:+.2f} to {hi:+.2f}); higher on {c['higher']} and lower on "
                     f"{c['lower']} of {c['pairs']} (organ, scan) pairs, on {c['scans_higher']} and "
                     f"{c['scans_lower']} of the {c['scans']} scans, on {c['folds_higher']} and "
                     f"{c['folds_lower']} of the {c['folds']} folds")
    return lines


def _data_name(results: Mapping) -> str:
    """Short name of the evaluated data (folder name, or the phantom spec) for the table's source column."""
    data = str(results.get("data", "?"))
    return data if data.startswith("phantom") else (Path(data).name or data)


def _is_chaos(columns: Sequence[str]) -> bool:
    return set(CHAOS_ORDER) <= set(columns)


def results_table(results: Mapping) -> str:
    """The Dice table of one run (Table I layout, the paper's rows above ours when the classes are CHAOS's)."""
    columns = column_order(results["all_classes"])
    row = _row_of([results], results["label"], f"this run, data: {_data_name(results)}")
    notes = _fold_mean_lines([row], columns)
    return "\n".join([table([row], columns, with_paper=_is_chaos(columns))] + ([""] + notes if notes else []))


def merge_results(paths: Sequence[str | Path], labels: Sequence[str] | None = None,
                  average_repeats: bool = False) -> str:
    """Merge several ``results.json`` into one Markdown table (Table I layout).

    Parameters
    ----------
    paths : sequence of path
        ``results.json`` files written by ``evaluate``.
    labels : sequence of str, optional
        Row name for each path (default: each run's own label). Paths sharing a label are pooled into one
        row: their per-scan Dice values are combined (an (organ, fold, scan) given twice is an error), so the
        two label-group models of setting 2, or runs of single folds, make one row.
    average_repeats : bool
        Results of one label that score the same (organ, fold, scan) are repeated trainings (other seeds):
        each scan's Dice is their mean, for the table and the paired differences alike. Every scan must then be
        scored equally often.

    Returns
    -------
    str
        Markdown: the table, a line per row saying which files it came from, and with two rows or more each
        row's paired difference from the first (``paired_difference``).
    """
    if not paths:
        raise ReportError("no results.json given")
    if labels is not None and len(labels) != len(paths):
        raise ReportError(f"{len(paths)} results files but {len(labels)} labels: --labels names one row per file")
    loaded = [load_results(p) for p in paths]
    names = list(labels) if labels is not None else [r["label"] for r in loaded]
    groups: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        groups.setdefault(name, []).append(i)
    for name, idx in groups.items():
        _check_group(name, [(str(paths[i]), loaded[i]) for i in idx], average_repeats)
    rows = [_row_of([loaded[i] for i in idx], name,
                    "this project, data: " + ", ".join(dict.fromkeys(_data_name(loaded[i]) for i in idx)),
                    average_repeats)
            for name, idx in groups.items()]
    columns = column_order([c for r in loaded for c in r["all_classes"]])
    lines = [table(rows, columns, with_paper=_is_chaos(columns)), ""]
    if any(r["partial"] for r in rows):
        lines.append("\\* mean over the organs this row evaluates (a setting-2 model covers one label group).")
    lines += _fold_mean_lines(rows, columns)
    for name, idx in groups.items():
        lines.append(f"- {name}: " + "; ".join(_describe_run(loaded[i], str(paths[i])) for i in idx))
    if len(rows) > 1:
        lines += ["", f"Paired against the first row ({rows[0]['label']}), on the (organ, scan) pairs both scored:"]
        lines += _comparison_lines(rows)
    return "\n".join(lines) + "\n"


def _check_group(label: str, items: Sequence[tuple[str, Mapping]], average_repeats: bool) -> None:
    """Results pooled into one row must follow one protocol on one dataset, and repeats must be trainings.

    ``ReportError`` names the two files that disagree: a row mixing C, folds, classes or data would print a
    mean that no single evaluation defines; averaging a file with itself, with another evaluation of the same
    checkpoint, or with a support copy (which has no training to repeat) would shrink the spread seen.
    """
    first_path, first = items[0]
    seen = {Path(first_path).resolve()}
    for path, res in items[1:]:
        if Path(path).resolve() in seen:
            raise ReportError(f"{label}: {path} is given twice")
        seen.add(Path(path).resolve())
        for what, get in (("C (chunks)", lambda r: r.get("chunks")), ("n_folds", lambda r: r["n_folds"]),
                          ("classes", lambda r: sorted(r["all_classes"])), ("data", _data_name)):
            if get(res) != get(first):
                raise ReportError(f"{label}: {path} has {what} {get(res)} but {first_path} has {get(first)}: "
                                  "one row pools results of one protocol on one dataset")
    if not average_repeats:
        return                               # overlaps are refused by _pool
    scored = [(path, res, {(o, k) for o, scans in per_scan_dice(res).items() for k in scans}) for path, res in items]
    for i, (path_a, a, keys_a) in enumerate(scored):
        for path_b, b, keys_b in scored[i + 1:]:
            if not keys_a & keys_b:
                continue
            ck_a, ck_b = a.get("checkpoint"), b.get("checkpoint")
            if not ck_a or not ck_b:
                raise ReportError(f"{label}: {path_b if not ck_b else path_a} has no model (support copy): "
                                  "there is no training to repeat, so nothing to average")
            if ck_a.get("sha256") == ck_b.get("sha256"):
                raise ReportError(f"{label}: {path_a} and {path_b} score the same checkpoint (sha256 "
                                  f"{str(ck_a.get('sha256'))[:12]}): repeats must be separate trainings")


def _describe_run(res: Mapping, path: str) -> str:
    ck = res.get("checkpoint")
    what = "no model" if not ck else (f"checkpoint {Path(ck['path']).name} (sha256 {ck['sha256'][:12]}, "
                                      f"encoder {ck.get('encoder')}, trained for fold {ck.get('train_fold')})")
    return f"`{path}`: {what}, data {res['data']}, C = {res['chunks']}, folds {res['folds_evaluated']}"


def load_results(path: str | Path) -> dict:
    """Read one ``results.json``; ``ReportError`` (one line) for a missing, unreadable or foreign file."""
    path = Path(path)
    if path.is_dir():                        # an evaluate --out folder: its results.json
        if not (path / "results.json").is_file():
            raise ReportError(f"{path}: a folder without a results.json (name an evaluate output folder or "
                              f"its results.json)")
        path = path / "results.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ReportError(f"{path}: file not found") from None
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: not a readable JSON file ({exc})") from None
    missing = [k for k in ("folds", "all_classes", "label", "n_folds", "folds_evaluated") if k not in data]
    if missing:
        raise ReportError(f"{path}: not an evaluate results.json (missing {', '.join(missing)})")
    return data


# --------------------------------------------------------------------------------------------- one run
def markdown(results: Mapping) -> str:
    """``results.md``: the Table I layout, then per-fold and per-scan Dice, timings and notes."""
    columns = column_order(results["all_classes"])
    lines = [f"# Evaluation: {results['label']}", ""]
    ck = results.get("checkpoint")
    lines.append(f"- data: `{results['data']}`; folds evaluated: {results['folds_evaluated']} of "
                 f"{results['n_folds']}; C = {results['chunks']} chunks; setting: {results['setting'] or '–'}")
    if ck:
        meta = ck.get("meta") or {}
        lines.append(f"- checkpoint: `{ck['path']}` (sha256 `{ck['sha256']}`), encoder {ck.get('encoder')}, "
                     f"iteration {meta.get('iteration', '?')}, trained for fold {ck.get('train_fold')} "
                     f"(setting {ck.get('setting')}, label group {ck.get('label_group')}), "
                     f"device {ck.get('device')}")
    else:
        lines.append("- predictor: support copy (each query slice gets its chunk's support mask; no model)")
    t = results["timings"]
    lines.append(f"- wall time {t['total_s']:.1f} s ({t['query_slices']} query slices predicted, "
                 f"{t['query_s']:.1f} s; support {t['support_s']:.1f} s; loading {t['load_s']:.1f} s)")
    lines += ["", "## Dice (%), Table I layout", ""]
    if _is_chaos(columns):
        lines.append("The first rows are the paper's numbers (CHAOS T2-SPIR, setting 2, mean of 5 folds, "
                     "ResNet-101 with COCO weights, 100k iterations), copied from its Table I; the last row is "
                     f"this run on `{results['data']}` (folds {results['folds_evaluated']}): comparable only "
                     "when that is CHAOS T2 and the budget is the paper's.")
        lines.append("")
    lines.append(results_table(results))
    if any(c not in results["classes"] for c in columns):
        lines += ["", "\\* mean over the organs this run evaluates; '–' = not evaluated (setting 2: the "
                      "checkpoint's label group decides the organs)."]
    lines += ["", "## Per fold (mean Dice % over its query scans)", ""]
    lines.append(_row(["fold", "queries", "support"] + [DISPLAY.get(c, c) for c in columns] + ["Mean"]))
    lines.append(_row(["---"] * 3 + ["---:"] * (len(columns) + 1)))
    for f in results["folds"]:
        s = f["summary"]
        lines.append(_row([str(f["fold"]), ", ".join(f["queries"]), f["support"]]
                          + [_pct(_num(s["organs"].get(c))) for c in columns] + [_pct(_num(s["mean"]))]))
    lines += ["", "## Per scan (Dice %)", ""]
    lines.append(_row(["fold", "scan"] + [DISPLAY.get(c, c) for c in columns]))
    lines.append(_row(["---"] * 2 + ["---:"] * len(columns)))
    for f in results["folds"]:
        for sid in f["queries"]:
            cells = []
            for c in columns:
                s = f["organs"].get(c, {}).get("scans", {}).get(sid)
                cells.append("–" if not s else ("skip" if "skipped" in s else _pct(_num(s["dice"]))))
            lines.append(_row([str(f["fold"]), sid] + cells))
    lines += ["", "## Support slices (z in the support scan, one per chunk)", ""]
    for f in results["folds"]:
        for organ, e in f["organs"].items():
            what = (f"skipped: {e['skipped']}" if e["skipped"] else
                    f"extent z {e['support_extent'][0]}..{e['support_extent'][1]}, slices {e['support_slices']}")
            lines.append(f"- fold {f['fold']}, {DISPLAY.get(organ, organ)} (label {e['label']}), "
                         f"support scan {f['support']}: {what}")
    if results.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    return "\n".join(lines) + "\n"


def write_overlays(folder: Path, overlays: Mapping) -> list[Path]:
    """One PNG per (fold, organ, scan): a row per chunk with the support slice and its mask, the query
    slice, its ground truth and the prediction (middle scored slice of the chunk)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    groups: dict[tuple, list] = {}
    for (fold, organ, sid, chunk), v in overlays.items():
        groups.setdefault((fold, organ, sid), []).append((chunk, v))
    written = []
    for (fold, organ, sid), items in sorted(groups.items(), key=lambda kv: str(kv[0])):
        items.sort(key=lambda cv: cv[0])
        fig, axes = plt.subplots(len(items), 4, figsize=(8, 2.1 * len(items)), squeeze=False)
        for row, (chunk, v) in enumerate(items):
            panels = [(v["support_image"], v["support_mask"], f"support z={v['support_z']}"),
                      (v["image"], None, f"query {sid} z={v['z']} (chunk {chunk})"),
                      (v["image"], v["truth"], "ground truth"),
                      (v["image"], v["pred"], f"prediction (Dice {_pct(v['dice'])})")]
            for ax, (img, mask, title) in zip(axes[row], panels):
                ax.imshow(np.rot90(img), cmap="gray")
                if mask is not None and np.any(mask):
                    ax.imshow(np.ma.masked_where(~np.rot90(mask), np.rot90(mask).astype(float)),
                              cmap="autumn", alpha=0.5, vmin=0, vmax=1)
                ax.set_title(title, fontsize=7)
                ax.axis("off")
        fig.suptitle(f"fold {fold}, {DISPLAY.get(organ, organ)}, query scan {sid}", fontsize=9)
        written.append(save_figure(fig, folder / f"fold{fold}_{organ}_scan{sid}.png", dpi=72))
    return written


def write_report(out: Path, results: Mapping, overlays: Mapping) -> None:
    """Write ``results.json``, ``results.md`` and ``overlays/*.png`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    clean = jsonable(results)
    write_text_atomic(out / "results.json", json.dumps(clean, indent=1))
    write_text_atomic(out / "results.md", markdown(clean))
    write_overlays(out / "overlays", overlays)


# --------------------------------------------------------------------------------------------- CLI
def main(argv: Sequence[str] | None = None) -> int:
    """``python -m alpnet.report``: merge results files into one table (stdout or ``--out``)."""
    p = argparse.ArgumentParser(prog="python -m alpnet.report",
                                description="Merge several evaluate results.json into one Dice table "
                                            "(Table I layout).")
    p.add_argument("results", nargs="+", help="results.json files, or the evaluate output folders holding them")
    p.add_argument("--labels", nargs="+", help="row name per file (same name = one pooled row)")
    p.add_argument("--average-repeats", action="store_true",
                   help="results of one label that score the same scans are repeated trainings (seeds): "
                        "average each scan's Dice over them")
    p.add_argument("--out", help="write the Markdown table here (default: print it)")
    args = p.parse_args(argv)
    try:
        text = merge_results(args.results, args.labels, args.average_repeats)
    except ReportError as exc:
        print(f"report: {exc}", file=sys.stderr)
        return 2
    if args.out:
        try:
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            write_text_atomic(args.out, text)
        except OSError as exc:
            print(f"report: {args.out}: cannot write the table ({exc.strerror or exc})", file=sys.stderr)
            return 2
        print(f"wrote {args.out}")
    else:
        print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
