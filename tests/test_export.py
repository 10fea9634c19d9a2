"""The serving export: parity with the training model, the no-extra-cost promise, loading without exfm."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import make_tiny_dataset

from exfm.data.batch import Batch, KeyedJagged
from exfm.data.dataset import DatasetError, open_dataset
from exfm.data.reader import ReaderPosition, StreamReader
from exfm.data.synth import TEACHER_ONLY_FEATURES, synthetic_schema
from exfm.experiments.zoo import synthetic_zoo
from exfm.models import MLP, RecModel, build_model
from exfm.schema import Schema
from exfm.serving import ServingModel, export_model, export_run, serving_inputs
from exfm.train.config import parse_train_config
from exfm.train.run_dir import RunDirectory, RunError
from exfm.train.trainer import train

STUDENTS = ["fm", "fmfm", "deepfm", "dlrm", "two_tower"]
TEACHERS = ["dcn", "dcnv2", "dmin", "multitask(dcnv2)"]


def small_synthetic_schema() -> Schema:
    """The synthetic stream's schema (feature names of the zoo presets) with tables of at most 300 rows."""
    schema = synthetic_schema(days=4)
    features = [
        f.model_copy(update={"buckets": min(f.buckets, 300)}) if f.type == "categorical" else f for f in schema.features
    ]
    return schema.model_copy(update={"features": features})


SCHEMA = small_synthetic_schema()
ZOO = synthetic_zoo(SCHEMA, embedding_dim=8)


def random_batch(schema: Schema, size: int, seed: int = 0) -> Batch:
    """A batch in the reader's layout: random ids (some missing), sequences of random lengths."""
    g = torch.Generator().manual_seed(seed)
    single = torch.stack([torch.randint(0, f.buckets, (size,), generator=g) for f in schema.categorical])
    values, lengths = [single.reshape(-1)], [torch.ones(single.numel(), dtype=torch.int32)]
    for seq in schema.sequences:
        counts = torch.randint(0, seq.max_len + 1, (size,), generator=g)
        buckets = schema.feature(seq.embedding).buckets
        values.append(torch.randint(1, buckets, (int(counts.sum()),), generator=g))
        lengths.append(counts.int())
    return Batch(
        sparse=KeyedJagged(
            keys=[f.name for f in schema.categorical] + [s.name for s in schema.sequences],
            values=torch.cat(values),
            lengths=torch.cat(lengths),
            stride=size,
            num_single=len(schema.categorical),
        ),
        dense=torch.randn(size, len(schema.numeric), generator=g),
        labels=torch.zeros(size, len(schema.tasks)),
        time_us=torch.zeros(size, dtype=torch.long),
        domain=torch.full((size,), -1, dtype=torch.long),
        day=1,
    )


def zoo_model(name: str, seed: int = 0) -> RecModel:
    torch.manual_seed(seed)
    return build_model(ZOO[name].config, SCHEMA, SCHEMA.tasks).eval()


def add_training_heads(model: RecModel) -> None:
    """The heads distillation adds to a VM: an auxiliary (distillation) and an adapter head per task."""
    for task in model.serving_heads:
        model.add_head(f"distill:{task}", MLP(model.representation_dim, [16], 1))
        model.add_head(f"adapter:{task}", MLP(model.representation_dim, [], 1))


def serving_logits(model: RecModel, batch: Batch) -> torch.Tensor:
    """``[B, T]``: the training model's serving heads, in task order."""
    with torch.no_grad():
        logits = model(batch, heads=model.serving_heads)
    return torch.stack([logits[task] for task in model.serving_heads], dim=1)


def load_program(directory: Path) -> torch.nn.Module:
    return torch.export.load(directory / "model.pt2").module()


@pytest.fixture(scope="module")
def exported_zoo(tmp_path_factory) -> dict[str, Path]:
    """Every zoo model exported (no ONNX) from its initial weights: ``{name: artifact directory}``."""
    root = tmp_path_factory.mktemp("zoo")
    artifacts = {}
    for name in ZOO:
        artifacts[name] = root / name.replace("(", "_").replace(")", "")
        export_model(zoo_model(name), artifacts[name], SCHEMA, onnx=False)
    return artifacts


