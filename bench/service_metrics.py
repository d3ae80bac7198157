"""What a fleet of N devices costs on the service's /metrics: series, bytes, scrape time.
Not part of CI; the figures are in docs/cloud-service.md.

    python bench/service_metrics.py --devices 10000

Fills an SQLite database (in a temporary directory) with one status, one telemetry
sample and one confirmed update per device through the service's own records code, then
renders /metrics the way a scrape does, --repeat times, and prints the median.
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prometheus_client import CollectorRegistry, generate_latest  # noqa: E402

from cloud_sync.service.database import open_database  # noqa: E402
from cloud_sync.service.metrics import FleetCollector  # noqa: E402
from cloud_sync.service.records import apply_batch  # noqa: E402
from tests.cloud_sync.service.test_records import progress, status, telemetry  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="service-metrics-"))
    try:
        engine, sessions = open_database(f"sqlite:///{work / 'cloud.db'}")
        t = time.monotonic()
        for start in range(0, args.devices, 500):
            batch = []
            for i in range(start, min(start + 500, args.devices)):
                device = f"edge-{i:05d}"
                batch += [status(device), telemetry(device, 100.0, uptime=10.0),
                          progress(device, "u1", "active", 110.0),
                          progress(device, "u1", "confirmed", 111.0)]
            with sessions() as session:
                apply_batch(session, batch)
        fill_s = time.monotonic() - t
        registry = CollectorRegistry(auto_describe=False)
        registry.register(FleetCollector(sessions, {"tiny": 40.0}))
        times, body = [], b""
        for _ in range(args.repeat):
            t = time.perf_counter()
            body = generate_latest(registry)
            times.append(time.perf_counter() - t)
        series = sum(1 for line in body.decode().splitlines() if line and line[0] != "#")
        per_device = sum(1 for line in body.decode().splitlines()
                         if 'device="edge-00001"' in line)
        figures = {"devices": args.devices, "series": series, "series_per_device": per_device,
                   "bytes": len(body), "scrape_s_median": round(statistics.median(times), 3),
                   "scrape_s_max": round(max(times), 3), "fill_s": round(fill_s, 1)}
        print(json.dumps(figures))
        engine.dispose()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
