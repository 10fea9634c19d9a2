"""Open Bandit Dataset (ZOZOTOWN, Saito et al. 2020): the campaign logs -> an exfm dataset.

Raw input (``raw_dir``, the ``obd`` / ``open_bandit_dataset`` folder)::

    raw_dir/<policy>/<campaign>/<campaign>.csv       impressions
    raw_dir/<policy>/<campaign>/item_context.csv     item features by item_id

for behaviour policies ``random`` and ``bts`` and campaigns ``all``, ``men``, ``women``. An
impressions file has a leading unnamed index column, ``timestamp`` (ISO-8601, UTC), ``item_id``,
``position``, ``click``, ``propensity_score``, ``user_feature_0..3`` (hashed categories) and
``user-item_affinity_0..K-1`` (one per item of the campaign: K = 80, 34, 46); an item context has
``item_id``, ``item_feature_0`` (numeric) and ``item_feature_1..3`` (hashed categories).

Output (decisions documented in ``docs/datasets.md``, section "obd"):

* domain: the campaign (``all_items`` for campaign ``all``, whose name the metrics reserve for the whole
  set; ``men``, ``women``); label: ``click``;
* features: ``item_id`` as ``<campaign>/<item_id>`` (an item index is only meaningful within its
  campaign), ``position``, ``user_feature_0..3``, ``item_feature_1..3`` (categorical),
  ``item_feature_0``, ``affinity_item`` (the user's affinity to the shown item),
  ``affinity_total`` (summed over the campaign's items) and, with ``affinity_columns``, the raw
  ``affinity_0..K-1`` (numeric; null beyond a campaign's item count);
* item features of a campaign come from the item context of the first of ``policies`` (the
  policies' files list the same items, but hash the categorical item features differently);
* passthrough (never model inputs): ``propensity_score`` (the logging policy's probability of the
  shown item, for off-policy estimates) and ``policy_bts`` (1.0: logged by Bernoulli Thompson
  Sampling, 0.0: by the uniform random policy);
* time: ``timestamp``; split: calendar days in UTC from 2019-11-24, 7 days.
"""

from __future__ import annotations

import warnings
from datetime import date
from pathlib import Path
from typing import Literal

import duckdb

from exfm.data.dataset import Manifest
from exfm.data.ingest import IngestError, read_header
from exfm.data.sources._common import (
    FILE_COLUMN,
    LINE_COLUMN,
    Check,
    RawFile,
    RawTable,
    categorical_features,
    distinct_counts,
    literal,
    require_file,
    run_adapter,
)
from exfm.schema import Schema, parse_schema

POLICIES = ("random", "bts")
CAMPAIGNS = ("all", "men", "women")
ALL_CAMPAIGN_DOMAIN = "all_items"
"""The domain of campaign ``all``: exfm's metrics reserve the name ``all`` for the whole set."""
AFFINITY_PREFIX = "user-item_affinity_"
USER_FEATURES = tuple(f"user_feature_{k}" for k in range(4))
ITEM_CATEGORIES = tuple(f"item_feature_{k}" for k in range(1, 4))
EVENTS, ITEMS = "impressions", "items"


