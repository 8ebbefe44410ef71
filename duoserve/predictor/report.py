"""docs/predictor.md's result tables from eval-predictor JSON files (markdown).

    python -m duoserve.predictor.report EVAL.json [EVAL.json ...] [--out tables.md]

Files are grouped by model (their "model" and "topology"); within a group, the first file
is the main set (every predictor at every d it was scored at; d >= 2 rows only for the
predictors whose ranking changes with d: gate-lookahead, paper, ours) and every file adds
rows to the d = 1 comparison across sets. A file's label is its "title" (eval-predictor
--title), else its test path. Percentages, best value per column in bold.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from duoserve.predictor.evaluate import METRICS, ORDER

PER_D = ("gate-lookahead", "paper", "ours")  # predictors shown at every d


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def main_table(record: dict[str, Any]) -> str:
    """Every predictor at d = 1, then PER_D predictors at each larger d (one table)."""
    top_k = record["topology"][2]
    rows = [r for r in record["rows"] if "skipped" not in r]
    budget = rows[0]["budget"] if rows else 2 * top_k
    lines = [
        f"| predictor | d | exact top-{top_k} | ≥ half right | recall@{top_k} | "
        f"recall@{budget} | precision@{budget} |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for d in sorted({r["d"] for r in rows}):
        mine = [r for r in rows if r["d"] == d and (d == 1 or r["predictor"] in PER_D)]
        mine.sort(key=lambda r: ORDER.index(r["predictor"]) if r["predictor"] in ORDER else 99)
        best = {m: max(r[m] for r in mine) for m in METRICS}
        for r in mine:
            cells = [_bold(_pct(r[m]), r[m] == best[m]) for m in METRICS]
            name = _bold(r["predictor"], r["predictor"] == "ours")
            lines.append(f"| {name} | {d} | " + " | ".join(cells) + " |")
    skipped = [r for r in record["rows"] if "skipped" in r]
    lines += [f"\n{r['predictor']}: skipped ({r['skipped']})" for r in skipped]
    return "\n".join(lines)


def _bold(text: str, on: bool) -> str:
    return f"**{text}**" if on else text


def sets_table(records: list[dict[str, Any]]) -> str:
    """d = 1 exact top-K and recall@K of every predictor, one pair of rows per set."""
    names = [n for n in ORDER if any(r.get("predictor") == n for x in records for r in x["rows"])]
    lines = [
        "| set | " + " | ".join(names) + " |",
        "|---|" + "---:|" * len(names),
    ]
    for record in records:
        by_name = {r["predictor"]: r for r in record["rows"] if r.get("d") == 1}
        for metric, label in (("exact", "exact"), ("recall_k", "recall@K")):
            values = {n: by_name[n][metric] for n in names if n in by_name}
            best = max(values.values(), default=0.0)
            cells = [
                _bold(_pct(values[n]), values[n] == best) if n in values else "–" for n in names
            ]
            first = label_of(record) if metric == "exact" else "″"
            lines.append(f"| {first}: {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def label_of(record: dict[str, Any]) -> str:
    test = record.get("test")
    return record.get("title") or (", ".join(test) if isinstance(test, list) else str(test))


def report(records: list[dict[str, Any]]) -> str:
    """The markdown for all groups (see the module docstring)."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        key = f"{record.get('model') or '?'} ({' x '.join(map(str, record['topology']))})"
        groups.setdefault(key, []).append(record)
    parts = []
    for group in groups.values():
        first = group[0]
        topology = " x ".join(map(str, first["topology"]))
        parts += [
            f"**{label_of(first)}** ({topology}; {first['test_tokens']} "
            f"{first.get('tokens', 'all')} tokens; baselines fitted on {first['train_tokens']}):",
            "",
            main_table(first),
            "",
            "d = 1 on every set:",
            "",
            sets_table(group),
            "",
        ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("evals", nargs="+", help="eval-predictor --json files")
    parser.add_argument("--out", default=None, help="write the markdown here (else stdout)")
    args = parser.parse_args(argv)
    text = report([json.loads(Path(p).read_text()) for p in args.evals])
    if args.out:
        Path(args.out).write_text(text + "\n")
    else:
        print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
