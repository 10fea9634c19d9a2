"""Teacher models: DCN, DMIN (masked sequence attention), the multi-task shared-bottom teacher."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from exfm.data.batch import Batch, KeyedJagged
from exfm.models import (
    MODEL_CONFIGS,
    CrossLayerV1,
    CrossNetV1,
    DCNConfig,
    DCNModel,
    DCNv2Config,
    DMINConfig,
    DMINModel,
    EmbeddingCollection,
    FMConfig,
    MultiHeadSelfAttention,
    MultiInterestArch,
    MultiTaskConfig,
    MultiTaskModel,
    RecModel,
    SelfAttentionHeads,
    TargetAttention,
    build_model,
    flops_per_example,
    masked_softmax,
    parse_model_config,
)
from exfm.models.dmin import recency
from exfm.schema import Schema, SchemaError, parse_schema
from exfm.train.config import DenseOptimizerConfig, SparseOptimizerConfig, parse_train_config
from exfm.train.objective import SupervisedObjective
from exfm.train.optim import Optimizers
from exfm.train.trainer import train

TASKS = ["click", "like"]
BUCKETS = {"user": 50, "item": 30, "cate": 10}


def make_schema(max_len: int = 6) -> Schema:
    return parse_schema(
        {
            "name": "toy",
            "features": [
                *({"type": "categorical", "name": n, "buckets": b} for n, b in BUCKETS.items()),
                {"type": "sequence", "name": "hist", "max_len": max_len, "embedding": "item"},
                {"type": "sequence", "name": "cates", "max_len": 3, "embedding": "cate"},
                {"type": "numeric", "name": "price"},
                {"type": "numeric", "name": "age"},
            ],
            "labels": [{"name": t} for t in TASKS],
            "time": {"column": "ts"},
        }
    )


def make_batch(
    single: torch.Tensor,
    hist: list[list[int]],
    cates: list[list[int]] | None = None,
    dense: torch.Tensor | None = None,
    labels: torch.Tensor | None = None,
) -> Batch:
    """A batch by hand: ``single [B, 3]`` ids (user, item, cate), two item lists per example."""
    size = single.shape[0]
    cates = cates if cates is not None else [[] for _ in range(size)]
    jagged = [i for h in hist for i in h] + [i for c in cates for i in c]
    values = torch.cat([single.t().reshape(-1), torch.tensor(jagged, dtype=torch.long)])
    lengths = torch.tensor([1] * (3 * size) + [len(h) for h in hist] + [len(c) for c in cates], dtype=torch.int32)
    return Batch(
        sparse=KeyedJagged([*BUCKETS, "hist", "cates"], values, lengths, stride=size, num_single=3),
        dense=torch.zeros(size, 2) if dense is None else dense,
        labels=torch.zeros(size, len(TASKS)) if labels is None else labels,
        time_us=torch.zeros(size, dtype=torch.long),
        domain=torch.full((size,), -1, dtype=torch.long),
        day=1,
    )


def random_batch(size: int = 16, seed: int = 0, max_len: int = 6) -> Batch:
    """Random ids (some missing), histories of every length 0..max_len, random dense and labels."""
    g = torch.Generator().manual_seed(seed)
    single = torch.stack([torch.randint(0, b, (size,), generator=g) for b in BUCKETS.values()], dim=1)
    hist = [torch.randint(1, BUCKETS["item"], (i % (max_len + 1),), generator=g).tolist() for i in range(size)]
    cates = [torch.randint(1, BUCKETS["cate"], (i % 4,), generator=g).tolist() for i in range(size)]
    labels = torch.randint(0, 2, (size, len(TASKS)), generator=g).float()
    return make_batch(single, hist, cates, torch.randn(size, 2, generator=g), labels)


SMALL_DMIN = {
    "embedding_dim": 8,
    "num_heads": 2,
    "num_interests": 3,
    "interest_dim": 4,
    "position_dim": 4,
    "attention_hidden": [8, 4],
    "deep_hidden": [16],
}
CONFIGS = {
    "dcn": DCNConfig(embedding_dim=8, deep_hidden=[16], num_cross_layers=2),
    "dcn-heads": DCNConfig(embedding_dim=8, deep_hidden=[], head_hidden=[8]),
    "dmin": DMINConfig(**SMALL_DMIN),
    "dmin-causal": DMINConfig(**SMALL_DMIN, causal=True, head_hidden=[8]),
    "dmin-cates-nopos": DMINConfig(embedding_dim=6, num_heads=4, head_dim=3, sequence="cates", position_dim=0),
    "multitask-dcnv2": MultiTaskConfig(
        bottom=DCNv2Config(embedding_dim=8, deep_hidden=[16], low_rank=4), tower_hidden=[8]
    ),
    "multitask-dcn": MultiTaskConfig(bottom=DCNConfig(embedding_dim=8, deep_hidden=[16]), tower_hidden=[]),
    "multitask-dmin": MultiTaskConfig(bottom=DMINConfig(**SMALL_DMIN), tower_hidden=[8, 4], dropout=0.1),
}


def build(name: str, seed: int = 0, max_len: int = 6) -> RecModel:
    torch.manual_seed(seed)
    return build_model(CONFIGS[name], make_schema(max_len), TASKS)


def collection_of(model: RecModel) -> EmbeddingCollection:
    (collection,) = (m for m in model.modules() if isinstance(m, EmbeddingCollection))
    return collection


def loud(model: RecModel) -> RecModel:
    """Embeddings and recency embeddings ~ N(0, 1): attention and recency visibly move the output."""
    with torch.no_grad():
        collection_of(model).weight[1:].normal_()
        for module in model.modules():
            if isinstance(module, MultiInterestArch):
                torch.nn.init.normal_(module.position.weight)
    return model.eval()


# --- every teacher: the RecModel interface ------------------------------------------------------


@pytest.mark.parametrize("name", CONFIGS)
def test_forward_returns_float_logits_per_task(name):
    model = build(name)
    batch = random_batch(16)
    logits = model(batch)
    assert list(logits) == TASKS and list(model(batch, heads=model.serving_heads)) == TASKS
    for value in logits.values():
        assert value.shape == (16,) and value.dtype == torch.float32 and torch.isfinite(value).all()
    assert model.backbone(batch).shape == (16, model.representation_dim)


@pytest.mark.parametrize("name", CONFIGS)
def test_gradients_reach_every_parameter(name):
    model = build(name)
    model.eval()  # no dropout: every parameter must get a nonzero gradient
    batch = random_batch(16)
    logits = model(batch)
    sum(F.binary_cross_entropy_with_logits(logits[t], batch.labels[:, i]) for i, t in enumerate(TASKS)).backward()
    collection = collection_of(model)
    touched = set(collection.rows(batch).unique().tolist()) - {0}
    (table,) = model.sparse_parameters()
    assert table.grad.is_sparse
    assert set(table.grad.coalesce().to_dense().abs().sum(1).nonzero().flatten().tolist()) == touched
    for pname, p in model.named_parameters():
        if p is not table:
            assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", ["dcn", "dmin", "multitask-dmin"])
def test_feature_subset_is_respected(name):
    features = ["user", "item", "hist", "price"]
    config = CONFIGS[name]
    if isinstance(config, MultiTaskConfig):
        config = config.model_copy(update={"bottom": config.bottom.model_copy(update={"features": features})})
    else:
        config = config.model_copy(update={"features": features})
    torch.manual_seed(0)
    model = build_model(config, make_schema(), TASKS).eval()
    collection = collection_of(model)
    assert collection.single_features == ["user", "item"] and collection.numeric_features == ["price"]
    assert collection.sequence_features == ["hist"]

    batch = random_batch(8)
    reference = model(batch)
    other = random_batch(8, seed=1)  # other cate ids, cate lists, ages, labels; same user, item, hist, price
    single = batch.sparse.single_ids().clone()
    single[:, 2] = other.sparse.single_ids()[:, 2]
    hist_values, hist_lengths = batch.sparse.jagged("hist")
    hist = [h.tolist() for h in torch.split(hist_values, hist_lengths.tolist())]
    cates_values, cates_lengths = other.sparse.jagged("cates")
    cates = [c.tolist() for c in torch.split(cates_values, cates_lengths.tolist())]
    dense = torch.stack([batch.dense[:, 0], other.dense[:, 1]], dim=1)
    changed = model(make_batch(single, hist, cates, dense))
    for t in TASKS:
        assert torch.equal(changed[t], reference[t])


# --- DCN ----------------------------------------------------------------------------------------


def test_cross_layer_v1_by_hand():
    torch.manual_seed(0)
    layer = CrossLayerV1(5)
    with torch.no_grad():
        layer.bias.normal_()
    x0, x = torch.randn(3, 5), torch.randn(3, 5)
    w, b = layer.weight.weight[0], layer.bias
    expected = torch.stack([x0[i] * sum(x[i, j] * w[j] for j in range(5)) + b + x[i] for i in range(3)])
    assert torch.allclose(layer(x0, x), expected, atol=1e-6)

    net = CrossNetV1(5, 2)
    first, second = net.layers
    assert torch.allclose(net(x0), second(x0, first(x0, x0)))
    assert torch.equal(CrossNetV1(5, 0)(x0), x0)


def test_dcn_is_cross_next_to_deep():
    model = build("dcn")
    assert isinstance(model, DCNModel)
    input_dim = 5 * 8 + 2  # 3 categoricals + 2 pooled sequences, k = 8, 2 numerics
    assert model.representation_dim == input_dim + 16 and len(model.cross.layers) == 2
    batch = random_batch(4)
    x0 = model.embedding(batch).flat()
    expected = torch.cat([model.cross(x0), model.deep(x0)], dim=1)
    assert torch.allclose(model.backbone(batch), expected)
    assert build("dcn-heads").representation_dim == 2 * input_dim


# --- masked attention ---------------------------------------------------------------------------


def padded_sequences(lengths: list[int], length: int, dim: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``[B, length, dim]`` items with garbage (large random values) in the padding slots."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.arange(length) < torch.tensor(lengths).unsqueeze(1)
    return torch.randn(len(lengths), length, dim, generator=g) * torch.where(mask, 1.0, 100.0).unsqueeze(-1), mask


def test_masked_softmax_rows_and_gradients():
    scores = torch.randn(3, 4, requires_grad=True)
    allowed = torch.tensor([[True, False, True, True], [False] * 4, [False, False, True, False]])
    weights = masked_softmax(scores, allowed)
    assert torch.allclose(weights[0, [0, 2, 3]], scores[0, [0, 2, 3]].softmax(0))
    assert weights[0, 1] == 0 and torch.equal(weights[1], torch.zeros(4))
    assert torch.equal(weights[2], torch.tensor([0.0, 0.0, 1.0, 0.0]))
    (weights * torch.randn(3, 4)).sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.equal(scores.grad[~allowed], torch.zeros(8))


@pytest.mark.parametrize("causal", [False, True])
def test_self_attention_equals_attention_on_the_unpadded_items(causal):
    """Each example's valid items, attended alone without any mask, give the same heads; padding gives 0."""
    torch.manual_seed(0)
    heads, head_dim = 3, 4
    attention = SelfAttentionHeads(6, heads, head_dim, causal=causal)
    x, mask = padded_sequences([5, 0, 2, 7, 1], 7, 6)
    mask[3, [1, 4]] = False  # missing items inside a sequence count as padding
    out = attention(x, mask)
    assert out.shape == (5, heads, 7, head_dim) and torch.isfinite(out).all()
    wq, wk, wv = attention.qkv.weight.view(3, heads, head_dim, 6)
    for b in range(5):
        items = x[b, mask[b]]  # [n, 6], no padding at all
        n = items.shape[0]
        for h in range(heads):
            scores = (items @ wq[h].t()) @ (items @ wk[h].t()).t() / math.sqrt(head_dim)
            if causal:
                scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
            expected = scores.softmax(-1) @ (items @ wv[h].t()) if n else torch.zeros(0, head_dim)
            assert torch.allclose(out[b, h, mask[b]], expected, atol=1e-5), (b, h)
        assert torch.equal(out[b, :, ~mask[b]], torch.zeros(heads, int((~mask[b]).sum()), head_dim))


