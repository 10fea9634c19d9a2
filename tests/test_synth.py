"""The synthetic stream: format, determinism, rates, id churn, drift, teacher-only signal, raw CSV."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from exfm.data import synth
from exfm.data.dataset import (
    DOMAIN_COLUMN,
    TIME_COLUMN,
    Dataset,
    DatasetError,
    open_dataset,
    partition_arrow_schema,
)
from exfm.data.hashing import bucketize, stable_hash
from exfm.data.synth import TEACHER_ONLY_FEATURES, synthesize, synthetic_schema
from exfm.schema import load_schema, parse_schema

ROWS, DAYS, SEED = 20_000, 8, 3


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, rows=ROWS, days=DAYS, seed=SEED, raw_csv=True, show_progress=False)
    return out


@pytest.fixture(scope="module")
def rows(generated: Path) -> pa.Table:
    """All days concatenated (time order), with a ``day`` column."""
    ds = open_dataset(generated)
    tables = []
    for day in range(1, ds.num_days + 1):
        table = _read_day(ds, day)
        tables.append(table.append_column("day", pa.array(np.full(table.num_rows, day, np.int64))))
    return pa.concat_tables(tables)


def _read_day(ds: Dataset, day: int) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in ds.day_files(day)])


def _np(table: pa.Table, name: str) -> np.ndarray:
    return table[name].to_numpy(zero_copy_only=False)


def _logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p / (1 - p))


def _codes(*columns: np.ndarray) -> np.ndarray:
    """Dense codes 0..K-1 of the distinct value tuples of the columns."""
    return np.unique(np.stack(columns, axis=1), axis=0, return_inverse=True)[1].ravel()


def _one_hot(codes: np.ndarray) -> np.ndarray:
    return np.eye(codes.max() + 1)[codes]


def _partitions(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.glob("day=*/*.parquet"))}


# --- schema ----------------------------------------------------------------------------------------
def test_schema_is_valid_and_round_trips():
    schema = synthetic_schema()
    assert parse_schema(yaml.safe_load(schema.to_yaml())) == schema
    assert schema.tasks == ["click", "like", "follow"]
    assert schema.passthrough == ["p_click", "p_like", "p_follow"]
    assert schema.split.mode == "calendar" and schema.split.days == 8 and schema.split.start == synth.START_DATE
    assert schema.domain is not None and schema.time.unit == "s"
    assert synthetic_schema(5).split.days == 5
    names = {f.name for f in schema.features}
    assert set(TEACHER_ONLY_FEATURES) <= names
    student = schema.subset(sorted(names - set(TEACHER_ONLY_FEATURES)))
    assert {f.name for f in student.features} == names - set(TEACHER_ONLY_FEATURES)
    assert schema.feature("hist_items").embedding == "item_id"


def test_small_vocabularies_get_distinct_buckets():
    schema = synthetic_schema()
    sizes = {
        "user_segment": synth.N_SEGMENTS,
        "user_cluster": synth.N_CLUSTERS,
        "item_category": synth.N_CATEGORIES,
        "item_brand": synth.N_BRANDS,
        "device": synth.N_DEVICES,
        "hour": 24,
    }
    for name, size in sizes.items():
        buckets = bucketize(torch.from_numpy(stable_hash(np.arange(size))), schema.feature(name).buckets)
        assert len(torch.unique(buckets)) == size, name


# --- format ----------------------------------------------------------------------------------------
def test_output_is_a_day_partitioned_dataset(generated: Path):
    ds = open_dataset(generated)
    schema = ds.schema
    assert schema == synthetic_schema(DAYS)
    assert ds.manifest.created_by == "synth" and ds.manifest.rows == ROWS and ds.num_days == DAYS
    assert ds.manifest.domains == ["feed", "search", "video"]
    for day in range(1, DAYS + 1):
        info = ds.day(day)
        midnight = datetime(2026, 1, day, tzinfo=UTC).timestamp() * 1_000_000
        assert info.start_us == midnight and info.end_us == midnight + 86_400_000_000
        assert abs(info.rows - ROWS / DAYS) < 0.1 * ROWS / DAYS
        table = _read_day(ds, day)
        assert table.schema.equals(partition_arrow_schema(schema))
        assert table.num_rows == info.rows
        time = _np(table, TIME_COLUMN)
        assert np.all(np.diff(time) >= 0) and time[0] >= info.start_us and time[-1] < info.end_us
        assert np.all(time % 1_000_000 == 0)
        hist = table["hist_items"].combine_chunks()
        assert pc.max(pc.list_value_length(hist)).as_py() <= synth.HIST_LEN
        assert pc.all(pc.not_equal(hist.flatten(), 0)).as_py()
        for task in schema.tasks:
            p = _np(table, f"p_{task}")
            assert np.all((p > 0) & (p < 1))
    days = [f"day={day:02d}" for day in range(1, DAYS + 1)]
    assert sorted(p.name for p in generated.iterdir()) == [*days, "manifest.json", "raw", "schema.yaml"]


def test_existing_output_is_kept_unless_overwrite(tmp_path: Path):
    out = tmp_path / "small"
    synthesize(out, rows=800, days=2, seed=0, show_progress=False)
    with pytest.raises(DatasetError, match="already exists"):
        synthesize(out, rows=800, days=2, seed=1, show_progress=False)
    manifest = synthesize(out, rows=900, days=2, seed=1, overwrite=True, show_progress=False)
    assert open_dataset(out).manifest == manifest and manifest.rows == 900


def test_same_seed_same_bytes_other_seed_other_data(generated: Path, tmp_path: Path):
    synthesize(tmp_path / "again", rows=ROWS, days=DAYS, seed=SEED, show_progress=False)  # without CSV
    assert _partitions(tmp_path / "again") == _partitions(generated)
    synthesize(tmp_path / "other", rows=ROWS, days=DAYS, seed=SEED + 1, show_progress=False)
    other = _partitions(tmp_path / "other")
    assert other.keys() == _partitions(generated).keys()
    assert all(other[name] != data for name, data in _partitions(generated).items())


# --- labels and probabilities ----------------------------------------------------------------------
def test_label_rates_and_bernoulli_consistency(rows: pa.Table):
    rates = {task: _np(rows, task).mean() for task in ("click", "like", "follow")}
    assert 0.05 <= rates["click"] <= 0.15
    assert 0.01 <= rates["like"] <= 0.03
    assert rates["follow"] < 0.01
    click = _np(rows, "click")
    assert np.all(_np(rows, "like") <= click) and np.all(_np(rows, "follow") <= click)
    domain = _np(rows, DOMAIN_COLUMN)
    for task in rates:
        label, p = _np(rows, task), _np(rows, f"p_{task}").astype(np.float64)
        assert abs(label.mean() - p.mean()) < 4 * np.sqrt(np.sum(p * (1 - p))) / len(p), task
    ctr = {name: click[domain == name].mean() for name in ("feed", "search", "video")}
    assert ctr["search"] > ctr["feed"] > ctr["video"]  # domains differ in base rate


def test_ids_enter_and_leave(rows: pa.Table):
    day = _np(rows, "day")
    for name in ("user_id", "item_id"):
        first, last = set(_np(rows, name)[day == 1]), set(_np(rows, name)[day == DAYS])
        assert len(first - last) > 0.2 * len(first), name
        assert len(last - first) > 0.2 * len(last), name
    _, counts = np.unique(_np(rows, "user_id"), return_counts=True)
    assert counts.max() > 20 * np.median(counts)  # heavy-tailed (Zipf) popularity


def test_click_function_drifts_gradually():
    world = synth._World.draw(np.random.default_rng(0), ROWS, DAYS)
    rng = np.random.default_rng(1)
    n = 4000
    fixed = (
        rng.integers(0, len(world.user_weight), n),
        rng.integers(0, len(world.item_weight), n),
        rng.integers(0, 3, n),
        rng.integers(0, synth.N_DEVICES, n),
        rng.integers(0, 24, n),
    )
    logits = [_logit(world.probabilities(*fixed, np.full(n, float(t)))[0]) for t in range(DAYS)]
    step = np.mean([np.abs(b - a).mean() for a, b in itertools.pairwise(logits)])
    total = np.abs(logits[-1] - logits[0]).mean()
    assert 0.02 < step < 0.3  # changes every day, smoothly
    assert total > 3 * step  # and the change accumulates over the days


def test_teacher_only_features_carry_signal(rows: pa.Table):
    """Beyond every visible feature used here, p_click still varies with quality and cluster."""
    logit = _logit(_np(rows, "p_click"))
    segment, category = _np(rows, "user_segment"), _np(rows, "item_category")
    visible = np.hstack(
        [
            _one_hot(_codes(segment, category)),
            _one_hot(_codes(_np(rows, "device"), _np(rows, DOMAIN_COLUMN).astype("U"))),
            _one_hot(_codes(_np(rows, "hour"))),
            _one_hot(_codes(_np(rows, "day"), _np(rows, DOMAIN_COLUMN).astype("U"))),
            np.log(_np(rows, "item_price"))[:, None],
            np.log1p(_np(rows, "user_activity"))[:, None],
            _logit(_np(rows, "item_ctr_prior"))[:, None],
        ]
    )
    residual = logit - visible @ np.linalg.lstsq(visible, logit, rcond=None)[0]
    assert np.corrcoef(residual, _np(rows, "item_quality"))[0, 1] > 0.1

    # (cluster, category) cell means of the residual replicate across two random halves of the rows
    cell = _codes(_np(rows, "user_cluster"), category)
    half = np.random.default_rng(0).random(len(cell)) < 0.5
    sums = [np.bincount(cell[h], residual[h], cell.max() + 1) for h in (half, ~half)]
    counts = [np.bincount(cell[h], minlength=cell.max() + 1) for h in (half, ~half)]
    both = (counts[0] >= 3) & (counts[1] >= 3)
    means = [s[both] / c[both] for s, c in zip(sums, counts, strict=True)]
    assert both.sum() > 200 and np.corrcoef(*means)[0, 1] > 0.3


# --- behaviour sequences ---------------------------------------------------------------------------
def test_history_is_the_users_clicks_before_the_impression(rows: pa.Table):
    users, time, click = _np(rows, "user_id"), _np(rows, TIME_COLUMN), _np(rows, "click")
    items, hist = _np(rows, "item_id"), rows["hist_items"].to_pylist()
    order = np.argsort(users, kind="stable")  # per user, in time order
    boundaries = np.flatnonzero(np.diff(users[order])) + 1
    for group in np.split(order, boundaries):
        for previous, current in itertools.pairwise(group):
            if time[current] == time[previous]:
                assert hist[current] == hist[previous]
            else:
                between = [r for r in group if time[previous] <= time[r] < time[current] and click[r]]
                assert hist[current] == (hist[previous] + [int(items[r]) for r in between])[-synth.HIST_LEN :]


def test_history_reveals_interest_in_the_candidate_category(rows: pa.Table):
    category_of = dict(zip(_np(rows, "item_id"), _np(rows, "item_category"), strict=True))
    category, hist = _np(rows, "item_category"), rows["hist_items"].to_pylist()
    share = np.array(
        [np.mean([category_of.get(i) == c for i in h]) if h else np.nan for h, c in zip(hist, category, strict=True)]
    )
    known = ~np.isnan(share)
    assert np.corrcoef(share[known], _logit(_np(rows, "p_click"))[known])[0, 1] > 0.1


# --- raw CSV ---------------------------------------------------------------------------------------
def test_raw_csv_holds_the_same_values(generated: Path, rows: pa.Table):
    schema = load_schema(generated / "raw" / "schema.yaml")
    assert schema == synthetic_schema(DAYS)
    numeric = [f.name for f in schema.numeric] + schema.passthrough
    text = pacsv.read_csv(
        generated / "raw" / "synthetic.csv",
        convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys([*numeric, "hist_items"], pa.string())),
    )
    assert text.num_rows == rows.num_rows
    np.testing.assert_array_equal(_np(text, "time") * 1_000_000, _np(rows, TIME_COLUMN))
    np.testing.assert_array_equal(_np(text, "domain"), _np(rows, DOMAIN_COLUMN))
    for feature in schema.categorical:
        np.testing.assert_array_equal(stable_hash(text[feature.name]), _np(rows, feature.name))
    for name in numeric:  # the text reads back as the same float32, directly or via float64
        for via in (pa.float32(), pa.float64()):
            values = pc.cast(pc.cast(text[name], via), pa.float32())
            np.testing.assert_array_equal(_np(pa.table({"v": values}), "v"), _np(rows, name))
    for task in schema.tasks:
        np.testing.assert_array_equal(_np(text, task), _np(rows, task))
    lists = pc.split_pattern(text["hist_items"].combine_chunks(), "|")
    ids = pc.list_flatten(lists)
    ids = ids.filter(pc.greater(pc.utf8_length(ids), 0))  # an empty history is one empty field
    stored = rows["hist_items"].combine_chunks()
    np.testing.assert_array_equal(stable_hash(ids), stored.flatten().to_numpy())
    lengths = pc.if_else(pc.equal(text["hist_items"], ""), 0, pc.list_value_length(lists))
    np.testing.assert_array_equal(_np(pa.table({"n": lengths}), "n"), pc.list_value_length(stored).to_numpy())


def test_raw_csv_ingests_to_the_same_dataset(generated: Path, tmp_path: Path):
    ingest = pytest.importorskip("exfm.data.ingest")
    schema = load_schema(generated / "raw" / "schema.yaml")
    out = tmp_path / "ingested"
    ingest.ingest(schema, generated / "raw" / "synthetic.csv", out, show_progress=False)
    direct, ingested = open_dataset(generated), open_dataset(out)
    assert ingested.manifest.rows == direct.manifest.rows
    for day in range(1, DAYS + 1):
        assert ingested.day(day).model_dump(exclude={"files"}) == direct.day(day).model_dump(exclude={"files"})
        assert _read_day(ingested, day).equals(_read_day(direct, day))
