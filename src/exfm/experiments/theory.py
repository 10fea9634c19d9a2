"""The paper's two theorems, checked empirically on the synthetic stream, whose truth is known.

**Theorem 3.1** (cross-domain bias). A teacher that ranks perfectly but is miscalibrated for the
VM's traffic: :class:`~exfm.distill.supervision.OracleTeacher` with a logit shift ``s = +1``,
``p_fm = σ(logit(p) + 1)`` (the true ranking, but about twice the true click rate). VMs (FM students
without the teacher-only features, task click) train one pass on days 1–4 with ``none``, ``kd``
and ``ah`` (LW = LS = GS = 1) and are evaluated on day 5. KD's serving head fits the mixed target
``(y + LW·p_fm) / (1 + LW)``, and with a learned bias the first-order condition of the BCE makes
``Σ σ(z) = Σ (y + LW·p_fm) / (1 + LW)``: its calibration moves to about::

    c_kd = (Σ p + LW·Σ p_fm) / ((1 + LW)·Σ y)              (reported as ``kd_calibration_predicted``)

Prediction: KD's calibration moves from none's toward the teacher's, AH's stays as close to 1 as
none's, and AH improves next-day NE and AUC over none (the teacher knows more than the VM).

**Theorem 3.2** (freshness gap). A stale teacher: :class:`~exfm.distill.supervision.StaleOracleTeacher`,
the true probability function frozen at the end of day 2 (t₀ = 2), so its error grows with the
interest rotation (10°/day), the category-popularity cycle and the trends of the later days. VMs
train on days 3–7 (all supervised by it) with ``none``, ``ah`` and ``ah_sa`` and are evaluated on
day 8. Prediction: ``ah_sa`` beats ``ah`` (the Student Adapter recalibrates the stale prediction on
fresh labels before the VM distils from it).

Per seed the stream is synthesised anew (8 days), so the spread over seeds covers the data,
the initialisation and the teacher. The verdict rules are fixed in :func:`_verdicts` before
looking at the numbers; the theorems are measured, not assumed.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from exfm.data.dataset import atomic_write_text, open_dataset
from exfm.data.reader import StreamReader
from exfm.data.synth import synthesize
from exfm.distill.supervision import OracleTeacher, StaleOracleTeacher, Teacher, log_supervision
from exfm.experiments.zoo import synthetic_zoo
from exfm.train.config import TrainConfig, parse_train_config
from exfm.train.metrics import ALL, MetricSet, StreamingMetrics
from exfm.train.trainer import train

__all__ = ["TheorySetup", "format_theory_table", "run_theory"]

TASK = "click"
METRICS = ("auc", "ne", "logloss", "calibration")


@dataclass(frozen=True)
class Experiment:
    """One theorem's experiment: its teacher, the supervised days, the VM's days and methods."""

    key: str
    theorem: str
    teacher: Teacher
    supervised_days: tuple[int, ...]
    train_days: tuple[int, int]
    eval_day: int
    methods: tuple[str, ...]


@dataclass(frozen=True)
class TheorySetup:
    """Sizes and settings of the theory experiments.

    The VM is the model zoo's FM student with its tuned one-pass settings
    (:func:`exfm.experiments.zoo.synthetic_zoo`: batch 1024, dense rate 0.1, k = 16).

    Attributes:
        rows: rows of each seed's synthetic stream (8 days).
        teacher_shift: Theorem 3.1's teacher logit shift s.
        stale_at_day: Theorem 3.2's teacher frozen at t₀ (days since the start).
        adapter_lr: the Student Adapter's Adam rate (higher than the default 1e-3: a quick run has
            only about 100 steps a day).
    """

    rows: int
    teacher_shift: float = 1.0
    stale_at_day: float = 2.0
    adapter_lr: float = 0.01

    @classmethod
    def for_mode(cls, quick: bool, rows: int | None = None) -> TheorySetup:
        """Quick: 200 000 rows per stream; full: 1 000 000 (the default stream)."""
        return cls(rows=rows or (200_000 if quick else 1_000_000))

    def experiments(self) -> list[Experiment]:
        return [
            Experiment(
                key="thm3_1",
                theorem="3.1",
                teacher=OracleTeacher(shift=self.teacher_shift),
                supervised_days=(1, 2, 3, 4, 5),  # day 5 only to score the teacher itself
                train_days=(1, 4),
                eval_day=5,
                methods=("none", "kd", "ah"),
            ),
            Experiment(
                key="thm3_2",
                theorem="3.2",
                teacher=StaleOracleTeacher(frozen_at_day=self.stale_at_day),
                supervised_days=(3, 4, 5, 6, 7, 8),  # day 8 only to score the teacher itself
                train_days=(3, 7),
                eval_day=8,
                methods=("none", "ah", "ah_sa"),
            ),
        ]

    def vm_config(self, data: Path, experiment: Experiment, method: str, seed: int) -> TrainConfig:
        """The VM's training config: the zoo's FM student (no teacher-only features), task click, one pass."""
        preset = synthetic_zoo(open_dataset(data).schema)["fm"]
        return parse_train_config(
            {
                **preset.train_settings(),
                "data": str(data),
                "tasks": [TASK],
                "train_days": list(experiment.train_days),
                "eval_days": [experiment.eval_day],
                "distillation": {"method": method, "adapter": {"lr": self.adapter_lr}},
                "checkpoint_every": 0,
                "log_every": 1000,
                "seed": seed,
            }
        )


def run_theory(
    out_dir: str | Path,
    seeds: Sequence[int] = (0, 1, 2),
    rows: int | None = None,
    quick: bool = False,
    *,
    show_progress: bool = True,
) -> dict:
    """Run both theorems' experiments for every seed; write ``theory.json`` and ``theory.md``.

    Args:
        out_dir: results directory; ``seed-<s>/runs/`` keeps each VM run's config, metrics and
            summary (datasets and checkpoints are deleted once a seed is done).
        seeds: one synthetic stream (and VM initialisation) per seed.
        rows: rows per stream (default: 200 000 quick, 1 000 000 full).
        quick: the small setting (:meth:`TheorySetup.for_mode`).
        show_progress: print one line per step.

    Returns:
        The result: setup, per-seed metrics, aggregates (mean, std, min, max) and verdicts.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    setup = TheorySetup.for_mode(quick, rows)
    say = print if show_progress else (lambda *_: None)
    start = time.perf_counter()
    per_seed = {}
    for seed in seeds:
        per_seed[str(seed)] = _run_seed(setup, seed, out_dir / f"seed-{seed}", say)
    experiments = {e.key: e for e in setup.experiments()}
    result = {
        "setup": {
            **asdict(setup),
            "seeds": list(seeds),
            "quick": quick,
            "task": TASK,
            "teachers": {key: e.teacher.snapshot_id for key, e in experiments.items()},
            "days": {
                key: {"train": list(e.train_days), "eval": e.eval_day, "methods": list(e.methods)}
                for key, e in experiments.items()
            },
        },
        "elapsed_s": time.perf_counter() - start,
        "per_seed": per_seed,
        "aggregate": _aggregate(per_seed, experiments),
    }
    result["verdicts"] = _verdicts(result["aggregate"], per_seed)
    atomic_write_text(out_dir / "theory.json", json.dumps(_json_safe(result), indent=2) + "\n")
    atomic_write_text(out_dir / "theory.md", format_theory_table(result) + "\n")
    say(f"theory: {len(seeds)} seed(s) in {result['elapsed_s']:.0f} s -> {out_dir / 'theory.md'}")
    return result


