"""`exfm reproduce`: the rolling protocol through DAS, its studies, caching and resume, on a tiny
synthetic stream and on the real OBD sample in ``../shared/data/obd``."""

from __future__ import annotations

import json
import os
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from exfm.cli import main
from exfm.data.dataset import open_dataset
from exfm.data.synth import synthesize
from exfm.distill.supervision import FM_TRAINED_THROUGH_COLUMN
from exfm.experiments import reproduce
from exfm.experiments.reproduce import ReproduceConfig, Reproduction, SweepGrid, VMUnit, iter_rows, plan

ROW_KEYS = {
    "dataset",
    "fm",
    "vm",
    "method",
    "train_day",
    "eval_day",
    "task",
    "domain",
    "auc",
    "logloss",
    "ne",
    "calibration",
    "n_examples",
    "seed",
}
OBD = Path(__file__).resolve().parents[2] / "shared" / "data" / "obd"


@pytest.fixture(scope="module")
def stream(tmp_path_factory) -> Path:
    """8 days of the synthetic stream, 2,000 rows a day."""
    out = tmp_path_factory.mktemp("stream") / "synthetic"
    synthesize(out, rows=16_000, days=8, seed=3, show_progress=False)
    return out


@pytest.fixture(scope="module")
def every_study(stream: Path, tmp_path_factory) -> tuple[Reproduction, dict]:
    config = ReproduceConfig(
        data=stream,
        studies=list(reproduce.STUDIES),
        sweep=SweepGrid(gs=[0.5, 1.0], ls=[1.0], lw=[1.0]),
    )
    runner = Reproduction(config, tmp_path_factory.mktemp("run"))
    return runner, runner.run()


def test_plan_runs_each_unit_once_and_shares_it_between_studies(stream: Path):
    config = ReproduceConfig(data=stream, vms=["fm", "deepfm"], studies=["main", "freshness", "sweep"], seeds=[0, 1])
    runs = plan(config, open_dataset(stream))
    units = {run.unit for run in runs}
    # main: 2 VMs x 4 methods x 2 seeds; freshness adds the frozen AH and AH+SA (its daily runs and
    # `none` are main's); the sweep adds GS/LS pairs other than (1, 1) (its `none` is main's)
    assert len(units) == 16 + 2 * 2 + (3 * 2 - 1) * 2
    assert VMUnit("dcnv2", "daily", "fm", "none", 0) in units
    assert not any(u.method == "none" and u.fm_updates == "frozen" for u in units)  # none reads no supervision
    keys = [u.key for u in units]
    assert len(set(keys)) == len(keys)
    assert Counter(run.study for run in runs) == {"main": 16, "freshness": 12, "sweep": 2 + 12}


def test_every_row_has_the_protocols_fields_and_days(every_study):
    runner, results = every_study
    assert results["format"] == reproduce.FORMAT
    assert results["config"]["vm_days"] == [5, 6, 7]
    for row in results["rows"]:
        assert set(row) >= ROW_KEYS, row
    main_rows = list(iter_rows(results, study="main", domain="all"))
    # 4 methods x 3 evaluation days x 3 tasks
    assert len(main_rows) == 4 * 3 * 3
    assert {(r["train_day"], r["eval_day"]) for r in main_rows} == {(5, 6), (6, 7), (7, 8)}
    dataset = runner.dataset
    for row in main_rows:
        assert row["n_examples"] == dataset.day(row["eval_day"]).rows
        assert 0.0 < row["auc"] < 1.0 and row["ne"] > 0
    # per-domain rows add up to the overall one
    for method in reproduce.METHODS:
        per_domain = iter_rows(results, study="main", method=method, eval_day=6, task="click")
        counts = {r["domain"]: r["n_examples"] for r in per_domain}
        assert counts.pop("all") == sum(counts.values()) and set(counts) == set(dataset.manifest.domains)


def test_das_logged_each_day_with_the_fm_trained_through_the_day_before(every_study):
    runner, results = every_study
    dataset = runner.dataset
    daily = [s for s in results["supervision"] if s["fm"] == "dcnv2" and s["fm_updates"] == "daily"]
    frozen = [s for s in results["supervision"] if s["fm"] == "dcnv2" and s["fm_updates"] == "frozen"]
    assert [(s["day"], s["checkpoint"]) for s in daily] == [(5, "day-04"), (6, "day-05"), (7, "day-06"), (8, "day-07")]
    assert {s["checkpoint"] for s in frozen} == {"day-04"} and len(frozen) == 4
    for summary in daily + frozen:
        assert summary["supervised"] == 1.0 and summary["rows"] == dataset.day(summary["day"]).rows
    # read the store itself: the same rows as the dataset, each supervised by the day-before snapshot
    store = open_dataset(runner.out / "das" / "dcnv2-daily" / "shared")
    for summary in daily:
        day = summary["day"]
        table = pq.ParquetDataset(store.day_files(day)).read()
        source = pq.ParquetDataset(dataset.day_files(day)).read()
        assert np.array_equal(np.sort(table["_time"].to_numpy()), source["_time"].to_numpy())
        assert table["click"].to_numpy().sum() == source["click"].to_numpy().sum()
        through = set(table[FM_TRAINED_THROUGH_COLUMN].to_pylist())
        assert through == {summary["trained_through_us"]}
        assert dataset.day(day - 1).start_us < summary["trained_through_us"] < dataset.day(day).start_us


