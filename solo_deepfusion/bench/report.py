"""``solo-deepfusion bench-report``: tables and a plot from ``solo-deepfusion bench`` results.

Example::

    solo-deepfusion bench-report benchmarks/results.jsonl --out report.md --plot report.png

Host-free: the standard library, scipy and matplotlib, no solo-learn, so the
report can be made anywhere the JSON-lines files are. It reads one or more results files (the
last ``ok`` record of a cell wins; failed cells and damaged lines are listed, not used) and
writes a markdown report:

* **Results**: one row per cell (method x projector x ablation values, within one budget):
  mean ± sample standard deviation over seeds of each metric, the head's parameters and forward
  FLOPs at the training token count, time per epoch and peak memory.
* **Paired difference to the ``mlp`` head**: for each other head, ``Δ = head - mlp`` per seed,
  against the ``mlp`` run of the same method, seed, budget and ablation values (an axis that
  does not apply to the MLP, such as depth, matches any value), then the mean Δ and its 95%
  confidence interval over seeds, ``mean ± t(0.975, n-1) · sd / √n`` (Student t), and the
  paired t-test's p-value, Holm-adjusted across the heads compared with the same ``mlp`` cells
  (one family per metric, method and budget), so that several arms can be screened at once
  without inflating false positives.
* **Checks**: paired runs whose data order differed (``run.data_order_sha256``), cells without
  a baseline, failed cells.

``--plot`` draws the paired differences with their intervals (and each seed's Δ), one panel per
metric; with no pairs, the per-cell means ± std. The PNG is written atomically.
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import os
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import scipy.stats

from solo_deepfusion.atomic import write_text
from solo_deepfusion.bench import BASELINE
from solo_deepfusion.errors import UsageError, exit_status
from solo_deepfusion.fusion.plots import save_figure_atomic

AXES = ("batch_size", "temperature", "weight_decay", "depth")
METRIC_NAMES = {
    "feature_linear_acc1": "linear (features)",
    "online_linear_acc1": "online linear",
    "offline_linear_acc1": "offline linear",
    "uacc_train_bs_head": "unsup. acc (train B)",
    "backbone_1nn_acc": "backbone 1-NN",
    "fusion_ratio_last": "fusion ratio (last)",
    "collapse_min_entropy": "min attn entropy (nats)",
    "collapse_output_cosine": "output cosine",
    "collapse_output_rank": "output rank",
    "eval_output_cosine": "output cosine (test)",
    "eval_output_rank": "output rank (test)",
}
# Metrics that are not accuracies (shown as they are, not as percentages).
DIAGNOSTICS = frozenset(
    {
        "fusion_ratio_last",
        "collapse_min_entropy",
        "collapse_output_cosine",
        "collapse_output_rank",
        "eval_output_cosine",
        "eval_output_rank",
    }
)
PLOT_PREFERENCE = (
    "feature_linear_acc1",
    "offline_linear_acc1",
    "online_linear_acc1",
    "knn_k20_acc1",
    "uacc_train_bs_head",
)
MAX_PLOT_PANELS = 4

__all__ = [
    "CellKey",
    "Pair",
    "Results",
    "cell_rows",
    "chained_differences",
    "confidence_interval",
    "holm_adjust",
    "load_results",
    "main",
    "paired_differences",
    "paired_p_value",
    "render_markdown",
    "t_quantile",
    "write_plot",
]


# ---------------------------------------------------------------------------------------------
# Statistics


def t_quantile(df: int) -> float:
    """``t(0.975, df)``, the two-sided 95% quantile of Student's t."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    return float(scipy.stats.t.ppf(0.975, df))


def paired_p_value(deltas: Sequence[float]) -> float | None:
    """Two-sided p-value of the paired t-test ``mean Δ = 0``; ``None`` for n < 2 or no spread."""
    if len(deltas) < 2 or statistics.pstdev(deltas) == 0:
        return None
    return float(scipy.stats.ttest_1samp(deltas, 0.0).pvalue)