def _run_seed(setup: TheorySetup, seed: int, work: Path, say: Callable[..., None]) -> dict:
    """One seed: synthesise, log each experiment's supervision, train and evaluate its VMs."""
    data = work / "data"
    synthesize(data, rows=setup.rows, days=8, seed=seed, overwrite=True, show_progress=False)
    results = {}
    for experiment in setup.experiments():
        supervised = work / f"{experiment.key}-data"
        log_supervision(data, supervised, experiment.teacher, experiment.supervised_days, overwrite=True)
        day = experiment.eval_day
        entry = {"teacher": _logged_metrics(supervised, day), "truth": _truth_metrics(supervised, day)}
        if "kd" in experiment.methods:
            entry["kd_calibration_predicted"] = _kd_calibration(supervised, day)
        for method in experiment.methods:
            began = time.perf_counter()
            run_dir = work / "runs" / f"{experiment.key}-{method}"
            shutil.rmtree(run_dir, ignore_errors=True)
            config = setup.vm_config(supervised, experiment, method, seed)
            evaluation = train(config, run_dir, show_progress=False).evaluations[day][TASK][ALL]
            shutil.rmtree(run_dir / "checkpoints")
            entry[method] = _metrics(evaluation)
            say(
                f"seed {seed} theorem {experiment.theorem} {method:<5} day {day}: "
                f"NE {evaluation.ne:.4f} AUC {evaluation.auc:.4f} calibration {evaluation.calibration:.3f} "
                f"({time.perf_counter() - began:.0f} s)"
            )
        shutil.rmtree(supervised)
        results[experiment.key] = entry
    shutil.rmtree(data)
    return results


