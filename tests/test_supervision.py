"""Batch supervision logging: aligned fm:<task> columns, null elsewhere, atomic output, teachers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import make_tiny_dataset

from exfm.data.dataset import DatasetError, open_dataset
from exfm.data.hashing import stable_hash
from exfm.data.reader import StreamReader
from exfm.data.synth import DOMAINS, SECONDS_PER_DAY, _day_start_s, _World, synthesize
from exfm.distill.supervision import (
    FM_SNAPSHOT_COLUMN,
    FM_TRAINED_THROUGH_COLUMN,
    OracleTeacher,
    RunTeacher,
    StaleOracleTeacher,
    log_supervision,
    supervision_columns,
)
from exfm.train.config import parse_train_config
from exfm.train.run_dir import RunDirectory
from exfm.train.trainer import build_for_run, train

TASKS = ["click", "like", "follow"]
ROWS, DAYS, SEED = 6000, 4, 3


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "data"
    synthesize(out, rows=ROWS, days=DAYS, seed=SEED, show_progress=False)
    return out


def _day_table(root: Path, day: int) -> pa.Table:
    return pa.concat_tables([pq.read_table(path) for path in open_dataset(root).day_files(day)])


def _logit(p: np.ndarray) -> np.ndarray:
    p = p.astype(np.float64)
    return np.log(p) - np.log1p(-p)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-z))


def test_supervised_days_carry_aligned_predictions_others_null(synthetic, tmp_path):
    manifest = log_supervision(synthetic, tmp_path / "sup", OracleTeacher(shift=1.0), [2, 3], batch_size=500)
    source = open_dataset(synthetic)
    assert manifest.rows == source.manifest.rows
    assert [d.rows for d in manifest.days] == [d.rows for d in source.manifest.days]
    for day in range(1, DAYS + 1):
        before, after = _day_table(synthetic, day), _day_table(tmp_path / "sup", day)
        assert after.column_names == before.column_names + supervision_columns(TASKS)
        assert after.select(before.column_names).equals(before)  # the input columns unchanged, same order
        if day in (2, 3):
            for task in TASKS:
                p = before.column(f"p_{task}").to_numpy()
                expected = _sigmoid(_logit(p) + 1.0)
                np.testing.assert_allclose(after.column(f"fm:{task}").to_numpy(), expected, rtol=1e-6, atol=1e-7)
            assert set(after.column(FM_SNAPSHOT_COLUMN).to_pylist()) == {OracleTeacher(shift=1.0).snapshot_id}
            # a current oracle: the row's own time is its train-through time (staleness 0)
            np.testing.assert_array_equal(after.column(FM_TRAINED_THROUGH_COLUMN).to_numpy(), before["_time"])
        else:
            assert all(after.column(c).null_count == after.num_rows for c in supervision_columns(TASKS))


def test_reader_yields_logged_predictions(synthetic, tmp_path):
    log_supervision(synthetic, tmp_path / "sup", OracleTeacher(shift=-0.5, temperature=2.0), [2])
    dataset = open_dataset(tmp_path / "sup")
    batches = list(StreamReader(dataset, [1, 2], 700, with_fm_predictions=True, passthrough=["p_click"], prefetch=0))
    for batch in batches:
        fm = batch.fm_predictions
        assert fm.shape == (batch.size, 3)
        if batch.day == 1:
            assert torch.isnan(fm).all()
        else:
            expected = _sigmoid(_logit(batch.passthrough["p_click"].numpy()) / 2.0 - 0.5)
            np.testing.assert_allclose(fm[:, 0].numpy(), expected, rtol=1e-5, atol=1e-7)


def test_oracle_bias_is_the_one_asked(synthetic, tmp_path):
    """Shift, per-domain shift and noise: the logged logit minus the true one is exactly the bias."""
    teacher = OracleTeacher(shift=0.5, domain_shift={"video": 1.0}, noise=0.3, seed=7)
    log_supervision(synthetic, tmp_path / "sup", teacher, [3], batch_size=1024)
    table = _day_table(tmp_path / "sup", 3)
    p_true = table.column("p_click").to_numpy()
    gap = _logit(table.column("fm:click").to_numpy()) - _logit(p_true)
    video = np.array(table.column("_domain").to_pylist()) == "video"
    assert abs(gap[~video].mean() - 0.5) < 0.05 and abs(gap[video].mean() - 1.5) < 0.1
    assert abs(gap[~video].std() - 0.3) < 0.03
    # Without noise the calibration against the truth, Σ p_fm / Σ p, is the shift's effect exactly.
    log_supervision(synthetic, tmp_path / "exact", OracleTeacher(shift=1.0), [3])
    fm = _day_table(tmp_path / "exact", 3).column("fm:click").to_numpy().astype(np.float64)
    assert fm.sum() / p_true.sum() == pytest.approx(_sigmoid(_logit(p_true) + 1.0).sum() / p_true.sum(), rel=1e-6)
    assert fm.sum() / p_true.sum() > 2.0  # +1 logit on a ~10 % base rate more than doubles the predictions


def test_stale_oracle_is_the_true_function_frozen_in_time(synthetic, tmp_path):
    """Recompute p(t₀) from the synthetic world and the rows' raw ids; compare with the logged values."""
    frozen = 1.25
    teacher = StaleOracleTeacher(frozen)
    log_supervision(synthetic, tmp_path / "sup", teacher, [3, 4])
    world = _World.draw(np.random.default_rng(np.random.SeedSequence(SEED).spawn(DAYS + 1)[0]), ROWS, DAYS)

    def ids(hashes, known):
        order = np.argsort(known)
        return order[np.searchsorted(known[order], hashes)]

    for day in (3, 4):
        table = _day_table(tmp_path / "sup", day)
        users = ids(table.column("user_id").to_numpy(), world.user_hash)
        items = ids(table.column("item_id").to_numpy(), world.item_hash)
        device = ids(table.column("device").to_numpy(), stable_hash(np.arange(3)))
        hour = ids(table.column("hour").to_numpy(), stable_hash(np.arange(24)))
        domain = np.array([DOMAINS.index(d) for d in table.column("_domain").to_pylist()])
        t = (table.column("_time").to_numpy() / 1e6 - _day_start_s(1)) / SECONDS_PER_DAY
        now = world.probabilities(users, items, domain, device, hour, t)
        np.testing.assert_allclose(table.column("p_click").to_numpy(), now[0], rtol=1e-5)  # the ids are right
        then = world.probabilities(users, items, domain, device, hour, np.full(len(t), frozen))
        for task, expected in zip(TASKS, then, strict=True):
            np.testing.assert_allclose(table.column(f"fm:{task}").to_numpy(), expected, rtol=2e-4, atol=1e-7)
        assert np.abs(table.column("fm:click").to_numpy() - now[0]).max() > 0.01  # it is stale
        through = table.column(FM_TRAINED_THROUGH_COLUMN).to_numpy()
        assert (through == (_day_start_s(1) + frozen * SECONDS_PER_DAY) * 1_000_000).all()


