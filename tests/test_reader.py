"""The streaming reader: order, exactly-once, resume positions, causal normalisation, prefetch."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_tiny_dataset

from exfm.data.dataset import open_dataset
from exfm.data.hashing import bucketize
from exfm.data.reader import ReaderPosition, StreamReader


def _all(reader: StreamReader):
    return list(reader)


def test_reads_every_row_once_in_time_order(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    batches = _all(StreamReader(ds, [1, 2, 3, 4], batch_size=128))
    times = torch.cat([b.time_us for b in batches]).numpy()
    assert len(times) == ds.manifest.rows
    assert np.all(np.diff(times) >= 0)
    stored = np.concatenate([pq.read_table(f).column("_time").to_numpy() for d in range(1, 5) for f in ds.day_files(d)])
    np.testing.assert_array_equal(times, stored)
    for batch in batches:  # a batch never spans two days, numbering restarts per day
        assert batch.size <= 128
        info = ds.day(batch.day)
        assert info.start_us <= int(batch.time_us.min()) and int(batch.time_us.max()) < info.end_us
    assert [b.index_in_day for b in batches if b.day == 2] == list(range(len([b for b in batches if b.day == 2])))


def test_batch_layout_matches_stored_columns(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    batch = next(iter(StreamReader(ds, [1], batch_size=64, passthrough=["p_click"])))
    table = pq.read_table(ds.day_files(1)[0]).slice(0, 64)
    assert batch.sparse.keys == ["user", "item", "cate", "hist"]
    ids = batch.sparse.single_ids()
    assert ids.shape == (64, 3)
    expected_item = bucketize(torch.from_numpy(table.column("item").to_numpy().copy()), 40)
    assert torch.equal(ids[:, 1], expected_item)
    values, lengths = batch.sparse.jagged("hist")
    assert lengths.tolist() == [len(v) for v in table.column("hist").to_pylist()]
    assert len(values) == int(lengths.sum()) and bool((values >= 1).all())
    assert batch.labels.shape == (64, 2) and batch.labels.dtype == torch.float32
    assert torch.equal(batch.labels[:, 0], torch.from_numpy(table.column("click").to_numpy().astype(np.float32)))
    assert batch.dense.shape == (64, 2) and torch.isfinite(batch.dense).all()
    assert batch.domain.min() >= 0 and batch.domain.max() < 3
    np.testing.assert_allclose(batch.passthrough["p_click"].numpy(), table.column("p_click").to_numpy())
    padded = batch.sparse.padded("hist", 5)
    assert padded.shape == (64, 5) and torch.equal((padded > 0).sum(1), lengths.long())


def test_start_position_continues_exactly(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    full = _all(StreamReader(ds, [1, 2, 3], batch_size=100))
    start = ReaderPosition(day=2, batch=3)
    resumed = _all(StreamReader(ds, [1, 2, 3], batch_size=100, start=start))
    tail = [b for b in full if (b.day, b.index_in_day) >= (2, 3)]
    assert len(resumed) == len(tail)
    for a, b in zip(tail, resumed, strict=True):
        assert (a.day, a.index_in_day) == (b.day, b.index_in_day)
        assert torch.equal(a.sparse.values, b.sparse.values)
        assert torch.equal(a.time_us, b.time_us)
        # The causal statistics were rebuilt, bit for bit, from everything before the start.
        assert torch.equal(a.dense, b.dense)
    assert StreamReader(ds, [1, 2, 3], batch_size=100, start=start).total_rows == sum(b.size for b in tail)


def test_normalisation_never_looks_ahead(tmp_path):
    """Perturbing day 3 and 4 leaves every batch of days 1-2 unchanged (and not vice versa)."""
    base = open_dataset(make_tiny_dataset(tmp_path / "a", seed=1))
    other = open_dataset(make_tiny_dataset(tmp_path / "b", seed=1))
    for day in (3, 4):
        for path in other.day_files(day):
            table = pq.read_table(path)
            price = table.column("price").to_numpy(zero_copy_only=False) * 1000
            table = table.set_column(table.schema.get_field_index("price"), "price", [price.astype(np.float32)])
            pq.write_table(table, path)
    a = _all(StreamReader(base, [1, 2, 3], batch_size=100))
    b = _all(StreamReader(other, [1, 2, 3], batch_size=100))
    for x, y in zip(a, b, strict=True):
        if x.day <= 2:
            assert torch.equal(x.dense, y.dense)
    assert not all(torch.equal(x.dense, y.dense) for x, y in zip(a, b, strict=True) if x.day == 3)


def test_standardised_features_use_only_earlier_rows(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    batches = _all(StreamReader(ds, [1], batch_size=250, prefetch=0))
    raw = np.concatenate([pq.read_table(f).column("score").to_numpy() for f in ds.day_files(1)])
    # The first batch has no past: identity. The second uses the first 250 rows' moments.
    np.testing.assert_allclose(batches[0].dense[:, 1].numpy(), raw[:250], rtol=1e-6)
    mean, std = raw[:250].astype(np.float64).mean(), raw[:250].astype(np.float64).std()
    np.testing.assert_allclose(batches[1].dense[:, 1].numpy(), (raw[250:500] - mean) / std, rtol=1e-4, atol=1e-5)


def test_prefetch_matches_inline_and_forwards_errors(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    inline = _all(StreamReader(ds, [1, 2], batch_size=77, prefetch=0))
    threaded = _all(StreamReader(ds, [1, 2], batch_size=77, prefetch=3))
    assert len(inline) == len(threaded)
    assert all(torch.equal(a.sparse.values, b.sparse.values) for a, b in zip(inline, threaded, strict=True))
    (ds.day_files(2)[1]).write_bytes(b"not parquet")
    with pytest.raises(Exception, match=r"(?i)parquet|magic"):
        _all(StreamReader(ds, [1, 2], batch_size=77, prefetch=3))


def test_missing_fm_predictions_are_nan(tiny_dataset):
    ds = open_dataset(tiny_dataset)
    batch = next(iter(StreamReader(ds, [1], batch_size=32, with_fm_predictions=True)))
    assert batch.fm_predictions.shape == (32, 2) and torch.isnan(batch.fm_predictions).all()


def test_unknown_day_is_an_error(tiny_dataset):
    with pytest.raises(ValueError, match="no day 9"):
        StreamReader(open_dataset(tiny_dataset), [9], batch_size=10)
