"""External distillation: GS, LS, LW, KD, AH, the Student Adapter (Algorithm 1), missing supervision,
training end to end and exact resume."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torch.nn.functional as F
from conftest import make_tiny_dataset, tiny_schema, train_config
from torch import nn

from exfm.data.batch import Batch, KeyedJagged
from exfm.distill import (
    DistillationObjective,
    StudentAdapter,
    adapter_head_name,
    ah_pseudo_label,
    build_objective,
    distill_head_name,
    gradient_scale,
)
from exfm.models.base import RecModel
from exfm.train.config import DenseOptimizerConfig, DistillationConfig, SparseOptimizerConfig, parse_train_config
from exfm.train.objective import SupervisedObjective
from exfm.train.optim import Optimizers
from exfm.train.run_dir import RunDirectory
from exfm.train.trainer import evaluate_checkpoint, train

TASKS = ["click", "like"]
SCHEMA = tiny_schema()


class LinearRec(RecModel):
    """A tiny student: ``x = W · dense`` (no bias), linear serving heads."""

    def __init__(self, tasks=TASKS, dim: int = 3) -> None:
        super().__init__(tasks)
        self.w = nn.Linear(len(SCHEMA.numeric), dim, bias=False)
        self.representation_dim = dim
        for task in tasks:
            self.add_head(task, nn.Linear(dim, 1))

    def encode(self, features) -> torch.Tensor:
        return self.w(features.dense)

    def backbone(self, batch: Batch) -> torch.Tensor:  # no embedding collection: read the batch directly
        return self.encode(batch)


def make_batch(p_fm: torch.Tensor, seed: int = 0, labels: torch.Tensor | None = None) -> Batch:
    """A batch of the tiny schema with the given FM predictions ``[B, 2]`` (NaN = missing)."""
    g = torch.Generator().manual_seed(seed)
    rows = p_fm.shape[0]
    single = torch.stack([torch.randint(1, b.buckets, (rows,), generator=g) for b in SCHEMA.categorical])
    sparse = KeyedJagged(
        keys=[f.name for f in SCHEMA.categorical] + ["hist"],
        values=single.flatten(),
        lengths=torch.cat([torch.ones(3 * rows, dtype=torch.int32), torch.zeros(rows, dtype=torch.int32)]),
        stride=rows,
        num_single=3,
    )
    if labels is None:
        labels = (torch.rand(rows, 2, generator=g) < 0.3).float()
    return Batch(
        sparse=sparse,
        dense=torch.randn(rows, len(SCHEMA.numeric), generator=g),
        labels=labels,
        time_us=torch.zeros(rows, dtype=torch.int64),
        domain=torch.full((rows,), -1),
        day=1,
        fm_predictions=p_fm,
    )


def fresh(method: str, seed: int = 0, model_cls=LinearRec, **settings):
    """An identically initialised (model, objective) pair for ``method``."""
    torch.manual_seed(seed)
    model = model_cls()
    return model, build_objective(DistillationConfig(method=method, **settings), model, SCHEMA, TASKS)


def uniform_p(rows: int, seed: int = 1) -> torch.Tensor:
    return torch.rand(rows, 2, generator=torch.Generator().manual_seed(seed)) * 0.9 + 0.05


# --- GS, LS, LW ------------------------------------------------------------------------------------


def test_gradient_scale_is_the_identity_forward_and_scales_the_gradient():
    x = torch.randn(4, 3, requires_grad=True)
    y = gradient_scale(x, 0.25)
    assert torch.equal(y, x)
    (y * torch.arange(3.0)).sum().backward()
    assert torch.equal(x.grad, 0.25 * torch.arange(3.0).expand(4, 3))


@pytest.mark.parametrize("gs", [0.0, 0.3, 1.0, 2.5])
def test_gs_scales_only_the_backbone_gradient_from_the_distillation_head(gs):
    """Autograd against the hand-computed gradient of ``L = Σ_t mean BCE(h_s) + LW·mean BCE(h_d(GS(x)))``."""
    lw, rows = 0.7, 16
    model, objective = fresh("ah", gradient_scale=gs, loss_weight=lw)
    with torch.no_grad():  # make h_d differ from h_s
        for task in TASKS:
            model.heads[distill_head_name(task)].weight.mul_(-2.0).add_(0.1)
    p = uniform_p(rows)
    batch = make_batch(p)
    objective.forward(model, batch).loss.backward()

    x = model.backbone(batch).detach()
    expected_w = torch.zeros_like(model.w.weight)
    for t, task in enumerate(TASKS):
        h_s, h_d = model.heads[task], model.heads[distill_head_name(task)]
        r_s = (torch.sigmoid(h_s(x).squeeze(1)) - batch.labels[:, t]) / rows  # ∂L/∂s_b
        r_d = lw * (torch.sigmoid(h_d(x).squeeze(1)) - p[:, t]) / rows  # ∂L/∂d_b
        # serving head: only its own term; distillation head: at full strength whatever GS is
        torch.testing.assert_close(h_s.weight.grad, (r_s @ x).unsqueeze(0))
        torch.testing.assert_close(h_d.weight.grad, (r_d @ x).unsqueeze(0))
        torch.testing.assert_close(h_d.bias.grad, r_d.sum().unsqueeze(0))
        # backbone: dL/dx_b = r_s h_s.w + GS · r_d h_d.w, then x = W dense
        grad_x = r_s.unsqueeze(1) * h_s.weight + gs * r_d.unsqueeze(1) * h_d.weight
        expected_w += grad_x.t() @ batch.dense
    torch.testing.assert_close(model.w.weight.grad, expected_w)


def test_label_scale_clips_the_pseudo_label_at_one():
    assert torch.equal(ah_pseudo_label(torch.tensor([0.1, 0.5, 0.6, 1.0]), 2.0), torch.tensor([0.2, 1.0, 1.0, 1.0]))
    rows = 8
    model, objective = fresh("ah", label_scale=2.0)
    none_model, none_objective = fresh("none")
    p = torch.full((rows, 2), 0.6)
    batch = make_batch(p)
    loss = objective.forward(model, batch).loss
    x = model.backbone(batch)
    distill = sum(
        F.binary_cross_entropy_with_logits(model.heads[distill_head_name(t)](x).squeeze(1), torch.ones(rows))
        for t in TASKS
    )
    torch.testing.assert_close(loss, none_objective.forward(none_model, batch).loss + distill)


@pytest.mark.parametrize("method", ["kd", "ah"])
def test_loss_weight_scales_only_the_distillation_term(method):
    batch = make_batch(uniform_p(32))
    losses = {lw: fresh(method, loss_weight=lw) for lw in (0.0, 1.0, 3.0)}
    values = {lw: objective.forward(model, batch).loss for lw, (model, objective) in losses.items()}
    none_model, none_objective = fresh("none")
    assert torch.equal(values[0.0], none_objective.forward(none_model, batch).loss)
    torch.testing.assert_close(values[3.0] - values[0.0], 3.0 * (values[1.0] - values[0.0]))
    assert values[1.0] > values[0.0]


# --- what each method learns -------------------------------------------------------------------------


def _fit(method: str, steps: int = 300, **settings):
    """Train on labels with base rate 0.25 and an FM that says 0.8 everywhere."""
    model, objective = fresh(method, **settings)
    optimizers = Optimizers(model, DenseOptimizerConfig(lr=0.05), SparseOptimizerConfig())
    labels = torch.zeros(256, 2)
    labels[:64] = 1.0
    batch = make_batch(torch.full((256, 2), 0.8), labels=labels)
    for _ in range(steps):
        objective.before_step(batch)
        loss = objective.forward(model, batch).loss
        optimizers.zero_grad()
        loss.backward()
        optimizers.step()
    with torch.no_grad():
        x = model.backbone(batch)
        return {name: torch.sigmoid(logit).mean().item() for name, logit in model.apply_heads(x).items()}


def test_kd_pulls_the_serving_head_to_the_fm_and_ah_keeps_it_calibrated():
    none = _fit("none")
    kd = _fit("kd")
    ah = _fit("ah")
    assert none["click"] == pytest.approx(0.25, abs=0.03)
    assert kd["click"] == pytest.approx((0.25 + 0.8) / 2, abs=0.03)  # KD: the FM's bias in the served head
    assert ah["click"] == pytest.approx(0.25, abs=0.03)  # AH: served head calibrated ...
    assert ah[distill_head_name("click")] == pytest.approx(0.8, abs=0.03)  # ... the aux head takes the FM


def test_adapter_recalibrates_the_fm_towards_the_fresh_labels():
    fitted = _fit("ah_sa", adapter={"lr": 0.05})
    assert fitted["click"] == pytest.approx(0.25, abs=0.03)
    assert fitted[adapter_head_name("click")] == pytest.approx(0.25, abs=0.05)  # p_sa ≈ the label rate


# --- the Student Adapter --------------------------------------------------------------------------


def test_adapter_starts_as_the_identity():
    adapter = StudentAdapter(
        DistillationConfig().adapter.model_copy(update={"context_features": ["price", "cate"]}), SCHEMA, TASKS
    )
    p = torch.tensor([[1e-9, 0.2], [0.5, 0.9], [0.999, 1.0]])
    batch = make_batch(p)
    torch.testing.assert_close(adapter.predict(p, batch, [0, 1]), p.clamp(1e-7, 1 - 1e-7))


def test_adapter_context_must_be_numeric_or_categorical():
    config = DistillationConfig().adapter
    with pytest.raises(ValueError, match="sequence"):
        StudentAdapter(config.model_copy(update={"context_features": ["hist"]}), SCHEMA, TASKS)
    with pytest.raises(ValueError, match="nope"):
        StudentAdapter(config.model_copy(update={"context_features": ["nope"]}), SCHEMA, TASKS)


def _vm_parameters(model: RecModel) -> list[nn.Parameter]:
    return list(model.parameters())


def test_no_gradient_crosses_between_the_adapter_and_the_vm():
    model, objective = fresh("ah_sa", adapter={"context_features": ["price", "user"]})
    assert isinstance(objective, DistillationObjective)
    adapter = objective.adapter
    batch = make_batch(uniform_p(32))
    objective.before_step(batch)  # the SA's loss and step
    assert all(p.grad is None for p in _vm_parameters(model)), "the SA's loss reached the VM"
    assert any(p.grad is not None for p in adapter.parameters())
    adapter.zero_grad(set_to_none=True)
    objective.forward(model, batch).loss.backward()  # the VM's loss
    assert all(p.grad is None for p in adapter.parameters()), "a VM gradient reached the SA"
    assert model.heads[adapter_head_name("click")].weight.grad is not None
    assert model.w.weight.grad is not None


def test_algorithm_1_order_sa_step_then_updated_prediction_then_vm_step(tmp_path, monkeypatch):
    data = fm_dataset(tmp_path / "data", rows_per_day=256, days=2)
    events: list[str] = []
    snapshots: dict[str, list[torch.Tensor]] = {}

    def params(adapter):
        return [p.detach().clone() for p in adapter.parameters()]

    step, predict, vm_step = StudentAdapter.step, StudentAdapter.predict, Optimizers.step

    def spy_step(self, *args):
        snapshots["before"] = params(self)
        out = step(self, *args)
        snapshots["after"] = params(self)
        events.append("sa_step")
        return out

    def spy_predict(self, *args):
        current = params(self)
        assert all(torch.equal(a, b) for a, b in zip(current, snapshots["after"], strict=True))
        assert not all(torch.equal(a, b) for a, b in zip(current, snapshots["before"], strict=True))
        events.append("sa_predict")
        return predict(self, *args)

    def spy_vm_step(self):
        events.append("vm_step")
        vm_step(self)

    monkeypatch.setattr(StudentAdapter, "step", spy_step)
    monkeypatch.setattr(StudentAdapter, "predict", spy_predict)
    monkeypatch.setattr(Optimizers, "step", spy_vm_step)
    config = parse_train_config(_config(data, "ah_sa", train_days=[1, 2], eval_days=[]))
    result = train(config, tmp_path / "run", show_progress=False)
    batches = result.examples // 64
    assert events == ["sa_step", "sa_predict", "vm_step"] * batches


# --- missing supervision --------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["kd", "ah", "ah_sa"])
def test_missing_predictions_give_exactly_the_none_loss_and_train_only_serving_heads(method):
    rows = 24
    batch = make_batch(torch.full((rows, 2), float("nan")))
    none_model, none_objective = fresh("none")
    model, objective = fresh(method)
    loss = objective.forward(model, batch).loss
    expected = none_objective.forward(none_model, batch).loss
    assert torch.equal(loss, expected)
    objective.before_step(batch)
    loss.backward()
    expected.backward()
    for name, param in model.named_parameters():
        if name.startswith(("heads.distill:", "heads.adapter:")):
            assert param.grad is None, name
        else:
            assert torch.equal(param.grad, dict(none_model.named_parameters())[name].grad), name
    if objective.adapter is not None:
        assert not objective.adapter.optimizer.state, "the SA stepped without supervision"
    assert objective.log_record() == {"supervision": {t: {"rows": 0, "missing": rows} for t in TASKS}}


def test_distillation_terms_average_over_the_supervised_rows():
    p = uniform_p(10)
    p[:4, 0] = float("nan")  # click: 6 supervised rows
    p[:, 1] = float("nan")  # like: none
    batch = make_batch(p)
    model, objective = fresh("ah", loss_weight=1.0)
    loss = objective.forward(model, batch).loss
    x = model.backbone(batch)
    logit = model.heads[distill_head_name("click")](x[4:]).squeeze(1)
    distill = F.binary_cross_entropy_with_logits(logit, p[4:, 0])
    torch.testing.assert_close(loss, SupervisedObjective(TASKS, [0, 1]).forward(model, batch).loss + distill)
    loss.backward()
    assert model.heads[distill_head_name("like")].weight.grad is None
    assert objective.log_record()["supervision"] == {
        "click": {"rows": 6, "missing": 4},
        "like": {"rows": 0, "missing": 10},
    }


def test_a_batch_without_fm_predictions_is_an_error():
    model, objective = fresh("kd")
    batch = make_batch(uniform_p(4))
    batch.fm_predictions = None
    with pytest.raises(ValueError, match="with_fm_predictions"):
        objective.forward(model, batch)


# --- through the trainer -------------------------------------------------------------------------


def fm_dataset(out: Path, rows_per_day: int = 1000, days: int = 4, missing: float = 0.2) -> Path:
    """The tiny dataset with logged FM predictions: a biased ``fm:click`` and ``fm:like``, some null."""
    data = make_tiny_dataset(out, rows_per_day=rows_per_day, days=days)
    rng = np.random.default_rng(7)
    for path in sorted(data.glob("day=*/*.parquet")):
        table = pq.read_table(path)
        p = table.column("p_click").to_numpy()
        for task, value in (("click", np.clip(1.3 * p + 0.05, 0, 1)), ("like", 0.3 * p)):
            null = rng.random(len(p)) < missing
            table = table.append_column(f"fm:{task}", pa.array(value.astype(np.float32), mask=null))
        pq.write_table(table, path)
    return data


def _config(data: Path, method: str, **changes) -> dict:
    return train_config(data, **{"distillation": {"method": method}, **changes})


@pytest.fixture(scope="module")
def fm_data(tmp_path_factory) -> Path:
    return fm_dataset(tmp_path_factory.mktemp("fm") / "data", rows_per_day=640)


@pytest.mark.parametrize(
    ("method", "model", "settings"),
    [
        ("none", {"name": "fm", "embedding_dim": 8}, {}),
        ("kd", {"name": "fm", "embedding_dim": 8}, {"loss_weight": 0.5}),
        (
            "ah",
            {"name": "deepfm", "embedding_dim": 8, "deep_hidden": [16]},
            {"gradient_scale": 0.5, "label_scale": 1.2},
        ),
        (
            "ah_sa",
            {"name": "dlrm", "embedding_dim": 8, "bottom_hidden": [8], "top_hidden": [16]},
            {
                "head_hidden": [8],
                "adapter": {"hidden": [4], "context_features": ["price", "cate"], "optimizer": "adagrad"},
            },
        ),
    ],
)
def test_every_method_trains_end_to_end(fm_data, tmp_path, method, model, settings):
    config = parse_train_config(_config(fm_data, method, model=model, distillation={"method": method, **settings}))
    result = train(config, tmp_path / "run", show_progress=False)
    assert result.examples == 3 * 640
    metrics = result.evaluations[4]["click"]["all"]
    assert np.isfinite(metrics.logloss) and metrics.auc > 0.5
    records = RunDirectory(result.run_dir).read_metrics()
    day_end = [r for r in records if r["event"] == "day_end"][-1]
    extra_heads = {n for n in result.model.heads if n not in TASKS}
    if method == "none":
        assert "supervision" not in day_end and not extra_heads
    else:
        for task in TASKS:
            counts = day_end["supervision"][task]
            assert counts["rows"] + counts["missing"] == 3 * 640
            assert 0.7 < counts["rows"] / (3 * 640) < 0.9  # 20 % of the FM predictions are null
        expected = {distill_head_name(t) for t in TASKS} if method in ("ah", "ah_sa") else set()
        expected |= {adapter_head_name(t) for t in TASKS} if method == "ah_sa" else set()
        assert extra_heads == expected
    # the served model is evaluated on its serving heads; a checkpoint with training heads re-evaluates the same
    again = evaluate_checkpoint(result.run_dir, 4)
    assert again["click"]["all"].logloss == pytest.approx(metrics.logloss, rel=1e-12)


def test_ah_sa_crash_and_resume_is_bit_identical(fm_data, tmp_path, monkeypatch):
    config = parse_train_config(
        _config(fm_data, "ah_sa", distillation={"method": "ah_sa", "adapter": {"context_features": ["score", "item"]}})
    )
    whole = train(config, tmp_path / "whole", show_progress=False)

    vm_step, calls = Optimizers.step, [0]

    def crash_at_batch_17(self):  # day 2, between the checkpoints of batches 14 and 20
        calls[0] += 1
        if calls[0] == 17:
            raise RuntimeError("killed")
        vm_step(self)

    monkeypatch.setattr(Optimizers, "step", crash_at_batch_17)
    with pytest.raises(RuntimeError, match="killed"):
        train(config, tmp_path / "killed", show_progress=False)
    monkeypatch.setattr(Optimizers, "step", vm_step)
    assert torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)["batches"] == 14
    resumed = train(config, tmp_path / "killed", resume=True, show_progress=False)

    a = torch.load(tmp_path / "whole/checkpoints/last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed/checkpoints/last.pt", weights_only=True)
    assert a["batches"] == b["batches"] and resumed.examples == whole.examples
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), name
    for name, tensor in a["objective"]["adapter"]["parameters"].items():
        assert torch.equal(tensor, b["objective"]["adapter"]["parameters"][name]), name
    assert a["objective"]["rows"] == b["objective"]["rows"]
    state_a, state_b = a["objective"]["adapter"]["optimizer"]["state"], b["objective"]["adapter"]["optimizer"]["state"]
    for key in state_a:
        for field in state_a[key]:
            assert torch.equal(state_a[key][field], state_b[key][field])

    def without_timing(run):
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in RunDirectory(run).read_metrics()]

    assert without_timing(tmp_path / "whole") == without_timing(tmp_path / "killed")
    summary = "summary.json"
    assert json.loads((tmp_path / "whole" / summary).read_text()) == json.loads(
        (tmp_path / "killed" / summary).read_text()
    )