def holm_adjust(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjustment: family-wise error control for several comparisons."""
    order = sorted(range(len(p_values)), key=p_values.__getitem__)
    adjusted = [0.0] * len(p_values)
    running = 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(p_values) - rank) * p_values[index]))
        adjusted[index] = running
    return adjusted


def confidence_interval(values: Sequence[float]) -> tuple[float, float, float] | None:
    """``(mean, low, high)``: the 95% Student-t interval of the mean, ``None`` for n < 2."""
    n = len(values)
    if n < 2:
        return None
    mean = statistics.fmean(values)
    half = t_quantile(n - 1) * statistics.stdev(values) / math.sqrt(n)
    return mean, mean - half, mean + half


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class CellKey:
    """A cell without its seed: the unit that seeds are averaged over."""

    method: str
    projector: str
    ablation: tuple[tuple[str, Any], ...]
    budget: str  # hash of recipe, budget and evaluation settings

    def axis(self, name: str) -> Any:
        return dict(self.ablation).get(name)


def _budget_id(record: dict[str, Any]) -> str:
    parts = {k: record.get(k) for k in ("recipe", "recipe_sha256", "budget", "eval")}
    text = json.dumps(parts, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()[:8]


def cell_key(record: dict[str, Any]) -> CellKey:
    ablation = record.get("ablation") or {}
    return CellKey(
        method=record["method"],
        projector=record["projector"],
        ablation=tuple((axis, ablation.get(axis)) for axis in AXES),
        budget=_budget_id(record),
    )


@dataclass
class Results:
    """The usable records of results files, and what was left out."""

    records: list[dict[str, Any]] = field(default_factory=list)
    failed: list[dict[str, Any]] = field(default_factory=list)
    bad_lines: int = 0
    sources: list[str] = field(default_factory=list)

    def by_cell(self) -> dict[CellKey, dict[int, dict[str, Any]]]:
        """``cell -> seed -> record``, cells in first-seen order."""
        cells: dict[CellKey, dict[int, dict[str, Any]]] = {}
        for record in self.records:
            cells.setdefault(cell_key(record), {})[record["seed"]] = record
        return cells


def load_results(paths: Iterable[str | os.PathLike]) -> Results:
    """Records of the files: per cell id, the last ``ok`` one; failures without a later ``ok``."""
    out = Results()
    ok: dict[str, dict[str, Any]] = {}
    failed: dict[str, dict[str, Any]] = {}
    for path in paths:
        out.sources.append(str(path))
        for number, raw in enumerate(Path(path).read_bytes().splitlines(), start=1):
            if not raw.strip():
                continue
            try:  # a line that is not UTF-8 JSON (a torn write, another file) is a bad line
                record = json.loads(raw.decode("utf-8"))
                cell_id, status = record["cell_id"], record.get("status")
            except (ValueError, KeyError, TypeError):
                out.bad_lines += 1
                continue
            if status == "ok":
                check_metrics(record, f"{path} line {number}")
                ok.pop(cell_id, None)  # keep the file order of the latest record
                ok[cell_id] = record
            elif status == "failed":
                failed[cell_id] = record
    out.records = list(ok.values())
    out.failed = [r for cell_id, r in failed.items() if cell_id not in ok]
    return out


def check_metrics(record: dict[str, Any], where: str) -> None:
    """A :class:`UsageError` for a metric that would be shown wrong: not a number (a string
    would read as "not measured"), or an accuracy outside [0, 1] (250 would read as 25000%).
    ``None`` and NaN are "not measured"."""
    metrics = record.get("metrics") or {}
    if not isinstance(metrics, dict):
        raise UsageError(f"{where}: metrics is a {type(metrics).__name__}, not an object")
    for name, value in metrics.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise UsageError(f"{where}: metrics.{name}={value!r} is not a number")
        if _is_accuracy(name) and math.isfinite(value) and not 0 <= value <= 1:
            raise UsageError(
                f"{where}: metrics.{name}={value!r} is not an accuracy in [0, 1] "
                "(accuracies are stored as fractions)"
            )


# ---------------------------------------------------------------------------------------------
# Aggregation


def _numbers(records: Iterable[dict[str, Any]], section: str, name: str) -> list[float]:
    values = ((r.get(section) or {}).get(name) for r in records)
    return [float(v) for v in values if isinstance(v, int | float) and math.isfinite(v)]


def _measured(record: dict[str, Any]) -> list[str]:
    """The metric keys of a record that hold a finite number."""
    metrics = record.get("metrics") or {}
    return [k for k, v in metrics.items() if isinstance(v, int | float) and math.isfinite(v)]


def metric_names(results: Results, wanted: Sequence[str] | None = None) -> list[str]:
    """The metrics to show: ``wanted``, else every one present in a sensible order (the
    backbone-within-batch 1-NN references ``uacc_b*_backbone`` only with ``all``)."""
    present = {name for r in results.records for name in _measured(r)}
    if wanted and list(wanted) != ["all"]:
        absent = [m for m in wanted if m not in present]
        if absent:
            raise UsageError(
                f"--metrics {' '.join(absent)}: not measured in these results; "
                f"measured: {', '.join(sorted(present)) or 'none'}"
            )
        return list(wanted)

    def rank(name: str) -> tuple[int, int, str]:
        part = [*name.split("_"), ""][1]
        number = int("".join(c for c in part if c.isdigit()) or 0)
        linear = ("feature_linear_acc1", "offline_linear_acc1", "online_linear_acc1")
        if name in linear:
            return 0, linear.index(name), name
        if name.startswith("knn_k"):
            return 1, number, name
        if name == "uacc_train_bs_head":
            return 2, 0, name
        if name.startswith("uacc_b"):
            return 3 if name.endswith("_head") else 6, number, name
        if name == "backbone_1nn_acc":
            return 4, 0, name
        return 5, 0, name

    names = sorted(present, key=rank)
    if wanted != ["all"]:
        names = [n for n in names if not (n.startswith("uacc_b") and n.endswith("_backbone"))]
    return names


@dataclass
class Row:
    """One cell's aggregate over its seeds."""

    key: CellKey
    seeds: list[int]
    metrics: dict[str, tuple[float, float | None, int]]  # mean, std (n >= 2), n
    cost: dict[str, float | None]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def cell_rows(results: Results, metrics: Sequence[str]) -> list[Row]:
    """Mean ± std over seeds per cell, with the head's cost and the run's time and memory."""
    rows = []
    for key, by_seed in results.by_cell().items():
        records = list(by_seed.values())
        stats = {}
        for name in metrics:
            values = _numbers(records, "metrics", name)
            if values:
                std = statistics.stdev(values) if len(values) > 1 else None
                stats[name] = (statistics.fmean(values), std, len(values))
        gpu = _numbers(records, "cost", "peak_gpu_bytes")
        cost = {
            "head_params": _mean(_numbers(records, "cost", "head_params")),
            "head_flops": _mean(_numbers(records, "cost", "head_flops")),
            "head_tokens": _mean(_numbers(records, "cost", "head_tokens")),
            "time_per_epoch_s": _mean(_numbers(records, "cost", "time_per_epoch_s")),
            "peak_bytes": _mean(gpu or _numbers(records, "cost", "peak_rss_bytes")),
            "peak_kind": "GPU" if gpu else "RSS",
        }
        rows.append(Row(key, sorted(by_seed), stats, cost))
    return rows


@dataclass
class Pair:
    """Paired differences of one cell to its baseline, per metric."""

    key: CellKey
    baseline: CellKey
    deltas: dict[str, list[tuple[int, float]]]  # metric -> [(seed, Δ)]
    order_mismatches: list[int]  # seeds whose data order hashes differ
    order_compared: int
    init_mismatches: list[int] = field(default_factory=list)  # seeds: backbone init differs
    init_compared: int = 0
    p_holm: dict[str, float] = field(default_factory=dict)  # metric -> Holm-adjusted p-value


def _matches(base: CellKey, key: CellKey, baseline: str) -> bool:
    if base.projector != baseline or (base.method, base.budget) != (key.method, key.budget):
        return False
    return all(
        b is None or b == v for (_, b), (_, v) in zip(base.ablation, key.ablation, strict=True)
    )


def find_baseline(
    key: CellKey, keys: Iterable[CellKey], baseline: str = BASELINE
) -> CellKey | None:
    """The baseline cell of ``key``: most axes equal, the others not applying to the MLP."""
    candidates = [b for b in keys if _matches(b, key, baseline)]
    if not candidates:
        return None
    return max(candidates, key=lambda b: sum(v is not None for _, v in b.ablation))


def _hash_check(
    runs: dict[int, dict[str, Any]], base: dict[int, dict[str, Any]], seeds: list[int], name: str
) -> tuple[list[int], int]:
    """``(seeds whose run.<name> differs from the baseline's, pairs where both have it)``."""
    values = [((runs[s].get("run") or {}).get(name), (base[s].get("run") or {}).get(name))
              for s in seeds]  # fmt: skip
    compared = [(s, v) for s, v in zip(seeds, values, strict=True) if None not in v]
    return [s for s, (a, b) in compared if a != b], len(compared)


def _pair(cells: dict[CellKey, dict[int, dict[str, Any]]], key, base_key, metrics) -> Pair:
    """``key``'s per-seed Δ to ``base_key`` on the seeds both have."""
    by_seed, base = cells[key], cells[base_key]
    seeds = sorted(set(by_seed) & set(base))
    deltas: dict[str, list[tuple[int, float]]] = {}
    for name in metrics:
        for seed in seeds:
            a = _numbers([by_seed[seed]], "metrics", name)
            b = _numbers([base[seed]], "metrics", name)
            if a and b:
                deltas.setdefault(name, []).append((seed, a[0] - b[0]))
    order = _hash_check(by_seed, base, seeds, "data_order_sha256")
    init = _hash_check(by_seed, base, seeds, "backbone_init_sha256")
    return Pair(key, base_key, deltas, *order, *init)


def paired_differences(
    results: Results, metrics: Sequence[str], baseline: str = BASELINE
) -> tuple[list[Pair], list[CellKey]]:
    """``(pairs, cells without a baseline)`` for every non-baseline cell."""
    cells = results.by_cell()
    pairs, orphans = [], []
    for key in cells:
        if key.projector == baseline:
            continue
        base_key = find_baseline(key, cells, baseline)
        if base_key is None:
            orphans.append(key)
        else:
            pairs.append(_pair(cells, key, base_key, metrics))
    _holm_families(pairs, metrics)
    return pairs, orphans


def chained_differences(
    results: Results, metrics: Sequence[str], chain: Sequence[str]
) -> list[Pair]:
    """A decomposition: each head of ``chain`` (projector labels) paired with the one before
    it, per method, budget and ablation values; the links' Δs add up to the last head's Δ to
    the first. One Holm family per metric, method and budget, as for the baseline's pairs."""
    cells = results.by_cell()
    pairs = []
    for before, after in itertools.pairwise(chain):
        for key in cells:
            base_key = find_baseline(key, cells, before) if key.projector == after else None
            if base_key is not None:
                pairs.append(_pair(cells, key, base_key, metrics))
    _holm_families(pairs, metrics)
    return pairs


def _holm_families(pairs: list[Pair], metrics: Sequence[str]) -> None:
    """Fill ``Pair.p_holm``: one Holm family per metric, method and budget."""
    for name in metrics:
        families: dict[tuple[str, str], list[tuple[Pair, float]]] = {}
        for pair in pairs:
            p = paired_p_value([d for _, d in pair.deltas.get(name, [])])
            if p is not None:
                families.setdefault((pair.key.method, pair.key.budget), []).append((pair, p))
        for members in families.values():
            adjusted = holm_adjust([p for _, p in members])
            for (pair, _), value in zip(members, adjusted, strict=True):
                pair.p_holm[name] = value


# ---------------------------------------------------------------------------------------------
# Markdown


def _is_accuracy(name: str) -> bool:
    return name not in DIAGNOSTICS


def metric_title(name: str) -> str:
    if name in METRIC_NAMES:
        return METRIC_NAMES[name]
    if name.startswith("knn_k"):
        return f"k-NN k={name.removeprefix('knn_k').split('_')[0]}"
    if name.startswith("uacc_b"):
        size, _, kind = name.removeprefix("uacc_b").partition("_")
        return f"unsup. acc B={size}" + (" (backbone)" if kind == "backbone" else "")
    return name


def _scale(name: str) -> float:
    return 100.0 if _is_accuracy(name) else 1.0


def _fmt(value: float, name: str, digits: int, signed: bool = False) -> str:
    places = digits if _is_accuracy(name) else 3
    text = f"{value * _scale(name):{'+' if signed else ''}.{places}f}"
    return text.replace("-", "−")


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "–"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.2f}{prefix}{unit}"
    return f"{value:.0f}{unit}"


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _varying_axes(keys: Sequence[CellKey]) -> list[str]:
    return [a for a in AXES if len({k.axis(a) for k in keys}) > 1]


