"""``exfm report RUN``: the tables and plots of a reproduction run, from ``RUN/results.json``.

The input is the runner's ``results.json`` (format ``exfm-reproduce/1``): ``rows`` of next-day
metrics, one per (study, variant, fm, vm, method, seed, eval_day, task, domain), and the
progressive ``curves`` of the main study. The output directory (default ``RUN/report``) gets
``report.md`` (tables, links to the PNGs), ``report.html`` (the same content, self-contained:
inline CSS, every image a ``data:image/png`` URI) and the PNGs, each file written atomically.

Aggregation, in every table: per seed the mean of the finite values over the eval days, then the
mean and the sample standard deviation (ddof 1; 0 for one seed) of those per-seed means across seeds.

NE gain of a row, in %: ``gain = (NE_none − NE) / NE_none · 100`` against the ``none`` row with the
same (fm, vm, seed, eval_day, task, domain) in the same study and variant, or failing that in study
``main`` with variant ``""`` (the sweep's baseline). It is computed row by row, then aggregated as
above; positive = better than the VM without an FM.

Verdict per (fm, vm, task): the methods ordered by mean NE, worst to best, and whether NE strictly
decreases along the paper's order none, kd, ah, ah_sa. A step between adjacent methods of that order
exceeds the seed spread when its gap in mean NE gain is larger than the larger of the two methods'
NE-gain standard deviations (the gain is paired with ``none`` per seed and day, so the spread does
not include the seed-to-seed variation shared by all methods).
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from exfm.data.dataset import atomic_write_bytes, atomic_write_text

__all__ = [
    "FORMAT",
    "METHODS",
    "Report",
    "Stat",
    "Step",
    "Verdict",
    "check_results",
    "load_results",
    "main_table",
    "main_table_text",
    "method_verdict",
    "summarize",
    "sweep_table",
    "variant_table",
    "with_ne_gain",
    "write_report",
]

FORMAT = "exfm-reproduce/1"
METHODS = ("none", "kd", "ah", "ah_sa")
"""The paper's order of the methods, worst to best."""
METRICS = ("auc", "logloss", "ne", "calibration")
SWEEP_PARAMS = ("gs", "ls", "lw")
ROW_KEYS = ("study", "variant", "fm", "vm", "method", "seed", "eval_day", "task", "domain")
PAIR_KEYS = ("fm", "vm", "seed", "eval_day", "task", "domain")
CURVE_KEYS = ("study", "fm", "vm", "method", "seed", "task", "points")
ALL = "all"  # the domain of the rows over all domains (exfm.train.metrics.ALL)
COLORS = {"none": "tab:gray", "kd": "tab:orange", "ah": "tab:blue", "ah_sa": "tab:green"}
_NAN = float("nan")


# --- input -----------------------------------------------------------------------------------------
def load_results(run: str | Path) -> dict:
    """Read and check ``RUN/results.json`` (:func:`check_results`); FileNotFoundError / ValueError if bad."""
    path = Path(run) / "results.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected the results of `exfm reproduce` (format {FORMAT})")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from exc
    return check_results(data, str(path))


def check_results(data: Any, source: str = "results") -> dict:
    """``data`` if it is a results object of format :data:`FORMAT`, else ValueError naming ``source``.

    Each row needs the keys of :data:`ROW_KEYS` (``seed`` and ``eval_day`` integers) and numbers or
    null for the metrics it has; each curve needs :data:`CURVE_KEYS`, its points ``examples`` and ``ne``.
    """
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        found = data.get("format") if isinstance(data, dict) else type(data).__name__
        raise ValueError(f'{source}: expected a JSON object with "format": "{FORMAT}", found {found!r}')
    if not isinstance(data.get("rows"), list):
        raise ValueError(f'{source}: expected "rows": a list of metric rows')
    if not isinstance(data.get("config", {}), dict) or not isinstance(data.get("curves", []), list):
        raise ValueError(f'{source}: expected "config" to be an object and "curves" a list')
    for i, row in enumerate(data["rows"]):
        where = f"{source}: rows[{i}]"
        _require(row, ROW_KEYS, where)
        for key in ("seed", "eval_day"):
            if not isinstance(row[key], int) or isinstance(row[key], bool):
                raise ValueError(f"{where}: {key} must be an integer, found {row[key]!r}")
        for key in (*METRICS, *SWEEP_PARAMS):
            value = row.get(key)
            if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
                raise ValueError(f"{where}: {key} must be a number or null, found {value!r}")
            if row["study"] == "sweep" and row["method"] != "none" and key in SWEEP_PARAMS and value is None:
                raise ValueError(f"{where}: a sweep row (other than its none baseline) needs the numbers gs, ls and lw")
    for i, curve in enumerate(data.get("curves", [])):
        where = f"{source}: curves[{i}]"
        _require(curve, CURVE_KEYS, where)
        if not isinstance(curve["points"], list):
            raise ValueError(f"{where}: points must be a list")
        for j, point in enumerate(curve["points"]):
            _require(point, ("examples", "ne"), f"{where}.points[{j}]")
    return data