def _metrics(m: MetricSet) -> dict[str, float]:
    return {key: float(getattr(m, key)) for key in METRICS}


def _day_metrics(root: Path, day: int, probability) -> dict[str, float]:
    """Metrics on one day of the probabilities ``probability(batch) -> [B]`` against the click label."""
    dataset = open_dataset(root)
    column = dataset.schema.tasks.index(TASK)
    metrics = StreamingMetrics([TASK])
    reader = StreamReader(dataset, [day], 65_536, with_fm_predictions=True, passthrough=[f"p_{TASK}"])
    for batch in reader:
        p = probability(batch, column).double().clamp(1e-7, 1 - 1e-7)
        metrics.update(torch.logit(p).unsqueeze(1), batch.labels[:, column : column + 1])
    return _metrics(metrics.result()[TASK][ALL])


def _logged_metrics(root: Path, day: int) -> dict[str, float]:
    """The teacher's own metrics: its logged ``fm:click`` on the day."""
    return _day_metrics(root, day, lambda batch, column: batch.fm_predictions[:, column])


def _truth_metrics(root: Path, day: int) -> dict[str, float]:
    """The true probabilities' metrics: the best any model can do."""
    return _day_metrics(root, day, lambda batch, column: batch.passthrough[f"p_{TASK}"])


def _kd_calibration(root: Path, day: int, loss_weight: float = 1.0) -> float:
    """Theorem 3.1's KD calibration on the day: ``(Σ p + LW·Σ p_fm) / ((1 + LW)·Σ y)``."""
    dataset = open_dataset(root)
    column = dataset.schema.tasks.index(TASK)
    sums = np.zeros(3)
    for batch in StreamReader(dataset, [day], 65_536, with_fm_predictions=True, passthrough=[f"p_{TASK}"]):
        sums += [
            float(batch.passthrough[f"p_{TASK}"].double().sum()),
            float(batch.fm_predictions[:, column].double().sum()),
            float(batch.labels[:, column].double().sum()),
        ]
    return (sums[0] + loss_weight * sums[1]) / ((1 + loss_weight) * sums[2])


# --- aggregation and verdicts ---------------------------------------------------------------------
def _stats(values: list[float]) -> dict:
    """Mean, sample standard deviation (0 for one value), min, max and the values themselves."""
    array = np.asarray(values, dtype=np.float64)
    return {
        "mean": float(array.mean()),
        "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
        "min": float(array.min()),
        "max": float(array.max()),
        "values": [float(v) for v in array],
    }