def _key_cells(key: CellKey, axes: Sequence[str], budgets: dict[str, str]) -> list[str]:
    cells = [key.method, f"`{key.projector}`"]
    cells += ["–" if key.axis(a) is None else f"{key.axis(a):g}" for a in axes]
    return [*cells, budgets[key.budget]] if len(budgets) > 1 else cells


def _results_table(
    rows: list[Row], metrics: Sequence[str], digits: int, axes, budgets
) -> list[str]:
    header = ["method", "projector", *axes, *(["budget"] if len(budgets) > 1 else []), "seeds"]
    header += [metric_title(m) for m in metrics]
    header += ["head params", "head FLOPs (T)", "time/epoch", "peak mem"]
    body = []
    for row in rows:
        cells = [*_key_cells(row.key, axes, budgets), str(len(row.seeds))]
        for name in metrics:
            if name not in row.metrics:
                cells.append("–")
                continue
            mean, std, _ = row.metrics[name]
            spread = (
                ""
                if std is None
                else f" ± {std * _scale(name):.{digits if _is_accuracy(name) else 3}f}"
            )
            cells.append(_fmt(mean, name, digits) + spread)
        c = row.cost
        tokens = "" if c["head_tokens"] is None else f" ({c['head_tokens']:.0f})"
        time_text = "–" if c["time_per_epoch_s"] is None else f"{c['time_per_epoch_s']:.1f} s"
        memory = "–" if c["peak_bytes"] is None else f"{_si(c['peak_bytes'], 'B')} {c['peak_kind']}"
        cells += [_si(c["head_params"]), _si(c["head_flops"]) + tokens, time_text, memory]
        body.append(cells)
    return _table(header, body)