def test_stale_oracle_rejects_a_world_that_does_not_match(synthetic, tmp_path):
    other = tmp_path / "other"
    synthesize(other, rows=ROWS, days=DAYS, seed=SEED, show_progress=False)
    manifest = json.loads((other / "manifest.json").read_text())
    manifest["sources"] = [f"exfm synth --rows {ROWS} --days {DAYS} --seed {SEED + 1}"]
    (other / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DatasetError, match="does not reproduce"):
        log_supervision(other, tmp_path / "sup", StaleOracleTeacher(1.0), [2])
    with pytest.raises(DatasetError, match="not a synthetic stream"):
        log_supervision(make_tiny_dataset(tmp_path / "tiny"), tmp_path / "sup", StaleOracleTeacher(1.0), [2])


def test_output_is_atomic_and_never_the_input(synthetic, tmp_path):
    class Failing(OracleTeacher):
        def predict(self, batch):
            if batch.day == 3:
                raise RuntimeError("teacher crashed")
            return super().predict(batch)

    out = tmp_path / "sup"
    with pytest.raises(RuntimeError, match="crashed"):
        log_supervision(synthetic, out, Failing(), [2, 3])
    assert not out.exists() and list(tmp_path.iterdir()) == []  # no half-written dataset, no staging left
    log_supervision(synthetic, out, OracleTeacher(), [2])
    with pytest.raises(DatasetError, match="already exists"):
        log_supervision(synthetic, out, OracleTeacher(), [2])
    with pytest.raises(ValueError, match="new directory"):
        log_supervision(synthetic, synthetic, OracleTeacher(), [2], overwrite=True)
    with pytest.raises(DatasetError, match="no day 9"):
        log_supervision(synthetic, tmp_path / "x", OracleTeacher(), [9])


def test_supervising_again_replaces_only_the_given_days(synthetic, tmp_path):
    log_supervision(synthetic, tmp_path / "a", OracleTeacher(shift=1.0), [1, 2])
    log_supervision(tmp_path / "a", tmp_path / "b", OracleTeacher(shift=-1.0), [2])
    snapshots = {day: set(_day_table(tmp_path / "b", day).column(FM_SNAPSHOT_COLUMN).to_pylist()) for day in (1, 2, 3)}
    assert snapshots == {
        1: {OracleTeacher(shift=1.0).snapshot_id},
        2: {OracleTeacher(shift=-1.0).snapshot_id},
        3: {None},
    }


def test_run_teacher_predicts_the_run_models_sigmoid(tmp_path):
    data = make_tiny_dataset(tmp_path / "tiny")  # two files per day: alignment across files
    config = parse_train_config(
        {
            "data": str(data),
            "model": {"name": "fm", "embedding_dim": 4},
            "tasks": ["click"],
            "train_days": [1, 2],
            "batch_size": 64,
            "checkpoint_every": 0,
        }
    )
    train(config, tmp_path / "run", show_progress=False)
    teacher = RunTeacher(tmp_path / "run", "day-02")
    log_supervision(data, tmp_path / "sup", teacher, [3, 4], batch_size=128)

    model = build_for_run(config, open_dataset(data))
    model.load_state_dict(RunDirectory(tmp_path / "run").load_checkpoint("day-02")["model"])
    model.eval()
    with torch.no_grad():
        expected = torch.cat(
            [
                torch.sigmoid(model(b, heads=["click"])["click"])
                for b in StreamReader(open_dataset(data), [3, 4], 128, prefetch=0)
            ]
        )
    logged = torch.cat(
        [b.fm_predictions for b in StreamReader(open_dataset(tmp_path / "sup"), [3, 4], 128, with_fm_predictions=True)]
    )
    torch.testing.assert_close(logged[:, 0], expected)
    assert torch.isnan(logged[:, 1]).all()  # the run has no "like" head
    day2 = _day_table(data, 2).column("_time")
    table = _day_table(tmp_path / "sup", 3)
    assert set(table.column(FM_TRAINED_THROUGH_COLUMN).to_pylist()) == {day2[-1].as_py()}
    assert table.column(FM_SNAPSHOT_COLUMN)[0].as_py().startswith("run/day-02@")