def _aggregate(per_seed: dict, experiments: dict[str, Experiment]) -> dict:
    """``{experiment: {row: {metric: stats}}}`` over seeds; rows are the methods, teacher and truth.

    Each row also has ``ne_gain_vs_none`` in percent, ``(NE_none - NE) / NE_none · 100`` per seed;
    ``ah_sa`` has ``ne_gain_vs_ah`` likewise (the paired effect of the Student Adapter).
    """
    out = {}
    for key, experiment in experiments.items():
        rows = {}
        for row in ("truth", "teacher", *experiment.methods):
            rows[row] = {m: _stats([s[key][row][m] for s in per_seed.values()]) for m in METRICS}
            rows[row]["ne_gain_vs_none"] = _stats(
                [(s[key]["none"]["ne"] - s[key][row]["ne"]) / s[key]["none"]["ne"] * 100 for s in per_seed.values()]
            )
        if {"ah", "ah_sa"} <= set(experiment.methods):
            rows["ah_sa"]["ne_gain_vs_ah"] = _stats(
                [(s[key]["ah"]["ne"] - s[key]["ah_sa"]["ne"]) / s[key]["ah"]["ne"] * 100 for s in per_seed.values()]
            )
        if "kd" in experiment.methods:
            rows["kd_calibration_predicted"] = _stats([s[key]["kd_calibration_predicted"] for s in per_seed.values()])
        out[key] = rows
    return out


def _verdicts(aggregate: dict, per_seed: dict) -> list[dict]:
    """Each theorem's predictions, tested by rules fixed in advance; ``held`` is a measurement.

    Rules (means over seeds; "every seed" where stated):

    * 3.1 KD transfers the bias: on every seed, KD's calibration is moved from none's toward the
      teacher's (same sign as ``c_teacher - c_none``) by more than 0.1.
    * 3.1 AH stays calibrated: ``|c_ah - 1| ≤ |c_none - 1| + 0.05``.
    * 3.1 AH improves the VM: NE(ah) < NE(none) and AUC(ah) > AUC(none).
    * 3.2 SA beats a stale teacher: NE(ah_sa) < NE(ah), and on a majority of seeds.
    """
    seeds = list(per_seed.values())
    a, b = aggregate["thm3_1"], aggregate["thm3_2"]

    def mean(rows, row, metric):
        return rows[row][metric]["mean"]

    kd_moves = [
        math.copysign(1.0, s["thm3_1"]["teacher"]["calibration"] - s["thm3_1"]["none"]["calibration"])
        * (s["thm3_1"]["kd"]["calibration"] - s["thm3_1"]["none"]["calibration"])
        for s in seeds
    ]
    ah_error, none_error = (abs(mean(a, m, "calibration") - 1) for m in ("ah", "none"))
    sa_wins = sum(s["thm3_2"]["ah_sa"]["ne"] < s["thm3_2"]["ah"]["ne"] for s in seeds)
    sa_gain = b["ah_sa"]["ne_gain_vs_ah"]
    return [
        {
            "theorem": "3.1",
            "claim": "KD through the serving head transfers the teacher's bias (calibration)",
            "rule": "on every seed, c_kd moves from c_none toward c_teacher by > 0.1",
            "held": all(move > 0.1 for move in kd_moves),
            "evidence": (
                f"c_none {mean(a, 'none', 'calibration'):.3f}, c_kd {mean(a, 'kd', 'calibration'):.3f} "
                f"(predicted {a['kd_calibration_predicted']['mean']:.3f}), "
                f"c_teacher {mean(a, 'teacher', 'calibration'):.3f}; smallest move {min(kd_moves):.3f}"
            ),
        },
        {
            "theorem": "3.1",
            "claim": "AH keeps the serving head calibrated",
            "rule": "|c_ah - 1| <= |c_none - 1| + 0.05 (means)",
            "held": ah_error <= none_error + 0.05,
            "evidence": f"|c_ah - 1| = {ah_error:.3f}, |c_none - 1| = {none_error:.3f}",
        },
        {
            "theorem": "3.1",
            "claim": "AH improves the VM over no FM",
            "rule": "NE(ah) < NE(none) and AUC(ah) > AUC(none) (means)",
            "held": mean(a, "ah", "ne") < mean(a, "none", "ne") and mean(a, "ah", "auc") > mean(a, "none", "auc"),
            "evidence": (
                f"NE {mean(a, 'ah', 'ne'):.4f} vs {mean(a, 'none', 'ne'):.4f} "
                f"(gain {mean(a, 'ah', 'ne_gain_vs_none'):+.2f} %), "
                f"AUC {mean(a, 'ah', 'auc'):.4f} vs {mean(a, 'none', 'auc'):.4f}"
            ),
        },
        {
            "theorem": "3.2",
            "claim": "the Student Adapter shrinks the stale teacher's error",
            "rule": "NE(ah_sa) < NE(ah) (means) and on a majority of seeds",
            "held": mean(b, "ah_sa", "ne") < mean(b, "ah", "ne") and sa_wins * 2 > len(seeds),
            "evidence": (
                f"NE {mean(b, 'ah_sa', 'ne'):.4f} vs {mean(b, 'ah', 'ne'):.4f} "
                f"(ah_sa better on {sa_wins}/{len(seeds)} seeds; paired NE gain "
                f"{sa_gain['mean']:+.2f} ± {sa_gain['std']:.2f} %); calibration "
                f"{mean(b, 'ah_sa', 'calibration'):.3f} vs {mean(b, 'ah', 'calibration'):.3f}"
            ),
        },
    ]


