"""The one-pass trainer: exactly-once training, checkpoints, kill -9 and resume, evaluation."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_dataset, train_config

from exfm.data.dataset import open_dataset
from exfm.train.config import ConfigError, load_train_config, parse_train_config
from exfm.train.run_dir import RunDirectory
from exfm.train.trainer import evaluate_checkpoint, train


def _write_config(path: Path, config: dict) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "exfm.cli", *args]


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONHASHSEED": "0"}


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in records]


def test_trains_every_example_once_and_evaluates(tiny_dataset, tmp_path):
    config = parse_train_config(train_config(tiny_dataset, dense_optimizer={"name": "adagrad", "lr": 0.01}))
    result = train(config, tmp_path / "run", show_progress=False)
    run = RunDirectory(result.run_dir)
    assert result.examples == 3 * 1000
    records = run.read_metrics()
    day_ends = [r for r in records if r["event"] == "day_end"]
    assert [r["day"] for r in day_ends] == [1, 2, 3]
    assert [r["examples"] for r in day_ends] == [1000, 2000, 3000]
    assert day_ends[-1]["progressive"]["examples"] == 3000  # every example scored once before training
    assert {p.name for p in run.checkpoints.glob("*.pt")} == {"last.pt", "day-01.pt", "day-02.pt", "day-03.pt"}
    evaluation = result.evaluations[4]
    assert set(evaluation) == {"click", "like"}
    assert evaluation["click"]["all"].n == 1000
    assert set(evaluation["click"]) == {"all", "a", "b", "c"}
    summary = json.loads((run.root / "summary.json").read_text())
    assert summary["eval"]["4"]["click"]["all"]["n"] == 1000
    # Re-evaluating the saved checkpoint reproduces the in-process evaluation exactly.
    again = evaluate_checkpoint(run.root, 4)
    assert again["click"]["all"].logloss == pytest.approx(evaluation["click"]["all"].logloss, rel=1e-12)


def test_a_fresh_run_refuses_an_existing_run_dir(tiny_dataset, tmp_path):
    config = parse_train_config(train_config(tiny_dataset, train_days=[1, 1], eval_days=[]))
    train(config, tmp_path / "run", show_progress=False)
    with pytest.raises(FileExistsError):
        train(config, tmp_path / "run", show_progress=False)
    changed = parse_train_config(train_config(tiny_dataset, train_days=[1, 2], eval_days=[]))
    with pytest.raises(ValueError, match="config differs"):
        train(changed, tmp_path / "run", resume=True, show_progress=False)


def test_config_errors_name_the_field(tmp_path):
    path = _write_config(tmp_path / "c.yaml", train_config(tmp_path, batch_size=0, model={"name": "nope"}))
    with pytest.raises(ConfigError) as info:
        load_train_config(path)
    assert "batch_size" in str(info.value) and "model" in str(info.value)
    path = _write_config(tmp_path / "d.yaml", train_config(tmp_path, train_days=[3, 1]))
    with pytest.raises(ConfigError, match="train_days"):
        load_train_config(path)


def test_kill_and_resume_equals_an_uninterrupted_run(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", rows_per_day=12_000, days=4)
    config = _write_config(tmp_path / "c.yaml", train_config(data, eval_days=[4]))

    whole = tmp_path / "whole"
    subprocess.run(_cli("train", "--config", str(config), "--run-dir", str(whole), "--quiet"), env=_env(), check=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(_cli("train", "--config", str(config), "--run-dir", str(killed), "--quiet"), env=_env())
    deadline = time.monotonic() + 120
    while not (killed / "checkpoints" / "day-01.pt").exists():  # kill it on day 2, mid-day
        assert process.poll() is None, "the training process ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.005)
    time.sleep(0.3)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (killed / "summary.json").exists(), "the run finished before the kill: the test proves nothing"
    killed_at = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)["position"]
    assert killed_at[0] in (1, 2)

    resume = _cli("train", "--config", str(config), "--run-dir", str(killed), "--resume", "--quiet")
    subprocess.run(resume, env=_env(), check=True)

    a = torch.load(whole / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(killed / "checkpoints" / "last.pt", weights_only=True)
    assert a["examples"] == b["examples"] == 36_000 and a["batches"] == b["batches"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"parameter {name} differs after kill and resume"
    assert json.loads((whole / "summary.json").read_text()) == json.loads((killed / "summary.json").read_text())
    # metrics.jsonl holds each record once: the records after the last checkpoint were cut back.
    assert _without_timing(RunDirectory(whole).read_metrics()) == _without_timing(RunDirectory(killed).read_metrics())


def test_one_pass_learns_the_synthetic_stream(tmp_path):
    """FM and DCNv2 beat chance on the next day after one pass (seeded; far from the threshold)."""
    from exfm.data.synth import TEACHER_ONLY_FEATURES, synthesize

    data = tmp_path / "synthetic"
    synthesize(data, rows=80_000, days=4, seed=3, show_progress=False)
    schema_features = [f.name for f in open_dataset(data).schema.features]
    student = [f for f in schema_features if f not in TEACHER_ONLY_FEATURES]
    for model in ({"name": "fm", "embedding_dim": 8, "features": student}, {"name": "dcnv2", "embedding_dim": 8}):
        config = parse_train_config(
            train_config(data, model=model, tasks=["click"], batch_size=256, dense_optimizer={"lr": 0.01})
        )
        result = train(config, tmp_path / model["name"], show_progress=False)
        metrics = result.evaluations[4]["click"]["all"]
        assert metrics.auc > 0.6, (model["name"], metrics)
        assert 0.7 < metrics.calibration < 1.4, (model["name"], metrics)
