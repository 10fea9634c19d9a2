"""The `exfm` command end to end: synth -> ingest -> train -> eval, help texts, errors, demo."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from exfm.cli import main
from exfm.train.config import load_train_config

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "command",
    [
        [],
        ["synth"],
        ["ingest"],
        ["train"],
        ["eval"],
        ["supervise"],
        ["export"],
        ["experiment"],
        ["das"],
        ["das", "publish"],
        ["models"],
        ["demo"],
        ["reproduce"],
        ["report"],
    ],
)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([*command, "--help"])
    assert info.value.code == 0
    assert "usage: exfm" in capsys.readouterr().out


def test_example_configs_are_valid_and_match_the_zoo_presets():
    from exfm.data.synth import synthetic_schema
    from exfm.experiments.zoo import synthetic_zoo

    zoo = synthetic_zoo(synthetic_schema())
    for name in ("fm", "dcnv2"):
        config = load_train_config(REPO / "configs" / f"synthetic_{name}.yaml")
        preset = zoo[name].train_settings()
        assert config.model.model_dump() == preset["model"], name
        assert (
            config.batch_size == preset["batch_size"] and config.dense_optimizer.lr == preset["dense_optimizer"]["lr"]
        )


def test_synth_ingest_train_eval(tmp_path, capsys):
    data = tmp_path / "synthetic"
    assert main(["synth", "--out", str(data), "--rows", "16000", "--days", "4", "--raw-csv"]) == 0
    # The raw CSV goes through ingest into an equivalent dataset.
    ingested = tmp_path / "ingested"
    raw = data / "raw"
    assert main(["ingest", "--schema", str(raw / "schema.yaml"), "--input", str(raw / "synthetic.csv"),
                 "--out", str(ingested)]) == 0  # fmt: skip
    assert json.loads((ingested / "manifest.json").read_text())["rows"] == 16000
    config = tmp_path / "fm.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "data": str(ingested),
                "model": {"name": "fm", "embedding_dim": 4},
                "train_days": [1, 3],
                "eval_days": [4],
                "batch_size": 512,
            }
        )
    )
    run = tmp_path / "run"
    assert main(["train", "--config", str(config), "--run-dir", str(run), "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "fm (day 4)" in out and "click" in out and "follow" in out
    assert main(["eval", "--run", str(run), "--day", "4", "--checkpoint", "day-02", "--by-domain"]) == 0
    out = capsys.readouterr().out
    assert "day-02" in out and "search" in out
    # The FM's predictions logged next to day 4, then the served model exported.
    supervised = tmp_path / "supervised"
    assert main(["supervise", "--data", str(ingested), "--out", str(supervised), "--days", "4",
                 "--teacher-run", str(run), "--checkpoint", "day-02"]) == 0  # fmt: skip
    day4 = json.loads((supervised / "manifest.json").read_text())["days"][3]
    assert day4["rows"] > 0 and "day-02" in capsys.readouterr().out
    assert main(["export", str(run), "--out", str(tmp_path / "served"), "--no-onnx"]) == 0
    manifest = json.loads((tmp_path / "served" / "manifest.json").read_text())
    assert manifest["tasks"] == ["click", "like", "follow"] and manifest["training_method"] == "none"
    assert main(["das", "publish", "--spd", str(tmp_path / "spd"), "--run", str(run), "--fm", "fm"]) == 0
    assert "published snapshot fm-" in capsys.readouterr().out
    assert len(list((tmp_path / "spd").glob("fm-*/DONE"))) == 1


def test_models_lists_the_zoo_with_parameters_and_compute(capsys):
    assert main(["models", "--embedding-dim", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    names = {line.split()[0] for line in lines[2:]}
    assert {"fm", "fmfm", "deepfm", "dlrm", "two_tower", "dcn", "dcnv2", "dmin", "multitask(dcnv2)"} <= names
    fm = next(line.split() for line in lines if line.startswith("fm "))
    assert fm[1] == "student" and int(fm[3].replace(",", "")) > 0


def test_user_errors_exit_2_with_a_clear_message(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\nfeatures: []\nlabels: []\ntime: {column: t}\n")
    code = main(["ingest", "--schema", str(bad), "--input", str(tmp_path / "none.csv"), "--out", str(tmp_path / "o")])
    assert code == 2
    err = capsys.readouterr().err
    assert "exfm ingest: error:" in err and "bad.yaml: features" in err
    assert main(["eval", "--run", str(tmp_path / "nothing"), "--day", "2"]) == 2
    assert "not a run directory" in capsys.readouterr().err


def test_demo_runs_the_whole_story_small_and_reuses_its_cache(tmp_path, capsys, monkeypatch):
    from exfm.demo import run_demo
    from exfm.experiments import reproduce

    results = run_demo(tmp_path / "demo", rows=24_000, vms=["fm"])
    out = capsys.readouterr().out
    assert "teacher" in out and "ah_sa" in out and "NE gain %" in out and "verdicts" in out
    report = tmp_path / "demo" / "run" / "report"
    assert (report / "report.html").stat().st_size > 0 and list(report.glob("*.png"))
    studies = {row["study"] for row in results["rows"]}
    assert studies == {"main", "freshness", "staleness"}
    assert {row["method"] for row in results["rows"] if row["study"] == "main"} == {"none", "kd", "ah", "ah_sa"}

    def no_training(*args, **kwargs):
        raise AssertionError("the second demo trained again")

    monkeypatch.setattr(reproduce, "train", no_training)
    assert run_demo(tmp_path / "demo", rows=24_000, vms=["fm"])["rows"] == results["rows"]
    assert "reusing the synthetic stream" in capsys.readouterr().out
