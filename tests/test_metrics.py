"""Metrics: AUC, LogLoss, NE, calibration; exact, streaming and progressive."""

from __future__ import annotations

import io
import json
import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss as sk_log_loss
from sklearn.metrics import roc_auc_score

from exfm.train.metrics import (
    MetricSet,
    ProgressiveNE,
    StreamingMetrics,
    auc,
    calibration,
    compute_metrics,
    log_loss_from_logits,
    log_loss_from_probs,
    ne_gain,
    normalized_entropy,
)

TASKS = ["click", "like"]
DOMAINS = ["a", "b", "c"]


def _entropy(p: float) -> float:
    return -(p * math.log(p) + (1 - p) * math.log(1 - p))


def _same(a: MetricSet, b: MetricSet, rel: float = 1e-9) -> None:
    assert a.n == b.n and a.positives == b.positives
    for name in ("auc", "logloss", "ne", "calibration"):
        x, y = getattr(a, name), getattr(b, name)
        if math.isnan(y):
            assert math.isnan(x), name
        else:
            assert x == pytest.approx(y, rel=rel, abs=1e-12), name


def _identical(a: dict, b: dict) -> None:
    """Bitwise equality of nested result dicts (NaN == NaN)."""
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _identical(a[key], b[key])
        else:
            assert a[key] == b[key] or (math.isnan(a[key]) and math.isnan(b[key])), key


def _results_as_dicts(result: dict[str, dict[str, MetricSet]]) -> dict:
    return {t: {k: vars(m) for k, m in per.items()} for t, per in result.items()}


