"""VM views of a shared store: domain and salted traffic filters in the reader, the trainer and the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from conftest import make_tiny_dataset, train_config
from pydantic import ValidationError

from exfm.cli import main
from exfm.data.dataset import (
    REQUEST_ID_COLUMN,
    DatasetError,
    DatasetWriter,
    atomic_output_dir,
    open_dataset,
    partition_arrow_schema,
)
from exfm.data.hashing import hash_text
from exfm.data.reader import ReaderPosition, StreamReader
from exfm.data.views import View
from exfm.serving.export import numeric_moments
from exfm.train.config import ConfigError, load_train_config, parse_train_config
from exfm.train.optim import Optimizers
from exfm.train.run_dir import RunDirectory
from exfm.train.trainer import evaluate_checkpoint, train


# --- a store-like dataset ----------------------------------------------------------------------------
def make_store_like(out: Path, rows_per_day: int = 1000, days: int = 4, seed: int = 0) -> Path:
    """:func:`make_tiny_dataset` plus a unique ``_request_id`` string column in every file (the
    manifest's counts and summaries are unchanged: the column is extra, as in a DAS shared store)."""
    make_tiny_dataset(out, rows_per_day=rows_per_day, days=days, seed=seed)
    dataset = open_dataset(out)
    for info in dataset.manifest.days:
        for part, path in enumerate(dataset.day_files(info.day)):
            table = pq.read_table(path)
            ids = [f"req-{seed}-{info.day:02d}-{part}-{i:06d}" for i in range(table.num_rows)]
            pq.write_table(table.append_column(REQUEST_ID_COLUMN, pa.array(ids, pa.string())), path)
    return out


@pytest.fixture
def store(tmp_path: Path) -> Path:
    return make_store_like(tmp_path / "store")


def _stored(dataset, days, columns=("_time", "_domain", "p_click", "score", REQUEST_ID_COLUMN)) -> pa.Table:
    """The stored rows of ``days``, in stored order."""
    return pa.concat_tables(
        pq.read_table(path, columns=list(columns)) for day in days for path in dataset.day_files(day)
    )


def _expected_mask(table: pa.Table, view: View) -> np.ndarray:
    """The view's selection computed row by row with the scalar hash (independent of View.mask)."""
    domains = table.column("_domain").to_pylist()
    ids = table.column(REQUEST_ID_COLUMN).to_pylist() if REQUEST_ID_COLUMN in table.column_names else None
    keep = []
    for i, domain in enumerate(domains):
        ok = view.domains is None or domain in view.domains
        if view.traffic_fraction < 1:
            ok = ok and hash_text(view.traffic_salt + ids[i]) % 10_000 < view.traffic_fraction * 10_000
        keep.append(ok)
    return np.array(keep, dtype=bool)


def _times(batches) -> np.ndarray:
    return torch.cat([b.time_us for b in batches]).numpy()


# --- the reader ----------------------------------------------------------------------------------
def test_domain_view_yields_exactly_that_domains_rows_in_order(store):
    ds = open_dataset(store)
    for domains in (["b"], ["c", "a"]):
        view = View(domains=domains)
        reader = StreamReader(ds, [1, 2, 3], batch_size=100, row_filter=view, passthrough=["p_click"])
        batches = list(reader)
        for day in (1, 2, 3):
            table = _stored(ds, [day])
            want = table.filter(pa.array(np.isin(table.column("_domain").to_numpy(zero_copy_only=False), domains)))
            got = [b for b in batches if b.day == day]
            np.testing.assert_array_equal(_times(got), want.column("_time").to_numpy())
            np.testing.assert_array_equal(
                torch.cat([b.passthrough["p_click"] for b in got]).numpy(), want.column("p_click").to_numpy()
            )
            # Batches are full except the last of the day, numbered from 0 within the day.
            assert [b.index_in_day for b in got] == list(range(len(got)))
            assert all(b.size == 100 for b in got[:-1]) and 0 < got[-1].size <= 100
            assert reader.day_rows(day) == want.num_rows == sum(ds.day(day).domains[d] for d in domains)
            assert reader.batches_in_day(day) == len(got)
        codes = {ds.manifest.domains.index(d) for d in domains}
        assert set(torch.cat([b.domain for b in batches]).tolist()) == codes
        assert reader.total_rows == sum(b.size for b in batches)


def test_traffic_view_keeps_exactly_the_hashed_fraction(store):
    ds = open_dataset(store)
    table = _stored(ds, [1, 2, 3, 4])
    for fraction in (0.1, 0.5, 0.75):
        view = View(traffic_fraction=fraction, traffic_salt="vm-1")
        expected = _expected_mask(table, view)
        np.testing.assert_array_equal(view.mask(table), expected)
        assert abs(expected.mean() - fraction) < 0.03  # 4000 rows: ≈ f
        reader = StreamReader(ds, [1, 2, 3, 4], batch_size=64, row_filter=view, passthrough=["p_click"])
        batches = list(reader)
        assert reader.total_rows == sum(b.size for b in batches) == int(expected.sum())
        kept = table.filter(pa.array(expected))
        np.testing.assert_array_equal(_times(batches), kept.column("_time").to_numpy())
        np.testing.assert_array_equal(
            torch.cat([b.passthrough["p_click"] for b in batches]).numpy(), kept.column("p_click").to_numpy()
        )
    # Domain and traffic filters combine (both must hold).
    both = View(domains=["a"], traffic_fraction=0.5, traffic_salt="vm-a")
    expected = _expected_mask(table, both)
    np.testing.assert_array_equal(both.mask(table), expected)
    assert expected.sum() == sum(b.size for b in StreamReader(ds, [1, 2, 3, 4], 50, row_filter=both))


def test_salted_views_are_deterministic_nested_and_independent(store):
    ds = open_dataset(store)
    table = _stored(ds, [1, 2, 3, 4])
    half_a = View(traffic_fraction=0.5, traffic_salt="a").mask(table)
    np.testing.assert_array_equal(half_a, View(traffic_fraction=0.5, traffic_salt="a").mask(table))
    # The selection is a property of the row, not of the chunking: per-row masks agree.
    np.testing.assert_array_equal(
        np.concatenate([View(traffic_fraction=0.5, traffic_salt="a").mask(b) for b in table.to_batches(333)]), half_a
    )
    half_b = View(traffic_fraction=0.5, traffic_salt="b").mask(table)
    assert not np.array_equal(half_a, half_b)
    assert abs((half_a & half_b).mean() - 0.25) < 0.03  # independent slices
    fifth_a = View(traffic_fraction=0.2, traffic_salt="a").mask(table)
    assert np.all(half_a[fifth_a]) and fifth_a.sum() < half_a.sum()  # nested for one salt
    # The same view gives the same rows whatever the batch size and prefetching.
    view = View(domains=["a", "b"], traffic_fraction=0.3, traffic_salt="vm-7")
    a = _times(StreamReader(ds, [1, 2], batch_size=100, row_filter=view, prefetch=0))
    b = _times(StreamReader(ds, [1, 2], batch_size=37, row_filter=view, prefetch=3))
    np.testing.assert_array_equal(a, b)
    # Null and empty request ids are never in a traffic slice.
    assert View(traffic_fraction=0.999, traffic_salt="s").traffic_mask(["", None]).tolist() == [False, False]


def test_a_view_that_keeps_every_row_reads_as_no_view(store):
    ds = open_dataset(store)
    plain = list(StreamReader(ds, [1, 2], batch_size=90))
    assert StreamReader(ds, [1, 2], batch_size=90, row_filter=View()).row_filter is None
    everything = list(StreamReader(ds, [1, 2], batch_size=90, row_filter=View(domains=["a", "b", "c"])))
    assert len(plain) == len(everything)
    for x, y in zip(plain, everything, strict=True):
        assert (x.day, x.index_in_day) == (y.day, y.index_in_day)
        assert torch.equal(x.sparse.values, y.sparse.values) and torch.equal(x.dense, y.dense)


def test_normaliser_and_resume_positions_follow_the_filtered_stream(store):
    ds = open_dataset(store)
    view = View(domains=["a", "c"], traffic_fraction=0.6, traffic_salt="s")
    full = list(StreamReader(ds, [1, 2, 3], batch_size=50, row_filter=view))
    start = ReaderPosition(day=2, batch=3)
    resumed_reader = StreamReader(ds, [1, 2, 3], batch_size=50, start=start, row_filter=view)
    resumed = list(resumed_reader)
    tail = [b for b in full if (b.day, b.index_in_day) >= (2, 3)]
    assert len(resumed) == len(tail) and resumed_reader.total_rows == sum(b.size for b in tail)
    for a, b in zip(tail, resumed, strict=True):
        assert (a.day, a.index_in_day) == (b.day, b.index_in_day)
        assert torch.equal(a.sparse.values, b.sparse.values) and torch.equal(a.time_us, b.time_us)
        assert torch.equal(a.dense, b.dense)  # statistics rebuilt bit for bit from the filtered past

    # The statistics are those of the view's rows only: batch 2 of day 1 uses batch 1's moments.
    day1 = _stored(ds, [1])
    raw = day1.filter(pa.array(_expected_mask(day1, view))).column("score").to_numpy().astype(np.float64)
    batches = list(StreamReader(ds, [1], batch_size=100, row_filter=view, prefetch=0))
    np.testing.assert_allclose(batches[0].dense[:, 1].numpy(), raw[:100], rtol=1e-6)
    mean, std = raw[:100].mean(), raw[:100].std()
    np.testing.assert_allclose(batches[1].dense[:, 1].numpy(), (raw[100:200] - mean) / std, rtol=1e-4, atol=1e-5)

    # A reader starting on day 3 has observed exactly the view's rows of days 1-2 (score is never missing).
    past = _stored(ds, [1, 2])
    scores = past.filter(pa.array(_expected_mask(past, view))).column("score").to_numpy().astype(np.float64)
    at_day3 = StreamReader(ds, [3], batch_size=50, row_filter=view).start_normalizer()
    assert at_day3.count == len(scores)
    assert at_day3.moments()[0][1] == pytest.approx(scores.mean(), rel=1e-9)
    unfiltered = StreamReader(ds, [3], batch_size=50).start_normalizer()
    assert unfiltered.count == 2000 and unfiltered.moments()[0][1] != at_day3.moments()[0][1]
    # The exported transform of a run trained through the view is the filtered one.
    moments = numeric_moments(ds, (3, 0), 50, view=view)
    assert moments["score"][0] == pytest.approx(scores.mean(), rel=1e-9)


def test_view_errors_name_the_dataset_and_column(store, tiny_dataset, tmp_path):
    ds = open_dataset(tiny_dataset)  # no _request_id column
    with pytest.raises(DatasetError, match=r"_request_id") as info:
        StreamReader(ds, [1], 10, row_filter=View(traffic_fraction=0.5))
    assert str(tiny_dataset) in str(info.value) and "traffic" in str(info.value)
    with pytest.raises(DatasetError, match=r"unknown domain\(s\) \['z'\].*\['a', 'b', 'c'\]"):
        StreamReader(open_dataset(store), [1], 10, row_filter=View(domains=["a", "z"]))
    no_domain = open_dataset(_without_domains(tiny_dataset, tmp_path / "nodomain"))
    with pytest.raises(DatasetError, match="has no domain column"):
        StreamReader(no_domain, [1], 10, row_filter=View(domains=["a"]))
    with pytest.raises(ValueError, match="_domain"):
        View(domains=["a"]).mask(pa.table({"x": [1]}))
    with pytest.raises(ValueError, match="_request_id"):
        View(traffic_fraction=0.5).mask(pa.table({"_domain": ["a"]}))
    for bad in ({"traffic_fraction": 0}, {"traffic_fraction": 1.5}, {"domains": []}, {"domain": ["a"]}):
        with pytest.raises(ValidationError):
            View.model_validate(bad)
    with pytest.raises(ConfigError, match=r"view\.traffic_fraction"):
        parse_train_config(train_config(store, view={"traffic_fraction": 2}))
    # The trainer checks the view before it makes the run directory.
    config = parse_train_config(train_config(tiny_dataset, view={"traffic_fraction": 0.5}))
    with pytest.raises(DatasetError, match="_request_id"):
        train(config, tmp_path / "run", show_progress=False)
    assert not (tmp_path / "run" / "config.yaml").exists()


def _without_domains(source: Path, out: Path) -> Path:
    """A copy of a tiny dataset whose schema has no domain column."""
    ds = open_dataset(source)
    schema = ds.schema.model_copy(update={"domain": None})
    with atomic_output_dir(out) as staging:
        writer = DatasetWriter(staging, schema)
        for info in ds.manifest.days:
            table = pa.concat_tables(pq.read_table(p) for p in ds.day_files(info.day)).drop_columns(["_domain"])
            writer.add_day(info.day, table.cast(partition_arrow_schema(schema)))
        writer.finish("test")
    return out


# --- training through a view ---------------------------------------------------------------------
VIEW = {"domains": ["a"], "traffic_fraction": 0.5, "traffic_salt": "vm-a"}


def test_exfm_train_with_a_view_trains_and_evaluates_only_on_it(store, tmp_path):
    ds = open_dataset(store)
    view = View(**VIEW)
    per_day = {d: int(_expected_mask(_stored(ds, [d]), view).sum()) for d in (1, 2, 3, 4)}
    assert 0 < per_day[1] < ds.day(1).domains["a"]
    config_path = tmp_path / "vm.yaml"
    config_path.write_text(yaml.safe_dump(train_config(store, view=VIEW, batch_size=32)))
    run_dir = tmp_path / "run"
    assert main(["train", "--config", str(config_path), "--run-dir", str(run_dir), "--quiet"]) == 0

    run = RunDirectory(run_dir)
    records = run.read_metrics()
    day_ends = [r for r in records if r["event"] == "day_end"]
    assert [r["day"] for r in day_ends] == [1, 2, 3]
    assert [r["examples"] for r in day_ends] == list(np.cumsum([per_day[d] for d in (1, 2, 3)]))
    assert day_ends[-1]["progressive"]["examples"] == sum(per_day[d] for d in (1, 2, 3))
    evaluation = next(r for r in records if r["event"] == "eval")["metrics"]
    assert evaluation["click"]["all"]["n"] == evaluation["click"]["a"]["n"] == per_day[4]
    assert evaluation["click"]["b"]["n"] == evaluation["click"]["c"]["n"] == 0
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["examples"] == sum(per_day[d] for d in (1, 2, 3))
    assert summary["eval"]["4"]["click"]["all"]["n"] == per_day[4]
    assert {p.name for p in run.checkpoints.glob("*.pt")} == {"last.pt", "day-01.pt", "day-02.pt", "day-03.pt"}
    # The saved config round-trips the view, and re-evaluating the checkpoint uses it.
    saved = load_train_config(run.config_path)
    assert saved.view == view
    assert saved.to_yaml() == run.config_path.read_text()
    again = evaluate_checkpoint(run_dir, 4)
    assert again["click"]["all"].n == per_day[4]
    assert again["click"]["all"].logloss == pytest.approx(evaluation["click"]["all"]["logloss"], rel=1e-12)


def test_a_config_without_a_view_saves_no_view_key(tiny_dataset):
    """Runs made before views existed keep an identical config.yaml (and so can be resumed)."""
    config = parse_train_config(train_config(tiny_dataset))
    assert config.view is None and "view" not in yaml.safe_load(config.to_yaml())


def test_interrupted_and_resumed_run_with_a_view_is_bit_identical(store, tmp_path, monkeypatch):
    config = parse_train_config(train_config(store, view=VIEW, batch_size=16, checkpoint_every=7, log_every=5))
    whole = train(config, tmp_path / "whole", show_progress=False)

    real_step, calls = Optimizers.step, []

    def crashing_step(self):
        calls.append(1)
        if len(calls) == 17:  # mid day 2 (day 1 has about 11 batches); last checkpoint after batch 14
            raise RuntimeError("simulated crash")
        return real_step(self)

    monkeypatch.setattr(Optimizers, "step", crashing_step)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(config, tmp_path / "killed", show_progress=False)
    monkeypatch.setattr(Optimizers, "step", real_step)
    killed_at = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)["position"]
    assert killed_at[0] == 2 and killed_at[1] > 0
    assert not (tmp_path / "killed" / "summary.json").exists()
    resumed = train(config, tmp_path / "killed", resume=True, show_progress=False)

    assert resumed.examples == whole.examples
    a = torch.load(tmp_path / "whole" / "checkpoints" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "killed" / "checkpoints" / "last.pt", weights_only=True)
    assert a["examples"] == b["examples"] and a["batches"] == b["batches"] and a["position"] == b["position"]
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"parameter {name} differs after interruption and resume"
    assert json.loads((tmp_path / "whole" / "summary.json").read_text()) == json.loads(
        (tmp_path / "killed" / "summary.json").read_text()
    )

    def without_timing(path: Path) -> list[dict]:
        return [{k: v for k, v in r.items() if k != "examples_per_s"} for r in RunDirectory(path).read_metrics()]

    assert without_timing(tmp_path / "whole") == without_timing(tmp_path / "killed")
