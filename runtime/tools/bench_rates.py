"""Throughput figures for the benchmarks: results per second with N clients against a
server, and the bare engine's rate, measured in interleaved rounds on the same machine.
"""

from __future__ import annotations

import threading
import time

import numpy as np
from rich.table import Table

from runtime.client import Client, Reply

ROUNDS = 3  # throughput rounds, each: bare, then each path with 1 and 2 clients


def bare_rate(engine, feeds, seconds: float) -> float:
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        engine.infer(feeds)
        count += 1
    return count / (time.perf_counter() - start)


def server_rate(endpoint: str, keys: dict, frame: np.ndarray, clients: int, seconds: float,
                *, in_flight: int = 2, latencies: list[float] | None = None) -> float:
    """Results per second with `clients` clients, each keeping `in_flight` frames out;
    each result's round trip (ms) is appended to `latencies` when given."""
    results = [0] * clients
    stop = threading.Event()

    def make_handler(index: int):
        def on_reply(reply: Reply) -> None:
            if reply.ok:
                results[index] += 1
                if latencies is not None and reply.round_trip_s is not None:
                    latencies.append(reply.round_trip_s * 1e3)
            if not stop.is_set():
                handles[index].send(frame)  # keep the window full: the engine never idles
        return on_reply

    handles = [Client(endpoint, max_in_flight=in_flight, on_reply=make_handler(i), **keys)
               for i in range(clients)]
    try:
        for client in handles:
            client.wait_connected(10)
        start = time.perf_counter()
        for client in handles:
            for _ in range(in_flight):
                client.send(frame)
        time.sleep(seconds)
        stop.set()
        elapsed = time.perf_counter() - start
        total = sum(results)
    finally:
        for client in handles:
            client.close()
    return total / elapsed


def interleaved_throughput(engine, feeds, links, frame, seconds) -> dict[str, list[float]]:
    rates: dict[str, list[float]] = {"bare engine": []}
    window = seconds / ROUNDS
    for _ in range(ROUNDS):
        rates["bare engine"].append(bare_rate(engine, feeds, window))
        for name, (endpoint, keys) in links.items():
            for count in (1, 2):
                label = f"{name}, {count} client{'s' if count > 1 else ''}"
                rates.setdefault(label, []).append(
                    server_rate(endpoint, keys, frame, count, window))
    return rates


def throughput_table(rates: dict[str, list[float]]) -> Table:
    table = Table(title=f"Throughput (median of {ROUNDS} interleaved rounds)")
    for column in ("path", "frames/s", "ratio to bare"):
        table.add_column(column, justify="left" if column == "path" else "right")
    bare = float(np.median(rates["bare engine"]))
    for name, values in rates.items():
        rate = float(np.median(values))
        table.add_row(name, f"{rate:.1f}", f"{rate / bare:.3f}")
    return table
