"""Schema validation, stable hashing across processes, and the day split."""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date

import numpy as np
import pytest
import torch
import yaml
from conftest import TINY_SCHEMA

from exfm.data.dataset import assign_days, day_boundaries
from exfm.data.hashing import bucketize, hash_text, stable_hash
from exfm.schema import DaySplit, SchemaError, load_schema, parse_schema


def _with(**changes) -> dict:
    return {**TINY_SCHEMA, **changes}


@pytest.mark.parametrize(
    ("schema", "field"),
    [
        (_with(features=[{"name": "u", "type": "categorical", "buckets": 1}]), "features.0.categorical.buckets"),
        (_with(features=[{"name": "u", "type": "colour"}]), "features.0"),
        (_with(features=[{"name": "s", "type": "sequence", "max_len": 5, "embedding": "nope"}]), "nope"),
        (_with(labels=[]), "labels"),
        (_with(time={"column": "ts", "unit": "weeks"}), "time.unit"),
        (_with(time={"column": "ts", "timezone": "Mars/Olympus"}), "time.timezone"),
        (_with(split={"mode": "calendar", "days": 0}), "split.days"),
        (_with(labels=[{"name": "user"}]), "unique"),
        (_with(surprise=1), "surprise"),
    ],
)
def test_invalid_schemas_name_the_field(schema, field):
    with pytest.raises(SchemaError) as info:
        parse_schema(schema, "my.yaml")
    assert "my.yaml" in str(info.value) and field in str(info.value)


def test_schema_yaml_round_trip_and_fingerprint(tmp_path):
    schema = parse_schema(TINY_SCHEMA)
    path = tmp_path / "s.yaml"
    path.write_text(schema.to_yaml())
    again = load_schema(path)
    assert again == schema and again.fingerprint() == schema.fingerprint()
    assert [f.name for f in schema.subset(["hist"]).features] == ["item", "hist"]  # the shared table comes along
    with pytest.raises(SchemaError, match="unknown feature"):
        schema.subset(["nope"])
    (tmp_path / "bad.yaml").write_text("name: [unclosed")
    with pytest.raises(SchemaError, match=r"bad\.yaml: not valid YAML"):
        load_schema(tmp_path / "bad.yaml")
    with pytest.raises(SchemaError, match="not found"):
        load_schema(tmp_path / "missing.yaml")
    assert yaml.safe_load(schema.to_yaml())["name"] == "tiny"


def test_stable_hash_is_the_same_in_another_process_and_run():
    values = ["alice", "bob", "123", "", "日本", "x" * 100]
    here = stable_hash(values).tolist()
    code = f"import json; from exfm.data.hashing import stable_hash as h; print(json.dumps(h({values!r}).tolist()))"
    for seed in ("1", "2"):  # Python's own str hash differs between these processes; ours must not
        env = {"PYTHONHASHSEED": seed, "PATH": ""}
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert json.loads(out.stdout) == here
    # Fixed values: a change of the hash function would silently remap every stored id.
    assert hash_text("alice") == here[0] == stable_hash(["alice"])[0]
    assert here[3] == 0
    assert stable_hash([123, None]).tolist() == [here[2], 0]


def test_bucketize_range_and_missing():
    hashes = torch.from_numpy(stable_hash([str(i) for i in range(10_000)] + [None]))
    buckets = bucketize(hashes, 97)
    assert int(buckets[-1]) == 0
    assert int(buckets[:-1].min()) >= 1 and int(buckets.max()) <= 96
    counts = np.bincount(buckets[:-1].numpy(), minlength=97)[1:]
    assert counts.min() > 60 and counts.max() < 150  # roughly uniform


def test_calendar_days_follow_local_midnight_across_dst():
    split = DaySplit(mode="calendar", days=3, timezone="Europe/Berlin", start=date(2026, 3, 28))
    bounds = day_boundaries(split, 0, 0)
    # 2026-03-29 has 23 hours in Berlin (clocks go forward).
    assert (np.diff(bounds) / 3_600_000_000).tolist() == [24.0, 23.0, 24.0]
    assert bounds[0] == int(np.datetime64("2026-03-27T23:00:00", "us").astype(np.int64))
    times = np.array([bounds[0] - 1, bounds[0], bounds[1] - 1, bounds[1], bounds[3] - 1, bounds[3]])
    assert assign_days(times, bounds).tolist() == [0, 1, 1, 2, 3, 0]


def test_equal_spans_cover_the_range_with_the_maximum_in_the_last_day():
    split = DaySplit(mode="equal_spans", days=4)
    bounds = day_boundaries(split, 1_000, 9_000)
    assert bounds.tolist() == [1_000, 3_000, 5_000, 7_000, 9_001]
    assert assign_days(np.array([1_000, 2_999, 3_000, 9_000]), bounds).tolist() == [1, 1, 2, 4]
