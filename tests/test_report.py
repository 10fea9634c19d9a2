"""`exfm report`: the table computations on hand-made rows with known answers, the files, the CLI.

The hand-made run: teachers dcnv2, dmin × students fm, dlrm × methods none, kd, ah, ah_sa × seeds 0, 1
× eval days 5, 6. ``none`` has NE ``0.8 + 0.1·seed + 0.01·(day − 5)``; a method with base gain G has
``NE = NE_none · (1 − (G + seed + day − 5) / 100)``, so its NE gain per seed (mean over the days) is
G + 0.5 and G + 1.5: mean G + 1, sample std √0.5 across the seeds.
"""

from __future__ import annotations

import base64
import html.parser
import json
import math
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import require_service

from exfm.cli import main
from exfm.experiments.report import (
    FORMAT,
    Stat,
    check_results,
    load_results,
    main_table,
    main_table_text,
    method_verdict,
    summarize,
    sweep_table,
    variant_table,
    with_ne_gain,
    write_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SPREAD = math.sqrt(0.5)  # the sample std of the per-seed means G + 0.5 and G + 1.5
GAINS = {
    ("dcnv2", "fm"): {"kd": 1.0, "ah": 3.0, "ah_sa": 5.0},  # the paper's order, steps of 2 points
    ("dcnv2", "dlrm"): {"kd": 1.0, "ah": 1.5, "ah_sa": 2.0},  # the paper's order, steps of 0.5 points
    ("dmin", "fm"): {"kd": -3.0, "ah": 2.0, "ah_sa": 4.0},  # kd worse than none
    ("dmin", "dlrm"): {"kd": 1.0, "ah": 4.0, "ah_sa": 3.0},  # ah_sa worse than ah
}
SEEDS, DAYS = (0, 1), (5, 6)


def row(
    study="main", variant="", fm="dcnv2", vm="fm", method="none", seed=0, day=5, task="click", domain="all", **metrics
) -> dict:
    values = {"auc": None, "logloss": None, "ne": None, "calibration": None, **metrics}
    return {
        "dataset": "synthetic",
        "study": study,
        "variant": variant,
        "fm": fm,
        "vm": vm,
        "method": method,
        "train_day": day - 1,
        "eval_day": day,
        "task": task,
        "domain": domain,
        "n_examples": 1000,
        "seed": seed,
        **values,
    }


def none_ne(seed: int, day: int) -> float:
    return 0.8 + 0.1 * seed + 0.01 * (day - 5)


def main_rows() -> list[dict]:
    rows = []
    for (fm, vm), gains in GAINS.items():
        for method in ("none", "kd", "ah", "ah_sa"):
            gain = gains.get(method, 0.0)
            for seed in SEEDS:
                for day in DAYS:
                    shift = 0.0 if method == "none" else seed + day - 5
                    ne = none_ne(seed, day) * (1 - (gain + shift) / 100)
                    auc = 0.70 + 0.01 * gain + 0.01 * seed + 0.002 * (day - 5)
                    if (fm, vm, method, seed, day) == ("dmin", "dlrm", "none", 1, 6):
                        auc = None  # e.g. a day without positives
                    common = {"fm": fm, "vm": vm, "method": method, "seed": seed, "day": day}
                    rows.append(row(**common, auc=auc, ne=ne, logloss=ne / 2, calibration=1 + 0.01 * seed))
                    rows.append(row(**common, domain="a", auc=0.5, ne=2 * ne, logloss=ne, calibration=1.5))
        for seed in SEEDS:  # a second task, one teacher and student only
            for day in DAYS:
                rows.append(row(fm=fm, vm=vm, seed=seed, day=day, task="like", auc=0.6, ne=0.9, calibration=1.0))
    return [r for r in rows if r["task"] == "click" or (r["fm"] == "dcnv2" and r["vm"] == "fm")]


def study_rows() -> list[dict]:
    rows = []
    # freshness: daily ah 2 %, ah_sa 3 %; frozen ah 2, 1, 0 % and ah_sa 3, 2.5, 2 % on days 5, 6, 7
    gains = {
        "daily": {"ah": lambda d: 2.0, "ah_sa": lambda d: 3.0},
        "frozen": {"ah": lambda d: 2.0 - (d - 5), "ah_sa": lambda d: 3.0 - 0.5 * (d - 5)},
    }
    for updates, by_method in gains.items():
        for seed in SEEDS:
            for day in (5, 6, 7):
                variant = f"fm_updates={updates}"
                rows.append(row("freshness", variant, seed=seed, day=day, auc=0.7, ne=0.8))
                for method, gain in by_method.items():
                    ne = 0.8 * (1 - gain(day) / 100)
                    rows.append(row("freshness", variant, method=method, seed=seed, day=day, auc=0.71, ne=ne))
    # staleness: the FM's own NE, daily flat, stopped rising by 0.02 a day
    for day in (5, 6, 7):
        rows.append(row("staleness", "training=daily", vm="-", day=day, ne=0.8, auc=0.75))
        rows.append(row("staleness", "training=stopped", vm="-", day=day, ne=0.8 + 0.02 * (day - 5), auc=0.74))
    # sweep: ah with NE gain 2·gs + ls against main's none row
    for gs in (0.5, 1.0, 2.0):
        for ls in (1.0, 2.0):
            for seed in SEEDS:
                for day in DAYS:
                    ne = none_ne(seed, day) * (1 - (2 * gs + ls) / 100)
                    rows.append(
                        row(
                            "sweep",
                            f"gs={gs:g},ls={ls:g},lw=1",
                            method="ah",
                            seed=seed,
                            day=day,
                            ne=ne,
                            auc=0.7 + gs / 100,
                            gs=gs,
                            ls=ls,
                            lw=1.0,
                        )
                    )
    # multi_domain: the VM of domain d; ah gains 4 % on a and 6 % on b; other domains' rows are decoys
    for domain, gain, auc in (("a", 4.0, 0.66), ("b", 6.0, 0.77)):
        for seed in SEEDS:
            common = {"study": "multi_domain", "variant": f"vm_domain={domain}", "seed": seed}
            rows.append(row(**common, domain=domain, ne=0.9, auc=auc))
            rows.append(row(**common, method="ah", domain=domain, ne=0.9 * (1 - gain / 100), auc=auc + 0.01))
            for decoy in ("all", "b" if domain == "a" else "a"):
                rows.append(row(**common, domain=decoy, ne=0.9, auc=0.5))
                rows.append(row(**common, method="ah", domain=decoy, ne=0.45, auc=0.5))
    # multi_task: the VM of task t; ah gains 1 % on click and 2 % on like; the other task's rows are decoys
    for task, gain in (("click", 1.0), ("like", 2.0)):
        for other, ne_ah in ((task, 0.9 * (1 - gain / 100)), ("like" if task == "click" else "click", 0.45)):
            common = {"study": "multi_task", "variant": f"vm_task={task}", "task": other}
            rows.append(row(**common, ne=0.9, auc=0.7))
            rows.append(row(**common, method="ah", ne=ne_ah, auc=0.72))
    return rows


def curves() -> list[dict]:
    out = []
    for fm, vm in (("dcnv2", "fm"), ("dmin", "dlrm")):
        for rank, method in enumerate(("none", "kd", "ah", "ah_sa")):
            for seed in SEEDS:
                points = [
                    {"examples": 1000 * k, "day": 5, "ne": 1.0 - 0.01 * k - 0.005 * rank, "window_ne": 0.9}
                    for k in range(1, 6)
                ]
                out.append(
                    {
                        "study": "main",
                        "variant": "",
                        "fm": fm,
                        "vm": vm,
                        "method": method,
                        "seed": seed,
                        "task": "click",
                        "points": points,
                    }
                )
    return out


def results() -> dict:
    config = {"dataset": "synthetic", "fms": ["dcnv2", "dmin"], "vms": ["fm", "dlrm"], "seeds": list(SEEDS)}
    return {"format": FORMAT, "config": config, "rows": main_rows() + study_rows(), "curves": curves()}


@pytest.fixture
def run(tmp_path: Path) -> Path:
    run = tmp_path / "run"
    run.mkdir()
    (run / "results.json").write_text(json.dumps(results()))
    return run


# --- the computations --------------------------------------------------------------------------------
def test_ne_gain_is_per_row_against_the_matching_none_row():
    rows = [
        row(ne=0.8),
        row(method="ah", ne=0.76),
        row(method="ah", seed=1, ne=0.7),  # no none row for seed 1
        row("sweep", "gs=1,ls=1,lw=1", method="ah", ne=0.72, gs=1, ls=1, lw=1),  # baseline from main
        row("freshness", "fm_updates=daily", ne=0.5),
        row("freshness", "fm_updates=daily", method="ah", ne=0.45),  # baseline of its own variant
        row("freshness", "fm_updates=frozen", method="ah", ne=0.4),  # falls back to main
        row(day=6, ne=None),
        row(method="kd", day=6, ne=0.7),  # the baseline's NE is null
        row("sweep", day=7, ne=0.9),  # the sweep's own none run (variant "")
        row("sweep", "gs=2,ls=1,lw=1", method="ah", day=7, ne=0.81, gs=2, ls=1, lw=1),  # baseline: the one above
    ]
    gains = [r["ne_gain"] for r in with_ne_gain(rows)]
    assert gains[10] == pytest.approx(10.0)
    assert gains[0] == 0.0
    assert gains[1] == pytest.approx(5.0)
    assert math.isnan(gains[2])
    assert gains[3] == pytest.approx(10.0)
    assert gains[4:7] == [0.0, pytest.approx(10.0), pytest.approx(50.0)]
    assert math.isnan(gains[7]) and math.isnan(gains[8])
    assert "ne_gain" not in rows[1]  # copies, the input is left alone


def test_summarize_means_over_days_then_over_seeds():
    rows = [
        row(seed=0, day=5, auc=1.0),
        row(seed=0, day=6, auc=3.0),
        row(seed=1, day=5, auc=4.0),
        row(seed=1, day=6, auc=None),  # ignored: seed 1's mean is 4
        row(seed=2, day=5, auc=None),  # no finite value: seed 2 does not count
        row(vm="dlrm", auc=None),
    ]
    stats = summarize(rows, ("fm", "vm"), ("auc", "ne"))
    assert list(stats) == [("dcnv2", "fm"), ("dcnv2", "dlrm")]
    assert stats[("dcnv2", "fm")]["auc"] == Stat(pytest.approx(3.0), pytest.approx(math.sqrt(2.0)), 2)
    assert math.isnan(stats[("dcnv2", "fm")]["ne"].mean) and stats[("dcnv2", "fm")]["ne"].seeds == 0
    one = summarize([row(auc=0.7)], ("fm",), ("auc",))[("dcnv2",)]["auc"]
    assert (one.mean, one.std, one.seeds) == (pytest.approx(0.7), 0.0, 1)


def test_main_table_numbers():
    table = main_table(results(), "click")
    assert table["fms"] == ["dcnv2", "dmin"]
    assert table["vms"] == ["fm", "dlrm"]
    assert table["methods"] == ["none", "kd", "ah", "ah_sa"]
    assert (table["eval_days"], table["seeds"]) == ([5, 6], [0, 1])
    for (fm, vm), gains in GAINS.items():
        for method, gain in {"none": 0.0, **gains}.items():
            cell = table["cells"][(fm, method, vm)]
            expected_gain = 0.0 if method == "none" else gain + 1
            assert cell["ne_gain"].mean == pytest.approx(expected_gain)
            assert cell["ne_gain"].std == pytest.approx(0.0 if method == "none" else SPREAD)
            assert cell["calibration"].mean == pytest.approx(1.005)
            if (fm, vm, method) != ("dmin", "dlrm", "none"):
                assert cell["auc"].mean == pytest.approx(0.70 + 0.01 * gain + 0.005 + 0.001)
                assert cell["auc"].std == pytest.approx(0.01 * SPREAD)
    # ah of dcnv2 -> fm: per seed the mean of NE_none · (1 − (3 + δ)/100) over days 5 and 6
    per_seed = [np.mean([none_ne(s, d) * (1 - (3 + s + d - 5) / 100) for d in DAYS]) for s in SEEDS]
    ne = table["cells"][("dcnv2", "ah", "fm")]["ne"]
    assert (ne.mean, ne.std, ne.seeds) == (pytest.approx(np.mean(per_seed)), pytest.approx(np.std(per_seed, ddof=1)), 2)
    # a null AUC is skipped: seed 1 of dmin -> dlrm none has day 5 only (0.71), seed 0 the days' mean 0.701
    auc = table["cells"][("dmin", "none", "dlrm")]["auc"]
    assert (auc.mean, auc.std) == (pytest.approx(0.7055), pytest.approx(0.009 / math.sqrt(2)))
    like = main_table(results(), "like")
    assert (like["fms"], like["vms"], like["methods"]) == (["dcnv2"], ["fm"], ["none"])


def test_verdicts_name_the_order_and_the_spread():
    verdicts = main_table(results(), "click")["verdicts"]
    paper = "the paper's none < kd < ah < ah_sa"
    expected = {
        ("dcnv2", "fm"): f"none < kd < ah < ah_sa; matches {paper}; every step exceeds the seed spread.",
        ("dcnv2", "dlrm"): f"none < kd < ah < ah_sa; matches {paper}; within the seed spread: "
        "kd → ah (+0.50 vs ±0.71), ah → ah_sa (+0.50 vs ±0.71).",
        ("dmin", "fm"): f"kd < none < ah < ah_sa; differs from {paper}; every step exceeds the seed spread.",
        ("dmin", "dlrm"): f"none < kd < ah_sa < ah; differs from {paper}; every step exceeds the seed spread.",
    }
    assert {key: v.text for key, v in verdicts.items()} == {
        key: f"worst → best by mean NE: {text}" for key, text in expected.items()
    }
    assert [v.matches_paper for v in verdicts.values()] == [True, True, False, False]
    assert [v.beyond_spread for v in verdicts.values()] == [True, False, True, True]
    steps = verdicts[("dmin", "dlrm")].steps
    assert [(s.earlier, s.later) for s in steps] == [("none", "kd"), ("kd", "ah"), ("ah", "ah_sa")]
    assert [s.gap for s in steps] == [pytest.approx(2.0), pytest.approx(3.0), pytest.approx(-1.0)]
    assert [s.spread for s in steps] == [pytest.approx(SPREAD)] * 3


def test_method_verdict_with_one_seed_ties_and_missing_methods():
    def cells(**ne: float) -> dict:
        return {m: {"ne": Stat(v, 0.0, 1), "ne_gain": Stat(0.0, 0.0, 1)} for m, v in ne.items()}

    verdict = method_verdict(cells(ah_sa=0.8, none=0.9, ah=0.85))
    assert verdict.ordering == (("none", 0.9), ("ah", 0.85), ("ah_sa", 0.8))
    assert verdict.matches_paper and verdict.beyond_spread is None
    assert verdict.text == (
        "worst → best by mean NE: none < ah < ah_sa; matches the paper's none < ah < ah_sa; "
        "one seed: no spread to compare."
    )
    tie = method_verdict(cells(none=0.9, kd=0.9))
    assert not tie.matches_paper and "none = kd" in tie.text
    assert method_verdict(cells(none=float("nan"), ah=0.8)).text == (
        "fewer than two methods with an NE: nothing to compare."
    )


def test_variant_and_sweep_tables():
    data = results()
    domains = variant_table(data, "multi_domain", "click")
    assert domains["columns"] == ["a", "b"]
    assert domains["rows"] == [("dcnv2", "fm", "none"), ("dcnv2", "fm", "ah")]
    assert domains["cells"][("dcnv2", "fm", "ah", "a")]["ne_gain"].mean == pytest.approx(4.0)
    assert domains["cells"][("dcnv2", "fm", "ah", "b")]["ne_gain"].mean == pytest.approx(6.0)
    assert domains["cells"][("dcnv2", "fm", "ah", "b")]["auc"] == Stat(pytest.approx(0.78), pytest.approx(0.0), 2)
    assert len(domains["cells"]) == 4  # the decoys (other domains, "all") are not counted
    tasks = variant_table(data, "multi_task")
    assert tasks["columns"] == ["click", "like"]
    assert tasks["cells"][("dcnv2", "fm", "ah", "click")]["ne_gain"].mean == pytest.approx(1.0)
    assert tasks["cells"][("dcnv2", "fm", "ah", "like")]["ne_gain"].mean == pytest.approx(2.0)
    data["rows"].append(row("sweep", day=9, ne=0.9))  # a none baseline of the sweep: not a cell of its table
    sweep = sweep_table(data, "click")
    assert len(sweep) == 6
    for (fm, vm, gs, ls, lw), cell in sweep.items():
        assert (fm, vm, lw) == ("dcnv2", "fm", 1.0)
        assert cell["ne_gain"].mean == pytest.approx(2 * gs + ls)
        assert cell["ne_gain"].std == pytest.approx(0.0, abs=1e-9)


def test_main_table_text_is_aligned_and_has_the_verdicts():
    text = main_table_text(results(), "click")
    lines = text.splitlines()
    table = lines[2 : 2 + 2 + 2 * 4]  # header, rule, 2 teachers × 4 methods
    assert len({len(line) for line in table}) == 1
    assert table[0].split()[:6] == ["teacher", "method", "fm", "AUC", "fm", "LogLoss"]
    assert re.match(r"dcnv2\s+ah\s+0\.7360 ± 0\.0071\s+\S+ ± \S+\s+\+4\.00 ± 0\.71\s+1\.005 ± 0\.007\s", table[4])
    assert "dcnv2 -> dlrm: worst → best by mean NE: none < kd < ah < ah_sa; matches" in text
    every = main_table_text(results())
    assert "Task click" in every and "Task like" in every
    assert main_table_text({"format": FORMAT, "rows": []}) == "no rows of study main in the results"


# --- the files -----------------------------------------------------------------------------------------
class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag, attrs):
        for name, value in attrs:
            if name in ("src", "href"):
                self.links.append(value)
                if tag == "img":
                    self.images.append(value)


