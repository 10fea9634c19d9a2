"""The synthetic stream: exfm's embedded default data set, with the true probability of every label.

A seeded generator of time-ordered ad impressions over ``days`` UTC calendar days from
2026-01-01, in three domains of different sizes (``feed`` 55 %, ``search`` 30 %, ``video`` 15 %)
and with three tasks (``click``, ``like``, ``follow``). Each row stores the true probabilities
``p_click``, ``p_like`` and ``p_follow`` that its labels were drawn from (passthrough columns), so
calibration and the best achievable NE are known exactly. ``docs/synthetic.md`` documents the
model in full, with measured rates; in brief, for a row at time ``t`` (days since the start) with
domain ``d``, user ``u`` (segment ``s``, fine interest cluster ``k``, activity ``a``, device
``v``), item ``i`` (category ``c``, brand ``b``, price ``π``, quality ``q``) and hour ``h``::

    η_click = b₀ + κ·t + β_d + κ_d·t + bias_u + 0.25·z(a) + 0.5·q + brand_b + ρ_s·z(π)
              + 0.8·(1 + α_d)·A_t[k, c] + P_t[c] + G[h] + W[v, d] + T[k, c, ⌊h/6⌋]
    A_t     = cos(ωt)·A⁰ + sin(ωt)·A¹                 (rotating interests: concept drift)
    P_t[c]  = 0.35·sin(2πt/16 + φ_c)                  (drifting category popularity)
    η_like  = -1.9 + γ_d + 0.6·q + 0.4·A_t[k, c] + 0.2·z(a)
    η_follow = -3.8 + λ_d + 0.4·q + f_b + 0.3·A_t[k, c] + 0.3·z(a)
    p_click = σ(η_click),  p_like = p_click·σ(η_like),  p_follow = p_click·σ(η_follow)

``click ~ Bernoulli(p_click)``; like and follow are possible only after a click:
``like = click · Bernoulli(σ(η_like))`` (so ``P(like) = p_like``), the same for follow.

The fine cluster ``k`` and the quality ``q`` are :data:`TEACHER_ONLY_FEATURES`: the foundation
model sees them, the vertical models must not. The three-way term ``T`` (cluster × category ×
hour bucket) is out of reach of a pairwise student. User and item ids follow a Zipf law over an
id window that slides day by day (new ids enter, old ones leave); ``hist_items`` holds the user's
most recent clicked items (seeded at the user's first appearance by draws from the user's
interests), using only clicks strictly before the impression's second.

Generation runs day by day with one child seed per day (``SeedSequence(seed).spawn``), so memory
is bounded by one day plus per-id state, and a seed gives byte-identical partitions.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
from tqdm.auto import tqdm

from exfm.data.dataset import (
    DOMAIN_COLUMN,
    SCHEMA_NAME,
    TIME_COLUMN,
    US_PER_S,
    DatasetWriter,
    Manifest,
    atomic_output_dir,
    atomic_write_text,
    partition_arrow_schema,
)
from exfm.data.hashing import stable_hash
from exfm.schema import (
    CategoricalFeature,
    DaySplit,
    DomainColumn,
    Label,
    NumericFeature,
    NumericTransform,
    Schema,
    SequenceFeature,
    TimeColumn,
)

__all__ = ["START_DATE", "TEACHER_ONLY_FEATURES", "synthesize", "synthetic_schema"]

TEACHER_ONLY_FEATURES: tuple[str, ...] = ("user_cluster", "item_quality")
"""Features the foundation model sees and the vertical models must not."""

START_DATE = date(2026, 1, 1)
SECONDS_PER_DAY = 86_400
RAW_CSV = "raw/synthetic.csv"

DOMAINS = ("feed", "search", "video")
DOMAIN_SHARES = np.array([0.55, 0.30, 0.15])
TASKS = ("click", "like", "follow")

N_SEGMENTS = 8
CLUSTERS_PER_SEGMENT = 8
N_CLUSTERS = N_SEGMENTS * CLUSTERS_PER_SEGMENT
N_CATEGORIES = 24
BRANDS_PER_CATEGORY = 16
N_BRANDS = N_CATEGORIES * BRANDS_PER_CATEGORY
N_DEVICES = 3
HOURS_PER_BUCKET = 6
HIST_LEN = 20

# Hash buckets. For the small vocabularies they are the smallest counts at which no two of the
# ids share a bucket (tests/test_synth.py checks it), so hashing loses nothing there.
BUCKETS = {
    "user_id": 1 << 19,
    "item_id": 1 << 16,
    "user_segment": 18,
    "user_cluster": 505,
    "item_category": 138,
    "item_brand": 10_543,
    "device": 5,
    "hour": 138,
}

# --- the generative model's constants (see docs/synthetic.md) -----------------------------------
USER_ZIPF = (1.0, 100.0)  # weight of the id of popularity rank r: (r + offset) ** -exponent
ITEM_ZIPF = (1.1, 20.0)
WEEKEND_TRAFFIC = 1.08  # relative rows on Saturdays and Sundays
SAME_DEVICE = 0.85  # probability that an impression uses the user's usual device
SEARCH_INTENT = 0.6  # probability that a search impression's category follows the user's interest
INTEREST_SHARPNESS = 1.5  # interest distribution over categories: softmax(1.5·A_t[k] + P_t)
SEED_HISTORY_RATE = 0.6  # a new user's history length ~ min(20, Poisson(0.6·activity))

CLICK_BIAS = -3.2  # b₀
LIKE_BIAS = -1.9
FOLLOW_BIAS = -3.8
CLICK_TREND = 0.03  # κ, per day
DOMAIN_BIAS = np.array([0.0, 0.0, -0.4])  # β_d
DOMAIN_TREND = np.array([0.0, -0.03, 0.05])  # κ_d, per day
DOMAIN_INTEREST = np.array([0.0, 0.3, -0.3])  # α_d
LIKE_DOMAIN = np.array([0.0, -0.5, 0.6])  # γ_d
FOLLOW_DOMAIN = np.array([0.0, -0.6, 0.5])  # λ_d
INTEREST_ROTATION = math.radians(10.0)  # ω, per day
POPULARITY_PERIOD = 16.0  # days
ACTIVITY_LOG_MEAN, ACTIVITY_LOG_STD = 2.5, 0.9  # z(a) = (ln(1 + a) - 2.5) / 0.9
PRICE_LOG_MEAN = 3.25  # z(π) = ln π - 3.25


def synthetic_schema(days: int = 8) -> Schema:
    """The schema of the synthetic stream: 8 categoricals, 1 sequence, 4 numerics, 3 tasks.

    Args:
        days: number of UTC calendar days from :data:`START_DATE` (the split's ``days``).

    Returns:
        The schema; its ``passthrough`` columns ``p_click, p_like, p_follow`` hold the true
        probabilities and its :data:`TEACHER_ONLY_FEATURES` are for the foundation model only.
    """
    categorical = [CategoricalFeature(name=name, buckets=buckets) for name, buckets in BUCKETS.items()]
    numeric = [
        NumericFeature(name="item_price", transform=NumericTransform.LOG1P_STANDARDIZE),
        NumericFeature(name="user_activity", transform=NumericTransform.LOG1P_STANDARDIZE),
        NumericFeature(name="item_ctr_prior", transform=NumericTransform.STANDARDIZE),
        NumericFeature(name="item_quality", transform=NumericTransform.STANDARDIZE),
    ]
    history = SequenceFeature(name="hist_items", max_len=HIST_LEN, embedding="item_id")
    return Schema(
        name="synthetic",
        features=[*categorical, history, *numeric],
        labels=[Label(name=task) for task in TASKS],
        time=TimeColumn(column="time", unit="s"),
        domain=DomainColumn(column="domain"),
        passthrough=[f"p_{task}" for task in TASKS],
        split=DaySplit(mode="calendar", days=days, timezone="UTC", start=START_DATE),
    )


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _zipf_weights(rng: np.random.Generator, n: int, law: tuple[float, float]) -> np.ndarray:
    """Zipf–Mandelbrot weights ``(r + offset) ** -exponent`` of a random popularity rank r per id."""
    exponent, offset = law
    return (rng.permutation(n) + offset) ** -exponent


def _ragged(lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For segments of the given lengths ``[G]``: the segment of every element and its position in it.

    Both outputs are ``[sum(lengths)]``; e.g. lengths ``[2, 0, 3]`` give ``[0, 0, 2, 2, 2]`` and
    ``[0, 1, 0, 1, 2]``.
    """
    segment = np.repeat(np.arange(len(lengths)), lengths)
    starts = np.cumsum(lengths) - lengths
    return segment, np.arange(len(segment)) - starts[segment]


@dataclass(frozen=True)
class _World:
    """Everything drawn once per seed: the id universes, their attributes, the model's weights.

    Users ``0..n_users-1``; on day d (1-based) the ids ``[(d-1)·user_shift, +user_window)`` are
    active, items likewise; both windows scale with the rows per day.
    """

    user_window: int
    user_shift: int
    item_window: int
    item_shift: int
    user_weight: np.ndarray  # [n_users] Zipf popularity
    user_segment: np.ndarray
    user_cluster: np.ndarray
    user_activity: np.ndarray  # float64 counts ≥ 1
    user_bias: np.ndarray
    user_device: np.ndarray
    item_weight: np.ndarray  # [n_items] Zipf popularity
    item_category: np.ndarray
    item_brand: np.ndarray
    item_price: np.ndarray
    item_quality: np.ndarray
    item_ctr_prior: np.ndarray
    affinity: tuple[np.ndarray, np.ndarray]  # A⁰, A¹: [N_CLUSTERS, N_CATEGORIES]
    popularity_phase: np.ndarray  # φ_c [N_CATEGORIES]
    brand_bias: np.ndarray  # [N_BRANDS]
    brand_follow: np.ndarray  # f_b [N_BRANDS]
    price_slope: np.ndarray  # ρ_s [N_SEGMENTS]
    device_domain: np.ndarray  # W [N_DEVICES, len(DOMAINS)]
    hour_effect: np.ndarray  # G [24]
    triple: np.ndarray  # T [N_CLUSTERS, N_CATEGORIES, 24 // HOURS_PER_BUCKET]
    user_hash: np.ndarray  # stable_hash of every user id
    item_hash: np.ndarray

    @classmethod
    def draw(cls, rng: np.random.Generator, rows: int, days: int) -> _World:
        """Draw the world for ``rows`` impressions over ``days`` days from ``rng``."""
        per_day = math.ceil(rows / days)
        user_window = max(1000, per_day)
        item_window = max(200, per_day // 8)
        user_shift, item_shift = user_window // 10, item_window // 8
        n_users = user_window + user_shift * (days - 1)
        n_items = item_window + item_shift * (days - 1)

        segment = rng.choice(N_SEGMENTS, n_users, p=rng.dirichlet(np.full(N_SEGMENTS, 5.0)))
        cluster = segment * CLUSTERS_PER_SEGMENT + rng.integers(0, CLUSTERS_PER_SEGMENT, n_users)
        activity = np.floor(np.exp(rng.normal(2.3, 1.0, n_users))) + 1.0
        user_bias = rng.normal(0.0, 0.4, n_users)
        device = rng.choice(N_DEVICES, n_users, p=[0.45, 0.40, 0.15])
        user_weight = _zipf_weights(rng, n_users, USER_ZIPF)

        category_share = (rng.permutation(N_CATEGORIES) + 1.0) ** -0.6
        category = rng.choice(N_CATEGORIES, n_items, p=category_share / category_share.sum())
        brand_share = (np.arange(BRANDS_PER_CATEGORY) + 1.0) ** -1.0
        brand = category * BRANDS_PER_CATEGORY + rng.choice(
            BRANDS_PER_CATEGORY, n_items, p=brand_share / brand_share.sum()
        )
        price_level = rng.uniform(1.5, 5.0, N_CATEGORIES)
        price = np.maximum(np.round(np.exp(price_level[category] + rng.normal(0.0, 1.0, n_items)), 2), 0.01)
        quality = rng.normal(0.0, 1.0, n_items)
        brand_bias = rng.normal(0.0, 0.3, N_BRANDS)
        ctr_prior = _sigmoid(-2.2 + 0.5 * quality + brand_bias[brand] + rng.normal(0.0, 0.5, n_items))
        item_weight = _zipf_weights(rng, n_items, ITEM_ZIPF)

        def segment_structured(*shape: int) -> np.ndarray:
            """Cluster-level N(0, 1) weights, half of whose variance is shared by the segment."""
            coarse = rng.normal(0.0, 1.0, (N_SEGMENTS, *shape))
            fine = rng.normal(0.0, 1.0, (N_CLUSTERS, *shape))
            return math.sqrt(0.5) * (np.repeat(coarse, CLUSTERS_PER_SEGMENT, axis=0) + fine)

        affinity = (segment_structured(N_CATEGORIES), segment_structured(N_CATEGORIES))
        triple = 0.45 * segment_structured(N_CATEGORIES, 24 // HOURS_PER_BUCKET)
        return cls(
            user_window=user_window,
            user_shift=user_shift,
            item_window=item_window,
            item_shift=item_shift,
            user_weight=user_weight,
            user_segment=segment,
            user_cluster=cluster,
            user_activity=activity,
            user_bias=user_bias,
            user_device=device,
            item_weight=item_weight,
            item_category=category,
            item_brand=brand,
            item_price=price,
            item_quality=quality,
            item_ctr_prior=ctr_prior,
            affinity=affinity,
            popularity_phase=rng.uniform(0.0, 2 * math.pi, N_CATEGORIES),
            brand_bias=brand_bias,
            brand_follow=rng.normal(0.0, 0.8, N_BRANDS),
            price_slope=rng.normal(-0.25, 0.15, N_SEGMENTS),
            device_domain=rng.normal(0.0, 0.2, (N_DEVICES, len(DOMAINS))),
            hour_effect=0.2 * np.cos(2 * math.pi * (np.arange(24) - 20) / 24),
            triple=triple,
            user_hash=stable_hash(np.arange(n_users)),
            item_hash=stable_hash(np.arange(n_items)),
        )

    def interest(self, cluster: np.ndarray, t: np.ndarray | float, category: np.ndarray | None = None) -> np.ndarray:
        """``A_t[k, c]`` per row ``[m]``, or the whole row ``A_t[k, :]`` ``[m, N_CATEGORIES]`` without c.

        ``t`` is a scalar or ``[m]``.
        """
        angle = INTEREST_ROTATION * np.asarray(t, dtype=np.float64)
        if category is not None:
            return (
                np.cos(angle) * self.affinity[0][cluster, category]
                + np.sin(angle) * self.affinity[1][cluster, category]
            )
        angle = angle[..., None]
        return np.cos(angle) * self.affinity[0][cluster] + np.sin(angle) * self.affinity[1][cluster]

    def popularity(self, t: np.ndarray | float, category: np.ndarray | None = None) -> np.ndarray:
        """``P_t[c]`` per row, or ``P_t[:]`` (``[..., N_CATEGORIES]``) without c."""
        phase = self.popularity_phase if category is None else self.popularity_phase[category]
        t = np.asarray(t, dtype=np.float64)
        if category is None:
            t = t[..., None]
        return 0.35 * np.sin(2 * math.pi * t / POPULARITY_PERIOD + phase)

    def probabilities(
        self,
        users: np.ndarray,
        items: np.ndarray,
        domain: np.ndarray,
        device: np.ndarray,
        hour: np.ndarray,
        t: np.ndarray,
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The true ``(p_click, p_like, p_follow)`` of each row (all ``[n]`` float64)."""
        cluster, segment = self.user_cluster[users], self.user_segment[users]
        category, brand = self.item_category[items], self.item_brand[items]
        quality = self.item_quality[items]
        z_activity = (np.log1p(self.user_activity[users]) - ACTIVITY_LOG_MEAN) / ACTIVITY_LOG_STD
        z_price = np.log(self.item_price[items]) - PRICE_LOG_MEAN
        interest = self.interest(cluster, t, category)
        click = (
            CLICK_BIAS
            + CLICK_TREND * t
            + DOMAIN_BIAS[domain]
            + DOMAIN_TREND[domain] * t
            + self.user_bias[users]
            + 0.25 * z_activity
            + 0.5 * quality
            + self.brand_bias[brand]
            + self.price_slope[segment] * z_price
            + 0.8 * (1.0 + DOMAIN_INTEREST[domain]) * interest
            + self.popularity(t, category)
            + self.hour_effect[hour]
            + self.device_domain[device, domain]
            + self.triple[cluster, category, hour // HOURS_PER_BUCKET]
        )
        like = LIKE_BIAS + LIKE_DOMAIN[domain] + 0.6 * quality + 0.4 * interest + 0.2 * z_activity
        follow = (
            FOLLOW_BIAS
            + FOLLOW_DOMAIN[domain]
            + 0.4 * quality
            + self.brand_follow[brand]
            + 0.3 * interest
            + 0.3 * z_activity
        )
        p_click = _sigmoid(click)
        return p_click, p_click * _sigmoid(like), p_click * _sigmoid(follow)

    def sample_categories(
        self,
        users: np.ndarray,
        t: np.ndarray | float,
        catalog: _Catalog,
        rng: np.random.Generator,
        counts: np.ndarray | None = None,
    ) -> np.ndarray:
        """Draw categories from each user's interests ``softmax(1.5·A_t[k] + P_t)``.

        Only categories with an active item on the catalog's day can be drawn.

        Args:
            users: ``[m]`` user ids.
            t: the time, a scalar or ``[m]``.
            catalog: the day's active items.
            rng: the day's generator.
            counts: ``[m]`` draws per user (default one each); the result is grouped by user.

        Returns:
            ``[sum(counts)]`` category ids.
        """
        logits = INTEREST_SHARPNESS * self.interest(self.user_cluster[users], t) + self.popularity(t)
        weights = np.exp(logits - logits.max(axis=1, keepdims=True)) * catalog.available
        cdf = np.cumsum(weights, axis=1)
        cdf /= cdf[:, -1:]
        # Row j's CDF shifted to (j, j + 1]: one sorted array, so one searchsorted serves all rows.
        owner = np.arange(len(users)) if counts is None else np.repeat(np.arange(len(users)), counts)
        shifted = (cdf + np.arange(len(users))[:, None]).ravel()
        position = np.searchsorted(shifted, owner + rng.random(len(owner)), side="right")
        return position - owner * N_CATEGORIES


class _Catalog:
    """The items active on one day, grouped by category, for popularity-weighted draws."""

    def __init__(self, world: _World, day: int) -> None:
        first = (day - 1) * world.item_shift
        ids = np.arange(first, first + world.item_window)
        category = world.item_category[ids]
        order = np.argsort(category, kind="stable")
        self.ids = ids[order]
        self.cumulative = np.cumsum(world.item_weight[self.ids])
        edges = np.searchsorted(category[order], np.arange(N_CATEGORIES + 1))
        padded = np.concatenate([[0.0], self.cumulative])
        self.group_end = edges[1:]
        self.low, self.high = padded[edges[:-1]], padded[edges[1:]]
        self.available = self.high > self.low

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        """``n`` items drawn by popularity over all categories."""
        target = rng.random(n) * self.cumulative[-1]
        return self.ids[np.searchsorted(self.cumulative, target, side="right")]

    def sample_in(self, categories: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One item per entry of ``categories``, drawn by popularity within that category."""
        low, high = self.low[categories], self.high[categories]
        position = np.searchsorted(self.cumulative, low + rng.random(len(categories)) * (high - low), "right")
        return self.ids[np.minimum(position, self.group_end[categories] - 1)]


class _Histories:
    """Per-user click histories carried across days: the last ``HIST_LEN`` item ids, oldest first.

    ``items[u, HIST_LEN - length[u]:]`` holds user u's history; ``length[u] = -1`` until the user's
    first impression, when :meth:`seed` gives it a starting history.
    """

    def __init__(self, n_users: int) -> None:
        self.items = np.zeros((n_users, HIST_LEN), dtype=np.int32)
        self.length = np.full(n_users, -1, dtype=np.int64)

    def unseen(self, users: np.ndarray) -> np.ndarray:
        """The distinct users among ``users`` that have no history yet (sorted)."""
        distinct = np.unique(users)
        return distinct[self.length[distinct] < 0]

    def seed(self, users: np.ndarray, lengths: np.ndarray, items: np.ndarray) -> None:
        """Give each of ``users`` the history ``items`` (concatenated, ``lengths[j]`` each)."""
        owner, position = _ragged(lengths)
        self.items[users[owner], HIST_LEN - lengths[owner] + position] = items
        self.length[users] = lengths

    def advance(
        self, users: np.ndarray, items: np.ndarray, clicked: np.ndarray, seconds: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """The history of every row of a day, then append the day's clicks to the state.

        A row's history is the user's last ``HIST_LEN`` clicked items from before its second
        (earlier days, then earlier clicks of this day). Rows are in time order; every user must
        have been seeded.

        Args:
            users: ``[n]`` user ids.
            items: ``[n]`` candidate item ids.
            clicked: ``[n]`` bool click labels.
            seconds: ``[n]`` sorted event times.

        Returns:
            ``(offsets [n + 1] int32, values [offsets[-1]] int64)``: the histories as a list array.
        """
        n = len(users)
        order = np.lexsort((seconds, users))  # by user, then time (stable)
        user, second, click = users[order], seconds[order], clicked[order].astype(np.int64)
        starts_user = np.concatenate([[True], user[1:] != user[:-1]])
        group = np.cumsum(starts_user) - 1
        group_user, group_first = user[starts_user], np.flatnonzero(starts_user)
        clicks_before = np.cumsum(click) - click  # clicks on earlier rows (all users)
        clicks_in_group = clicks_before - clicks_before[group_first][group]
        starts_second = starts_user | np.concatenate([[True], second[1:] != second[:-1]])
        first_of_second = np.maximum.accumulate(np.where(starts_second, np.arange(n), 0))
        seen = clicks_in_group[first_of_second]  # only clicks strictly before the row's second

        # Each user's sequence: the stored history, then the day's clicks in time order.
        stored = self.length[group_user]
        day_clicks = np.add.reduceat(click, group_first)
        sequence_length = stored + day_clicks
        sequence_start = np.cumsum(sequence_length) - sequence_length
        sequence = np.empty(int(sequence_length.sum()), dtype=np.int32)
        owner, position = _ragged(stored)
        sequence[sequence_start[owner] + position] = self.items[group_user[owner], HIST_LEN - stored[owner] + position]
        clicked_rows = np.flatnonzero(click)
        owner = group[clicked_rows]
        sequence[sequence_start[owner] + stored[owner] + clicks_in_group[clicked_rows]] = items[order][clicked_rows]

        # Each row sees the last HIST_LEN entries of its user's sequence up to `seen` clicks.
        end = sequence_start[group] + stored[group] + seen
        length = np.minimum(HIST_LEN, stored[group] + seen)
        row_start, row_length = np.empty(n, np.int64), np.empty(n, np.int64)
        row_start[order], row_length[order] = end - length, length
        offsets = np.concatenate([[0], np.cumsum(row_length)])
        owner, position = _ragged(row_length)
        values = sequence[row_start[owner] + position].astype(np.int64)

        kept = np.minimum(HIST_LEN, sequence_length)
        owner, position = _ragged(kept)
        self.items[group_user[owner], HIST_LEN - kept[owner] + position] = sequence[
            sequence_start[owner] + sequence_length[owner] - kept[owner] + position
        ]
        self.length[group_user] = kept
        return offsets.astype(np.int32), values


def _rows_per_day(rows: int, days: int) -> np.ndarray:
    """Split ``rows`` over the days (weekends get ``WEEKEND_TRAFFIC`` times more), summing exactly."""
    weekend = np.array([(START_DATE + timedelta(days=d)).weekday() >= 5 for d in range(days)])
    weight = np.where(weekend, WEEKEND_TRAFFIC, 1.0)
    share = rows * weight / weight.sum()
    counts = np.floor(share).astype(np.int64)
    counts[np.argsort(counts - share, kind="stable")[: rows - counts.sum()]] += 1
    return counts


def _generate_day(
    world: _World, histories: _Histories, day: int, n: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """One day's ``n`` impressions in time order, as raw ids, values and true probabilities."""
    hour_weight = 1.0 + 0.6 * np.cos(2 * math.pi * (np.arange(24) - 20) / 24)
    hour = rng.choice(24, n, p=hour_weight / hour_weight.sum())
    seconds = np.sort(hour * 3600 + rng.integers(0, 3600, n))
    hour = seconds // 3600
    t = (day - 1) + seconds / SECONDS_PER_DAY
    domain = rng.choice(len(DOMAINS), n, p=DOMAIN_SHARES)

    first_user = (day - 1) * world.user_shift
    user_cdf = np.cumsum(world.user_weight[first_user : first_user + world.user_window])
    users = first_user + np.searchsorted(user_cdf, rng.random(n) * user_cdf[-1], side="right")
    device = np.where(rng.random(n) < SAME_DEVICE, world.user_device[users], rng.integers(0, N_DEVICES, n))
    catalog = _Catalog(world, day)
    items = catalog.sample(rng, n)
    intent = np.flatnonzero((domain == DOMAINS.index("search")) & (rng.random(n) < SEARCH_INTENT))
    items[intent] = catalog.sample_in(world.sample_categories(users[intent], t[intent], catalog, rng), rng)

    p_click, p_like, p_follow = world.probabilities(users, items, domain, device, hour, t)
    click = rng.random(n) < p_click
    like = click & (rng.random(n) * p_click < p_like)  # u < σ(η_like), given a click
    follow = click & (rng.random(n) * p_click < p_follow)

    fresh = histories.unseen(users)
    lengths = np.minimum(HIST_LEN, rng.poisson(SEED_HISTORY_RATE * world.user_activity[fresh]))
    seeded = catalog.sample_in(world.sample_categories(fresh, day - 1, catalog, rng, lengths), rng)
    histories.seed(fresh, lengths, seeded)
    offsets, history = histories.advance(users, items, click, seconds)

    return {
        "time": _day_start_s(day) + seconds,
        "domain": domain,
        "user_id": users,
        "item_id": items,
        "user_segment": world.user_segment[users],
        "user_cluster": world.user_cluster[users],
        "item_category": world.item_category[items],
        "item_brand": world.item_brand[items],
        "device": device,
        "hour": hour,
        "hist_offsets": offsets,
        "hist_items": history,
        "item_price": world.item_price[items],
        "user_activity": world.user_activity[users],
        "item_ctr_prior": world.item_ctr_prior[items],
        "item_quality": world.item_quality[items],
        "click": click,
        "like": like,
        "follow": follow,
        "p_click": p_click,
        "p_like": p_like,
        "p_follow": p_follow,
    }


def _day_start_s(day: int) -> int:
    """Unix seconds of day ``day``'s UTC midnight."""
    return (START_DATE.toordinal() - date(1970, 1, 1).toordinal() + day - 1) * SECONDS_PER_DAY


_SMALL_VOCABULARIES = {
    "user_segment": N_SEGMENTS,
    "user_cluster": N_CLUSTERS,
    "item_category": N_CATEGORIES,
    "item_brand": N_BRANDS,
    "device": N_DEVICES,
    "hour": 24,
}


def _partition(rows: dict[str, np.ndarray], world: _World, schema: Schema, hashes: dict[str, np.ndarray]) -> pa.Table:
    """A day's rows in the dataset's partition layout (hashed ids, float32 values, int8 labels)."""
    columns: dict[str, pa.Array | np.ndarray] = {
        TIME_COLUMN: rows["time"] * US_PER_S,
        "user_id": world.user_hash[rows["user_id"]],
        "item_id": world.item_hash[rows["item_id"]],
        "hist_items": pa.ListArray.from_arrays(rows["hist_offsets"], world.item_hash[rows["hist_items"]]),
        DOMAIN_COLUMN: pc.take(pa.array(DOMAINS), rows["domain"]),
    }
    columns |= {name: hashes[name][rows[name]] for name in _SMALL_VOCABULARIES}
    columns |= {feature.name: rows[feature.name].astype(np.float32) for feature in schema.numeric}
    columns |= {task: rows[task].astype(np.int8) for task in TASKS}
    columns |= {name: rows[name].astype(np.float32) for name in schema.passthrough}
    return pa.Table.from_pydict(columns, schema=partition_arrow_schema(schema))


_CSV_OPTIONS = pacsv.WriteOptions(quoting_style="none")


def _float_text(values: np.ndarray) -> pa.Array:
    """float32 values as the shortest text that reads back (via float32 or float64) as the same float32."""
    exact = pa.array(values.astype(np.float32))
    text = pc.cast(exact, pa.string())
    back = pc.cast(pc.cast(text, pa.float64()), pa.float32())
    if pc.all(pc.equal(back, exact)).as_py():
        return text
    return pc.if_else(pc.equal(back, exact), text, pc.cast(pc.cast(exact, pa.float64()), pa.string()))


def _raw_table(rows: dict[str, np.ndarray], schema: Schema) -> pa.Table:
    """A day's rows as raw CSV columns: ids as integers, history as '|'-joined ids, time in seconds."""
    history = pa.ListArray.from_arrays(rows["hist_offsets"], rows["hist_items"])
    columns: dict[str, pa.Array | np.ndarray] = {
        "time": rows["time"],
        "domain": pc.take(pa.array(DOMAINS), rows["domain"]),
    }
    for feature in schema.features:
        if feature.type == "categorical":
            columns[feature.name] = rows[feature.name]
        elif feature.type == "sequence":
            columns[feature.name] = pc.binary_join(pc.cast(history, pa.list_(pa.string())), feature.separator)
        else:
            columns[feature.name] = _float_text(rows[feature.name])
    columns |= {task: rows[task].astype(np.int8) for task in TASKS}
    columns |= {name: _float_text(rows[name]) for name in schema.passthrough}
    return pa.table(columns)


def synthesize(
    out: str | Path,
    rows: int = 1_000_000,
    days: int = 8,
    seed: int = 0,
    *,
    raw_csv: bool = False,
    overwrite: bool = False,
    show_progress: bool = True,
) -> Manifest:
    """Write the synthetic stream as an exfm dataset (and optionally as a raw CSV with its schema).

    The same ``(rows, days, seed)`` always give byte-identical partitions. With ``raw_csv`` the
    directory also holds ``raw/synthetic.csv`` and ``raw/schema.yaml``, from which ``exfm ingest``
    rebuilds the same rows and values.

    Args:
        out: the dataset directory to create (written atomically).
        rows: total impressions, split over the days (weekend days ~8 % busier).
        days: UTC calendar days from :data:`START_DATE`.
        seed: the random seed; day d uses child d of ``SeedSequence(seed)``.
        raw_csv: also write the raw CSV and its schema under ``out/raw/``.
        overwrite: replace ``out`` if it exists (otherwise that is an error).
        show_progress: show a progress bar (rows/s, ETA).

    Returns:
        The dataset's manifest.
    """
    if rows < days:
        raise ValueError(f"rows ({rows}) must be at least days ({days})")
    schema = synthetic_schema(days)
    seeds = np.random.SeedSequence(seed).spawn(days + 1)
    world = _World.draw(np.random.default_rng(seeds[0]), rows, days)
    histories = _Histories(len(world.user_weight))
    hashes = {name: stable_hash(np.arange(size)) for name, size in _SMALL_VOCABULARIES.items()}
    with contextlib.ExitStack() as stack:
        staging = stack.enter_context(atomic_output_dir(out, overwrite=overwrite))
        dataset = DatasetWriter(staging, schema)
        progress = stack.enter_context(tqdm(total=rows, unit="rows", desc="synth", disable=not show_progress))
        writer = None
        if raw_csv:
            (staging / "raw").mkdir()
            atomic_write_text(staging / "raw" / SCHEMA_NAME, schema.to_yaml())
        for day, n in enumerate(_rows_per_day(rows, days), start=1):
            day_rows = _generate_day(world, histories, day, int(n), np.random.default_rng(seeds[day]))
            table = _partition(day_rows, world, schema, hashes)
            dataset.add_day(day, table)
            if raw_csv:
                raw = _raw_table(day_rows, schema)
                if writer is None:
                    writer = stack.enter_context(
                        pacsv.CSVWriter(staging / RAW_CSV, raw.schema, write_options=_CSV_OPTIONS)
                    )
                writer.write_table(raw)
            progress.update(int(n))
        if writer is not None:
            writer.close()
        return dataset.finish("synth", sources=[f"exfm synth --rows {rows} --days {days} --seed {seed}"])
