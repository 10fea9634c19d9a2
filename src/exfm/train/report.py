"""Plain-text metric tables for the terminal."""

from __future__ import annotations

from exfm.train.metrics import ALL, MetricSet


def _fmt(value: float, digits: int = 4) -> str:
    return "n/a" if value != value else f"{value:.{digits}f}"


def format_eval_table(results: dict[str, dict[str, dict[str, MetricSet]]], by_domain: bool = False) -> str:
    """A table with one row per (model, task[, domain]).

    Args:
        results: ``{row label: {task: {"all" | domain: MetricSet}}}``.
        by_domain: add one row per domain under each task's overall row.
    """
    header = ("model", "task", "domain", "AUC", "LogLoss", "NE", "calib", "n", "pos")
    rows = []
    for label, per_task in results.items():
        for task, per_domain in per_task.items():
            keys = [ALL] + ([k for k in per_domain if k != ALL] if by_domain else [])
            for key in keys:
                m = per_domain[key]
                rows.append(
                    (
                        label,
                        task,
                        key,
                        _fmt(m.auc),
                        _fmt(m.logloss),
                        _fmt(m.ne),
                        _fmt(m.calibration, 3),
                        f"{m.n:,}",
                        f"{m.positives:,}",
                    )
                )
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(str(c).ljust(w) if i < 3 else str(c).rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)