# --- parity --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", STUDENTS + TEACHERS)
def test_exported_model_matches_the_serving_heads(name, exported_zoo):
    model = zoo_model(name)
    program = load_program(exported_zoo[name])
    served = ServingModel(model)
    for size, seed in ((33, 1), (1, 2)):
        batch = random_batch(SCHEMA, size, seed)
        expected = serving_logits(model, batch)
        inputs = serving_inputs(model, batch)
        with torch.no_grad():
            assert torch.allclose(served(*inputs), expected, atol=1e-6)
            assert torch.allclose(program(*inputs), expected, atol=1e-6)
        assert expected.shape == (size, len(SCHEMA.tasks))


@pytest.mark.parametrize("name", STUDENTS)
def test_training_only_heads_leave_the_served_model_unchanged(name, tmp_path):
    """DESIGN §1: an ExFM-trained VM serves with exactly the parameters, graph and output of a plain one."""
    model = zoo_model(name)
    plain = export_model(model, tmp_path / "none", SCHEMA, onnx=False)
    add_training_heads(model)
    assert len(model.heads) == 3 * len(model.serving_heads)
    distilled = export_model(model, tmp_path / "ah_sa", SCHEMA, onnx=False)
    assert set(model.heads) >= {f"distill:{t}" for t in SCHEMA.tasks}  # the training model keeps its heads

    a = torch.export.load(tmp_path / "none" / "model.pt2")
    b = torch.export.load(tmp_path / "ah_sa" / "model.pt2")
    assert a.state_dict.keys() == b.state_dict.keys()
    assert not any("distill" in key or "adapter" in key for key in b.state_dict)
    for key, value in a.state_dict.items():
        assert torch.equal(b.state_dict[key], value), key
    assert a.graph_module.code == b.graph_module.code  # the same operations: the same latency
    assert distilled["parameter_count"] == plain["parameter_count"]
    assert distilled["inputs"] == plain["inputs"]
    batch = random_batch(SCHEMA, 17, seed=3)
    with torch.no_grad():
        out_a = a.module()(*serving_inputs(model, batch))
        out_b = b.module()(*serving_inputs(model, batch))
    assert torch.equal(out_a, out_b)
    assert torch.allclose(out_b, serving_logits(model, batch), atol=1e-6)


def test_served_model_is_a_snapshot_without_gradients():
    model = zoo_model("fm")
    add_training_heads(model)
    served = ServingModel(model)
    assert list(served.model.heads) == list(SCHEMA.tasks)
    batch = random_batch(SCHEMA, 8)
    inputs = served.inputs(batch)
    with torch.no_grad():
        before = served(*inputs)
        model.embedding.weight.add_(1.0)
        assert torch.equal(served(*inputs), before)
    assert not any(p.requires_grad for p in served.parameters())
    assert not served.training


def test_students_do_not_take_teacher_only_features(exported_zoo):
    for name in STUDENTS:
        manifest = json.loads((exported_zoo[name] / "manifest.json").read_text())
        columns = [c["feature"] for spec in manifest["inputs"] for c in spec.get("columns", spec.get("segments", []))]
        assert columns and not set(columns) & set(TEACHER_ONLY_FEATURES), name
    teacher = json.loads((exported_zoo["dcn"] / "manifest.json").read_text())
    assert teacher["inputs"][0]["shape"] == ["batch", len(SCHEMA.categorical)]


