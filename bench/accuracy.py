"""Which quantile sketch should back the *_ms metrics? Measured, not assumed.

For lognormal(5, 1) latencies at 1,000, 3,000 and 20,000 values an hour, prints the worst relative error of
p50/p95/p99 against the exact PERCENTILE_CONT of the same values, for an hour, a day (24
hour sketches merged) and a week (168 merged), over several seeds, with serialized sizes,
for KLL k=200 (the library default, the baseline), KLL k=400 and REQ-HRA k=12, 24, 48, 64, 96.
"Worst" is over every hour and every day of the week of each seed, not one sample of each.
Exits non-zero if the configured default misses the 1% bar anywhere.

    .venv/bin/python -m bench.accuracy [--seeds 5] [--per-hour 1000,3000,20000]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np
from rich.console import Console
from rich.table import Table

from sketches import Sketch
from streamagg.settings import Settings

KINDS = ("kll-k200", "kll-k400", "req-hra-k12", "req-hra-k24", "req-hra-k48", "req-hra-k64", "req-hra-k96", "req-hra-k128")
BASELINE = "kll-k200"
RANKS = (0.5, 0.95, 0.99)
BAR = 0.01
GRANULARITIES = {"hour": 1, "day": 24, "week": 168}


def percentile_cont_sorted(ordered: np.ndarray, ranks: tuple[float, ...]) -> np.ndarray:
    positions = np.asarray(ranks) * (len(ordered) - 1)
    first = np.floor(positions).astype(np.int64)
    low, high = ordered[first], ordered[np.ceil(positions).astype(np.int64)]
    return low + (high - low) * (positions - first)


def measure(seeds: int, per_hour: int) -> tuple[dict, dict]:
    """errors[kind][granularity] = worst relative error per rank; sizes[kind][granularity] = mean bytes."""
    errors = {k: {g: np.zeros(len(RANKS)) for g in GRANULARITIES} for k in KINDS}
    sizes = {k: {g: [] for g in GRANULARITIES} for k in KINDS}
    for seed in range(seeds):
        rng = np.random.default_rng(seed)
        hours = [rng.lognormal(5, 1, per_hour) for _ in range(168)]
        for kind in KINDS:
            hour_sketches = []
            for values in hours:
                sketch = Sketch(kind)
                sketch.update_many(values)
                hour_sketches.append(sketch)
            for granularity, span in GRANULARITIES.items():
                for start in range(0, 168, span):
                    merged = Sketch(kind)
                    for sketch in hour_sketches[start : start + span]:
                        merged.merge(sketch)
                    truth = percentile_cont_sorted(np.sort(np.concatenate(hours[start : start + span])), RANKS)
                    error = np.abs(np.array(merged.quantiles(RANKS)) / truth - 1)
                    errors[kind][granularity] = np.maximum(errors[kind][granularity], error)
                    sizes[kind][granularity].append(len(merged.serialize()))
    return errors, {k: {g: float(np.mean(v)) for g, v in d.items()} for k, d in sizes.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument(
        "--per-hour", type=lambda text: [int(n) for n in text.split(",")], default=[1_000, 3_000, 20_000],
        help="values per hour, comma separated: a sketch errs most just past its exact mode",
    )  # fmt: skip
    args = parser.parse_args(argv)
    default = Settings.model_fields["sketch_kind"].default

    console = Console() if sys.stdout.isatty() else Console(width=110)
    started = time.perf_counter()
    worst = 0.0
    for per_hour in args.per_hour:
        errors, sizes = measure(args.seeds, per_hour)
        table = Table(
            title=f"Worst relative error over {args.seeds} seeds, lognormal(5, 1), {per_hour:,} values/hour",
            caption=f"bar: {BAR:.0%} at p50, p95 and p99 at every granularity; ratio = p99 error / {BASELINE}'s",
        )
        for column in ("sketch", "granularity", "p50", "p95", "p99", "p99 vs baseline", "bytes", "meets bar"):
            table.add_column(column, justify="left" if column in ("sketch", "granularity") else "right")
        for kind in KINDS:
            for granularity in GRANULARITIES:
                err = errors[kind][granularity]
                baseline = errors[BASELINE][granularity][2]
                table.add_row(
                    kind + (" (default)" if kind == default else ""),
                    granularity,
                    *(f"{e:.3%}" for e in err),
                    f"{err[2] / baseline:.2f}x" if baseline else "-",
                    f"{sizes[kind][granularity]:,.0f}",
                    "yes" if err.max() <= BAR else "no",
                    end_section=granularity == "week",
                )
        console.print(table)
        worst = max(worst, *(errors[default][g].max() for g in GRANULARITIES))
    verdict = "meets" if worst <= BAR else "MISSES"
    console.print(f"default {default}: worst error {worst:.3%} over every size, {verdict} the {BAR:.0%} bar "
                  f"({time.perf_counter() - started:.1f} s)")  # fmt: skip
    return 0 if worst <= BAR else 1


if __name__ == "__main__":
    sys.exit(main())