def _delta_cell(
    deltas: list[tuple[int, float]], name: str, digits: int, p_holm: float | None
) -> str:
    if not deltas:
        return "–"
    values = [d for _, d in deltas]
    interval = confidence_interval(values)
    if interval is None:
        return f"{_fmt(values[0], name, digits, signed=True)} (n=1, no CI)"
    mean, low, high = interval
    return (
        f"{_fmt(mean, name, digits, signed=True)} "
        f"[{_fmt(low, name, digits, signed=True)}, {_fmt(high, name, digits, signed=True)}] "
        f"(n={len(values)}" + ("" if p_holm is None else f", p_Holm={p_holm:.2g}") + ")"
    )


def _pairs_table(
    pairs: list[Pair], metrics, digits: int, axes, budgets, chain: bool = False
) -> list[str]:
    header = ["method", "projector", *axes, *(["budget"] if len(budgets) > 1 else [])]
    if chain:
        header.insert(2, "minus")
    header += [f"Δ {metric_title(m)}" for m in metrics]
    body = [
        [
            *_key_cells(p.key, axes, budgets)[:2],
            *([f"`{p.baseline.projector}`"] if chain else []),
            *_key_cells(p.key, axes, budgets)[2:],
            *(_delta_cell(p.deltas.get(m, []), m, digits, p.p_holm.get(m)) for m in metrics),
        ]
        for p in pairs
    ]
    return _table(header, body)