@pytest.mark.parametrize("causal", [False, True])
def test_causal_self_attention_does_not_look_ahead(causal):
    torch.manual_seed(0)
    attention = MultiHeadSelfAttention(6, num_heads=2, head_dim=3, causal=causal)
    x, mask = padded_sequences([6, 6, 4], 6, 6)
    t = 2
    later = x.clone()
    later[:, t + 1 :] += torch.randn(3, 6 - t - 1, 6)
    out, moved = attention(x, mask), attention(later, mask)
    assert torch.allclose(out[:, : t + 1], moved[:, : t + 1]) == causal
    assert not torch.allclose(out[:, t + 1 : 4], moved[:, t + 1 : 4])
    assert torch.equal(out[2, 4:], torch.zeros(2, 6))  # padded queries output 0


def test_target_attention_pools_valid_items_only():
    torch.manual_seed(0)
    attention = TargetAttention(4, [8, 4], extra_dim=2)
    keys, mask = padded_sequences([3, 0, 5], 5, 4)
    query, extra = torch.randn(3, 4), torch.randn(5, 2)
    out = attention(keys, query, mask, extra)
    assert torch.equal(out[1], torch.zeros(4))
    for b in (0, 2):
        n = int(mask[b].sum())
        alone = attention(keys[b : b + 1, :n], query[b : b + 1], mask[b : b + 1, :n], extra[:n])
        assert torch.allclose(out[b], alone[0], atol=1e-6)
    with pytest.raises(ValueError, match="needs `extra`"):
        attention(keys, query, mask)
    with pytest.raises(ValueError, match="hidden layer"):
        TargetAttention(4, [])