def _stream(seed: int, sizes: list[int], num_tasks: int = 2, num_domains: int = 3):
    """Random batches: (logits [B,T], labels [B,T], domain [B] with -1s, mask [B,T] with NaN labels out)."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for size in sizes:
        logits = torch.randn(size, num_tasks, generator=gen) * 2
        truth = torch.sigmoid(logits + torch.randn(size, num_tasks, generator=gen))
        labels = (torch.rand(size, num_tasks, generator=gen) < truth).float()
        logits = torch.round(logits * 4) / 4  # ties
        domain = torch.randint(-1, num_domains, (size,), generator=gen)
        mask = torch.rand(size, num_tasks, generator=gen) > 0.2
        labels[~mask] = float("nan")  # a missing label, excluded by the mask
        batches.append((logits, labels, domain, mask))
    return batches


def _concat(batches):
    return [torch.cat(parts) for parts in zip(*batches, strict=True)]


def _expected(logits, labels, domain, mask, t: int, name: str, d: int | None) -> MetricSet:
    keep = mask[:, t] if d is None else mask[:, t] & (domain == d)
    return compute_metrics(labels[keep, t], logits[keep, t])


# --- AUC ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_auc_matches_sklearn_continuous_and_heavy_ties(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 3000)
    continuous = rng.normal(size=3000) + y
    tied = rng.integers(0, 4, 3000) + (rng.random(3000) < 0.3) * y  # five distinct values
    for scores in (continuous, tied, np.zeros(3000)):
        assert auc(y, scores) == pytest.approx(roc_auc_score(y, scores), abs=1e-12)
    assert auc(torch.tensor(y), torch.tensor(tied, dtype=torch.float32)) == pytest.approx(
        roc_auc_score(y, tied), abs=1e-12
    )


def test_auc_edge_cases():
    assert auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert auc([0, 1, 0, 1], [1, 1, 1, 1]) == 0.5
    assert math.isnan(auc([1, 1, 1], [0.1, 0.2, 0.3]))
    assert math.isnan(auc([0, 0], [0.1, 0.2]))
    assert math.isnan(auc([], []))
    assert math.isnan(auc([0, 1], [0.1, float("nan")]))
    with pytest.raises(ValueError, match="0 or 1"):
        auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="same shape"):
        auc([0, 1], [0.1])


# --- LogLoss, NE, calibration ------------------------------------------------------------------


def test_log_loss_matches_sklearn():
    rng = np.random.default_rng(0)
    z = rng.normal(size=1000) * 3
    y = rng.integers(0, 2, 1000)
    p = 1 / (1 + np.exp(-z))
    expected = sk_log_loss(y, p)
    assert log_loss_from_logits(y, z) == pytest.approx(expected, rel=1e-10)
    assert log_loss_from_logits(torch.tensor(y), torch.tensor(z, dtype=torch.float64)) == pytest.approx(
        expected, rel=1e-10
    )
    assert log_loss_from_probs(y, p) == pytest.approx(expected, rel=1e-10)


def test_log_loss_from_probs_clips():
    assert log_loss_from_probs([1.0, 0.0], [0.0, 1.0]) == pytest.approx(-math.log(1e-7), rel=1e-6)
    assert math.isfinite(log_loss_from_probs([1.0], [0.0]))


def test_logits_path_is_stable_at_large_logits():
    y = torch.tensor([1.0, 0.0, 1.0, 0.0])
    z = torch.tensor([100.0, -100.0, -100.0, 100.0])
    assert log_loss_from_logits(y, z) == pytest.approx(50.0, rel=1e-12)
    m = compute_metrics(y, z)
    assert all(math.isfinite(v) for v in (m.auc, m.logloss, m.ne, m.calibration))
    assert m.logloss == pytest.approx(50.0) and m.ne == pytest.approx(50.0 / math.log(2))
    right = compute_metrics(torch.tensor([1.0, 0.0]), torch.tensor([100.0, -100.0]))
    assert right.logloss == pytest.approx(0.0, abs=1e-40) and right.ne >= 0.0


def test_ne_hand_computation_and_exact_cases():
    assert normalized_entropy(0.3, 0.2) == pytest.approx(0.3 / _entropy(0.2))
    assert math.isnan(normalized_entropy(0.3, 0.0)) and math.isnan(normalized_entropy(0.3, 1.0))
    with pytest.raises(ValueError):
        normalized_entropy(0.3, 1.5)

    y = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0])  # base rate 0.2
    base = math.log(0.2 / 0.8)
    m = compute_metrics(y, torch.full((10,), base, dtype=torch.float64))  # predicting the base rate: NE = 1 exactly
    assert m.ne == pytest.approx(1.0, rel=1e-12)
    assert m.calibration == pytest.approx(1.0, rel=1e-12)
    sharp = compute_metrics(y, (y * 2 - 1) * 20)  # near-perfect predictions
    assert 0 < sharp.ne < 1e-7 and sharp.auc == 1.0

    z = torch.tensor([0.5, -1.0, 2.0, 0.0, -0.3])
    t = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0])
    p = torch.sigmoid(z.double())
    bce = -(t * p.log() + (1 - t) * (1 - p).log()).mean().item()
    m = compute_metrics(t, z)
    assert m.logloss == pytest.approx(bce, rel=1e-12)
    assert m.ne == pytest.approx(bce / _entropy(0.6), rel=1e-12)
    assert m.calibration == pytest.approx(p.sum().item() / 3, rel=1e-12)
    assert (m.n, m.positives) == (5, 3)
    assert math.isnan(compute_metrics([0, 0], [0.1, 0.2]).ne)


def test_calibration_and_ne_gain():
    assert calibration([1, 0, 0, 0], [0.5, 0.5, 0.5, 0.5]) == pytest.approx(2.0)
    assert math.isnan(calibration([0, 0], [0.5, 0.5]))
    assert math.isnan(compute_metrics([0, 0], [0.0, 0.0]).calibration)
    assert ne_gain(0.9, 1.0) == pytest.approx(10.0)
    assert ne_gain(1.1, 1.0) == pytest.approx(-10.0)
    assert math.isnan(ne_gain(float("nan"), 1.0))


def test_metricset_to_dict_is_json_safe():
    m = compute_metrics([1, 1], [0.3, 0.2])
    d = m.to_dict()
    assert d["auc"] is None and d["ne"] is None and d["n"] == 2 and d["positives"] == 2
    json.dumps(d, allow_nan=False)
    assert math.isnan(MetricSet.from_sums(0, 0, 0, 0).logloss)


# --- StreamingMetrics --------------------------------------------------------------------------


def test_streaming_equals_exact_per_task_and_domain():
    batches = _stream(0, [300, 517, 64, 1000])
    sm = StreamingMetrics(TASKS, DOMAINS)
    for logits, labels, domain, mask in batches:
        sm.update(logits, labels, domain, mask)
    result = sm.result()
    logits, labels, domain, mask = _concat(batches)
    for t, task in enumerate(TASKS):
        _same(result[task]["all"], _expected(logits, labels, domain, mask, t, "all", None))
        for d, name in enumerate(DOMAINS):
            _same(result[task][name], _expected(logits, labels, domain, mask, t, name, d))
    assert result["click"]["all"].n == int(mask[:, 0].sum())
    json.dumps(sm.to_dict(), allow_nan=False)


def test_streaming_state_dict_round_trip_continues_identically():
    batches = _stream(1, [200, 300, 150, 250])
    first, second = StreamingMetrics(TASKS, DOMAINS), StreamingMetrics(TASKS, DOMAINS)
    for batch in batches[:2]:
        first.update(*batch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for batch in batches[2:]:
        first.update(*batch)
        second.update(*batch)
    _identical(_results_as_dicts(first.result()), _results_as_dicts(second.result()))
    with pytest.raises(ValueError, match="tasks"):
        StreamingMetrics(["click"], DOMAINS).load_state_dict(first.state_dict())


def test_streaming_single_task_one_class_and_empty():
    sm = StreamingMetrics(["click"], ["a", "b"])
    sm.update(torch.tensor([0.1, 0.4, -0.2]), torch.tensor([1.0, 1.0, 1.0]), torch.tensor([0, 0, -1]))
    res = sm.result()["click"]
    assert math.isnan(res["all"].auc) and math.isnan(res["all"].ne)
    assert res["all"].n == 3 and res["a"].n == 2
    assert res["b"].n == 0 and math.isnan(res["b"].logloss)
    assert math.isnan(StreamingMetrics(["click"]).result()["click"]["all"].auc)


def test_streaming_input_checks():
    sm = StreamingMetrics(TASKS, DOMAINS)
    logits, labels = torch.zeros(4, 2), torch.zeros(4, 2)
    with pytest.raises(ValueError, match="domain"):
        sm.update(logits, labels, torch.tensor([0, 1, 3, -1]))
    labels[0, 1] = float("nan")
    with pytest.raises(ValueError, match="0 or 1"):
        sm.update(logits, labels, torch.zeros(4, dtype=torch.long))
    mask = torch.ones(4, 2, dtype=torch.bool)
    mask[0, 1] = False
    sm.update(logits, labels, torch.zeros(4, dtype=torch.long), mask)  # masked: accepted
    assert sm.result()["like"]["all"].n == 3
    with pytest.raises(ValueError, match="shape"):
        sm.update(torch.zeros(4, 3), torch.zeros(4, 3), None)
    with pytest.raises(ValueError, match="reserved"):
        StreamingMetrics(TASKS, ["all"])


# --- ProgressiveNE -----------------------------------------------------------------------------


def test_progressive_cumulative_and_window_are_exact():
    batches = _stream(2, [256, 256, 100, 300, 256])
    window = 500  # not a multiple of the batch sizes: the oldest kept batch is sliced
    pne = ProgressiveNE(TASKS, DOMAINS, window=window)
    for batch in batches:
        pne.update(*batch)
    logits, labels, domain, mask = _concat(batches)
    cumulative, recent = pne.cumulative(), pne.window_metrics()
    tail = [x[-window:] for x in (logits, labels, domain, mask)]
    for t, task in enumerate(TASKS):
        for d, name in [(None, "all"), *enumerate(DOMAINS)]:
            exact = _expected(logits, labels, domain, mask, t, name, d)
            got = cumulative[task][name]
            assert math.isnan(got.auc)
            _same(got, MetricSet(got.auc, exact.logloss, exact.ne, exact.calibration, exact.n, exact.positives))
            _same(recent[task][name], _expected(*tail, t, name, d))
    snap = pne.snapshot()
    json.dumps(snap, allow_nan=False)
    assert (snap["examples"], snap["batches"], snap["window_examples"]) == (1168, 5, window)
    assert snap["tasks"]["click"]["window"]["all"]["auc"] == pytest.approx(recent["click"]["all"].auc)
    assert snap["tasks"]["like"]["cumulative"]["b"]["ne"] == pytest.approx(cumulative["like"]["b"].ne)


def test_progressive_state_dict_round_trip_continues_identically():
    batches = _stream(3, [128, 200, 64, 300, 90])
    first, second = ProgressiveNE(TASKS, DOMAINS, window=250), ProgressiveNE(TASKS, DOMAINS, window=250)
    for batch in batches[:3]:
        first.update(*batch)
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    buffer.seek(0)
    second.load_state_dict(torch.load(buffer, weights_only=True))
    for batch in batches[3:]:
        first.update(*batch)
        second.update(*batch)
    assert first.snapshot() == second.snapshot()
    _identical(_results_as_dicts(first.window_metrics()), _results_as_dicts(second.window_metrics()))


def test_progressive_without_domains_or_mask():
    pne = ProgressiveNE(["click"], window=10)
    pne.update(torch.tensor([2.0, -2.0, 0.5]), torch.tensor([1.0, 0.0, 0.0]))
    m = pne.window_metrics()["click"]["all"]
    _same(m, compute_metrics([1.0, 0.0, 0.0], [2.0, -2.0, 0.5]))
    assert set(pne.cumulative()["click"]) == {"all"}
    with pytest.raises(ValueError):
        ProgressiveNE(["click"], window=0)


def test_unchecked_unknown_domain_counts_in_all_only():
    sm = StreamingMetrics(["click"], ["a"], check_inputs=False)
    sm.update(torch.tensor([[0.5], [-0.5], [1.0]]), torch.tensor([[1.0], [0.0], [0.0]]), torch.tensor([0, 7, -1]))
    res = sm.result()["click"]
    assert (res["all"].n, res["a"].n) == (3, 1)
    _same(res["all"], compute_metrics([1.0, 0.0, 0.0], [0.5, -0.5, 1.0]))