def _constants(results: Results, axes: Sequence[str]) -> list[str]:
    """A line per setting every record shares."""
    first = results.records[0]
    lines = [f"- recipe `{first.get('recipe')}` (sha256 {str(first.get('recipe_sha256'))[:12]}…)"]
    for axis in AXES:
        if axis not in axes:
            values = {cell_key(r).axis(axis) for r in results.records} - {None}
            if values:
                lines.append(f"- {axis}: {', '.join(f'{v:g}' for v in sorted(values))}")
    budgets = {json.dumps(r.get("budget"), sort_keys=True) for r in results.records}
    if len(budgets) == 1:
        lines.append(f"- budget: `{budgets.pop()}`")
    devices = sorted({str((r.get("env") or {}).get("device")) for r in results.records})
    lines.append(f"- device(s): {', '.join(devices)}")
    return lines


def _checks(pairs: list[Pair], orphans: list[CellKey], results: Results) -> list[str]:
    compared = sum(p.order_compared for p in pairs)
    mismatched = [(p, s) for p in pairs for s in p.order_mismatches]
    lines = [
        f"- data order (hash of the sample indices seen): {compared} paired runs compared, "
        + ("all identical" if not mismatched else f"{len(mismatched)} DIFFER:")
    ]
    lines += [f"  - {p.key.method} `{p.key.projector}` seed {s}" for p, s in mismatched]
    compared = sum(p.init_compared for p in pairs)
    differ = [(p, s) for p in pairs for s in p.init_mismatches]
    if compared:
        lines.append(
            f"- backbone initialisation (hash of its weights before training): {compared} paired "
            "runs compared, "
            + ("all identical" if not differ else f"{len(differ)} DIFFER (not the same start):")
        )
        lines += [f"  - {p.key.method} `{p.key.projector}` seed {s}" for p, s in differ]
    if orphans:
        lines.append(f"- cells without an `{BASELINE}` baseline (no Δ): {len(orphans)}")
        lines += [f"  - {_label(k, AXES)}" for k in orphans]
    if results.failed:
        lines.append(f"- failed cells (not in the tables): {len(results.failed)}")
        for r in results.failed:
            error = str(r.get("error", "")).strip().splitlines()
            lines.append(
                f"  - `{r['cell_id']}` {r.get('method')} `{r.get('projector')}` seed "
                f"{r.get('seed')}: {error[0] if error else '?'}"
            )
    total = len(results.records)
    for name in metric_names(results, ["all"]):  # recorded as null: asked for, not measured
        missing = sum(
            name in (r.get("metrics") or {}) and name not in _measured(r) for r in results.records
        )
        if missing:
            lines.append(f"- {metric_title(name)}: not measured in {missing} of {total} runs")
    unmeasured = sorted(
        {k for r in results.records for k in (r.get("metrics") or {})}
        - {k for r in results.records for k in _measured(r)}
    )
    if unmeasured:
        names = ", ".join(metric_title(k) for k in unmeasured)
        lines.append(f"- not measured in any run (e.g. no validation, a set too small): {names}")
    if results.bad_lines:
        lines.append(f"- unreadable lines skipped: {results.bad_lines}")
    return lines


