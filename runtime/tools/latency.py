"""Latency figures from reply timestamps: per-stage durations, percentiles, a printable table.

Slow path only (demo, bench, tools): nothing here runs per frame inside the daemon.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np
from rich.table import Table

# (label, from stamp, to stamp): durations measured on the daemon's clock.
SERVER_STAGES = (
    ("decode", "received", "decoded"),
    ("preprocess", "decoded", "preprocessed"),
    ("inference", "preprocessed", "inferred"),
    ("postprocess", "inferred", "postprocessed"),
    ("daemon total", "received", "sent"),
)
PERCENTILES = (50, 95, 99)


def stage_durations_ms(stamps: Mapping[str, float]) -> dict[str, float]:
    return {label: (stamps[end] - stamps[start]) * 1e3
            for label, start, end in SERVER_STAGES if start in stamps and end in stamps}


def percentiles(values_ms: Iterable[float]) -> tuple[float, ...]:
    values = np.asarray(list(values_ms), dtype=np.float64)
    if values.size == 0:
        return tuple(float("nan") for _ in PERCENTILES)
    return tuple(float(v) for v in np.percentile(values, PERCENTILES))


def latency_table(title: str, series: Mapping[str, Iterable[float]]) -> Table:
    """One row per series of millisecond samples: count, p50, p95, p99."""
    table = Table(title=title)
    table.add_column("stage")
    table.add_column("n", justify="right")
    for p in PERCENTILES:
        table.add_column(f"p{p} ms", justify="right")
    for name, values in series.items():
        values = list(values)
        table.add_row(name, str(len(values)), *(f"{v:.2f}" for v in percentiles(values)))
    return table
