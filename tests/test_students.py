"""The student models: FmFM, DeepFM, DLRM and the two-tower model (formulas, interface, export)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from test_models import BUCKETS, TASKS, fit_rule, make_batch, make_schema, random_batch, total_loss

from exfm.models import (
    MODEL_CONFIGS,
    DeepFMConfig,
    DeepFMModel,
    DLRMConfig,
    DLRMModel,
    DotInteraction,
    FieldPairInteraction,
    FMConfig,
    FmFMConfig,
    FmFMModel,
    FMInteraction,
    RecModel,
    TwoTowerConfig,
    TwoTowerModel,
    build_model,
    flops_per_example,
    parse_model_config,
)

USER = ["user", "hist", "age"]
ITEM = ["item", "cate", "price"]  # "ad" is in neither tower
CONFIGS = {
    "fmfm-vectorized": FmFMConfig(embedding_dim=8, variant="vectorized"),
    "fmfm-matrixed": FmFMConfig(embedding_dim=8),
    "deepfm": DeepFMConfig(embedding_dim=8, deep_hidden=[16, 8], dropout=0.1),
    "dlrm": DLRMConfig(embedding_dim=8, bottom_hidden=[8], top_hidden=[16]),
    "dlrm-no-dense": DLRMConfig(embedding_dim=8, features=["user", "item", "hist"], top_hidden=[16]),
    "two-tower": TwoTowerConfig(
        embedding_dim=8, user_features=USER, item_features=ITEM, tower_hidden=[16], output_dim=8, temperature=0.5
    ),
    "two-tower-learned": TwoTowerConfig(
        embedding_dim=8, user_features=USER, item_features=ITEM, tower_hidden=[16], learn_head_weights=True
    ),
}


def build(name: str, seed: int = 0) -> RecModel:
    torch.manual_seed(seed)
    return build_model(CONFIGS[name], make_schema(), TASKS)


def randomise_embeddings(*models: RecModel, seed: int = 1) -> None:
    """Give the FM-family embeddings a scale at which the interactions are far from zero."""
    for model in models:
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in (model.embedding.weight, model.embedding.first_order_weight, model.numeric_embedding):
                p.normal_(0, 0.5)
            model.numeric_first_order.normal_()
            model.embedding.weight[0] = 0
            model.embedding.first_order_weight[0] = 0


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_returns_float_logits_per_task(name):
    model = build(name)
    batch = random_batch(16, missing=True)
    logits = model(batch)
    assert list(logits) == TASKS
    for value in logits.values():
        assert value.shape == (16,) and value.dtype == torch.float32 and value.isfinite().all()
    assert model.backbone(batch).shape == (16, model.representation_dim)
    assert flops_per_example(model, make_schema()).dense_macs > 0


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_trainable_parameter(name):
    model = build(name)
    batch = random_batch(16, missing=True)
    batch.labels = torch.randint(0, 2, (16, 2), generator=torch.Generator().manual_seed(0)).float()
    total_loss(model, batch).backward()
    sparse = list(model.sparse_parameters())
    assert sparse and all(p.grad is not None and p.grad.is_sparse for p in sparse)
    for pname, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname
        else:
            assert p.grad is None, pname


@pytest.mark.parametrize("name", CONFIGS)
def test_config_round_trip(name):
    config = CONFIGS[name]
    assert parse_model_config(config.model_dump()) == config
    assert MODEL_CONFIGS[config.name] is type(config)


# --- FmFM ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["vectorized", "matrixed"])
def test_fmfm_with_identity_transforms_is_fm(variant):
    torch.manual_seed(0)
    fm = build_model(FMConfig(embedding_dim=8), make_schema(), TASKS)
    fmfm = build_model(FmFMConfig(embedding_dim=8, variant=variant), make_schema(), TASKS)
    randomise_embeddings(fm, fmfm)
    transform = fmfm.interaction.transform
    pairs = fmfm.interaction.num_pairs
    identity = torch.ones(pairs, 8) if variant == "vectorized" else torch.eye(8).expand(pairs, 8, 8)
    assert torch.equal(transform, identity)
    batch = random_batch(8, missing=True)
    with torch.no_grad():
        assert torch.allclose(fmfm.backbone(batch), fm.backbone(batch), atol=1e-5)
        assert torch.allclose(fmfm(batch)["click"], fm(batch)["click"], atol=1e-5)


def test_fmfm_field_count_includes_sequences_and_numerics():
    model = build("fmfm-matrixed")
    assert model.interaction.num_pairs == 7 * 6 // 2  # 4 categoricals + hist + 2 numerics
    assert model.representation_dim == 9


@pytest.mark.parametrize("variant", ["vectorized", "matrixed"])
def test_field_pair_interaction_follows_the_paper(variant):
    torch.manual_seed(0)
    block = FieldPairInteraction(5, 4, variant)
    with torch.no_grad():
        block.transform.normal_()
    fields = torch.randn(3, 5, 4)
    expected = torch.zeros(3, 4)
    pairs = [(f, g) for f in range(5) for g in range(f + 1, 5)]
    for p, (f, g) in enumerate(pairs):
        if variant == "vectorized":
            expected += fields[:, f] * block.transform[p] * fields[:, g]
        else:
            expected += (fields[:, f] @ block.transform[p]) * fields[:, g]
    assert torch.allclose(block(fields), expected, atol=1e-5)
    assert torch.allclose(FieldPairInteraction(5, 4, variant)(fields), FMInteraction()(fields), atol=1e-5)
    with pytest.raises(ValueError, match="variant"):
        FieldPairInteraction(5, 4, "scalar")


# --- DeepFM -------------------------------------------------------------------------------------


def test_deepfm_at_init_is_fm_logit_plus_deep_logit():
    torch.manual_seed(0)
    fm = build_model(FMConfig(embedding_dim=8), make_schema(), TASKS)
    deepfm = build_model(DeepFMConfig(embedding_dim=8, deep_hidden=[16, 8]), make_schema(), TASKS)
    randomise_embeddings(fm, deepfm)
    batch = random_batch(8, missing=True)
    deepfm.eval()
    with torch.no_grad():
        fm_logit = fm(batch)["like"]  # unit weights, zero bias: the plain FM
        x = deepfm.backbone(batch)
        head = deepfm.heads["like"]
        deep_logit = x[:, 9:] @ head.weight[0, 9:] + head.bias
        assert torch.allclose(x[:, 9:], deepfm.interaction.deep(_deep_input(deepfm, batch)), atol=1e-6)
        assert torch.allclose(deepfm(batch)["like"], fm_logit + deep_logit, atol=1e-5)
    assert torch.equal(head.weight[0, :9], torch.ones(9))
    assert deepfm.representation_dim == 9 + 8
    with pytest.raises(ValueError, match="hidden"):
        DeepFMModel(make_schema(), TASKS, deep_hidden=[])


def _deep_input(model: DeepFMModel, batch) -> torch.Tensor:
    """DeepFM's deep input, built by hand: ``[v_1, …, v_5, x_1 u_1, x_2 u_2]`` flattened."""
    emb = model.embedding(batch)
    numeric = batch.dense.unsqueeze(-1) * model.numeric_embedding
    return torch.cat([emb.fields(), numeric], dim=1).flatten(1)