def render_markdown(
    results: Results,
    metrics: Sequence[str],
    *,
    digits: int = 1,
    baseline: str = BASELINE,
    plot: str | None = None,
    verdict: str | None = None,
    chain: Sequence[str] = (),
) -> str:
    """The report as markdown; ``verdict`` (markdown written by whoever ran the study) goes
    right under the title; ``chain``: projector labels whose links (each minus the one before)
    get a table of their own (:func:`chained_differences`)."""
    rows = cell_rows(results, metrics)
    pairs, orphans = paired_differences(results, metrics, baseline)
    keys = [row.key for row in rows]
    axes = _varying_axes(keys)
    paired = [m for m in metrics if any(p.deltas.get(m) for p in pairs)]
    budgets = budget_labels(keys)
    out = [
        "# Deep Fusion benchmark: transformer head vs feed-forward head",
        "",
        *([verdict.strip(), ""] if verdict else []),
        f"From {', '.join(f'`{s}`' for s in results.sources)}: {len(results.records)} runs in "
        f"{len(rows)} cells, {len(results.failed)} failed.",
        "",
        "Accuracies in %, mean ± sample std over seeds; the fusion ratio is a ratio (1 = no "
        f"class preference). Δ: the paired difference to the `{baseline}` head of the same "
        "method, seed, "
        "ablation values and budget, in percentage points, with its 95% confidence interval over "
        "seeds (Student t) and the paired t-test's p-value, Holm-adjusted across the heads "
        "compared on one method and budget (p_Holm). An interval that contains 0 shows no "
        "difference at this number of seeds.",
        "",
        "Shared by every run:",
        *_constants(results, axes),
        "",
        "## Results",
        "",
        *_results_table(rows, metrics, digits, axes, budgets),
        "",
        "Head params: the online head (tail included, momentum copy not counted). Head FLOPs: "
        "one forward pass over a training step's T tokens (large crops x batch), matmuls only. "
        "Time/epoch: mean over epochs after the first (data loading + steps; validation and "
        "checkpoints excluded). Peak memory: torch's peak allocation on the GPU, else the "
        "process's max RSS.",
        "",
        f"## Paired difference to `{baseline}`",
        "",
        *(_pairs_table(pairs, paired, digits, axes, budgets) if pairs else ["No pairs."]),
        "",
        *(_chain_section(results, metrics, chain, digits, axes, budgets) if chain else []),
        "## Checks",
        "",
        *_checks(pairs, orphans, results),
    ]
    if len(budgets) > 1:
        out += ["", "## Budgets", ""]
        for budget, label in budgets.items():
            record = next(r for r in results.records if cell_key(r).budget == budget)
            out.append(f"- {label}: `{json.dumps(record.get('budget'), sort_keys=True)}`")
    if plot:
        out += ["", f"![paired differences]({plot})"]
    return "\n".join(out) + "\n"


