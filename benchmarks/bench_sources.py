"""The dataset adapters on generated raw files: input rows/s and MB/s, bytes per output row, peak memory.
Each row of the table is a metric group ``sources.<source>.<s|l>.*`` of the JSON (``s``: the first
size, ``l``: 4 times it).

For each adapter, raw files in the dataset's original format are generated in a temporary
directory with the real files' shape (columns, id cardinalities per row, duplicates, missing
values, times); TaobaoAd's ``behavior_log.csv`` has 28 events per impression, as the real one
(723M rows for 26M impressions), so the out-of-core, bucketed behaviour-sequence join is what
is measured. The adapter then runs in a child process (``exfm.data.sources.adapt``, default
options except ``--memory-limit-mb``), timed, with its peak resident memory (the child's own
``VmHWM``). Every adapter runs at two sizes, the second four times the first, so that the
growth of time and memory can be extrapolated to the real files::

    OMP_NUM_THREADS=1 python benchmarks/bench_sources.py [--full] [--sources taobao,kuaivideo]

Metrics per adapter and size: ``sources.<name>.<size>.rows_per_s`` (raw input rows, all files,
per second), ``.mb_per_s`` (raw input MB per second), ``.output_bytes_per_row`` (the dataset
on disk per output row), ``.peak_rss_mb``; sizes ``s`` and ``l`` (``l`` = 4 × ``s``).
Quick sizes by default (under a minute on 2 cores); ``--full`` for 5× more, 20× for taobao, whose
larger run then has 50M input rows (about 7 minutes).
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pv

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import metric, run_child, write_result

from exfm.data.sources import taobao

DAY_S = 86_400
CHUNK = 500_000
SCALE_UP = 4
"""The second size is this many times the first."""

CHILD = """
import json, sys, time
from exfm.data.sources import adapt
start = time.perf_counter()
manifest = adapt(sys.argv[1], sys.argv[2], sys.argv[3], show_progress=False, memory_limit_mb=int(sys.argv[4]))
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "rows": manifest.rows, "rejected": manifest.rejected_rows}))
"""


# --- writing -----------------------------------------------------------------------------------
def write_csv(path: Path, chunks, header: list[str] | None = None, delimiter: str = ",") -> int:
    """Write tables (an iterable) as one CSV / TSV file; ``header`` replaces the column names on
    line 1 (None: no header line). Returns the rows written."""
    rows = 0
    options = pv.WriteOptions(include_header=False, delimiter=delimiter, quoting_style="needed")
    with open(path, "wb") as handle:
        if header is not None:
            handle.write((delimiter.join(header) + "\n").encode())
        for table in chunks:
            pv.write_csv(table, handle, write_options=options)
            rows += table.num_rows
    return rows


def write_lines(path: Path, chunks) -> int:
    """Write arrays of text lines (an iterable) to a file, one line each. Returns the lines written."""
    rows = 0
    with open(path, "w") as handle:
        for lines in chunks:
            handle.write("\n".join(lines.to_pylist()) + "\n")
            rows += len(lines)
    return rows


def _chunks(total: int) -> list[int]:
    return [min(CHUNK, total - start) for start in range(0, total, CHUNK)]


def _text(values: np.ndarray, prefix: str = "") -> pa.Array:
    array = pa.array(values).cast(pa.string())
    return pc.binary_join_element_wise(prefix, array, "") if prefix else array


def _join(*parts) -> pa.Array:
    """Concatenate string arrays and literal strings element-wise."""
    return pc.binary_join_element_wise(*parts, "")


class Popularity:
    """Ids ``1..size`` drawn with log-normal popularity (``sigma`` = 1: the most active of a million
    users has about 100 times the mean; 2: a long tail of items seen once)."""

    def __init__(self, rng: np.random.Generator, size: int, sigma: float) -> None:
        self.rng = rng
        weights = np.cumsum(rng.lognormal(0.0, sigma, size))
        self.cdf = weights / weights[-1]

    def draw(self, n: int) -> np.ndarray:
        return np.searchsorted(self.cdf, self.rng.random(n), side="right") + 1


# --- TaobaoAd ----------------------------------------------------------------------------------
TAOBAO_T0 = 1_494_000_000  # 2017-05-06 00:00 in UTC+8
PROFILE_FIELDS = [*taobao.PROFILE_FIELDS[:-1], taobao.PROFILE_FIELDS[-1] + " "]
"""``user_profile.csv``'s columns; the last header has a trailing space in the real file."""