def _require(item: Any, keys: Sequence[str], where: str) -> None:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: expected an object with keys {', '.join(keys)}")
    missing = [key for key in keys if key not in item]
    if missing:
        raise ValueError(f"{where}: lacks {', '.join(missing)} (expected keys {', '.join(keys)})")


def _value(item: dict, key: str) -> float:
    """``item[key]`` as a float; NaN for a missing key or null."""
    value = item.get(key)
    return _NAN if value is None else float(value)


# --- computations (plain data) ---------------------------------------------------------------------
@dataclass(frozen=True)
class Stat:
    """Mean and sample std (ddof 1; 0 for one seed) across seeds of the per-seed means; NaN without values."""

    mean: float
    std: float
    seeds: int  # the seeds with a finite value


def _stat(values: Iterable[float]) -> Stat:
    finite = np.asarray([v for v in values if math.isfinite(v)], dtype=np.float64)
    if finite.size == 0:
        return Stat(_NAN, _NAN, 0)
    return Stat(float(finite.mean()), float(finite.std(ddof=1)) if finite.size > 1 else 0.0, int(finite.size))


def _finite_mean(values: list[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else _NAN


def summarize(rows: Iterable[dict], keys: Sequence[str], metrics: Sequence[str]) -> dict[tuple, dict[str, Stat]]:
    """``{(row[k] for k in keys): {metric: Stat}}``, groups in first-seen order.

    Per group and seed the mean of the metric's finite values (the eval days when ``keys`` fix the
    rest), then :class:`Stat` across seeds.
    """
    groups: dict[tuple, dict[int, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for row in rows:
        groups[tuple(row[k] for k in keys)][row["seed"]].append(row)
    return {
        group: {
            m: _stat(_finite_mean([_value(r, m) for r in seed_rows]) for seed_rows in seeds.values()) for m in metrics
        }
        for group, seeds in groups.items()
    }


def with_ne_gain(rows: Iterable[dict]) -> list[dict]:
    """Copies of ``rows`` with ``ne_gain = (NE_none − NE) / NE_none · 100`` (NaN without a baseline).

    The baseline is the ``none`` row with the same (fm, vm, seed, eval_day, task, domain) in the same
    study and variant, or failing that in the same study with variant ``""`` (the sweep's baseline),
    or in study ``main``, variant ``""``.
    """
    rows = list(rows)
    baseline = {
        (row["study"], row["variant"], *(row[k] for k in PAIR_KEYS)): _value(row, "ne")
        for row in rows
        if row["method"] == "none"
    }
    out = []
    for row in rows:
        pair = tuple(row[k] for k in PAIR_KEYS)
        candidates = ((row["study"], row["variant"]), (row["study"], ""), ("main", ""))
        none = next((baseline[key] for c in candidates if (key := (*c, *pair)) in baseline), _NAN)
        gain = (none - _value(row, "ne")) / none * 100 if none > 0 else _NAN
        out.append({**row, "ne_gain": gain})
    return out


def _ordered(values: Iterable) -> list:
    return list(dict.fromkeys(values))


def _methods(rows: Iterable[dict]) -> list[str]:
    """The methods present: the paper's order first, then any other in first-seen order."""
    present = _ordered(row["method"] for row in rows)
    return [m for m in METHODS if m in present] + [m for m in present if m not in METHODS]


def _rows(results: dict, study: str, task: str | None = None, domain: str | None = ALL) -> list[dict]:
    """The rows of a study (with ``ne_gain``), optionally of one task and one domain."""
    return [
        row
        for row in with_ne_gain(results["rows"])
        if row["study"] == study and task in (None, row["task"]) and domain in (None, row["domain"])
    ]


def _tasks(results: dict, study: str) -> list[str]:
    return _ordered(row["task"] for row in results["rows"] if row["study"] == study)


@dataclass(frozen=True)
class Step:
    """Adjacent methods of the paper's order; ``gap`` = NE gain(later) − NE gain(earlier), in % points."""

    earlier: str
    later: str
    gap: float
    spread: float  # the larger of the two methods' NE-gain standard deviations across seeds

    @property
    def exceeds_spread(self) -> bool:
        return abs(self.gap) > self.spread


@dataclass(frozen=True)
class Verdict:
    """The observed ordering of the methods by mean NE against the paper's none < kd < ah < ah_sa."""

    ordering: tuple[tuple[str, float], ...]  # (method, mean NE), worst (highest NE) first
    matches_paper: bool  # NE strictly decreasing along the paper's order (of the methods present, ≥ 2)
    steps: tuple[Step, ...]
    seeds: int  # the fewest seeds behind a method's mean

    @property
    def beyond_spread(self) -> bool | None:
        """Whether every step exceeds the seed spread; None with fewer than 2 seeds or no NE gains."""
        if self.seeds < 2 or not self.steps or any(math.isnan(s.gap) for s in self.steps):
            return None
        return all(step.exceeds_spread for step in self.steps)

    @property
    def text(self) -> str:
        if len(self.ordering) < 2:
            return "fewer than two methods with an NE: nothing to compare."
        observed = self.ordering[0][0]
        for (_, worse), (method, better) in pairwise(self.ordering):
            observed += f" {'=' if worse == better else '<'} {method}"
        paper = " < ".join(m for m in METHODS if m in dict(self.ordering))
        match = "matches" if self.matches_paper else "differs from"
        if self.seeds < 2:
            spread = "one seed: no spread to compare"
        elif self.beyond_spread is None:
            spread = "no NE gain vs none: spread not compared"
        elif self.beyond_spread:
            spread = "every step exceeds the seed spread"
        else:
            within = [
                f"{s.earlier} → {s.later} ({s.gap:+.2f} vs ±{s.spread:.2f})" for s in self.steps if not s.exceeds_spread
            ]
            spread = "within the seed spread: " + ", ".join(within)
        return f"worst → best by mean NE: {observed}; {match} the paper's {paper}; {spread}."


def method_verdict(cells: dict[str, dict[str, Stat]]) -> Verdict:
    """The :class:`Verdict` of ``{method: {"ne": Stat, "ne_gain": Stat}}`` (one fm, vm and task)."""
    ne = {m: c["ne"] for m, c in cells.items() if not math.isnan(c["ne"].mean)}
    paper = [m for m in METHODS if m in ne]
    steps = tuple(
        Step(
            a,
            b,
            cells[b]["ne_gain"].mean - cells[a]["ne_gain"].mean,
            max(cells[a]["ne_gain"].std, cells[b]["ne_gain"].std),
        )
        for a, b in pairwise(paper)
    )
    return Verdict(
        ordering=tuple(sorted(((m, s.mean) for m, s in ne.items()), key=lambda item: -item[1])),
        matches_paper=len(paper) >= 2 and all(ne[a].mean > ne[b].mean for a, b in pairwise(paper)),
        steps=steps,
        seeds=min((s.seeds for s in ne.values()), default=0),
    )


def main_table(results: dict, task: str) -> dict:
    """Table 2/3 of one task (study ``main``, domain ``all``), as plain data.

    Returns ``{"task", "fms", "vms", "methods", "eval_days", "seeds", "cells", "verdicts"}``:
    ``cells[(fm, method, vm)]`` maps auc, logloss, ne, calibration and ne_gain to a :class:`Stat`;
    ``verdicts[(fm, vm)]`` is the :class:`Verdict` of that teacher and student.
    """
    rows = _rows(results, "main", task)
    fms, vms, methods = _ordered(r["fm"] for r in rows), _ordered(r["vm"] for r in rows), _methods(rows)
    cells = summarize(rows, ("fm", "method", "vm"), (*METRICS, "ne_gain"))
    verdicts = {
        (fm, vm): method_verdict({m: cells[(fm, m, vm)] for m in methods if (fm, m, vm) in cells})
        for fm in fms
        for vm in vms
        if any((fm, m, vm) in cells for m in methods)
    }
    return {
        "task": task,
        "fms": fms,
        "vms": vms,
        "methods": methods,
        "eval_days": sorted({r["eval_day"] for r in rows}),
        "seeds": sorted({r["seed"] for r in rows}),
        "cells": cells,
        "verdicts": verdicts,
    }


_VARIANT_FIELD = {"multi_domain": ("vm_domain", "domain"), "multi_task": ("vm_task", "task")}


def variant_table(results: dict, study: str, task: str | None = None) -> dict:
    """Table 4 (``multi_domain``) or 5 (``multi_task``): each variant's VM on its own domain / task.

    A ``multi_domain`` row counts when its variant is ``vm_domain=<its domain>`` (and its task is
    ``task``); a ``multi_task`` row when its variant is ``vm_task=<its task>`` and its domain ``all``.
    Returns ``{"columns": [domain or task], "rows": [(fm, vm, method)], "cells": {(fm, vm, method,
    column): {"auc": Stat, "ne_gain": Stat}}}``.
    """
    prefix, field = _VARIANT_FIELD[study]
    rows = [
        row
        for row in _rows(results, study, task, domain=None if field == "domain" else ALL)
        if row["variant"] == f"{prefix}={row[field]}"
    ]
    return {
        "columns": _ordered(r[field] for r in rows),
        "rows": [(fm, vm, m) for fm, vm in _ordered((r["fm"], r["vm"]) for r in rows) for m in _methods(rows)],
        "cells": summarize(rows, ("fm", "vm", "method", field), ("auc", "ne_gain")),
    }


def sweep_table(results: dict, task: str) -> dict[tuple, dict[str, Stat]]:
    """``{(fm, vm, gs, ls, lw): {"ne_gain", "auc", "ne": Stat}}`` of the ``sweep`` rows of one task (domain all),
    its ``none`` baseline rows left out."""
    rows = [r for r in _rows(results, "sweep", task) if r["method"] != "none"]
    return summarize(rows, ("fm", "vm", *SWEEP_PARAMS), ("ne_gain", "auc", "ne"))


# --- cells and the terminal table --------------------------------------------------------------------
def _gain_cell(method: str, stat: Stat, digits: int = 2) -> str:
    """The NE gain % cell: ``—`` for ``none`` (the baseline itself)."""
    return "—" if method == "none" else _cell(stat, digits, signed=True)


def _cell(stat: Stat, digits: int, signed: bool = False) -> str:
    """``mean ± std`` (``mean`` alone with one seed); ``n/a`` without a value."""
    if math.isnan(stat.mean):
        return "n/a"
    text = f"{stat.mean:{'+' if signed else ''}.{digits}f}"
    return f"{text} ± {stat.std:.{digits}f}" if stat.seeds >= 2 else text


_MAIN_COLUMNS = (("AUC", "auc", 4), ("LogLoss", "logloss", 4), ("NE gain %", "ne_gain", 2), ("calib", "calibration", 3))


def _main_table_grid(table: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows of a :func:`main_table`: teacher, method, then per student AUC / LogLoss / NE gain % / calib."""
    header = ["teacher", "method"] + [f"{vm} {label}" for vm in table["vms"] for label, _, _ in _MAIN_COLUMNS]
    rows = []
    for fm in table["fms"]:
        for method in table["methods"]:
            row = [fm, method]
            for vm in table["vms"]:
                cell = table["cells"].get((fm, method, vm))
                for _, metric, digits in _MAIN_COLUMNS:
                    if cell is None:
                        row.append("")
                    elif metric == "ne_gain":
                        row.append(_gain_cell(method, cell[metric], digits))
                    else:
                        row.append(_cell(cell[metric], digits))
            rows.append(row)
    return header, rows


def _main_table_caption(table: dict) -> str:
    days, seeds = table["eval_days"], table["seeds"]
    span = f"{days[0]}–{days[-1]}" if len(days) > 1 else f"{days[0]}"
    return (
        f"Task {table['task']}, domain all: mean over eval days {span}, then "
        f"{'mean ± std over' if len(seeds) > 1 else 'of'} {len(seeds)} seed{'s' * (len(seeds) > 1)}; "
        "NE gain % = (NE_none − NE) / NE_none · 100."
    )


def main_table_text(results: dict, task: str | None = None) -> str:
    """The Table-2-style table of study ``main`` (every task, or ``task``) as aligned text, with the verdicts."""
    tasks = _tasks(results, "main") if task is None else [task]
    blocks = []
    for name in tasks:
        table = main_table(results, name)
        if not table["fms"]:
            blocks.append(f"no rows of study main for task {name!r}")
            continue
        header, rows = _main_table_grid(table)
        widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
        lines = [_main_table_caption(table), ""]
        for i, row in enumerate([header, *rows]):
            cells = zip(row, widths, strict=True)
            lines.append("  ".join(c.ljust(w) if j < 2 else c.rjust(w) for j, (c, w) in enumerate(cells)))
            if i == 0:
                lines.append("  ".join("-" * w for w in widths))
        lines += ["", "verdicts:"]
        lines += [f"  {fm} -> {vm}: {v.text}" for (fm, vm), v in table["verdicts"].items() if v.ordering]
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks) if blocks else "no rows of study main in the results"


# --- plots -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Plot:
    name: str  # file name
    title: str
    png: bytes


Lines = dict[str, tuple[list[tuple[float, float]], dict]]  # label -> (points, matplotlib line style)


def _figure(panels: int, width: float = 5.0, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(max(width * panels, 7.5), height), layout="constrained")
    FigureCanvasAgg(figure)  # the Agg canvas: headless, no pyplot state
    return figure, figure.subplots(1, panels, squeeze=False)[0]


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100)
    return buffer.getvalue()


def _line_plot(title: str, panels: dict[str, Lines], xlabel: str, ylabel: str, zero: bool = False) -> bytes:
    """One line chart per panel (side by side), a legend each; ``zero`` draws y = 0; integer ticks for days."""
    from matplotlib.ticker import MaxNLocator

    figure, axes = _figure(len(panels))
    for ax, (panel, lines) in zip(axes, panels.items(), strict=True):
        for label, (points, style) in lines.items():
            xs, ys = zip(*sorted(points), strict=True)
            ax.plot(xs, ys, label=label, marker="o" if len(xs) <= 20 else None, **style)
        if zero:
            ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set(title=panel, xlabel=xlabel, ylabel=ylabel)
        if xlabel == "eval day":
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    figure.suptitle(title)
    return _png(figure)


def _heatmap(title: str, panels: dict[str, dict[tuple[float, float], float]], names: tuple[str, str]) -> bytes:
    """NE gain % over two parameters (x, y) per panel, annotated, one colour scale centred on 0."""
    figure, axes = _figure(len(panels), width=4.8, height=4.0)
    values = [v for grid in panels.values() for v in grid.values() if math.isfinite(v)]
    bound = max((abs(v) for v in values), default=1.0) or 1.0
    for ax, (panel, grid) in zip(axes, panels.items(), strict=True):
        xs, ys = sorted({x for x, _ in grid}), sorted({y for _, y in grid})
        image = np.array([[grid.get((x, y), _NAN) for x in xs] for y in ys])
        shown = ax.imshow(image, cmap="RdYlGn", vmin=-bound, vmax=bound, origin="lower", aspect="auto")
        for (row, col), value in np.ndenumerate(image):
            ax.text(col, row, "n/a" if math.isnan(value) else f"{value:+.2f}", ha="center", va="center", fontsize=9)
        ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
        ax.set_yticks(range(len(ys)), [f"{y:g}" for y in ys])
        ax.set(title=panel, xlabel=names[0], ylabel=names[1])
    figure.colorbar(shown, ax=list(axes), label="NE gain vs none (%)")
    figure.suptitle(title)
    return _png(figure)


def _slug(*parts: object) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "-", "_".join(str(p) for p in parts)).strip("-")


def _method_style(method: str, dashed: bool = False) -> dict:
    return {"color": COLORS.get(method), "linestyle": "--" if dashed else "-"}


def _by_fm_vm(rows: list[dict]) -> dict[tuple[str, str], list[dict]]:
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["fm"], row["vm"])].append(row)
    return groups


def _series(rows: list[dict], line: Callable[[str, str], str], metric: str) -> dict[str, dict[str, list]]:
    """``{task: {line(method, variant): [(eval_day, mean over seeds)]}}`` of ``metric``, lines in first-seen order."""
    panels: dict[str, dict[str, list]] = defaultdict(lambda: defaultdict(list))
    cells = summarize(rows, ("task", "method", "variant", "eval_day"), (metric,))
    for (task, method, variant, day), cell in cells.items():
        panels[task][line(method, variant)].append((day, cell[metric].mean))
    return panels


def _main_plots(results: dict) -> list[_Plot]:
    """Per (fm, vm): progressive NE over the stream (lowest seed), and next-day AUC per eval day."""
    plots = []
    curves: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for curve in results.get("curves", []):
        if curve["study"] == "main" and curve["points"]:
            curves[(curve["fm"], curve["vm"])].append(curve)
    for (fm, vm), group in curves.items():
        seed = min(c["seed"] for c in group)
        panels: dict[str, Lines] = defaultdict(dict)
        for curve in sorted((c for c in group if c["seed"] == seed), key=lambda c: _rank(c["method"])):
            points = [(p["examples"], _value(p, "ne")) for p in curve["points"]]
            panels[f"task {curve['task']}"][curve["method"]] = (points, _method_style(curve["method"]))
        title = f"Progressive NE over the stream: FM {fm} → VM {vm} (seed {seed})"
        plots.append(
            _Plot(
                _slug("progressive_ne", fm, vm) + ".png",
                title,
                _line_plot(title, panels, "examples", "cumulative NE (progressive)"),
            )
        )
    for (fm, vm), rows in _by_fm_vm(_rows(results, "main")).items():
        rows.sort(key=lambda r: _rank(r["method"]))
        series = _series(rows, lambda method, _: method, "auc")
        panels = {f"task {t}": {m: (pts, _method_style(m)) for m, pts in lines.items()} for t, lines in series.items()}
        title = f"Next-day AUC per eval day: FM {fm} → VM {vm} (mean over seeds)"
        plots.append(_Plot(_slug("auc_per_day", fm, vm) + ".png", title, _line_plot(title, panels, "eval day", "AUC")))
    return plots


def _rank(method: str) -> int:
    return METHODS.index(method) if method in METHODS else len(METHODS)


def _freshness_plots(results: dict) -> list[_Plot]:
    """Per (fm, vm): NE gain vs none per eval day, one line per method × FM updates (Figure 9)."""
    plots = []
    rows = [r for r in _rows(results, "freshness") if r["method"] != "none"]
    for (fm, vm), group in _by_fm_vm(rows).items():
        group.sort(key=lambda r: (_rank(r["method"]), r["variant"]))
        series = _series(group, lambda method, variant: f"{method} ({variant.partition('=')[2]})", "ne_gain")
        panels = {
            f"task {task}": {
                label: (pts, _method_style(label.split()[0], dashed="frozen" in label)) for label, pts in lines.items()
            }
            for task, lines in series.items()
        }
        title = f"Freshness: FM {fm} updated daily vs frozen → VM {vm}"
        plots.append(
            _Plot(
                _slug("freshness", fm, vm) + ".png",
                title,
                _line_plot(title, panels, "eval day", "NE gain vs none (%)", zero=True),
            )
        )
    return plots


def _staleness_plots(results: dict) -> list[_Plot]:
    """Per FM: its own next-day NE per eval day, trained daily vs stopped (Figure 2)."""
    plots = []
    for (fm, _), rows in _by_fm_vm(_rows(results, "staleness")).items():
        series = _series(sorted(rows, key=lambda r: r["variant"]), lambda _, variant: variant.partition("=")[2], "ne")
        panels = {f"task {t}": {v: (pts, {}) for v, pts in lines.items()} for t, lines in series.items()}
        title = f"FM staleness: {fm} trained daily vs stopped"
        png = _line_plot(title, panels, "eval day", "NE of the FM")
        plots.append(_Plot(_slug("staleness", fm) + ".png", title, png))
    return plots


def _sweep_plots(results: dict) -> list[_Plot]:
    """Per (fm, vm, task): NE gain over the varied parameters among gs, ls, lw (Figure 12).

    One varied parameter: a line; two: a heatmap; three: a heatmap of the first two per value of the third.
    """
    plots = []
    for task in _tasks(results, "sweep"):
        table = sweep_table(results, task)
        for fm, vm in _ordered(key[:2] for key in table):
            grid = {key[2:]: cell["ne_gain"].mean for key, cell in table.items() if key[:2] == (fm, vm)}
            varied = [i for i in range(3) if len({params[i] for params in grid}) > 1]
            title = f"Sweep: NE gain vs none (%), FM {fm} → VM {vm}, task {task}"
            name = _slug("sweep", fm, vm, task) + ".png"
            if len(varied) == 1:
                (i,) = varied
                points = [(params[i], gain) for params, gain in grid.items()]
                png = _line_plot(
                    title,
                    {f"task {task}": {"ah": (points, _method_style("ah"))}},
                    SWEEP_PARAMS[i],
                    "NE gain vs none (%)",
                    zero=True,
                )
            elif len(varied) >= 2:
                x, y, *rest = varied
                panels: dict[str, dict] = defaultdict(dict)
                for params, gain in grid.items():
                    panel = f"{SWEEP_PARAMS[rest[0]]} = {params[rest[0]]:g}" if rest else f"task {task}"
                    panels[panel][(params[x], params[y])] = gain
                png = _heatmap(title, dict(sorted(panels.items())), (SWEEP_PARAMS[x], SWEEP_PARAMS[y]))
            else:
                continue
            plots.append(_Plot(name, title, png))
    return plots


# --- the document ------------------------------------------------------------------------------------
# Blocks: ("h1" | "h2" | "h3" | "p", text), ("list", [items]), ("table", header, rows), ("image", _Plot).
Block = tuple


def _header_blocks(results: dict, run: Path) -> list[Block]:
    rows, config = results["rows"], results.get("config", {})
    seeds = sorted({r["seed"] for r in rows})
    datasets = _ordered(r["dataset"] for r in rows if "dataset" in r)
    dataset = config.get("dataset") or ", ".join(map(str, datasets)) or "unknown"
    studies = _ordered(r["study"] for r in rows)
    settings = [f"{key}: {_shorten(json.dumps(value))}" for key, value in config.items()]
    return [
        ("h1", "ExFM reproduction report"),
        (
            "p",
            f"Run {run}; dataset {dataset}; {len(seeds)} seed{'s' * (len(seeds) != 1)} "
            f"({', '.join(map(str, seeds))}); studies: {', '.join(studies) or 'none'}; {len(rows):,} rows.",
        ),
        ("list", settings or ["(no config recorded)"]),
        (
            "p",
            "Every value: per seed the mean over the eval days, then the mean ± sample std across seeds (the mean "
            "alone with one seed). NE gain % = (NE_none − NE) / NE_none · 100 against the none row of the same "
            "fm, vm, seed, eval day, task and domain (in the same study and variant, else in the same study, else in "
            "study main), per row "
            "before averaging; positive = better than the VM without an FM.",
        ),
    ]


def _shorten(text: str, limit: int = 160) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _main_blocks(results: dict, plots: list[_Plot]) -> list[Block]:
    blocks: list[Block] = [("h2", "Main results (Tables 2 and 3)")]
    for task in _tasks(results, "main"):
        table = main_table(results, task)
        blocks += [("h3", f"Task {task}"), ("p", _main_table_caption(table)), ("table", *_main_table_grid(table))]
        verdicts = [f"{fm} → {vm}: {v.text}" for (fm, vm), v in table["verdicts"].items() if v.ordering]
        blocks += [
            ("p", f"Verdicts, task {task} (paper: none < kd < ah < ah_sa, i.e. NE strictly decreasing):"),
            ("list", verdicts),
        ]
    if plots:
        blocks += [("h3", "Plots"), *(("image", plot) for plot in plots)]
    return blocks


def _variant_blocks(results: dict, study: str, title: str, label: str) -> list[Block]:
    blocks: list[Block] = [("h2", title)]
    for task in _tasks(results, study) if study == "multi_domain" else [None]:
        table = variant_table(results, study, task)
        header = ["teacher", "student", "method"] + [f"{c} {m}" for c in table["columns"] for m in ("AUC", "NE gain %")]
        rows = []
        for fm, vm, method in table["rows"]:
            row = [fm, vm, method]
            for column in table["columns"]:
                cell = table["cells"].get((fm, vm, method, column))
                row += ["", ""] if cell is None else [_cell(cell["auc"], 4), _gain_cell(method, cell["ne_gain"])]
            rows.append(row)
        caption = f"One VM per {label} (its own {label}'s rows)" + (f", task {task}" if task else "") + "."
        blocks += [("p", caption), ("table", header, rows)]
    return blocks


def _freshness_blocks(results: dict, plots: list[_Plot]) -> list[Block]:
    blocks: list[Block] = [("h2", "FM freshness (Figure 9)")]
    for task in _tasks(results, "freshness"):
        rows = _rows(results, "freshness", task)
        rows.sort(key=lambda r: (r["variant"], _rank(r["method"])))
        cells = summarize(rows, ("fm", "vm", "variant", "method"), ("auc", "ne", "ne_gain"))
        grid = [
            [
                fm,
                vm,
                variant.partition("=")[2],
                method,
                _cell(c["auc"], 4),
                _cell(c["ne"], 4),
                _gain_cell(method, c["ne_gain"]),
            ]
            for (fm, vm, variant, method), c in cells.items()
        ]
        blocks += [
            ("p", f"Task {task}: the FM updated daily or frozen after day 4; NE gain vs none of the same FM updates."),
            ("table", ["teacher", "student", "FM updates", "method", "AUC", "NE", "NE gain %"], grid),
        ]
    return blocks + [("image", plot) for plot in plots]


def _staleness_blocks(results: dict, plots: list[_Plot]) -> list[Block]:
    rows = _rows(results, "staleness")
    days = sorted({r["eval_day"] for r in rows})
    cells = summarize(rows, ("fm", "task", "variant", "eval_day"), ("ne",))
    grid = []
    for fm, task, variant in _ordered(key[:3] for key in cells):
        grid.append(
            [fm, task, variant.partition("=")[2]]
            + [_cell(cells[(fm, task, variant, d)]["ne"], 4) if (fm, task, variant, d) in cells else "" for d in days]
        )
    return [
        ("h2", "FM staleness (Figure 2)"),
        ("p", "The FM's own next-day NE: trained through the day before each eval day (daily) or stopped after day 4."),
        ("table", ["FM", "task", "training", *(f"day {d} NE" for d in days)], grid),
        *(("image", plot) for plot in plots),
    ]


def _sweep_blocks(results: dict, plots: list[_Plot]) -> list[Block]:
    blocks: list[Block] = [("h2", "AH hyper-parameter sweep (Figure 12)")]
    for task in _tasks(results, "sweep"):
        grid = [
            [fm, vm, f"{gs:g}", f"{ls:g}", f"{lw:g}", _cell(c["ne_gain"], 2, signed=True), _cell(c["auc"], 4)]
            for (fm, vm, gs, ls, lw), c in sweep_table(results, task).items()
        ]
        blocks += [
            (
                "p",
                f"Task {task}: method ah with gradient scale gs, label scale ls and loss weight lw; NE gain vs the "
                "sweep's none rows (else those of study main).",
            ),
            ("table", ["teacher", "student", "gs", "ls", "lw", "NE gain %", "AUC"], grid),
        ]
    return blocks + [("image", plot) for plot in plots]


def _blocks(results: dict, run: Path) -> list[Block]:
    studies = {row["study"] for row in results["rows"]}
    blocks = _header_blocks(results, run)
    if "main" in studies or results.get("curves"):
        blocks += _main_blocks(results, _main_plots(results))
    if "multi_domain" in studies:
        blocks += _variant_blocks(results, "multi_domain", "Multi-domain (Table 4)", "domain")
    if "multi_task" in studies:
        blocks += _variant_blocks(results, "multi_task", "Multi-task (Table 5)", "task")
    if "freshness" in studies:
        blocks += _freshness_blocks(results, _freshness_plots(results))
    if "staleness" in studies:
        blocks += _staleness_blocks(results, _staleness_plots(results))
    if "sweep" in studies:
        blocks += _sweep_blocks(results, _sweep_plots(results))
    return blocks


def _markdown(blocks: list[Block]) -> str:
    def cells(row: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |"

    parts = []
    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3"):
            parts.append("#" * int(kind[1]) + " " + content[0])
        elif kind == "p":
            parts.append(content[0])
        elif kind == "list":
            parts.append("\n".join(f"- {item}" for item in content[0]))
        elif kind == "table":
            header, rows = content
            parts.append("\n".join([cells(header), cells(["---"] * len(header)), *(cells(r) for r in rows)]))
        else:
            plot = content[0]
            parts.append(f"![{plot.title}]({plot.name})")
    return "\n\n".join(parts) + "\n"


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1200px;
       padding: 0 1em; color: #222; line-height: 1.45; }
h1, h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; }
.scroll { overflow-x: auto; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; white-space: nowrap; }
th { background: #f2f4f7; text-align: center; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.label { text-align: left; }
tbody tr:nth-child(even) { background: #fafbfc; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #555; }
"""


def _html(blocks: list[Block], pngs: dict[str, bytes]) -> str:
    esc = html.escape
    body = []
    numeric = re.compile(r"^([+\-]?\d|n/a$|—$)")

    def cell(text: str) -> str:
        return f'<td class="{"num" if numeric.match(text) else "label"}">{esc(text)}</td>'

    for kind, *content in blocks:
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{esc(content[0])}</{kind}>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{esc(item)}</li>" for item in content[0]) + "</ul>")
        elif kind == "table":
            header, rows = content
            head = "".join(f"<th>{esc(c)}</th>" for c in header)
            rows_html = "".join("<tr>" + "".join(cell(c) for c in row) + "</tr>" for row in rows)
            body.append(
                f'<div class="scroll"><table><thead><tr>{head}</tr></thead><tbody>{rows_html}</tbody></table></div>'
            )
        else:
            plot = content[0]
            data = base64.b64encode(pngs[plot.name]).decode("ascii")
            body.append(
                f'<figure><img src="data:image/png;base64,{data}" alt="{esc(plot.title)}">'
                f"<figcaption>{esc(plot.title)}</figcaption></figure>"
            )
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f"<title>ExFM reproduction report</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        + "\n".join(body)
        + "\n</body>\n</html>\n"
    )


@dataclass(frozen=True)
class Report:
    """The files :func:`write_report` wrote."""

    markdown: Path
    html: Path
    plots: list[Path]


def write_report(run: str | Path, out: str | Path | None = None) -> Report:
    """Write ``report.md``, ``report.html`` and the PNGs of ``RUN/results.json`` to ``out`` (default ``RUN/report``).

    Every file is written atomically (a temporary name in ``out``, then a rename); the PNGs first,
    ``report.html`` last.
    """
    run = Path(run)
    results = load_results(run)
    out = Path(out) if out is not None else run / "report"
    out.mkdir(parents=True, exist_ok=True)
    blocks = _blocks(results, run)
    plots = [block[1] for block in blocks if block[0] == "image"]
    for plot in plots:
        atomic_write_bytes(out / plot.name, plot.png)
    atomic_write_text(out / "report.md", _markdown(blocks))
    atomic_write_text(out / "report.html", _html(blocks, {plot.name: plot.png for plot in plots}))
    return Report(out / "report.md", out / "report.html", [out / plot.name for plot in plots])