# --- DMIN: padding never leaks ------------------------------------------------------------------


def interest_arch(causal: bool = False, max_len: int = 20) -> MultiInterestArch:
    torch.manual_seed(0)
    arch = MultiInterestArch(8, max_len, 2, 4, 3, 4, 4, [8, 4], causal=causal).eval()
    torch.nn.init.normal_(arch.position.weight)  # recency visibly matters (N(0, 0.01²) hides it)
    return arch


def test_recency_counts_real_items_after_each_slot():
    mask = torch.tensor([[True, True, True, False], [True, False, True, False], [False] * 4])
    assert recency(mask).tolist() == [[2, 1, 0, 0], [1, 1, 0, 0], [0, 0, 0, 0]]


@pytest.mark.parametrize("causal", [False, True])
def test_dmin_interests_ignore_padding_content_and_length(causal):
    arch = interest_arch(causal)
    lengths = [3, 0, 5, 1]
    target = torch.randn(4, 8)
    x, mask = padded_sequences(lengths, 5, 8)
    clean = torch.where(mask.unsqueeze(-1), x, 0.0)
    reference = arch(clean, mask, target)
    assert reference.shape == (4, 12)
    assert torch.allclose(arch(x, mask, target), reference, atol=1e-6)  # garbage in the padding
    assert torch.equal(arch.refine(x, mask)[~mask], torch.zeros(int((~mask).sum()), 8))
    long, long_mask = padded_sequences(lengths, 20, 8, seed=1)  # padded to 20, other garbage
    long[:, :5] = torch.where(mask.unsqueeze(-1), x, long[:, :5])
    assert torch.allclose(arch(long, long_mask, target), reference, atol=1e-6)
    assert torch.equal(reference[1], torch.zeros(12))  # the empty sequence
    for b, n in enumerate(lengths):  # every example alone, unpadded
        alone = arch(x[b : b + 1, :n], mask[b : b + 1, :n], target[b : b + 1])
        assert torch.allclose(alone[0], reference[b], atol=1e-6)