def _chain_section(results: Results, metrics, chain, digits: int, axes, budgets) -> list[str]:
    links = chained_differences(results, metrics, chain)
    paired = [m for m in metrics if any(p.deltas.get(m) for p in links)]
    return [
        "## Decomposition",
        "",
        "Each head minus the one before it in "
        + " → ".join(f"`{label}`" for label in chain)
        + ", paired by seed; the links add up to the last head's Δ to the first "
        "(on the seeds that every head has).",
        "",
        *(
            _pairs_table(links, paired, digits, axes, budgets, chain=True)
            if links
            else ["No pairs."]
        ),
        "",
    ]


# ---------------------------------------------------------------------------------------------
# Plot


def _label(key: CellKey, axes: Sequence[str], budgets: dict[str, str] | None = None) -> str:
    parts = [key.method, key.projector]
    parts += [f"{a}={key.axis(a):g}" for a in axes if key.axis(a) is not None]
    if budgets and len(budgets) > 1:
        parts.append(budgets[key.budget])
    return " · ".join(parts)


def budget_labels(keys: Iterable[CellKey]) -> dict[str, str]:
    """``budget hash -> B1, B2, ...`` in first-seen order."""
    return {b: f"B{i + 1}" for i, b in enumerate(dict.fromkeys(k.budget for k in keys))}


def _plot_metrics(metrics: Sequence[str], available: set[str]) -> list[str]:
    preferred = [m for m in PLOT_PREFERENCE if m in available]
    rest = [m for m in metrics if m in available and m not in preferred]
    return (preferred + rest)[:MAX_PLOT_PANELS]


def write_plot(
    results: Results,
    metrics: Sequence[str],
    path: str | os.PathLike,
    baseline: str = BASELINE,
) -> Path:
    """Paired Δ with 95% CIs (dots: seeds) per metric; or means ± std without pairs."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    pairs, _ = paired_differences(results, metrics, baseline)
    rows = cell_rows(results, metrics)
    axes_names = _varying_axes([r.key for r in rows])
    budgets = budget_labels(r.key for r in rows)
    if pairs:
        shown = _plot_metrics(metrics, {m for p in pairs for m in p.deltas})
        labels = [_label(p.key, axes_names, budgets) for p in pairs]
    else:
        shown = _plot_metrics(metrics, {m for r in rows for m in r.metrics})
        labels = [_label(r.key, axes_names, budgets) for r in rows]
    height = 1.2 + 0.35 * max(1, len(labels))
    fig = Figure(figsize=(4.2 * max(1, len(shown)), height), layout="constrained")
    FigureCanvasAgg(fig)
    panels = fig.subplots(1, max(1, len(shown)), sharey=True, squeeze=False)[0]
    for ax, name in zip(panels, shown, strict=False):
        scale = _scale(name)
        for y, item in enumerate(pairs or rows):
            if pairs:
                values = [d * scale for _, d in item.deltas.get(name, [])]
                ax.scatter(values, [y] * len(values), s=10, color="0.6", zorder=2)
                interval = confidence_interval(values)
                if interval is not None:
                    mean, low, high = interval
                    ax.errorbar(mean, y, xerr=[[mean - low], [high - mean]], fmt="o",
                                color="C0", capsize=3, zorder=3)  # fmt: skip
                elif values:
                    ax.plot(values[0], y, "o", color="C0", zorder=3)
            elif name in item.metrics:
                mean, std, _ = item.metrics[name]
                ax.errorbar(mean * scale, y, xerr=(std or 0) * scale, fmt="o", color="C0",
                            capsize=3)  # fmt: skip
        if pairs:
            ax.axvline(0, color="k", linewidth=0.8)
        unit = "pp" if _is_accuracy(name) and pairs else ("%" if _is_accuracy(name) else "")
        title = f"Δ {metric_title(name)} vs {baseline}" if pairs else metric_title(name)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(unit)
        ax.grid(axis="x", alpha=0.3)
    panels[0].set_yticks(range(len(labels)), labels, fontsize=8)
    panels[0].invert_yaxis()
    if not shown:
        panels[0].text(0.5, 0.5, "no metrics to plot", ha="center", transform=panels[0].transAxes)
    return save_figure_atomic(fig, path, dpi=110)


# ---------------------------------------------------------------------------------------------
# Command line


def _digits(text: str) -> int:
    """``--digits``: an integer from 0 to 10."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value <= 10:
        raise argparse.ArgumentTypeError(f"must be an integer from 0 to 10, got {text!r}")
    return value


