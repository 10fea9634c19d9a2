"""Models: embedding collection, blocks, the RecModel interface, FM and DCNv2, the registry."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from exfm.data.batch import Batch, KeyedJagged
from exfm.models import (
    MLP,
    CrossLayerV2,
    DCNv2Config,
    DCNv2Model,
    EmbeddingCollection,
    FMConfig,
    FMInteraction,
    FMModel,
    LowRankMixtureCrossLayer,
    RecModel,
    SequenceEmbedding,
    build_model,
    count_parameters,
    flops_per_example,
    parse_model_config,
)
from exfm.schema import Schema, SchemaError, parse_schema

TASKS = ["click", "like"]


BUCKETS = {"user": 50, "item": 30, "cate": 10, "ad": 20}


def make_schema(max_len: int = 4) -> Schema:
    categorical = [{"type": "categorical", "name": n, "buckets": b} for n, b in BUCKETS.items()]
    return parse_schema(
        {
            "name": "toy",
            "features": [
                *categorical,
                {"type": "sequence", "name": "hist", "max_len": max_len, "embedding": "item"},
                {"type": "numeric", "name": "price"},
                {"type": "numeric", "name": "age"},
            ],
            "labels": [{"name": t} for t in TASKS],
            "time": {"column": "ts"},
        }
    )


def make_batch(
    single: torch.Tensor, hist: list[list[int]], dense: torch.Tensor, labels: torch.Tensor | None = None
) -> Batch:
    """A batch by hand: ``single [B, 4]`` ids (user, item, cate, ad), ``hist`` item lists."""
    size = single.shape[0]
    values = torch.cat([single.t().reshape(-1), torch.tensor([i for h in hist for i in h], dtype=torch.long)])
    lengths = torch.tensor([1] * (4 * size) + [len(h) for h in hist], dtype=torch.int32)
    return Batch(
        sparse=KeyedJagged([*BUCKETS, "hist"], values, lengths, stride=size, num_single=4),
        dense=dense,
        labels=torch.zeros(size, len(TASKS)) if labels is None else labels,
        time_us=torch.zeros(size, dtype=torch.long),
        domain=torch.full((size,), -1, dtype=torch.long),
        day=1,
    )


def random_batch(size: int = 16, seed: int = 0, missing: bool = False) -> Batch:
    g = torch.Generator().manual_seed(seed)
    low = 0 if missing else 1
    single = torch.stack([torch.randint(low, b, (size,), generator=g) for b in BUCKETS.values()], dim=1)
    hist = [
        torch.randint(1, BUCKETS["item"], (int(n),), generator=g).tolist()
        for n in torch.randint(0, 5, (size,), generator=g)
    ]
    return make_batch(single, hist, torch.randn(size, 2, generator=g))


CONFIGS = {
    "fm": FMConfig(embedding_dim=8),
    "dcnv2-full-parallel": DCNv2Config(embedding_dim=8, deep_hidden=[16], num_cross_layers=2),
    "dcnv2-full-stacked": DCNv2Config(embedding_dim=8, deep_hidden=[16], structure="stacked"),
    "dcnv2-lowrank-parallel": DCNv2Config(embedding_dim=8, deep_hidden=[16], low_rank=4, num_experts=3),
    "dcnv2-lowrank-stacked": DCNv2Config(
        embedding_dim=8, deep_hidden=[16, 8], low_rank=4, structure="stacked", head_hidden=[8]
    ),
}


def build(name: str, seed: int = 0) -> RecModel:
    torch.manual_seed(seed)
    return build_model(CONFIGS[name], make_schema(), TASKS)


def total_loss(model: RecModel, batch: Batch) -> torch.Tensor:
    logits = model(batch)
    return sum(F.binary_cross_entropy_with_logits(logits[t], batch.labels[:, i]) for i, t in enumerate(TASKS))


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_returns_float_logits_per_task(name):
    model = build(name)
    batch = random_batch(16)
    logits = model(batch)
    assert list(logits) == TASKS
    for value in logits.values():
        assert value.shape == (16,) and value.dtype == torch.float32
    assert model.backbone(batch).shape == (16, model.representation_dim)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name):
    model = build(name)
    batch = random_batch(16, missing=True)
    batch.labels = torch.randint(0, 2, (16, 2)).float()
    total_loss(model, batch).backward()
    collection = model.embedding
    touched = set(collection.rows(batch).unique().tolist()) - {0}
    sparse = list(model.sparse_parameters())
    assert sparse and all(p.grad is not None and p.grad.is_sparse for p in sparse)
    for p in sparse:
        dense_grad = p.grad.coalesce().to_dense()
        nonzero = set(dense_grad.abs().sum(1).nonzero().flatten().tolist())
        assert nonzero == touched
    for pname, p in model.named_parameters():
        if p.is_leaf and not any(p is s for s in sparse):
            assert p.grad is not None and not p.grad.is_sparse, pname
            assert p.grad.abs().sum() > 0, pname


def test_sparse_and_dense_parameters_partition_the_model():
    model = build("fm")
    sparse = {id(p) for p in model.sparse_parameters()}
    dense = {id(p) for p in model.dense_parameters()}
    assert sparse and dense and not sparse & dense
    assert sparse | dense == {id(p) for p in model.parameters()}


def test_missing_id_embeds_to_zero_and_gets_no_gradient():
    torch.manual_seed(0)
    collection = EmbeddingCollection(make_schema(), None, 8, first_order=True)
    with torch.no_grad():
        collection.first_order_weight.normal_()
        collection.first_order_weight[0] = 0
    single = torch.tensor([[0, 3, 0, 5], [7, 0, 2, 0]])
    batch = make_batch(single, [[0, 4], []], torch.zeros(2, 2))
    out = collection(batch)
    assert torch.equal(out.single[single == 0], torch.zeros(4, 8))
    assert (out.single[single != 0].abs().sum(1) > 0).all()
    assert torch.equal(out.first_order[:, :4][single == 0], torch.zeros(4))
    assert out.sequences["hist"].mask.tolist() == [[False, True, False, False], [False] * 4]

    (out.single.sum() + out.fields().square().sum() + out.first_order.sum()).backward()
    for weight in (collection.weight, collection.first_order_weight):
        grad = weight.grad.coalesce().to_dense()
        assert grad[0].abs().sum() == 0
        assert grad.abs().sum() > 0
    optimizer = torch.optim.SparseAdam(collection.parameters(), lr=0.1)
    optimizer.step()
    assert collection.weight[0].abs().sum() == 0 and collection.first_order_weight[0].abs().sum() == 0


def test_fused_lookup_matches_per_table_embeddings():
    torch.manual_seed(0)
    collection = EmbeddingCollection(make_schema(), None, 8)
    batch = random_batch(8, missing=True)
    out = collection(batch)
    base = 0
    for column, (name, buckets) in enumerate(BUCKETS.items()):
        table = collection.weight[base + 1 : base + buckets]
        ids = batch.sparse.single_ids()[:, column]
        expected = torch.where((ids > 0).unsqueeze(1), table[(ids - 1).clamp(min=0)], 0.0)
        assert torch.equal(out.single[:, column], expected), name
        if name == "item":  # the sequence shares item's table
            hist = batch.sparse.padded("hist", 4)
            seq = torch.where((hist > 0).unsqueeze(-1), table[(hist - 1).clamp(min=0)], 0.0)
            assert torch.equal(out.sequences["hist"].values, seq)
        base += buckets - 1
    assert collection.num_rows == base + 1


def test_sparse_gradient_matches_nn_embedding():
    torch.manual_seed(0)
    collection = EmbeddingCollection(make_schema(), None, 8)
    batch = random_batch(8, missing=True)
    rows = collection.rows(batch)
    reference = nn.Embedding(collection.num_rows, 8, padding_idx=0, sparse=True)
    with torch.no_grad():
        reference.weight.copy_(collection.weight)
    target = torch.randn(*rows.shape, 8)
    (reference(rows) * target).sum().backward()
    out = collection(batch)
    values = torch.cat([out.single, out.sequences["hist"].values], dim=1)
    (values * target).sum().backward()
    assert torch.allclose(collection.weight.grad.to_dense(), reference.weight.grad.to_dense())


def test_feature_subset_excludes_columns():
    schema = make_schema()
    torch.manual_seed(0)
    model = build_model(FMConfig(embedding_dim=8, features=["user", "item", "hist", "price"]), schema, TASKS)
    assert model.embedding.single_features == ["user", "item"]
    assert model.embedding.numeric_features == ["price"]
    full = sum(b - 1 for b in BUCKETS.values()) + 1
    assert model.embedding.num_rows == full - (BUCKETS["cate"] - 1) - (BUCKETS["ad"] - 1)

    single = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 1, 2]])
    hist = [[3, 4], [], [5]]
    dense = torch.randn(3, 2)
    reference = model(make_batch(single, hist, dense))
    other = single.clone()
    other[:, 2:] = torch.tensor([[9, 19], [0, 1], [2, 3]])  # other cate and ad ids
    other_dense = dense.clone()
    other_dense[:, 1] += 5.0  # another age
    changed = model(make_batch(other, hist, other_dense))
    for t in TASKS:
        assert torch.equal(changed[t], reference[t])
    other[:, 0] = torch.tensor([11, 12, 13])  # other users: the output moves
    assert not torch.equal(model(make_batch(other, hist, other_dense))["click"], reference["click"])


def test_sequence_table_is_kept_when_only_the_sequence_is_selected():
    collection = EmbeddingCollection(make_schema(), ["hist"], 4)
    assert collection.single_features == [] and collection.sequence_features == ["hist"]
    assert collection.num_rows == BUCKETS["item"]
    assert collection(random_batch(4)).fields().shape == (4, 1, 4)


def test_unknown_or_empty_feature_selection_is_an_error():
    with pytest.raises(SchemaError, match="nope"):
        EmbeddingCollection(make_schema(), ["user", "nope"], 4)
    with pytest.raises(SchemaError, match="no model feature"):
        EmbeddingCollection(make_schema(), [], 4)


def test_batch_layout_mismatch_is_an_error():
    model = build("fm")
    batch = random_batch(4)
    batch.sparse.keys = ["item", "user", "cate", "ad", "hist"]
    with pytest.raises(ValueError, match="does not match"):
        model(batch)


def test_pooling_ignores_padding_content():
    values = torch.randn(3, 4, 5)
    mask = torch.tensor([[True, True, False, False], [True, False, True, False], [False] * 4])
    pooled = SequenceEmbedding(values, mask).pooled()
    garbage = torch.where(mask.unsqueeze(-1), values, torch.randn(3, 4, 5) * 100)
    assert torch.allclose(SequenceEmbedding(garbage, mask).pooled(), pooled)
    assert torch.allclose(pooled[0], values[0, :2].mean(0))
    assert torch.allclose(pooled[1], values[1, [0, 2]].mean(0))
    assert torch.equal(pooled[2], torch.zeros(5))


@pytest.mark.parametrize("name", ["fm", "dcnv2-full-parallel"])
def test_more_padding_or_missing_items_do_not_change_the_output(name):
    short = build(name)
    torch.manual_seed(0)
    long = build_model(CONFIGS[name], make_schema(max_len=9), TASKS)
    long.load_state_dict(short.state_dict())
    single = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    dense = torch.randn(2, 2)
    reference = short(make_batch(single, [[3, 4], []], dense))
    assert torch.equal(long(make_batch(single, [[3, 4], []], dense))["click"], reference["click"])
    with_missing = short(make_batch(single, [[3, 0, 4], [0]], dense))
    assert torch.allclose(with_missing["click"], reference["click"])


def plain_fm(model: FMModel, batch: Batch) -> torch.Tensor:
    """Rendle's FM computed the long way: w0 + Σ w_f + Σ_{f<g} <v_f, v_g> per example."""
    collection = model.embedding
    rows = collection.rows(batch)
    out = []
    for b in range(batch.size):
        vectors, weights = [], []
        for f in range(4):
            vectors.append(collection.weight[rows[b, f]])
            weights.append(collection.first_order_weight[rows[b, f], 0])
        items = [r for r in rows[b, 4:].tolist() if r != 0]
        if items:
            vectors.append(collection.weight[items].mean(0))
            weights.append(collection.first_order_weight[items, 0].mean())
        else:
            vectors.append(torch.zeros(collection.dim))
            weights.append(torch.tensor(0.0))
        for n in range(2):
            x = batch.dense[b, n]
            vectors.append(x * model.numeric_embedding[n])
            weights.append(x * model.numeric_first_order[n, 0])
        pairs = sum(torch.dot(vectors[i], vectors[j]) for i in range(len(vectors)) for j in range(i + 1, len(vectors)))
        out.append(model.heads["click"].bias[0] + sum(weights) + pairs)
    return torch.stack(out)