def taobao_files(raw: Path, impressions: int, seed: int = 0) -> int:
    """TaobaoAd's four files; sizes in the real ratios (26M impressions, 1.14M users, 846K ads,
    723M behaviour events). Returns the total raw rows."""
    rng = np.random.default_rng(seed)
    users, ads = max(impressions // 23, 10), max(impressions // 31, 10)
    user_ids, ad_ids = Popularity(rng, users, 1.0), Popularity(rng, ads, 2.0)
    events = impressions * 28

    def samples():
        for n in _chunks(impressions):
            clk = (rng.random(n) < 0.05).astype(np.int8)
            yield pa.table(
                {
                    "user": user_ids.draw(n),
                    "time_stamp": TAOBAO_T0 + rng.integers(0, 8 * DAY_S, n),
                    "adgroup_id": ad_ids.draw(n),
                    "pid": rng.choice(["430548_1007", "430539_1007"], n),
                    "nonclk": 1 - clk,
                    "clk": clk,
                }
            )

    def ad_rows():
        ids = np.arange(1, ads + 1)
        brand = _text(rng.integers(1, 460_000, ads)).to_numpy(zero_copy_only=False).astype(object)
        brand[rng.random(ads) < 0.3] = "NULL"
        yield pa.table(
            {
                "adgroup_id": ids,
                "cate_id": rng.integers(1, 6_800, ads),
                "campaign_id": rng.integers(1, 420_000, ads),
                "customer": rng.integers(1, 260_000, ads),
                "brand": pa.array(brand, pa.string()),
                "price": np.round(rng.lognormal(4, 1.3, ads), 2),
            }
        )

    def profiles():
        ids = np.flatnonzero(rng.random(users) < 0.93) + 1  # a few users have no profile
        n = len(ids)
        columns = {"userid": ids}
        for name, size in zip(PROFILE_FIELDS, [98, 13, 2, 7, 3, 3, 2, 4], strict=True):
            values = _text(rng.integers(0 if size > 2 else 1, size + 1, n)).to_numpy(zero_copy_only=False)
            values = values.astype(object)
            values[rng.random(n) < (0.3 if name in ("pvalue_level", PROFILE_FIELDS[-1]) else 0.0)] = None
            columns[name] = pa.array(values, pa.string())
        yield pa.table(columns)

    def behaviour():
        for n in _chunks(events):
            times = TAOBAO_T0 - 14 * DAY_S + rng.integers(0, 22 * DAY_S, n)
            times[rng.random(n) < 0.0005] = 1_300_000_000  # some times outside 2017 (2011)
            brand = _text(rng.integers(1, 460_000, n)).to_numpy(zero_copy_only=False).astype(object)
            brand[rng.random(n) < 0.3] = "NULL"
            table = pa.table(
                {
                    "user": user_ids.draw(n),
                    "time_stamp": times,
                    "btag": rng.choice(["pv", "pv", "pv", "pv", "cart", "fav", "buy"], n),
                    "cate": rng.integers(1, 12_000, n),
                    "brand": pa.array(brand, pa.string()),
                }
            )
            duplicates = table.take(pa.array(rng.integers(0, n, n * 7 // 100)))  # ~7 % exact duplicates
            yield pa.concat_tables([table, duplicates]).take(pa.array(rng.permutation(n + len(duplicates))))

    rows = write_csv(raw / "raw_sample.csv", samples(), ["user", "time_stamp", "adgroup_id", "pid", "nonclk", "clk"])
    rows += write_csv(
        raw / "ad_feature.csv", ad_rows(), ["adgroup_id", "cate_id", "campaign_id", "customer", "brand", "price"]
    )
    rows += write_csv(raw / "user_profile.csv", profiles(), ["userid", *PROFILE_FIELDS])
    rows += write_csv(raw / "behavior_log.csv", behaviour(), ["user", "time_stamp", "btag", "cate", "brand"])
    return rows


# --- Amazon Electronics ------------------------------------------------------------------------
AMAZON_LAST = int(datetime(2014, 7, 23, tzinfo=UTC).timestamp())


def amazon_files(raw: Path, reviews: int, seed: int = 0) -> int:
    """``reviews_Electronics_5.json`` (JSON lines with review texts) and ``meta_Electronics.json``
    (Python dict literals, 8 lines per reviewed item as in the real files: 1.69M reviews, 192K
    users, 63K reviewed items, 498K meta lines). Returns the total raw lines."""
    rng = np.random.default_rng(seed)
    users, items = max(reviews * 10 // 88, 10), max(reviews * 10 // 268, 10)
    user_ids, item_ids = Popularity(rng, users, 0.8), Popularity(rng, items, 1.2)
    words = np.array(
        [
            "good",
            "great",
            "cable",
            "works",
            "fine",
            "battery",
            "sound",
            "quality",
            "price",
            "would",
            "recommend",
            "the",
            "a",
            "it",
        ]
    )
    texts = pa.array([" ".join(rng.choice(words, rng.integers(20, 180))) for _ in range(500)])

    def review_lines():
        for n in _chunks(reviews):
            days = np.minimum(rng.exponential(400, n).astype(np.int64), 5000)
            when = _text(AMAZON_LAST - days * DAY_S)
            yield _join(
                '{"reviewerID": "',
                _text(user_ids.draw(n), "A"),
                '", "asin": "',
                _text(item_ids.draw(n), "B00"),
                '", "reviewerName": "J. Doe", "helpful": [0, 0], "reviewText": "',
                texts.take(pa.array(rng.integers(0, len(texts), n))),
                '", "overall": 5.0, "summary": "Works", "unixReviewTime": ',
                when,
                ', "reviewTime": "07 23, 2014"}',
            )

    def meta_lines():
        total = items * 8
        for start, n in zip(range(0, total, CHUNK), _chunks(total), strict=True):
            asin = _text(np.arange(start, start + n) // 8 + 1 + (np.arange(start, start + n) % 8) * 10**7, "B00")
            related = _join("'B00", _text(rng.integers(1, 10**8, n)), "', 'B00", _text(rng.integers(1, 10**8, n)), "'")
            yield _join(
                "{'asin': '",
                asin,
                "', 'title': 'A thing', 'price': 9.99, 'imUrl': 'http://ecx.images-amazon.com/images/I/x.jpg',"
                " 'related': {'also_bought': [",
                related,
                "]}, 'salesRank': {'Electronics': 1234}, 'categories': [['Electronics', 'Accessories', 'c",
                _text(rng.integers(0, 800, n)),
                "']]}",
            )

    rows = write_lines(raw / "reviews_Electronics_5.json", review_lines())
    rows += write_lines(raw / "meta_Electronics.json", meta_lines())
    return rows


# --- KuaiVideo ---------------------------------------------------------------------------------
def kuaivideo_files(raw: Path, rows: int, seed: int = 0) -> int:
    """``train_interaction.txt`` (TSV, no header), in the ratios of the 13.7M-row release (10K
    users, 3.2M photos), unix ms over 10 days. Returns the rows."""
    rng = np.random.default_rng(seed)
    users, photos = max(rows // 1366, 10), max(rows * 237 // 1000, 10)
    photo_ids = Popularity(rng, photos, 1.5)
    t0 = 1_524_000_000_000  # 2018-04-17

    def chunks():
        for n in _chunks(rows):
            click = (rng.random(n) < 0.2).astype(np.int8)
            yield pa.table(
                {
                    "user_id": rng.integers(0, users, n),
                    "photo_id": photo_ids.draw(n),
                    "click": click,
                    "like": (click & (rng.random(n) < 0.05)).astype(np.int8),
                    "follow": (click & (rng.random(n) < 0.01)).astype(np.int8),
                    "time": t0 + rng.integers(0, 10 * DAY_S * 1000, n),
                    "playing_time": click * rng.integers(1, 60_000, n),
                    "duration_time": rng.integers(1_000, 120_000, n),
                }
            )

    write_csv(raw / "train_interaction.txt", chunks(), None, delimiter="\t")
    return rows


# --- KuaiRand ----------------------------------------------------------------------------------
KUAIRAND_HEADER = [
    "user_id",
    "video_id",
    "date",
    "hourmin",
    "time_ms",
    "is_click",
    "is_like",
    "is_follow",
    "is_comment",
    "is_forward",
    "is_hate",
    "long_view",
    "play_time_ms",
    "duration_ms",
    "profile_stay_time",
    "comment_stay_time",
    "is_profile_enter",
    "is_rand",
    "tab",
]


def kuairand_files(raw: Path, rows: int, seed: int = 0) -> int:
    """``log_random_4_22_to_5_08_1k.csv`` over the 17 days from 2022-04-22 (Beijing). Returns the rows."""
    rng = np.random.default_rng(seed)
    users, videos = max(rows // 1186, 10), max(rows // 6, 10)
    video_ids = Popularity(rng, videos, 1.5)
    t0 = 1_650_556_800_000  # 2022-04-22 00:00 in UTC+8, ms

    def chunks():
        for n in _chunks(rows):
            t = t0 + rng.integers(0, 17 * DAY_S * 1000, n)
            click = (rng.random(n) < 0.17).astype(np.int8)
            zeros = np.zeros(n, np.int8)
            local = (t // 1000 + 8 * 3600) % DAY_S
            columns = [
                rng.integers(0, users, n),
                video_ids.draw(n),
                20220422 + (t - t0) // (DAY_S * 1000),
                local // 3600 * 100 + local % 3600 // 60 // 30 * 30,
                t,
                click,
                (click & (rng.random(n) < 0.03)).astype(np.int8),
                zeros,
                zeros,
                zeros,
                zeros,
                (rng.random(n) < 0.08).astype(np.int8),
                click * rng.integers(1, 60_000, n),
                rng.integers(1_000, 120_000, n),
                zeros,
                zeros,
                zeros,
                np.ones(n, np.int8),
                rng.integers(0, 5, n),
            ]
            yield pa.table(columns, names=KUAIRAND_HEADER)

    return write_csv(raw / "log_random_4_22_to_5_08_1k.csv", chunks(), KUAIRAND_HEADER)


# --- Open Bandit Dataset -----------------------------------------------------------------------
OBD_WIDTHS = {"all": 80, "men": 34, "women": 46}


def obd_files(raw: Path, rows: int, seed: int = 0) -> int:
    """The six logs (random / bts × all / men / women, ``rows`` split over them in the real
    proportions: bts and all are the big ones) and their item contexts. Returns the total rows."""
    rng = np.random.default_rng(seed)
    start = np.datetime64("2019-11-24T00:00:00", "us")
    share = {("random", "all"): 0.05, ("random", "men"): 0.02, ("random", "women"): 0.03}
    share |= {("bts", "all"): 0.47, ("bts", "men"): 0.18, ("bts", "women"): 0.25}
    hashes = np.array([f"{h:032x}" for h in rng.integers(0, 2**62, 64)])
    total = 0
    for (policy, campaign), fraction in share.items():
        width, n_file = OBD_WIDTHS[campaign], max(int(rows * fraction), 10)
        folder = raw / policy / campaign
        folder.mkdir(parents=True)
        header = ["", "timestamp", "item_id", "position", "click", "propensity_score"]
        header += [f"user_feature_{k}" for k in range(4)] + [f"user-item_affinity_{k}" for k in range(width)]

        def chunks(n_file=n_file, width=width, header=header):
            offset = 0
            for n in _chunks(n_file):
                moments = np.sort(start + rng.integers(0, 7 * DAY_S * 10**6, n).astype("timedelta64[us]"))
                iso = pc.replace_substring(pa.array(np.datetime_as_string(moments, unit="us")), "T", " ")
                columns = [np.arange(offset, offset + n), _join(iso, "+00:00"), rng.integers(0, width, n)]
                columns += [rng.integers(1, 4, n), (rng.random(n) < 0.005).astype(np.int8)]
                columns += [np.round(rng.random(n) / width, 6)]
                columns += [hashes[rng.integers(0, 16 * (k + 1), n)] for k in range(4)]
                columns += [rng.poisson(0.3, n).astype(np.float64) for _ in range(width)]
                offset += n
                yield pa.table(columns, names=header)

        total += write_csv(folder / f"{campaign}.csv", chunks(), header)
        items = pa.table(
            [
                np.arange(width),
                np.arange(width),
                np.round(rng.normal(size=width), 6),
                *(hashes[rng.integers(0, 64, width)] for _ in range(3)),
            ],
            names=["", "item_id", "item_feature_0", "item_feature_1", "item_feature_2", "item_feature_3"],
        )
        total += write_csv(folder / "item_context.csv", [items], items.column_names)
    return total


# --- the benchmark -----------------------------------------------------------------------------
SOURCES: dict[str, tuple[Callable[[Path, int], int], int, int, str]] = {
    # name: (generator, quick size, full size (of the smaller run), what the size counts)
    "taobao": (taobao_files, 20_000, 400_000, "impressions (raw_sample rows; behavior_log has 28x as many)"),
    "amazon": (amazon_files, 50_000, 250_000, "reviews"),
    "kuaivideo": (kuaivideo_files, 100_000, 500_000, "interactions"),
    "kuairand": (kuairand_files, 40_000, 200_000, "log rows"),
    "obd": (obd_files, 40_000, 200_000, "impressions (all six logs)"),
}


def folder_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def run(name: str, size: int, tmp: Path, memory_limit_mb: int) -> dict:
    generate = SOURCES[name][0]
    raw, out = tmp / f"{name}-{size}-raw", tmp / f"{name}-{size}-out"
    raw.mkdir()
    started = time.perf_counter()
    input_rows = generate(raw, size)
    generate_s = time.perf_counter() - started
    input_bytes = folder_bytes(raw)
    report = run_child(CHILD, name, str(raw), str(out), str(memory_limit_mb))
    output_bytes = folder_bytes(out)
    shutil.rmtree(raw)
    shutil.rmtree(out)
    row = {
        "source": name,
        "size": size,
        "input_rows": input_rows,
        "input_mb": input_bytes / 2**20,
        "output_rows": report["rows"],
        "seconds": report["seconds"],
        "rows_per_s": input_rows / report["seconds"],
        "output_rows_per_s": report["rows"] / report["seconds"],
        "mb_per_s": input_bytes / 2**20 / report["seconds"],
        "output_bytes_per_row": output_bytes / max(report["rows"], 1),
        "peak_rss_mb": report["peak_rss_mb"],
    }
    print(
        f"{name:>9} size {size:>10,}: generated {input_rows:,} rows ({row['input_mb']:,.0f} MB) in {generate_s:.0f} s;"
        f" adapter {row['seconds']:.1f} s, {row['rows_per_s']:,.0f} rows/s, {row['mb_per_s']:.1f} MB/s,"
        f" {row['output_rows']:,} rows out, {row['output_bytes_per_row']:.0f} B/row, peak {row['peak_rss_mb']:.0f} MB",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", action="store_true", help="the full sizes (5x the quick ones, 20x for taobao)")
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated adapters to run")
    parser.add_argument("--scale", type=float, help="a multiple of the quick sizes (instead of --full)")
    parser.add_argument("--memory-limit-mb", type=int, default=1024)
    args = parser.parse_args()
    names = [n for n in args.sources.split(",") if n]
    unknown = sorted(set(names) - set(SOURCES))
    if unknown:
        raise SystemExit(f"unknown source(s) {unknown}; choose from {sorted(SOURCES)}")
    table, metrics = [], {}
    with tempfile.TemporaryDirectory(prefix="exfm-bench-sources-") as tmp:
        for name in names:
            _, quick, full, _ = SOURCES[name]
            base = int(quick * args.scale) if args.scale else full if args.full else quick
            for label, size in (("s", base), ("l", base * SCALE_UP)):
                row = run(name, size, Path(tmp), args.memory_limit_mb)
                table.append(row)
                prefix = f"sources.{name}.{label}"
                metrics[f"{prefix}.rows_per_s"] = metric(row["rows_per_s"], "rows/s")
                metrics[f"{prefix}.mb_per_s"] = metric(row["mb_per_s"], "MB/s")
                metrics[f"{prefix}.output_bytes_per_row"] = metric(row["output_bytes_per_row"], "B/row")
                # amazon holds its reviews in memory by design; the others are bounded by the memory limit
                target = None if name == "amazon" else f"< {args.memory_limit_mb + 512}"
                metrics[f"{prefix}.peak_rss_mb"] = metric(row["peak_rss_mb"], "MB", target)
    write_result(
        "sources",
        metrics,
        extra={
            "sizes_of": "full" if args.full and not args.scale else f"quick x {args.scale or 1:g}",
            "scale_up": SCALE_UP,
            "memory_limit_mb": args.memory_limit_mb,
            "sizes": {name: SOURCES[name][3] for name in names},
            "table": table,
        },
    )


if __name__ == "__main__":
    main()