def _check_output(option: str, path: Path | None) -> None:
    """A :class:`UsageError` unless ``path`` can be written as a file (not a folder, no file
    among its parents)."""
    if path is None:
        return
    if path.is_dir():
        raise UsageError(f"{option} {path} is a folder, not a file")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UsageError(f"{option} {path}: {parent} is a file, not a folder")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="solo-deepfusion bench-report",
        description="Markdown tables (mean ± std, paired Δ to mlp with 95% CI) and a plot.",
    )
    p.add_argument(
        "results", nargs="+", type=Path, help="JSON-lines files of solo-deepfusion bench"
    )
    p.add_argument("--out", type=Path, help="markdown file (default: print it)")
    p.add_argument("--plot", type=Path, help="PNG of the paired differences")
    p.add_argument(
        "--metrics", nargs="+", help="metric keys to show, or `all` (default: main ones)"
    )
    p.add_argument("--baseline", default=BASELINE, help="projector label of the baseline")
    p.add_argument(
        "--digits", type=_digits, default=1, help="decimals of accuracies in %% (0 to 10)"
    )
    p.add_argument("--verdict", type=Path, help="markdown put under the title (the conclusion)")
    p.add_argument(
        "--chain",
        nargs="+",
        default=[],
        metavar="LABEL",
        help="projector labels: a table of each one minus the one before it (a decomposition)",
    )
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """``solo-deepfusion bench-report``: 0, or 2 for missing files or no usable record."""
    try:
        args = parser().parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return 0 if exit_.code is None else int(exit_.code)
    return exit_status(lambda: write_report(args))


def write_report(args: argparse.Namespace) -> None:
    """The report (and plot) of parsed ``args``; missing input is a ``UsageError``."""
    missing = [str(p) for p in (*args.results, *filter(None, [args.verdict])) if not p.is_file()]
    if missing:
        raise UsageError(f"no such file: {', '.join(missing)}")
    _check_output("--out", args.out)
    _check_output("--plot", args.plot)
    results = load_results(args.results)
    if not results.records:
        unreadable = f" ({results.bad_lines} unreadable lines)" if results.bad_lines else ""
        raise UsageError(f"no finished (status ok) record in the results{unreadable}")
    projectors = sorted({r["projector"] for r in results.records})
    for option, label in (("--baseline", args.baseline), *(("--chain", c) for c in args.chain)):
        if label not in projectors:
            raise UsageError(
                f"{option} {label}: no cell has that projector; present: {', '.join(projectors)}"
            )
    if len(args.chain) == 1:
        raise UsageError("--chain needs at least two projector labels")
    metrics = metric_names(results, args.metrics)
    plot_ref = None
    if args.plot is not None:
        write_plot(results, metrics, args.plot, args.baseline)
        plot_ref = os.path.relpath(args.plot, args.out.parent) if args.out else str(args.plot)
    try:
        verdict = args.verdict.read_text(encoding="utf-8") if args.verdict else None
    except UnicodeDecodeError as err:
        raise UsageError(f"--verdict {args.verdict} is not UTF-8 text ({err.reason})") from err
    text = render_markdown(
        results,
        metrics,
        digits=args.digits,
        baseline=args.baseline,
        plot=plot_ref,
        verdict=verdict,
        chain=args.chain,
    )
    if args.out is None:
        print(text, end="")
    else:
        write_text(args.out, text)
        print(f"wrote {args.out}" + (f" and {args.plot}" if args.plot else ""))


if __name__ == "__main__":
    sys.exit(main())