def test_fm_at_init_is_a_plain_fm():
    model = build("fm")
    with torch.no_grad():
        for p in (model.embedding.weight, model.embedding.first_order_weight, model.numeric_embedding):
            p.normal_(0, 0.5)
        model.numeric_first_order.normal_()
        model.embedding.weight[0] = 0
        model.embedding.first_order_weight[0] = 0
    batch = random_batch(6, missing=True)
    with torch.no_grad():
        expected = plain_fm(model, batch)
        logits = model(batch)
    assert torch.allclose(logits["click"], expected, atol=1e-5)
    assert torch.allclose(logits["like"], expected, atol=1e-5)
    assert torch.equal(model.heads["click"].weight, torch.ones(1, 9))


def test_fm_interaction_closed_form_and_gradient():
    fields = torch.randn(3, 5, 4, dtype=torch.float64, requires_grad=True)
    pairs = sum(fields[:, i] * fields[:, j] for i in range(5) for j in range(i + 1, 5))
    assert torch.allclose(FMInteraction()(fields), pairs)
    assert torch.autograd.gradcheck(FMInteraction(), (fields,))


def test_cross_layers_follow_the_paper():
    torch.manual_seed(0)
    x0, x = torch.randn(4, 6), torch.randn(4, 6)
    full = CrossLayerV2(6)
    w, b = full.linear.weight, full.linear.bias
    assert torch.allclose(full(x0, x), x0 * (x @ w.t() + b) + x)

    low = LowRankMixtureCrossLayer(6, rank=2, num_experts=1)
    u, v, c = low.u[0], low.v[0], low.c[0]
    expected = x0 * (torch.tanh(torch.tanh(x @ v) @ c.t()) @ u.t() + low.bias) + x
    assert torch.allclose(low(x0, x), expected, atol=1e-6)

    mixture = LowRankMixtureCrossLayer(6, rank=2, num_experts=3)
    gate = torch.softmax(x @ mixture.gate.weight.t(), dim=-1)
    experts = [
        x0 * (torch.tanh(torch.tanh(x @ mixture.v[e]) @ mixture.c[e].t()) @ mixture.u[e].t() + mixture.bias)
        for e in range(3)
    ]
    expected = sum(gate[:, e : e + 1] * experts[e] for e in range(3)) + x
    assert torch.allclose(mixture(x0, x), expected, atol=1e-6)