def adapt(
    raw_dir: Path,
    out: Path,
    *,
    overwrite: bool = False,
    show_progress: bool = True,
    memory_limit_mb: int = 2048,
    on_bad_row: Literal["error", "skip"] = "skip",
    policies: tuple[str, ...] = POLICIES,
    campaigns: tuple[str, ...] = CAMPAIGNS,
    affinity_columns: bool = True,
    start: date = date(2019, 11, 24),
    days: int = 7,
    max_buckets: int = 1 << 22,
) -> Manifest:
    """Turn the Open Bandit Dataset's logs in ``raw_dir`` into a dataset at ``out``.

    Args:
        raw_dir: the folder with one subfolder per policy (``random/``, ``bts/``).
        out: the dataset directory to create.
        overwrite: replace an existing ``out`` (once the new dataset is complete).
        show_progress: progress bars on stderr.
        memory_limit_mb: the working-memory budget (at least 256); DuckDB spills beyond half of it.
        on_bad_row: ``"error"``: stop at the first bad line (file, line and field named);
            ``"skip"``: leave bad lines out, list them in ``out/rejects.csv``, count them.
        policies: the behaviour policies to read (their rows are interleaved by time).
        campaigns: the campaigns to read; each becomes a domain.
        affinity_columns: also keep every raw ``user-item_affinity_k`` as feature ``affinity_k``.
        start: the UTC date of day 1.
        days: the number of days.
        max_buckets: the largest embedding table (buckets are sized from the distinct ids).

    Returns:
        The dataset's manifest.
    """
    if not policies or not campaigns:
        raise ValueError("at least one policy and one campaign are needed")
    raw_dir = Path(raw_dir)
    if not raw_dir.is_dir():
        raise IngestError(f"{raw_dir}: not a folder (expected the Open Bandit Dataset's folder with random/, bts/)")
    event_files, item_files, width = [], [], 0
    for policy in policies:
        for campaign in campaigns:
            folder = raw_dir / policy / campaign
            path = require_file(folder / f"{campaign}.csv", f"the {policy}/{campaign} log")
            header = read_header(path)
            affinities = [name for name in header if name.startswith(AFFINITY_PREFIX)]
            width = max(width, len(affinities))
            columns = ("timestamp", "item_id", "position", "click", "propensity_score", *USER_FEATURES, *affinities)
            constants = {"policy": policy, "campaign": campaign}
            event_files.append(RawFile(path, columns, constants=constants))
            items = require_file(folder / "item_context.csv", f"the {policy}/{campaign} item features")
            item_files.append(RawFile(items, ("item_id", "item_feature_0", *ITEM_CATEGORIES), constants=constants))
    event_checks = [
        Check("timestamp", "iso", name="time_us"),
        Check("item_id", "int"),
        Check("position", "int"),
        Check("click", "label"),
        Check("propensity_score", "number", required=False),
        *(Check(name, "text", required=False) for name in USER_FEATURES),
        *(Check(f"{AFFINITY_PREFIX}{k}", "number", required=False, name=f"affinity_{k}") for k in range(width)),
    ]
    item_checks = [
        Check("item_id", "int"),
        Check("item_feature_0", "number", required=False),
        *(Check(name, "text", required=False) for name in ITEM_CATEGORIES),
    ]

    def derive(con: duckdb.DuckDBPyConnection, work: Path) -> tuple[Schema, str]:
        if not con.execute(f"SELECT count(*) FROM {EVENTS}").fetchone()[0]:
            raise IngestError(f"no valid impression in {[str(f.path) for f in event_files]}")
        item_policy = _item_policy(con, policies)
        affinities = [f"affinity_{k}" for k in range(width)]
        affinity_list = f"[{', '.join(f'v.{a}' for a in affinities)}]" if affinities else "[]::DOUBLE[]"
        item_key = "v.campaign || '/' || CAST(v.item_id AS VARCHAR)"
        selected = [
            "v.time_us",
            f"{item_key} AS item_id",
            "v.position",
            *(f"v.{name}" for name in USER_FEATURES),
            *(f"i.{name}" for name in ITEM_CATEGORIES),
            "i.item_feature_0",
            f"CASE WHEN v.item_id BETWEEN 0 AND {width - 1} THEN list_extract({affinity_list}, v.item_id + 1) END"
            " AS affinity_item",
            f"list_sum({affinity_list}) AS affinity_total",
            *(f"v.{a}" for a in (affinities if affinity_columns else [])),
            "v.click",
            f"CASE v.campaign WHEN {literal('all')} THEN {literal(ALL_CAMPAIGN_DOMAIN)} ELSE v.campaign END"
            " AS campaign",
            "v.propensity_score",
            f"CAST(v.policy = {literal('bts')} AS DOUBLE) AS policy_bts",
            f"v.{FILE_COLUMN}",
            f"v.{LINE_COLUMN}",
        ]
        items = (
            f"SELECT * FROM {ITEMS} QUALIFY row_number() OVER"
            f" (PARTITION BY policy, campaign, item_id ORDER BY {FILE_COLUMN}, {LINE_COLUMN}) = 1"
        )
        sql = (
            f"SELECT {', '.join(selected)} FROM {EVENTS} v LEFT JOIN ({items}) i"
            f" ON i.campaign = v.campaign AND i.item_id = v.item_id AND i.policy = {item_policy}"
        )
        distinct = distinct_counts(con, EVENTS, ["position", *USER_FEATURES])
        distinct |= {"item_id": con.execute(f"SELECT count(DISTINCT (campaign, item_id)) FROM {EVENTS}").fetchone()[0]}
        used = "TRUE" if item_policy == "v.policy" else f"policy = {item_policy}"  # the joined contexts
        distinct |= distinct_counts(con, ITEMS, ITEM_CATEGORIES, where=used)
        return build_schema(distinct, width if affinity_columns else 0, start, days, max_buckets), sql

    return run_adapter(
        [RawTable(EVENTS, event_files, event_checks), RawTable(ITEMS, item_files, item_checks)],
        derive,
        Path(out),
        overwrite=overwrite,
        show_progress=show_progress,
        memory_limit_mb=memory_limit_mb,
        on_bad_row=on_bad_row,
    )


def _item_policy(con: duckdb.DuckDBPyConnection, policies: tuple[str, ...]) -> str:
    """The SQL of the policy whose item context each impression is joined with: the first
    policy's, if every policy's contexts list the same items with the same ``item_feature_0``;
    else each impression's own policy (with a warning)."""
    first = literal(policies[0])
    mismatches = 0
    for policy in policies[1:]:
        mismatches += con.execute(
            f"SELECT count(*) FROM (SELECT * FROM {ITEMS} WHERE policy = {literal(policy)}) a"
            f" FULL JOIN (SELECT * FROM {ITEMS} WHERE policy = {first}) b"
            " ON a.campaign = b.campaign AND a.item_id = b.item_id"
            " WHERE a.item_id IS NULL OR b.item_id IS NULL OR a.item_feature_0 IS DISTINCT FROM b.item_feature_0"
        ).fetchone()[0]
    if mismatches:
        warnings.warn(
            f"the policies' item_context.csv files disagree on {mismatches} item(s); each impression is joined"
            " with its own policy's item context (item categories are then hashed per policy)",
            stacklevel=3,
        )
        return "v.policy"
    return first


def build_schema(distinct: dict[str, int], width: int, start: date, days: int, max_buckets: int) -> Schema:
    """The schema of the joined OBD impressions (``width`` raw affinity columns kept)."""
    categorical = ["item_id", "position", *USER_FEATURES, *ITEM_CATEGORIES]
    features = categorical_features(categorical, distinct, max_buckets)
    features.append({"name": "item_feature_0", "type": "numeric"})
    for name in ("affinity_item", "affinity_total", *(f"affinity_{k}" for k in range(width))):
        features.append({"name": name, "type": "numeric", "transform": "log1p"})
    spec = {
        "name": "obd",
        "features": features,
        "labels": [{"name": "click"}],
        "time": {"column": "time_us", "unit": "us"},
        "domain": {"column": "campaign"},
        "passthrough": ["propensity_score", "policy_bts"],
        "split": {"mode": "calendar", "days": days, "timezone": "UTC", "start": start},
    }
    return parse_schema(spec, "obd")
