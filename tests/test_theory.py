"""The theory experiments run end to end and report every method; the teachers' biases are the ones asked.

The theorems' outcomes are measured, not guaranteed: no test asserts them.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from exfm.data.dataset import open_dataset
from exfm.data.reader import StreamReader
from exfm.data.synth import synthesize
from exfm.experiments.theory import TheorySetup, format_theory_table, run_theory

ROWS, SEED = 16_000, 0


@pytest.fixture(scope="module")
def theory(tmp_path_factory):
    out = tmp_path_factory.mktemp("theory")
    return out, run_theory(out, seeds=(SEED,), rows=ROWS, quick=True, show_progress=False)


def test_runs_end_to_end_with_every_method(theory):
    out, result = theory
    assert json.loads((out / "theory.json").read_text())["setup"]["seeds"] == [SEED]
    assert (out / "theory.md").read_text().strip() == format_theory_table(result)
    expected = {"thm3_1": ("none", "kd", "ah"), "thm3_2": ("none", "ah", "ah_sa")}
    for key, methods in expected.items():
        rows = result["aggregate"][key]
        for row in ("truth", "teacher", *methods):
            for metric in ("auc", "ne", "logloss", "calibration"):
                stats = rows[row][metric]
                assert math.isfinite(stats["mean"]) and stats["values"] == [result["per_seed"]["0"][key][row][metric]]
    assert result["aggregate"]["thm3_2"]["ah_sa"]["ne_gain_vs_ah"]["values"]
    assert [v["theorem"] for v in result["verdicts"]] == ["3.1", "3.1", "3.1", "3.2"]
    assert all(isinstance(v["held"], bool) and v["evidence"] for v in result["verdicts"])
    # only the small files of each run are kept
    runs = out / f"seed-{SEED}" / "runs"
    assert sorted(p.name for p in runs.iterdir()) == sorted(f"{k}-{m}" for k, ms in expected.items() for m in ms)
    assert not list(out.glob("**/*.pt")) and not list(out.glob("**/*.parquet"))


def test_table_is_well_formed(theory):
    _, result = theory
    table = format_theory_table(result)
    for method in ("none", "kd", "ah", "ah_sa", "truth", "teacher"):
        assert f"| {method} |" in table
    blocks = [line for line in table.splitlines() if line.startswith("|")]
    # every markdown row has as many cells as its header (escaped pipes inside cells don't count)
    for line in blocks:
        cells = line.replace("\\|", "").count("|")
        assert cells == 6, line  # 5 columns in both kinds of table


def test_teachers_have_the_bias_asked(theory):
    """Theorem 3.1's teacher is σ(logit(p) + s): same ranking as the truth, calibration Σσ(logit p + s)/Σy."""
    out, result = theory
    shift = TheorySetup.for_mode(True).teacher_shift
    data = out / "check"
    synthesize(data, rows=ROWS, days=8, seed=SEED, show_progress=False)
    sums = np.zeros(2)
    for batch in StreamReader(open_dataset(data), [5], 65_536, passthrough=["p_click"]):
        p = batch.passthrough["p_click"].double().numpy()
        sums += [(1 / (1 + np.exp(-(np.log(p / (1 - p)) + shift)))).sum(), batch.labels[:, 0].sum().item()]
    seed = result["per_seed"]["0"]["thm3_1"]
    assert seed["teacher"]["calibration"] == pytest.approx(sums[0] / sums[1], rel=1e-5)
    assert seed["teacher"]["auc"] == pytest.approx(seed["truth"]["auc"], abs=1e-4)  # a monotone transform
    # KD's predicted calibration (Σp + Σp_fm) / (2Σy) lies between the truth's and the teacher's
    assert seed["truth"]["calibration"] < seed["kd_calibration_predicted"] < seed["teacher"]["calibration"]
    # Theorem 3.2's teacher is stale: worse than the truth on the evaluation day
    stale = result["per_seed"]["0"]["thm3_2"]
    assert stale["teacher"]["ne"] > stale["truth"]["ne"]