# --- output ----------------------------------------------------------------------------------------
def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _cell(stats: dict, digits: int, spread: bool) -> str:
    text = f"{stats['mean']:.{digits}f}"
    if spread:
        text += f" ± {stats['std']:.{digits}f}"
    return text


def format_theory_table(result: dict) -> str:
    """A markdown table per theorem (mean ± sample std over seeds) and the verdicts.

    Rows: the true probabilities (the best achievable), the teacher's logged predictions, and one
    VM per method; columns: next-day AUC, NE, calibration ``Σp/Σy`` and NE gain over ``none`` in %.
    """
    setup = result["setup"]
    seeds = setup["seeds"]
    spread = len(seeds) > 1
    lines = [
        f"Seeds {', '.join(map(str, seeds))} ({len(seeds)}); {setup['rows']:,} rows per stream; "
        f"values are mean{' ± std' if spread else ''} over seeds.",
    ]
    titles = {
        "thm3_1": "Theorem 3.1 — biased teacher",
        "thm3_2": "Theorem 3.2 — stale teacher",
    }
    for key, rows in result["aggregate"].items():
        days = setup["days"][key]
        lines += [
            "",
            f"**{titles[key]}** `{setup['teachers'][key]}`: VMs train on days "
            f"{days['train'][0]}–{days['train'][1]}, evaluated on day {days['eval']}.",
            "",
            "| row | AUC | NE | calibration | NE gain vs none (%) |",
            "|---|---|---|---|---|",
        ]
        for row in ("truth", "teacher", *days["methods"]):
            stats = rows[row]
            gain = "" if row == "none" else _cell(stats["ne_gain_vs_none"], 2, spread)
            lines.append(
                f"| {row} | {_cell(stats['auc'], 4, spread)} | {_cell(stats['ne'], 4, spread)} | "
                f"{_cell(stats['calibration'], 3, spread)} | {gain} |"
            )
        if "kd" in days["methods"]:
            lines.append(f"| kd (predicted calibration) | | | {_cell(rows['kd_calibration_predicted'], 3, spread)} | |")
    lines += ["", "| theorem | prediction | rule | held | evidence |", "|---|---|---|---|---|"]
    for v in result["verdicts"]:
        held = "yes" if v["held"] else "**no**"
        cells = [v["theorem"], v["claim"], v["rule"], held, v["evidence"]]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines)