# --- DLRM ---------------------------------------------------------------------------------------


def test_dlrm_interaction_count_and_formula():
    model = build("dlrm")
    num_fields = 5  # 4 categoricals + the pooled sequence
    assert model.interaction.output_dim == (num_fields + 1) * num_fields // 2
    assert model.top[0].in_features == 8 + (num_fields + 1) * num_fields // 2
    no_dense = build("dlrm-no-dense")
    assert no_dense.bottom is None
    assert no_dense.interaction.output_dim == 3 * 2 // 2
    assert no_dense.top[0].in_features == 3

    t = torch.randn(2, 4, 3)
    expected = torch.stack([(t[:, a] * t[:, b]).sum(-1) for a in range(4) for b in range(a + 1, 4)], dim=1)
    assert torch.allclose(DotInteraction(4)(t), expected, atol=1e-6)


def test_dlrm_backbone_by_hand():
    model = build("dlrm")
    batch = random_batch(6, missing=True)
    with torch.no_grad():
        emb = model.embedding(batch)
        z = model.bottom(batch.dense)
        t = torch.cat([z.unsqueeze(1), emb.fields()], dim=1)
        pairs = [(t[:, a] * t[:, b]).sum(-1) for a in range(6) for b in range(a + 1, 6)]
        expected = model.top(torch.cat([z, torch.stack(pairs, dim=1)], dim=1))
        assert torch.allclose(model.backbone(batch), expected, atol=1e-6)
    assert isinstance(model, DLRMModel) and model.bottom.output_dim == 8


# --- two-tower ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["two-tower", "two-tower-learned"])
def test_two_tower_exported_towers_give_the_logit(name):
    model = build(name)
    with torch.no_grad():
        for head in model.heads.values():
            head.bias.fill_(0.3)
            if name == "two-tower-learned":
                head.weight.normal_()
    batch = random_batch(16, missing=True)
    users, items = model.user_tower_module(), model.item_tower_module()
    with torch.no_grad():
        u = users(*users.inputs(batch))
        i = items(*items.inputs(batch))
        assert torch.allclose(u, model.user_tower(batch), atol=1e-6)
        assert torch.allclose(i, model.item_tower(batch), atol=1e-6)
        logits = model(batch)
        for task in TASKS:
            head = model.heads[task]
            if name == "two-tower":
                expected = (u * i).sum(-1) / CONFIGS[name].temperature + head.bias
            else:  # the task's weights folded into the item vector
                expected = (u * (head.weight[0] * i)).sum(-1) + head.bias
            assert torch.allclose(logits[task], expected, atol=1e-5)
    assert model.heads["click"].weight.requires_grad == (name == "two-tower-learned")