def test_dmin_refiner_is_causal_only_when_asked():
    x, mask = padded_sequences([6, 6], 6, 8)
    later = x.clone()
    later[:, 4:] += 1.0
    for causal in (False, True):
        arch = interest_arch(causal)
        same = torch.allclose(arch.refine(x, mask)[:, :4], arch.refine(later, mask)[:, :4])
        assert same == causal
        interests = arch.extractor(arch.refine(x, mask), mask)
        moved = arch.extractor(arch.refine(later, mask), mask)
        assert torch.allclose(interests[:, :, :4], moved[:, :, :4]) == causal


@pytest.mark.parametrize("name", ["dmin", "dmin-causal"])
def test_dmin_model_padding_length_does_not_change_the_output(name):
    short = loud(build(name, max_len=6))
    long = build(name, max_len=20).eval()
    state = short.state_dict()
    position = "interests.position.weight"
    padded_table = long.state_dict()[position].clone()
    padded_table[:6] = state[position]
    long.load_state_dict({**state, position: padded_table})
    batch = random_batch(14, max_len=6)  # every history length 0..6
    for t in TASKS:
        assert torch.allclose(long(batch)[t], short(batch)[t], atol=1e-6)


@pytest.mark.parametrize("name", ["dmin", "dmin-causal", "multitask-dmin"])
def test_dmin_examples_do_not_leak_into_each_other(name):
    """An example's output is the same alone and next to other examples' sequences and padding."""
    model = loud(build(name))
    batch = random_batch(8)
    together = model(batch)["click"]
    single = batch.sparse.single_ids()
    hist_values, hist_lengths = batch.sparse.jagged("hist")
    hist = [h.tolist() for h in torch.split(hist_values, hist_lengths.tolist())]
    cates_values, cates_lengths = batch.sparse.jagged("cates")
    cates = [c.tolist() for c in torch.split(cates_values, cates_lengths.tolist())]
    for b in range(8):
        alone = model(make_batch(single[b : b + 1], hist[b : b + 1], cates[b : b + 1], batch.dense[b : b + 1]))
        assert torch.allclose(alone["click"][0], together[b], atol=1e-6)
    other = [[*reversed(h), 7, 8][-6:] for h in hist]  # other examples' items and lengths
    changed = model(make_batch(single, [hist[0], *other[1:]], cates, batch.dense))["click"]
    assert torch.allclose(changed[0], together[0], atol=1e-6)
    assert not torch.allclose(changed[1:], together[1:])