@pytest.mark.parametrize("name", STUDENTS + TEACHERS)
def test_a_zero_id_anywhere_in_a_sequence_is_padding(name, exported_zoo):
    """Left-padded, right-padded or with holes: the same items in the same order give the same logits."""
    model = zoo_model(name)
    program = load_program(exported_zoo[name])
    batch = random_batch(SCHEMA, 9, seed=4)
    ids, sequences, dense = serving_inputs(model, batch)
    if sequences.shape[1] == 0:
        pytest.skip(f"{name} reads no sequence")
    moved = torch.zeros_like(sequences)
    for row in range(sequences.shape[0]):
        items = sequences[row][sequences[row] != 0]
        if len(items) == 0:
            continue
        if row % 2:  # left-padded
            moved[row, sequences.shape[1] - len(items) :] = items
        else:  # one hole after the first item
            moved[row, 0] = items[0]
            moved[row, 2 : 1 + len(items)] = items[1 : sequences.shape[1] - 1]
            if len(items) == sequences.shape[1]:
                moved[row] = sequences[row]
    with torch.no_grad():
        assert torch.allclose(program(ids, moved, dense), program(ids, sequences, dense), atol=1e-6)


@pytest.mark.parametrize("name", ["fm", "two_tower", "dmin"])
def test_onnx_export_matches(name, tmp_path):
    pytest.importorskip("onnxscript")
    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    model = zoo_model(name)
    manifest = export_model(model, tmp_path / "out", SCHEMA)
    assert manifest["onnx"]["status"] == "ok", manifest["onnx"]
    assert manifest["files"]["onnx"] == "model.onnx"
    evaluator = ReferenceEvaluator(onnx.load(tmp_path / "out" / "model.onnx"))
    for size in (5, 1):
        batch = random_batch(SCHEMA, size, seed=size)
        inputs = dict(
            zip(["ids", "sequences", "dense"], (t.numpy() for t in serving_inputs(model, batch)), strict=True)
        )
        (logits,) = evaluator.run(None, inputs)
        assert np.allclose(logits, serving_logits(model, batch).numpy(), atol=1e-5)


# --- loading without exfm ------------------------------------------------------------------------

WITHOUT_EXFM = """
import sys
sys.modules["exfm"] = None  # from here on, `import exfm` raises ImportError
import torch
try:
    import exfm
except ImportError:
    pass
else:
    raise SystemExit("exfm is importable")
for artifact, work in zip(sys.argv[1::2], sys.argv[2::2]):
    program = torch.export.load(artifact + "/model.pt2").module()
    with torch.no_grad():
        torch.save(program(*torch.load(work + "/inputs.pt")), work + "/logits.pt")
print(sorted(name for name in sys.modules if name.startswith("exfm")))
"""


def test_artifacts_load_and_run_without_exfm(exported_zoo, tmp_path):
    args, expected = [], {}
    for name, artifact in exported_zoo.items():
        model = zoo_model(name)
        batch = random_batch(SCHEMA, 12, seed=5)
        work = tmp_path / artifact.name
        work.mkdir()
        torch.save(serving_inputs(model, batch), work / "inputs.pt")
        expected[work] = serving_logits(model, batch)
        args += [str(artifact), str(work)]
    env = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-I", "-c", WITHOUT_EXFM, *args], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.strip().splitlines()[-1] == "['exfm']"  # only the blocked name: nothing of exfm loaded
    for work, logits in expected.items():
        assert torch.allclose(torch.load(work / "logits.pt"), logits, atol=1e-6), work.name


# --- exporting a run -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A tiny FM run trained on days 1-2 of the tiny dataset (log1p-standardised numerics)."""
    root = tmp_path_factory.mktemp("run")
    data = make_tiny_dataset(root / "data", rows_per_day=400, days=4)
    config = parse_train_config(
        {
            "data": str(data),
            "model": {"name": "deepfm", "embedding_dim": 8, "deep_hidden": [16]},
            "train_days": [1, 2],
            "batch_size": 64,
            "checkpoint_every": 0,
        }
    )
    train(config, root / "run", show_progress=False)
    return root / "run"