def test_two_tower_towers_run_under_torch_export():
    model = build("two-tower")
    batch_dim = torch.export.Dim("batch")
    example, other = random_batch(16, missing=True), random_batch(5, seed=3, missing=True)
    for tower in (model.user_tower_module(), model.item_tower_module()):
        inputs = tower.inputs(example)
        program = torch.export.export(tower, inputs, dynamic_shapes=tuple({0: batch_dim} for _ in inputs))
        with torch.no_grad():
            assert torch.allclose(program.module()(*tower.inputs(other)), tower(*tower.inputs(other)), atol=1e-6)


def test_exported_tower_is_a_snapshot():
    model = build("two-tower")
    users = model.user_tower_module()
    batch = random_batch(4)
    with torch.no_grad():
        before = users(*users.inputs(batch))
        model.user_tower.embedding.weight.add_(1.0)
        assert torch.equal(users(*users.inputs(batch)), before)
    assert not any(p.requires_grad for p in users.parameters())


def test_two_tower_towers_see_only_their_features():
    model = build("two-tower")
    assert model.user_tower.embedding.single_features == ["user"]
    assert model.user_tower.embedding.sequence_features == ["hist"]
    assert model.item_tower.embedding.numeric_features == ["price"]
    single, hist, dense = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]]), [[3, 4], []], torch.randn(2, 2)
    batch = make_batch(single, hist, dense)
    other_items = make_batch(torch.tensor([[1, 9, 1, 4], [5, 1, 2, 8]]), hist, dense + torch.tensor([1.0, 0.0]))
    other_users = make_batch(torch.tensor([[7, 2, 3, 4], [0, 6, 7, 8]]), [[5], [1]], dense + torch.tensor([0.0, 1.0]))
    other_ads = make_batch(torch.tensor([[1, 2, 3, 9], [5, 6, 7, 1]]), hist, dense)  # "ad" is in no tower
    with torch.no_grad():
        assert torch.equal(model.user_tower(other_items), model.user_tower(batch))
        assert not torch.equal(model.item_tower(other_items), model.item_tower(batch))
        assert torch.equal(model.item_tower(other_users), model.item_tower(batch))
        assert not torch.equal(model.user_tower(other_users), model.user_tower(batch))
        assert torch.equal(model(other_ads)["click"], model(batch)["click"])


def test_two_tower_config_errors():
    with pytest.raises(ValueError, match="both towers"):
        TwoTowerConfig(user_features=["user", "item"], item_features=["item"])
    with pytest.raises(ValueError, match="features is unused"):
        TwoTowerConfig(user_features=["user"], item_features=["item"], features=["user"])
    with pytest.raises(ValueError, match="temperature"):
        parse_model_config(
            {"name": "two_tower", "user_features": ["user"], "item_features": ["item"], "temperature": 0}
        )
    with pytest.raises(ValueError, match="both towers"):
        TwoTowerModel(make_schema(), TASKS, ["user"], ["user"])
    with pytest.raises(ValueError, match="temperature"):
        TwoTowerModel(make_schema(), TASKS, ["user"], ["item"], temperature=-1.0)


# --- training -----------------------------------------------------------------------------------


def serving_loss(model: RecModel, batch) -> torch.Tensor:
    """Sum of the BCE of every serving head against its task's label column."""
    logits = model(batch, heads=model.serving_heads)
    return sum(F.binary_cross_entropy_with_logits(logits[t], batch.labels[:, TASKS.index(t)]) for t in logits)


@pytest.mark.parametrize("name", CONFIGS)
def test_training_reduces_loss(name):
    # With fixed head weights every task shares the score <u, i> / τ (up to its bias), which cannot
    # fit both rules of rule_batch (click: user-item parity match; like: item parity): train on click.
    tasks = ["click"] if name == "two-tower" else TASKS
    torch.manual_seed(0)
    model = build_model(CONFIGS[name], make_schema(), tasks)
    before, after = fit_rule(model, serving_loss)
    assert after < 0.5 * before, (before, after)


def test_students_parse_by_name_with_defaults():
    for name, cls in [("fmfm", FmFMModel), ("deepfm", DeepFMModel), ("dlrm", DLRMModel)]:
        assert isinstance(build_model(parse_model_config({"name": name}), make_schema(), ["click"]), cls)
    config = parse_model_config({"name": "two_tower", "user_features": ["user"], "item_features": list(BUCKETS)[1:]})
    assert isinstance(build_model(config, make_schema(), ["click"]), TwoTowerModel)