def test_mlp_shapes():
    assert isinstance(MLP(5, [], 1)[0], nn.Linear) and len(MLP(5, [], 1)) == 1
    assert MLP(5, []).output_dim == 5 and len(MLP(5, [])) == 0
    mlp = MLP(5, [7, 3], dropout=0.5)
    assert mlp.output_dim == 3 and mlp(torch.randn(2, 5)).shape == (2, 3)
    assert sum(isinstance(m, nn.Dropout) for m in mlp) == 2


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("dcnv2-full-parallel", lambda d: d + 16),
        ("dcnv2-full-stacked", lambda d: 16),
        ("dcnv2-lowrank-parallel", lambda d: d + 16),
        ("dcnv2-lowrank-stacked", lambda d: 8),
    ],
)
def test_dcnv2_representation(name, expected):
    model = build(name)
    input_dim = 5 * 8 + 2  # 4 categoricals + 1 pooled sequence, k = 8, 2 numerics
    assert model.representation_dim == expected(input_dim)
    assert len(model.cross.layers) == CONFIGS[name].num_cross_layers


def test_add_head_and_serving_heads():
    model = build("fm")
    distill = nn.Linear(model.representation_dim, 1)
    model.add_head("distill", distill)
    batch = random_batch(4)
    logits = model(batch)
    assert list(logits) == [*TASKS, "distill"]
    assert torch.allclose(logits["distill"], distill(model.backbone(batch)).squeeze(-1))
    assert list(model(batch, heads=model.serving_heads)) == TASKS
    assert any(p is distill.weight for p in model.dense_parameters())
    with pytest.raises(ValueError, match="already has a head"):
        model.add_head("click", nn.Linear(model.representation_dim, 1))


