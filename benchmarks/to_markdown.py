"""Render benchmarks/results/*.json into docs/benchmarks.md (one section per benchmark).

    python benchmarks/to_markdown.py

Each section takes its description from the first paragraph of the benchmark script's docstring
and shows the machine line, every metric with its unit and target, and, where the result holds a
``table`` (e.g. the model zoo), that table too.
"""

from __future__ import annotations

import ast
import json
import math
from pathlib import Path

HERE = Path(__file__).resolve().parent
DOC = HERE.parent / "docs" / "benchmarks.md"

INTRO = """# Benchmarks

Measured by the scripts in `benchmarks/` (`make bench` for the quick sizes, `make bench-full` for
real sizes; each writes `benchmarks/results/<name>.json`), then rendered here by
`python benchmarks/to_markdown.py`. Runs use one thread (`OMP_NUM_THREADS=1`) on the machine named
in each section. The development machines are 2-core and shared: absolute rates move by ±20 %
between runs, so compare ratios measured side by side in one run. No test asserts a time.
"""


def _description(script: Path) -> str:
    if not script.exists():
        return ""
    doc = ast.get_docstring(ast.parse(script.read_text())) or ""
    return doc.split("\n\n")[0].replace("\n", " ")


def _fmt(value) -> str:
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    if isinstance(value, float):
        if math.isnan(value):
            return "n/a"
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.4g}"
    return str(value)


def _section(result: dict) -> list[str]:
    name = result["benchmark"]
    lines = [f"## {name}", "", _description(HERE / f"bench_{name}.py"), "", f"Machine: {result['machine']}.", ""]
    table = result.get("table") if isinstance(result.get("table"), list) else None
    settings = {
        k: v
        for k, v in result.items()
        if k not in ("benchmark", "machine", "metrics", "table")
        and (isinstance(v, (int, float, str)) or (isinstance(v, list) and len(str(v)) <= 80))
    }
    if settings:
        lines += ["Settings: " + ", ".join(f"{k} = {_fmt(v)}" for k, v in settings.items()) + ".", ""]
    if table is None:
        lines += ["| metric | value | unit | target |", "|---|---:|---|---|"]
        for metric, m in result["metrics"].items():
            unit, target = (str(x or "").replace("|", "\\|") for x in (m["unit"], m.get("target")))
            lines.append(f"| `{metric}` | {_fmt(m['value'])} | {unit} | {target} |")
    else:
        columns = list(table[0])  # the table shows every per-row metric
        lines += ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(_fmt(row[c]) for c in columns) + " |" for row in table]
    return [*lines, ""]


def main() -> None:
    lines = [INTRO]
    for path in sorted((HERE / "results").glob("*.json")):
        lines += _section(json.loads(path.read_text()))
    DOC.write_text("\n".join(lines))
    print(f"wrote {DOC}")


if __name__ == "__main__":
    main()