def test_dmin_empty_and_missing_items():
    model = build("dmin")
    single = torch.tensor([[1, 2, 3], [4, 5, 6], [7, 8, 9]])
    empty = make_batch(single, [[], [], []])
    logits = model(empty)
    assert all(torch.isfinite(v).all() for v in logits.values())
    seq = model.embedding(empty).sequences["hist"]
    interests = model.interests(seq.values, seq.mask, torch.randn(3, 8))
    assert torch.equal(interests, torch.zeros(3, 12))
    sum(v.sum() for v in logits.values()).backward()
    assert all(torch.isfinite(p.grad.to_dense()).all() for p in model.parameters() if p.grad is not None)

    loud(model)
    with_missing = model(make_batch(single, [[3, 0, 4], [0], [0, 0, 5]]))["click"]
    without = model(make_batch(single, [[3, 4], [], [5]]))["click"]
    assert torch.allclose(with_missing, without, atol=1e-6)


def test_dmin_attends_the_chosen_sequence_with_its_candidate():
    model = build("dmin")
    assert isinstance(model, DMINModel) and model.sequence == "hist"
    assert model.embedding.single_features[model._target] == "item"
    cates = build("dmin-cates-nopos")
    assert cates.sequence == "cates" and cates.embedding.single_features[cates._target] == "cate"
    assert cates.interests.position is None
    with pytest.raises(SchemaError, match="candidate 'item'"):
        build_model(DMINConfig(features=["user", "hist"]), make_schema(), TASKS)
    with pytest.raises(SchemaError, match="not a selected sequence"):
        build_model(DMINConfig(sequence="user"), make_schema(), TASKS)
    with pytest.raises(SchemaError, match="needs a sequence"):
        build_model(DMINConfig(features=["user", "item"]), make_schema(), TASKS)
    with pytest.raises(ValueError, match="not a multiple of num_heads"):
        DMINConfig(embedding_dim=8, num_heads=3)


# --- the multi-task shared-bottom teacher -------------------------------------------------------


def rule_batch(size: int, seed: int) -> Batch:
    """click = user parity, like = item parity: two tasks with different features."""
    g = torch.Generator().manual_seed(seed)
    single = torch.stack([torch.randint(1, b, (size,), generator=g) for b in BUCKETS.values()], dim=1)
    labels = torch.stack([(single[:, 0] % 2).float(), (single[:, 1] % 2).float()], dim=1)
    hist = [torch.randint(1, BUCKETS["item"], (3,), generator=g).tolist() for _ in range(size)]
    return make_batch(single, hist, labels=labels)