def rule_batch(size: int, seed: int) -> Batch:
    """click = 1 when user and item parities agree (an interaction), like = item parity."""
    g = torch.Generator().manual_seed(seed)
    single = torch.stack([torch.randint(1, b, (size,), generator=g) for b in BUCKETS.values()], dim=1)
    same = (single[:, 0] % 2 == single[:, 1] % 2).float()
    labels = torch.stack([same, (single[:, 1] % 2).float()], dim=1)
    return make_batch(single, [[] for _ in range(size)], torch.randn(size, 2, generator=g), labels)


def fit_rule(model: RecModel, loss: Callable[[RecModel, Batch], torch.Tensor], steps: int = 60) -> tuple[float, float]:
    """Train ``model`` on :func:`rule_batch` batches; the held-out ``loss`` before and after."""
    sparse = torch.optim.SparseAdam(list(model.sparse_parameters()), lr=0.05)
    dense = torch.optim.Adam([p for p in model.dense_parameters() if p.requires_grad], lr=0.01)
    held_out = rule_batch(512, seed=999)
    with torch.no_grad():
        before = loss(model, held_out).item()
    for step in range(steps):
        batch = rule_batch(256, seed=step)
        sparse.zero_grad()
        dense.zero_grad()
        loss(model, batch).backward()
        sparse.step()
        dense.step()
    with torch.no_grad():
        return before, loss(model, held_out).item()


