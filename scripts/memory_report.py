"""The memory tables of docs/results.md, printed from the results files (so no figure is typed by hand).

    python scripts/memory_report.py            # prints the two tables in Markdown
    python scripts/memory_report.py --readme   # and writes them into docs/results.md between their markers

1. Accounted against measured: each H100 row of results/memory_full_mode_h100.json beside its accounted row in
   results/memory_accounted_h100.json (`python scripts/measure_memory.py --account H100 --only 04,06,07,08,09
   --json results/memory_accounted_h100.json`), with the ratio.
2. SD 1.5 at 512 px, accounted: results/memory_sd15_accounted_{h100,t4,t4_math}.json (`python
   scripts/measure_sd15_memory.py --account H100 --json ...`, `--account T4`, `--account T4 --attention math`), each
   row's peak with its largest parts.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "results"
SD15 = {"H100": "memory_sd15_accounted_h100.json", "T4": "memory_sd15_accounted_t4.json",
        "T4, math attention": "memory_sd15_accounted_t4_math.json"}


def validation_table() -> list[str]:
    measured = json.loads((RESULTS / "memory_full_mode_h100.json").read_text())
    accounted = {r["name"]: r for r in json.loads((RESULTS / "memory_accounted_h100.json").read_text())["rows"]}
    lines = ["| notebook, step (precision \"auto\": bf16 on the H100) | measured on the H100 | accounted | ratio |",
             "|---|---:|---:|---:|"]
    for row in measured["rows"]:
        mine = accounted.get(f"{row['name']}, bf16") or accounted[row["name"]]
        lines.append(f"| {row['name']} | {row['peak_gib']:.3f} GiB | {mine['peak_gib']:.3f} GiB | "
                     f"{mine['peak_gib'] / row['peak_gib']:.2f} |")
    return lines


def parts(categories: dict) -> str:
    big = sorted(((v, k) for k, v in categories.items() if v >= 0.01), reverse=True)
    return ", ".join(f"{k} {v:.2f}" for v, k in big)


def sd15_table() -> list[str]:
    runs = {gpu: json.loads((RESULTS / name).read_text()) for gpu, name in SD15.items()}
    gpus = list(runs)
    lines = ["| SD 1.5, 512 px, float16 networks | " + " | ".join(f"{g} (GiB)" for g in gpus)
             + " | largest parts on the H100 (GiB) |",
             "|---|" + "---:|" * len(gpus) + "---|"]
    first = runs[gpus[0]]["rows"]
    for i, row in enumerate(first):
        cells = []
        for g in gpus:
            r = runs[g]["rows"][i]
            assert r["name"] == row["name"], (g, r["name"], row["name"])
            cells.append("failed" if r["peak_gib"] is None else
                         f"{r['peak_gib']:.2f}" + ("" if r["peak_gib"] <= 8 else " (over 8)"))
        lines.append(f"| {row['name']} | " + " | ".join(cells) + f" | {parts(row['categories_gib'] or {})} |")
    return lines


TABLES = {"validation": validation_table, "sd15": sd15_table}


def fill(readme: str) -> str:
    """readme with each `<!-- memory_report: NAME -->` ... `<!-- /memory_report -->` block holding its table."""
    for name, table in TABLES.items():
        start = f"<!-- memory_report: {name} -->"
        if start not in readme:
            raise SystemExit(f"docs/results.md has no {start} marker")
        head, rest = readme.split(start, 1)
        _, tail = rest.split("<!-- /memory_report -->", 1)
        readme = head + start + "\n" + "\n".join(table()) + "\n<!-- /memory_report -->" + tail
    return readme


def main() -> int:
    for table in TABLES.values():
        print("\n".join(table()) + "\n")
    if "--readme" in sys.argv[1:]:
        path = ROOT / "docs" / "results.md"
        path.write_text(fill(path.read_text()))
        print(f"wrote the tables into {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
