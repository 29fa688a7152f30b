"""`cachegen bench compare A.json B.json`: two `bench serve` (or `vllm bench serve`) results side by side.

Prints one row per metric found in either file with both values and the ratio B/A, so "reuse on" vs "reuse
off" reads at a glance. Lower-is-better metrics (latencies) and higher-is-better ones (throughputs) are marked.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path

# (key, label, is_higher_better); latency keys are added per metric and statistic below.
HEADLINE = (
    ("completed", "Successful requests", True),
    ("failed", "Failed requests", False),
    ("duration", "Benchmark duration (s)", False),
    ("request_throughput", "Request throughput (req/s)", True),
    ("request_goodput", "Request goodput (req/s)", True),
    ("output_throughput", "Output token throughput (tok/s)", True),
    ("total_token_throughput", "Total token throughput (tok/s)", True),
    ("cached_token_ratio", "Cached-token ratio", True),
    ("cachegen_bytes_fetched", "KV bytes fetched", False),
    ("cachegen_fallback_chunks", "Fallback chunks", False),
)
LATENCIES = (("ttft", "TTFT"), ("tpot", "TPOT"), ("itl", "ITL"), ("e2el", "E2EL"))
STATISTICS = ("mean", "median", "p90", "p99")


@dataclass(slots=True, frozen=True)
class Row:
    label: str
    a: float | None
    b: float | None
    is_higher_better: bool

    @property
    def ratio(self) -> float | None:
        if self.a is None or self.b is None or self.a == 0:
            return None
        return self.b / self.a


def register(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("a", help="baseline result JSON (A)")
    parser.add_argument("b", help="result JSON to compare (B)")
    parser.add_argument("--names", default="A,B", help="column names, e.g. 'reuse off,reuse on'")


def _number(value: object) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def compare_rows(a: dict, b: dict) -> list[Row]:
    """Rows for every known metric present (as a number) in at least one of the two results."""
    specs = list(HEADLINE)
    for name, short in LATENCIES:
        specs += [(f"{stat}_{name}_ms", f"{stat.capitalize()} {short} (ms)", False) for stat in STATISTICS]
    rows = []
    for key, label, is_higher_better in specs:
        row = Row(label, _number(a.get(key)), _number(b.get(key)), is_higher_better)
        if row.a is not None or row.b is not None:
            rows.append(row)
    return rows


def _cell(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value == int(value) and abs(value) >= 1000 else f"{value:.3f}"


def format_table(rows: list[Row], names: tuple[str, str]) -> str:
    width = max(len(row.label) for row in rows) if rows else 10
    lines = [f"{'metric':<{width}}  {names[0]:>14}  {names[1]:>14}  {'B/A':>8}"]
    lines.append("-" * len(lines[0]))
    for row in rows:
        ratio = row.ratio
        mark = ""
        if ratio is not None and ratio != 1:
            mark = " better" if (ratio > 1) == row.is_higher_better else " worse"
        shown = f"{ratio:.2f}x" if ratio is not None else "-"
        lines.append(f"{row.label:<{width}}  {_cell(row.a):>14}  {_cell(row.b):>14}  {shown:>8}{mark}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    a, b = (json.loads(Path(path).read_text()) for path in (args.a, args.b))
    names = tuple(part.strip() for part in args.names.split(",", 1))
    if len(names) != 2:
        raise SystemExit("--names needs two comma-separated names")
    print(f"A = {args.a}\nB = {args.b}")
    print(format_table(compare_rows(a, b), names))  # type: ignore[arg-type]
    return 0
