"""`sightline bench`'s tables and its machine-readable figures, from the measured series.

Slow path only: everything here runs once, after the measuring is done.
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from runtime.tools.bench_rates import ROUNDS, Throughput, summarize
from runtime.tools.latency import PERCENTILES, latency_table, percentiles

BARE = "bare engine.infer"
# (label, from, to): the frame's path, on the client's clock ("client_sent",
# "client_received") and the server's stamps; one machine, so one clock.
PATH_STAGES = (
    ("transport in + socket read", "client_sent", "received"),
    ("hand-over to the model", "received", "taken"),
    ("decode", "taken", "decoded"),
    ("preprocess", "decoded", "preprocessed"),
    ("hand-over to the engine", "preprocessed", "started"),
    ("engine", "started", "inferred"),
    ("output decode", "inferred", "postprocessed"),
    ("encode, send, transport out", "postprocessed", "client_received"),
)
CLIENT_STAGE = "client SDK, direct mode"


def report(console: Console, latency: dict[str, list[float]],
           paths: dict[str, dict[str, list[float]]], rates: Throughput) -> dict:
    """Print every table; return the figures as plain data (the `--json` document)."""
    console.print(latency_table("Latency, interleaved samples (round trip, client clock)",
                                latency))
    overhead = _overhead(latency)
    console.print(_overhead_table(overhead))
    console.print(_stage_table(paths))
    throughput = summarize(rates)
    console.print(_throughput_table(throughput))
    return {"latency_ms": {name: _named(percentiles(v)) | {"n": len(v)}
                           for name, v in latency.items()},
            "overhead_ms": overhead,
            "stages_ms": {name: {label: _named(percentiles(v)) for label, v in series.items()}
                          for name, series in paths.items()},
            "throughput": {"rounds": ROUNDS, "bare engine": throughput["bare engine"],
                           "paths": {name: {str(count): row for count, row in rows.items()}
                                     for name, rows in throughput["paths"].items()}}}


def _named(values: tuple[float, ...]) -> dict[str, float]:
    return {f"p{p}": v for p, v in zip(PERCENTILES, values, strict=True)}


def _paired(values: list[float], baseline: list[float]) -> tuple[float, float]:
    """p50 and p99 of per-sample differences (the same frame on both paths)."""
    difference = np.asarray(values) - np.asarray(baseline)
    return float(np.percentile(difference, 50)), float(np.percentile(difference, 99))


def _overhead(latency: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    bare = percentiles(latency[BARE])
    floor = latency.get("floor")
    overhead = {}
    for name in (n for n in latency if n != BARE):
        full = percentiles(latency[name])
        figures = {"p50": full[0] - bare[0], "p99": full[2] - bare[2]}
        figures["paired_p50"], figures["paired_p99"] = _paired(latency[name], latency[BARE])
        if floor is not None and name != "floor":
            floor_p = percentiles(floor)
            figures["over_floor_p50"] = full[0] - floor_p[0]
            figures["over_floor_p99"] = full[2] - floor_p[2]
        overhead[name] = figures
    return overhead


def _overhead_table(overhead: dict[str, dict[str, float]]) -> Table:
    table = Table(title="Overhead, ms: p50(path) - p50(baseline) and p99 - p99; paired: "
                        "percentiles of per-frame differences")
    keys = ("p50", "p99", "paired_p50", "paired_p99", "over_floor_p50", "over_floor_p99")
    for column in ("path", "over bare p50", "over bare p99", "paired p50", "paired p99",
                   "over floor p50", "over floor p99"):
        table.add_column(column, justify="left" if column == "path" else "right")
    for name, figures in overhead.items():
        table.add_row(name, *(f"{figures[k]:+.2f}" if k in figures else "" for k in keys))
    return table


def _stage_table(paths: dict[str, dict[str, list[float]]]) -> Table:
    """One column per server configuration: where its time goes."""
    table = Table(title="Where each path's time goes, p50 ms (p99)")
    table.add_column("stage")
    for name in paths:
        table.add_column(name, justify="right")
    for label in [label for label, _, _ in PATH_STAGES] + [CLIENT_STAGE]:
        cells = []
        for series in paths.values():
            values = series.get(label)
            cells.append("-" if not values else
                         f"{np.percentile(values, 50):.3f} ({np.percentile(values, 99):.2f})")
        table.add_row(label, *cells)
    return table


def _throughput_table(summary: dict) -> Table:
    table = Table(title=f"Throughput and CPU per frame (results/s: median of {ROUNDS} "
                        "interleaved rounds, 2 frames in flight per client; CPU: the "
                        "server process's user+sys over the windows / results served)")
    for column in ("path", "clients", "results/s", "ratio to bare", "p50 ms", "p99 ms",
                   "CPU ms/frame", "beyond engine ms"):
        table.add_column(column, justify="left" if column == "path" else "right")
    bare = summary["bare engine"]
    table.add_row("bare engine (CPU: per inference)", "", f"{bare['results_per_s']:.1f}",
                  "1.000", "", "", _ms(bare["cpu_ms_per_inference"]), "")
    for name, rows in summary["paths"].items():
        for count, row in rows.items():
            table.add_row(name, str(count), f"{row['results_per_s']:.1f}", f"{row['ratio']:.3f}",
                          _ms(row["p50_ms"]), _ms(row["p99_ms"]), _ms(row["cpu_ms_per_frame"]),
                          _ms(row["cpu_ms_beyond_engine"], signed=True))
    return table


def _ms(value: float | None, *, signed: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:+.2f}" if signed else f"{value:.2f}"
