"""Shared fixtures: a tiny hand-built dataset in the exfm format (no ingest or synth needed), and
real Redis / ZooKeeper servers for the distributed DAS backends (see ``services.py``)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from services import (
    RedisServer,
    ZeusHarness,
    ZooKeeperServer,
    redis_available,
    unique,
    zookeeper_available,
)

from exfm.data.dataset import DatasetWriter, atomic_output_dir, partition_arrow_schema
from exfm.data.hashing import stable_hash
from exfm.schema import Schema, parse_schema

TINY_SCHEMA = {
    "name": "tiny",
    "features": [
        {"name": "user", "type": "categorical", "buckets": 50},
        {"name": "item", "type": "categorical", "buckets": 40},
        {"name": "cate", "type": "categorical", "buckets": 10},
        {"name": "hist", "type": "sequence", "max_len": 5, "embedding": "item"},
        {"name": "price", "type": "numeric", "transform": "log1p_standardize"},
        {"name": "score", "type": "numeric", "transform": "standardize", "fill": 0.5},
    ],
    "labels": [{"name": "click"}, {"name": "like"}],
    "time": {"column": "ts", "unit": "s"},
    "domain": {"column": "dom"},
    "passthrough": ["p_click"],
    "split": {"mode": "calendar", "days": 4, "start": "2026-01-01"},
}


def tiny_schema() -> Schema:
    return parse_schema(TINY_SCHEMA, "tiny")


def make_tiny_dataset(out: Path, rows_per_day: int = 1000, days: int = 4, seed: int = 0) -> Path:
    """Write a small random dataset directly in the partition format; returns its directory."""
    schema = tiny_schema().model_copy(update={"split": tiny_schema().split.model_copy(update={"days": days})})
    rng = np.random.default_rng(seed)
    with atomic_output_dir(out) as staging:
        writer = DatasetWriter(staging, schema)
        for day in range(1, days + 1):
            n = rows_per_day
            time_us = np.sort(rng.integers(*writer.day_span(day), n))
            item = rng.integers(1, 30, n)
            hist_len = rng.integers(0, 6, n)
            hist = [list(stable_hash([str(v) for v in rng.integers(1, 30, k)])) for k in hist_len]
            price = rng.lognormal(3, 1, n).astype(np.float32)
            price[rng.random(n) < 0.1] = np.nan
            p_click = 1 / (1 + np.exp(-(np.log(price + 1) - 3 + (item % 3 == 0))))
            p_click = np.nan_to_num(p_click, nan=0.1)
            click = (rng.random(n) < p_click).astype(np.int8)
            table = pa.table(
                {
                    "_time": time_us,
                    "user": stable_hash(rng.integers(1, 100, n)),
                    "item": stable_hash(item),
                    "cate": stable_hash(item % 7),
                    "hist": pa.array(hist, pa.list_(pa.int64())),
                    "price": pa.array(price, pa.float32(), from_pandas=True),
                    "score": rng.normal(day, 1, n).astype(np.float32),
                    "click": click,
                    "like": (click & (rng.random(n) < 0.3)).astype(np.int8),
                    "_domain": rng.choice(["a", "b", "c"], n),
                    "p_click": p_click.astype(np.float32),
                },
                schema=partition_arrow_schema(schema),
            )
            writer.add_day(day, table, parts=2)
        writer.finish("test")
    return out


def train_config(data: Path, **changes) -> dict:
    """A small training config (FM, days 1-3, evaluate day 4) as a dict; ``changes`` override keys."""
    config = {
        "data": str(data),
        "model": {"name": "fm", "embedding_dim": 8},
        "train_days": [1, 3],
        "eval_days": [4],
        "batch_size": 64,
        "checkpoint_every": 7,
        "log_every": 5,
        "progressive_window": 500,
    }
    config.update(changes)
    return config


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    """Tests use tiny tensors: one intra-op thread avoids OpenMP spin contention on small machines."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def tiny_dataset(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "tiny")


# --- real servers for the distributed DAS backends -------------------------------------------------
# A missing server (or client package) skips the tests that need it, unless EXFM_REQUIRE_SERVICES=1
# (CI), which turns the skip into a failure. Servers are killed when their fixture ends.


def require_service(reason: str | None) -> None:
    """Skip (or, with ``EXFM_REQUIRE_SERVICES=1``, fail) the test if ``reason`` says a service is missing."""
    if reason is None:
        return
    if os.environ.get("EXFM_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason}; EXFM_REQUIRE_SERVICES=1 requires it", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One Redis server for the session (tests use ``redis_client``, which empties it first)."""
    require_service(redis_available())
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def fresh_redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis server of this test alone (to kill and restart)."""
    require_service(redis_available())
    with RedisServer(tmp_path / "redis") as server:
        yield server


@pytest.fixture
def redis_client(redis_server: RedisServer):
    """A restart-proof client of the session's Redis server, emptied (``FLUSHALL``) for this test."""
    from exfm.das.redis_backend import connect_redis

    client = connect_redis(redis_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture(scope="session")
def zookeeper_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ZooKeeperServer]:
    """One ZooKeeper server for the session (tests work under their own ``zookeeper_root``)."""
    require_service(zookeeper_available())
    with ZooKeeperServer(tmp_path_factory.mktemp("zookeeper")) as server:
        yield server


@pytest.fixture
def fresh_zookeeper_server(tmp_path: Path) -> Iterator[ZooKeeperServer]:
    """A ZooKeeper server of this test alone (to kill and restart)."""
    require_service(zookeeper_available())
    with ZooKeeperServer(tmp_path / "zookeeper") as server:
        yield server


@pytest.fixture
def zookeeper_root() -> str:
    """A fresh znode root for one test on the session's ZooKeeper server."""
    return unique("/exfm-test/")


@pytest.fixture(params=["sqlite", "zookeeper"])
def zeus_harness(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ZeusHarness]:
    """Each Zeus backend in turn: ``open()`` another task's store, ``lapse(store)`` its leases."""
    server = request.getfixturevalue("zookeeper_server") if request.param == "zookeeper" else None
    harness = ZeusHarness(request.param, tmp_path, server)
    yield harness
    harness.close()