@pytest.mark.parametrize("name", ["fm", "dcnv2-lowrank-stacked"])
def test_training_reduces_loss(name):
    before, after = fit_rule(build(name), total_loss)
    assert after < 0.5 * before


def test_config_parsing_and_errors():
    config = parse_model_config({"name": "dcnv2", "low_rank": 8, "deep_hidden": [32]})
    assert isinstance(config, DCNv2Config) and config.low_rank == 8 and config.structure == "parallel"
    assert isinstance(parse_model_config({"name": "fm"}), FMConfig)
    with pytest.raises(ValueError, match=r"cfg\.yaml: .*low_rank"):
        parse_model_config({"name": "dcnv2", "low_rank": 0}, "cfg.yaml")
    with pytest.raises(ValueError, match=r"cfg\.yaml: dcnv2\.cross_layers: Extra inputs"):
        parse_model_config({"name": "dcnv2", "cross_layers": 2}, "cfg.yaml")
    with pytest.raises(ValueError, match="does not match any of the expected tags"):
        parse_model_config({"name": "nope"})
    with pytest.raises(ValueError, match="unknown task"):
        build_model(FMConfig(), make_schema(), ["click", "buy"])
    assert isinstance(build_model(DCNv2Config(), make_schema(), ["like"]), DCNv2Model)
    with pytest.raises(ValueError, match="structure"):
        DCNv2Model(make_schema(), TASKS, structure="diagonal")
    with pytest.raises(ValueError, match="at least one task"):
        FMModel(make_schema(), [])


def test_count_parameters_and_compute_cost():
    schema = make_schema()
    model = build_model(FMConfig(embedding_dim=8), schema, TASKS)
    rows = sum(b - 1 for b in BUCKETS.values()) + 1
    counts = count_parameters(model)
    assert counts.sparse == rows * (8 + 1)
    assert counts.dense == 2 * (8 + 1) + len(TASKS) * (9 + 1)
    assert counts.total == sum(p.numel() for p in model.parameters())
    cost = flops_per_example(model, schema)
    assert cost.lookup_rows == 2 * (4 + 4) and cost.lookup_values == (4 + 4) * (8 + 1)
    assert 5 * 8 * 2 <= cost.dense_macs <= 1000

    dcn = build_model(DCNv2Config(embedding_dim=8, deep_hidden=[], num_cross_layers=2), schema, TASKS)
    d = 5 * 8 + 2
    cost = flops_per_example(dcn, schema)
    assert cost.lookup_rows == 4 + 4
    assert 2 * d * d <= cost.dense_macs <= 2 * d * d + 20 * d
    assert dcn.training