def test_write_report_files(run: Path):
    report = write_report(run)
    out = run / "report"
    assert (report.markdown, report.html) == (out / "report.md", out / "report.html")
    names = sorted(p.name for p in report.plots)
    assert names == [
        "auc_per_day_dcnv2_dlrm.png",
        "auc_per_day_dcnv2_fm.png",
        "auc_per_day_dmin_dlrm.png",
        "auc_per_day_dmin_fm.png",
        "freshness_dcnv2_fm.png",
        "progressive_ne_dcnv2_fm.png",
        "progressive_ne_dmin_dlrm.png",
        "staleness_dcnv2.png",
        "sweep_dcnv2_fm_click.png",
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted([*names, "report.md", "report.html"])  # no temporaries

    markdown = report.markdown.read_text()
    linked = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(linked) == names
    for name in linked:
        data = (out / name).read_bytes()
        assert data.startswith(PNG_SIGNATURE) and len(data) > 1000
    assert "# ExFM reproduction report" in markdown
    assert "dataset synthetic; 2 seeds (0, 1)" in markdown
    assert "| teacher | method | fm AUC | fm LogLoss | fm NE gain % | fm calib | dlrm AUC |" in markdown
    assert "| dcnv2 | none | 0.7060 ± 0.0071 |" in markdown
    assert "- dmin → fm: worst → best by mean NE: kd < none < ah < ah_sa; differs from" in markdown
    assert "| dcnv2 | fm | frozen | ah | 0.7100 ± 0.0000 | 0.7920 ± 0.0000 | +1.00 ± 0.00 |" in markdown
    assert "| dcnv2 | fm | none | 0.6600 ± 0.0000 | — | 0.7700 ± 0.0000 | — |" in markdown
    assert "| dcnv2 | click | stopped | 0.8000 | 0.8200 | 0.8400 |" in markdown
    assert "| dcnv2 | fm | 2 | 2 | 1 | +6.00 ± 0.00 | 0.7200 ± 0.0000 |" in markdown

    page = report.html.read_text()
    parser = _Links()
    parser.feed(page)
    parser.close()
    assert len(parser.images) == len(names)
    for link in parser.links:
        assert link.startswith("data:image/png;base64,") or link.startswith("#"), link[:80]
    for image in parser.images:
        assert base64.b64decode(image.removeprefix("data:image/png;base64,")).startswith(PNG_SIGNATURE)
    assert "<style>" in page and "<link" not in page and "<script" not in page
    assert '<td class="num">+4.00 ± 0.71</td>' in page


def test_report_of_a_single_study_and_custom_out(tmp_path: Path):
    run = tmp_path / "run"
    run.mkdir()
    rows = [r for r in study_rows() if r["study"] == "staleness"]
    (run / "results.json").write_text(json.dumps({"format": FORMAT, "config": {}, "rows": rows}))
    report = write_report(run, tmp_path / "elsewhere")
    assert [p.name for p in report.plots] == ["staleness_dcnv2.png"]
    markdown = report.markdown.read_text()
    assert "## FM staleness (Figure 2)" in markdown and "Main results" not in markdown and "Freshness" not in markdown


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


def test_browser_renders_the_html_report(run: Path, tmp_path: Path):
    require_service(None if _chromium() else "chromium not found (apt-get install chromium)")
    report = write_report(run)
    shot = tmp_path / "shot.png"
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        f"--user-data-dir={tmp_path / 'profile'}",
        f"--screenshot={shot}",
        "--window-size=1200,2000",
        report.html.resolve().as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert shot.exists(), done.stderr[-2000:]
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[:2] == (2000, 1200)
    colours = np.unique(pixels.reshape(-1, pixels.shape[2]), axis=0)
    assert len(colours) > 50  # text, tables and plots, not a blank page


# --- input errors and the command ----------------------------------------------------------------------
def test_bad_results_give_clear_errors(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"results\.json not found: expected the results of `exfm reproduce`"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"results\.json: not valid JSON"):
        load_results(tmp_path)
    with pytest.raises(ValueError, match=r'expected a JSON object with "format": "exfm-reproduce/1", found \'x/2\''):
        check_results({"format": "x/2", "rows": []}, "R")
    with pytest.raises(ValueError, match=r'R: expected "rows": a list'):
        check_results({"format": FORMAT}, "R")
    bad = row()
    del bad["seed"]
    with pytest.raises(ValueError, match=r"R: rows\[1\]: lacks seed \(expected keys study, variant, fm"):
        check_results({"format": FORMAT, "rows": [row(), bad]}, "R")
    with pytest.raises(ValueError, match=r"R: rows\[0\]: auc must be a number or null, found '0.7'"):
        check_results({"format": FORMAT, "rows": [row(auc="0.7")]}, "R")
    with pytest.raises(ValueError, match=r"R: rows\[0\]: a sweep row \(other than its none baseline\) needs the"):
        check_results({"format": FORMAT, "rows": [row("sweep", method="ah", gs=1, ls=1)]}, "R")
    check_results({"format": FORMAT, "rows": [row("sweep")]}, "R")  # the sweep's none baseline has no gs, ls, lw
    with pytest.raises(ValueError, match=r"R: curves\[0\].points\[0\]: lacks ne"):
        curve = {**curves()[0], "points": [{"examples": 1}]}
        check_results({"format": FORMAT, "rows": [], "curves": [curve]}, "R")


def test_cli_report(run: Path, tmp_path: Path, capsys):
    assert main(["report", str(run)]) == 0
    assert "with 9 plots" in capsys.readouterr().out
    assert (run / "report" / "report.html").stat().st_size > 10_000
    assert main(["report", str(run), "--out", str(tmp_path / "r2")]) == 0
    assert (tmp_path / "r2" / "report.md").exists()
    assert main(["report", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert "exfm report: error:" in err and "missing/results.json not found" in err