def distilled_copy(run: Path, target: Path, method: str = "ah_sa") -> Path:
    """The run as if trained with ``method``: its checkpoint also holds training-only heads and SA state."""
    shutil.copytree(run, target)
    config = yaml.safe_load((target / "config.yaml").read_text())
    config["distillation"]["method"] = method
    (target / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    directory = RunDirectory(target)
    state = directory.load_checkpoint("last")
    width = state["model"]["heads.click.weight"].shape[1]
    for task in ("click", "like"):
        state["model"][f"heads.distill:{task}.0.weight"] = torch.randn(4, width)
        state["model"][f"heads.distill:{task}.0.bias"] = torch.randn(4)
        state["model"][f"heads.adapter:{task}.weight"] = torch.randn(1, width)
    state["student_adapter"] = {"mlp.0.weight": torch.randn(16, 1)}
    directory.save_checkpoint({k: v for k, v in state.items() if k != "format"}, "last")
    return target


def test_export_run_matches_the_checkpoint_and_writes_a_complete_manifest(trained_run, tmp_path):
    manifest = export_run(trained_run, tmp_path / "served")
    out = tmp_path / "served"
    assert sorted(p.name for p in out.iterdir()) == sorted(["manifest.json", "model.pt2", "model.onnx"])
    assert json.loads((out / "manifest.json").read_text()) == manifest
    dataset = open_dataset(yaml.safe_load((trained_run / "config.yaml").read_text())["data"])
    for key in (
        "format",
        "schema_fingerprint",
        "schema",
        "hashing",
        "tasks",
        "inputs",
        "outputs",
        "parameter_count",
        "training_method",
        "model",
        "checkpoint",
        "exfm_version",
        "torch_version",
    ):
        assert manifest.get(key) is not None, key
    assert manifest["format"] == "exfm-serving/1"
    assert manifest["schema_fingerprint"] == dataset.manifest.schema_fingerprint
    assert manifest["tasks"] == ["click", "like"] and manifest["training_method"] == "none"
    assert manifest["model"]["name"] == "deepfm"
    assert manifest["checkpoint"]["position"] == {"day": 2, "batch": 7} and manifest["checkpoint"]["examples"] == 800
    assert [spec["name"] for spec in manifest["inputs"]] == ["ids", "sequences", "dense"]
    assert manifest["inputs"][1]["segments"][0] | {"buckets": 0} == {
        "feature": "hist",
        "column": "hist",
        "separator": "|",
        "offset": 0,
        "max_len": 5,
        "table": "item",
        "buckets": 0,
    }
    assert manifest["onnx"]["status"] == "ok" and manifest["ignored_state"] == []

    model = build_model(
        parse_train_config(yaml.safe_load((trained_run / "config.yaml").read_text())).model,
        dataset.schema,
        ["click", "like"],
    ).eval()
    model.load_state_dict(RunDirectory(trained_run).load_checkpoint("last")["model"])
    program = load_program(out)
    assert manifest["parameter_count"]["total"] == sum(p.numel() for p in model.parameters())
    batch = next(iter(StreamReader(dataset, [3], 100, prefetch=0)))
    with torch.no_grad():
        assert torch.allclose(program(*serving_inputs(model, batch)), serving_logits(model, batch), atol=1e-6)


def test_manifest_numerics_reproduce_the_reader(trained_run, tmp_path):
    """Raw values, transformed by the manifest's rule, are the dense inputs the reader gives the next day."""
    manifest = export_run(trained_run, tmp_path / "served", onnx=False)
    dataset = open_dataset(yaml.safe_load((trained_run / "config.yaml").read_text())["data"])
    batch = next(iter(StreamReader(dataset, [3], 50, start=ReaderPosition(3, 0), prefetch=0)))
    raw = pq.read_table(dataset.day_files(3)[0]).slice(0, 50)
    columns = []
    for spec in manifest["inputs"][2]["columns"]:
        x = raw.column(spec["column"]).to_numpy(zero_copy_only=False).astype(np.float64)
        x = np.where(np.isnan(x), spec["fill"], x)
        if spec["transform"].startswith("log1p"):
            x = np.sign(x) * np.log1p(np.abs(x))
        if spec["transform"].endswith("standardize"):
            x = (x - spec["mean"]) / spec["std"]
        columns.append(x)
    assert np.allclose(np.stack(columns, axis=1), batch.dense.numpy(), atol=1e-5)


def test_training_only_state_in_a_checkpoint_is_dropped(trained_run, tmp_path):
    distilled = distilled_copy(trained_run, tmp_path / "ah_sa")
    plain = export_run(trained_run, tmp_path / "none", onnx=False)
    manifest = export_run(distilled, tmp_path / "ah_sa_served", onnx=False)
    assert manifest["training_method"] == "ah_sa"
    assert manifest["ignored_state"] == sorted(
        f"heads.{head}:{task}.{p}"
        for task in ("click", "like")
        for head, p in (("distill", "0.weight"), ("distill", "0.bias"), ("adapter", "weight"))
    )
    assert manifest["parameter_count"] == plain["parameter_count"]
    a = torch.export.load(tmp_path / "none" / "model.pt2")
    b = torch.export.load(tmp_path / "ah_sa_served" / "model.pt2")
    assert a.graph_module.code == b.graph_module.code
    assert a.state_dict.keys() == b.state_dict.keys()
    assert all(torch.equal(a.state_dict[k], b.state_dict[k]) for k in a.state_dict)


def test_a_missing_serving_parameter_is_an_error(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    directory = RunDirectory(run)
    state = directory.load_checkpoint("last")
    del state["model"]["heads.like.bias"]
    directory.save_checkpoint({k: v for k, v in state.items() if k != "format"}, "last")
    with pytest.raises(RunError, match=r"lacks serving parameter\(s\) \['heads.like.bias'\]"):
        export_run(run, tmp_path / "out", onnx=False)
    assert not (tmp_path / "out").exists()


def test_corrupt_or_missing_checkpoints_are_clear_errors(trained_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    last = run / "checkpoints" / "last.pt"
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(RunError, match=r"last\.pt: corrupt or unreadable checkpoint"):
        export_run(run, tmp_path / "out", onnx=False)
    with pytest.raises(
        FileNotFoundError, match=r"no checkpoint named 'day-09' \(available: \['day-01', 'day-02', 'last'\]\)"
    ):
        export_run(run, tmp_path / "out", checkpoint="day-09", onnx=False)
    with pytest.raises(FileNotFoundError, match="not a run directory"):
        export_run(tmp_path, tmp_path / "out", onnx=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing half-written


def test_an_existing_artifact_is_replaced_only_with_overwrite(trained_run, tmp_path):
    out = tmp_path / "served"
    export_run(trained_run, out, checkpoint="day-01", onnx=False)
    with pytest.raises(DatasetError, match="already exists"):
        export_run(trained_run, out, onnx=False)
    manifest = export_run(trained_run, out, onnx=False, overwrite=True)
    assert manifest["checkpoint"]["name"] == "last"
    assert json.loads((out / "manifest.json").read_text())["checkpoint"]["name"] == "last"


def test_the_documented_hashing_rule_gives_the_reader_s_buckets():
    """A server that follows the documented rule with hashlib alone gets the reader's bucket ids."""
    from exfm.data.hashing import bucketize, stable_hash

    def bucket(value: object, buckets: int) -> int:  # docs/serving.md, "Raw ids to bucket ids"
        text = "" if value is None else str(value)
        if not text:
            return 0
        digest = hashlib.blake2b(text.encode(), digest_size=8).digest()
        return 1 + (int.from_bytes(digest, "little", signed=True) or 1) % (buckets - 1)

    for values in (["u42", "", None, "ü-ß", "x" * 300], [123, 0, -7, None]):
        for buckets in (2, 50, 1 << 19):
            expected = bucketize(torch.from_numpy(stable_hash(values)), buckets).tolist()
            assert [bucket(v, buckets) for v in values] == expected