@pytest.mark.parametrize("name", ["multitask-dcnv2", "multitask-dmin"])
def test_multitask_trains_every_task_at_once(name):
    model = build(name)
    assert isinstance(model, MultiTaskModel) and len(model.bottom.heads) == 0
    assert list(model.heads) == TASKS and model.representation_dim == model.bottom.representation_dim
    objective = SupervisedObjective(TASKS, [0, 1])
    optimizers = Optimizers(model, DenseOptimizerConfig(lr=0.01), SparseOptimizerConfig(lr=0.1))
    batch = rule_batch(128, seed=0)

    def per_task() -> torch.Tensor:
        with torch.no_grad():
            logits = torch.stack([model(batch, heads=model.serving_heads)[t] for t in TASKS], dim=1)
            return F.binary_cross_entropy_with_logits(logits, batch.labels, reduction="none").mean(0)

    before = per_task()
    for _ in range(40):
        optimizers.zero_grad()
        objective(model(batch, heads=model.serving_heads), batch).backward()
        optimizers.step()
    after = per_task()
    assert (after < 0.7 * before).all(), (before, after)


def test_every_task_reaches_the_shared_bottom():
    model = build("multitask-dcnv2").eval()
    batch = random_batch(16)
    for i, task in enumerate(TASKS):
        model.zero_grad()
        F.binary_cross_entropy_with_logits(model(batch, heads=[task])[task], batch.labels[:, i]).backward()
        assert model.bottom.deep[0].weight.grad.abs().sum() > 0
        other = model.heads[TASKS[1 - i]]
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in other.parameters())


def test_multitask_model_in_the_trainer_reports_every_task(tiny_dataset, tmp_path):
    bottom = {"name": "dmin", "embedding_dim": 8, "attention_hidden": [8], "deep_hidden": [16]}
    config = parse_train_config(
        {
            "data": str(tiny_dataset),
            "model": {"name": "multitask", "bottom": bottom, "tower_hidden": [8]},
            "train_days": [1, 2],
            "eval_days": [3],
            "batch_size": 128,
        }
    )
    result = train(config, tmp_path / "run", show_progress=False)
    assert isinstance(result.model, MultiTaskModel)
    metrics = result.evaluations[3]
    assert set(metrics) == {"click", "like"}
    assert all(math.isfinite(metrics[t]["all"].ne) for t in metrics)


# --- configs ------------------------------------------------------------------------------------


def test_teacher_configs_parse_and_reject_mistakes():
    assert {"fm", "dcnv2", "dcn", "dmin", "multitask"} <= set(MODEL_CONFIGS)
    dcn = parse_model_config({"name": "dcn", "num_cross_layers": 4})
    assert isinstance(dcn, DCNConfig) and dcn.num_cross_layers == 4
    dmin = parse_model_config({"name": "dmin", "causal": True, "num_interests": 2})
    assert isinstance(dmin, DMINConfig) and dmin.causal and dmin.sequence is None
    multi = parse_model_config({"name": "multitask", "bottom": {"name": "dmin", "embedding_dim": 8}})
    assert isinstance(multi, MultiTaskConfig) and isinstance(multi.bottom, DMINConfig) and multi.tower_hidden == [64]
    assert isinstance(parse_model_config({"name": "multitask", "bottom": {"name": "fm"}}).bottom, FMConfig)
    with pytest.raises(ValueError, match=r"cfg: multitask\.bottom: Input tag 'multitask'"):
        parse_model_config({"name": "multitask", "bottom": {"name": "multitask", "bottom": {"name": "fm"}}}, "cfg")
    with pytest.raises(ValueError, match=r"bottom\.head_hidden is unused"):
        parse_model_config({"name": "multitask", "bottom": {"name": "dcnv2", "head_hidden": [8]}})
    with pytest.raises(ValueError, match=r"multitask\.bottom: Field required"):
        parse_model_config({"name": "multitask"})
    with pytest.raises(ValueError, match="attention_hidden"):
        parse_model_config({"name": "dmin", "attention_hidden": []})


def test_compute_cost_counts_the_attention():
    schema = make_schema()
    dmin = build("dmin")
    cost = flops_per_example(dmin, schema)
    # the target-attention scorer alone: 3 interests × 6 positions × (2·4·8 + 8·4 + 4) MACs
    assert cost.dense_macs > 3 * 6 * (2 * 4 * 8 + 8 * 4 + 4)
    assert cost.lookup_rows == 3 + 6 + 3
    assert flops_per_example(build("multitask-dmin"), schema).dense_macs > cost.dense_macs