def test_staleness_compares_the_fm_trained_daily_with_one_stopped_after_day_4(every_study):
    _, results = every_study
    rows = {
        (r["variant"], r["eval_day"]): r
        for r in iter_rows(results, study="staleness", fm="dcnv2", task="click", domain="all")
    }
    assert sorted(rows) == sorted((v, d) for v in ("training=daily", "training=stopped") for d in (5, 6, 7, 8))
    # on day 5 both are the same checkpoint (day-04): identical metrics
    assert rows["training=daily", 5]["ne"] == rows["training=stopped", 5]["ne"]
    for day in (6, 7, 8):
        assert rows["training=daily", day]["train_day"] == day - 1
        assert rows["training=stopped", day]["train_day"] == 4
        assert rows["training=daily", day]["ne"] != rows["training=stopped", day]["ne"]


def test_multi_domain_multi_task_and_sweep_rows(every_study):
    runner, results = every_study
    domains = runner.dataset.manifest.domains
    for domain in domains:
        rows = list(iter_rows(results, study="multi_domain", variant=f"vm_domain={domain}", eval_day=6, task="click"))
        assert {r["domain"] for r in rows} == {"all", domain}
        assert all(r["n_examples"] == runner.dataset.day(6).domains[domain] for r in rows)
    for task in runner.dataset.schema.tasks:
        rows = list(iter_rows(results, study="multi_task", variant=f"vm_task={task}"))
        assert {r["task"] for r in rows} == {task} and {r["fm"] for r in rows} == {"multitask(dcnv2)"}
    sweep = list(iter_rows(results, study="sweep", method="ah", domain="all", task="click", eval_day=6))
    assert sorted((r["gs"], r["ls"], r["lw"]) for r in sweep) == [(0.5, 1.0, 1.0), (1.0, 1.0, 1.0)]
    # the sweep's GS = 1 run is main's AH run: the same numbers
    main_ah = next(iter_rows(results, study="main", method="ah", domain="all", task="click", eval_day=6))
    assert next(r for r in sweep if r["gs"] == 1.0)["ne"] == main_ah["ne"]
    frozen = list(iter_rows(results, study="freshness", variant="fm_updates=frozen", domain="all", eval_day=8))
    assert {r["method"] for r in frozen} == {"none", "ah", "ah_sa"}


def test_curves_are_progressive_ne_over_the_stream(every_study):
    runner, results = every_study
    curves = [c for c in results["curves"] if c["study"] == "main" and c["task"] == "click"]
    assert {c["method"] for c in curves} == set(reproduce.METHODS)
    for curve in curves:
        examples = [p["examples"] for p in curve["points"]]
        assert examples == sorted(examples) and examples[-1] == sum(runner.dataset.day(d).rows for d in (5, 6, 7))
        assert {p["day"] for p in curve["points"]} == {5, 6, 7}
        assert all(p["ne"] > 0 for p in curve["points"])


def test_a_second_call_reuses_everything_and_an_interrupted_run_resumes(stream: Path, tmp_path: Path, monkeypatch):
    config = ReproduceConfig(data=stream, methods=["none", "ah"], studies=["main"])
    first = Reproduction(config, tmp_path / "run").run()
    # deterministic: another RUN gives the same numbers (the store's row order does not follow timing)
    assert Reproduction(config, tmp_path / "elsewhere").run()["rows"] == first["rows"]

    def no_training(*args, **kwargs):
        raise AssertionError("a cached unit was trained again")

    monkeypatch.setattr(reproduce, "train", no_training)
    assert Reproduction(config, tmp_path / "run").run()["rows"] == first["rows"]
    monkeypatch.undo()

    # an evaluated VM's checkpoints are deleted (0.1-0.4 GB each); its metrics and curves stay
    unit = VMUnit("dcnv2", "daily", "fm", "ah", 0)
    run_dir = tmp_path / "run" / "vm" / unit.key / "run"
    assert not (run_dir / "checkpoints").exists() and (run_dir / "metrics.jsonl").exists()

    # a VM cut off after its last checkpoint but before its rows were written, and DAS days 7-8
    # whose completion was never recorded: both are finished again from what is on disk
    keep = config.model_copy(update={"keep_vm_checkpoints": True})
    (tmp_path / "run" / "vm" / unit.key / "rows.json").unlink()
    shutil.rmtree(run_dir)
    Reproduction(keep, tmp_path / "run").run()  # trains the unit again, keeping its checkpoints
    assert (run_dir / "checkpoints" / "day-07.pt").exists()
    (tmp_path / "run" / "vm" / unit.key / "rows.json").unlink()
    days_path = tmp_path / "run" / "das" / "dcnv2-daily" / "days.json"
    days = json.loads(days_path.read_text())
    days_path.write_text(json.dumps(days[:2]))
    again = Reproduction(keep, tmp_path / "run").run()
    assert again["rows"] == first["rows"]
    redone = [(s["day"], s["checkpoint"], s["trained_through_us"]) for s in again["supervision"]]
    assert redone == [(s["day"], s["checkpoint"], s["trained_through_us"]) for s in days]


def test_the_vm_warm_up_trains_days_1_to_4_on_labels_alone_first(stream: Path, tmp_path: Path):
    config = ReproduceConfig(data=stream, methods=["none", "ah"], studies=["main"], vm_warmup=True)
    results = Reproduction(config, tmp_path / "run").run()
    days = [(s["day"], s["checkpoint"], s["supervised"]) for s in results["supervision"]]
    assert days == [(1, None, 0.0), (2, None, 0.0), (3, None, 0.0), (4, None, 0.0)] + [
        (t, f"day-{t - 1:02d}", 1.0) for t in (5, 6, 7, 8)
    ]
    assert {(r["train_day"], r["eval_day"]) for r in results["rows"]} == {(5, 6), (6, 7), (7, 8)}
    for curve in results["curves"]:
        assert {p["day"] for p in curve["points"]} == set(range(1, 8))  # one pass from day 1
    assert all(key.startswith("warmup/") for key in (p.unit.key for p in plan(config, open_dataset(stream))))
    vm_config = tmp_path / "run" / "vm" / VMUnit("dcnv2", "daily", "fm", "ah", 0, warmup=True).key / "run"
    assert "train_days:\n- 1\n- 7" in (vm_config / "config.yaml").read_text()


def test_bad_settings_are_clear_errors(stream: Path, tmp_path: Path, capsys):
    with pytest.raises(ValueError, match="unknown model"):
        Reproduction(ReproduceConfig(data=stream, fms=["gpt"]), tmp_path / "a")
    short = tmp_path / "short"
    synthesize(short, rows=2_000, days=5, seed=0, show_progress=False)
    with pytest.raises(ValueError, match=r"N >= fm_days \+ 2"):
        Reproduction(ReproduceConfig(data=short), tmp_path / "b")
    Reproduction(ReproduceConfig(data=short, fm_days=3), tmp_path / "c")  # 5 days: VM day 4, evaluated on 5
    with pytest.raises(ValueError, match="holds a run on"):
        Reproduction(ReproduceConfig(data=stream), tmp_path / "c")
    assert main(["reproduce", "--data", str(stream), "--out", str(tmp_path / "d"), "--studies", "main,tables"]) == 2
    assert "studies" in capsys.readouterr().err


@pytest.mark.skipif(not OBD.exists() and not os.environ.get("EXFM_REQUIRE_SERVICES"), reason="needs ../shared/data/obd")
def test_reproduce_runs_on_the_real_open_bandit_sample(tmp_path: Path, capsys):
    from exfm.data.sources import adapt

    data = tmp_path / "obd"
    adapt("obd", OBD, data, show_progress=False)
    out = tmp_path / "run"
    code = main(
        [
            "reproduce",
            "--data",
            str(data),
            "--out",
            str(out),
            "--methods",
            "none,ah_sa",
            "--studies",
            "main,multi_domain",
        ]
    )
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    rows = list(iter_rows(results, study="main", domain="all"))
    assert {(r["train_day"], r["eval_day"]) for r in rows} == {(5, 6), (6, 7)}  # OBD has 7 days
    assert {r["task"] for r in rows} == {"click"} and {r["dataset"] for r in rows} == {"obd"}
    variants = {r["variant"] for r in iter_rows(results, study="multi_domain")}
    assert variants == {"vm_domain=all_items", "vm_domain=men", "vm_domain=women"}
    assert "ah_sa" in capsys.readouterr().out
