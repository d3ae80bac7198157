"""A real Prometheus scrapes `sightline cloud serve` while simulated devices publish and
a slower version rolls out: every dashboard query and every metric the alert rules use
returns data, the rules load and evaluate, and a device that goes offline fires its alert.

The rules are the shipped file with each `for:` cut to 1 s (the durations themselves are
covered by the promtool unit tests); the expressions are the shipped ones.
"""

from __future__ import annotations

import json
import re
import time

from cloud_sync.push import resolve_targets, rollout
from tests.cloud_sync.service.fleet import ServiceProcess, SimFleet
from tests.cloud_sync.service.prometheus import Prometheus, binary
from tests.cloud_sync.service.test_alert_rules import RULES

DASHBOARD = RULES.parents[1] / "grafana" / "sightline-fleet.json"


def _dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    queries = [(panel["title"], target["expr"]) for panel in dashboard["panels"]
               for target in panel["targets"]]
    variable = dashboard["templating"]["list"][0]["query"]["query"]
    queries.append(("$device variable", re.sub(r"label_values\((\w+), \w+\)", r"\1",
                                               variable)))
    # Grafana's variables, as Grafana would fill them for "All" and a 1 s scrape
    return [(title, expr.replace("$device", ".+").replace("$__rate_interval", "10s"))
            for title, expr in queries]


def test_prometheus_scrapes_the_service_and_every_panel_and_alert_has_data(
        sqlite_url, broker, work_dir):
    binary("prometheus")
    rules = work_dir / "rules.yml"
    rules.write_text(re.sub(r"for: \d+m", "for: 1s", RULES.read_text()))
    service = ServiceProcess(work_dir, sqlite_url, broker.port,
                             "--latency-budget", "tiny=20").start()
    # sim-01 and sim-02 get 2.0, which is twice as slow: fps halves, p99 doubles past 20 ms
    fleet = SimFleet(work_dir / "fleet", broker.port, 4, interval_s=0.2,
                     slowdown={"2.0": 2.0}).start()
    prometheus = Prometheus(work_dir / "prometheus", [f"127.0.0.1:{service.http_port}"],
                            [rules])
    try:
        targets = resolve_targets(fleet.watcher.state, ["device:sim-01", "device:sim-02"])
        time.sleep(2.0)  # the "before" figures for fps_before_version_change
        final = rollout(fleet.watcher.client, fleet.watcher.state, fleet.archive, fleet.key,
                        targets, publish=fleet.publish, timeout_s=60, chunk_size=65536)
        assert {doc["state"] for doc in final.values()} == {"confirmed"}
        offline = fleet.devices[3]
        offline.telemetry.stop()
        offline.updater.stop()
        offline.link.stop()  # a clean stop: status offline

        empty = {}
        for title, expr in _dashboard_queries():
            if not prometheus.wait_for(lambda expr=expr: prometheus.query(expr), 30):
                empty[title] = expr
        assert empty == {}, f"dashboard queries without data: {empty}"

        text = RULES.read_text()
        names = sorted(set(re.findall(r"sightline_[a-z0-9_]+", text)))
        assert len(names) >= 12
        missing = [n for n in names if not prometheus.query(f'count({{__name__="{n}"}})')]
        assert missing == [], "metrics the alert rules use that the service does not export"
        groups = prometheus.wait_for(lambda: [
            g for g in prometheus.api("rules")["groups"]
            if all(r.get("lastEvaluation", "").startswith("20")
                   and r.get("health") == "ok" for r in g["rules"])], 30)
        assert groups and len(groups[0]["rules"]) == 9, prometheus.api("rules")

        def firing() -> set[tuple[str, str]]:
            return {(a["labels"]["alertname"], a["labels"].get("device", ""))
                    for a in prometheus.api("alerts")["alerts"] if a["state"] == "firing"}

        expected = {("SightlineDeviceOffline", "sim-04"),
                    ("SightlineLatencyOverBudget", "sim-01"),
                    ("SightlineFpsDownAfterVersionChange", "sim-01")}
        alerts = prometheus.wait_for(lambda: expected <= firing() and firing(), 30)
        assert alerts and expected <= alerts, firing()
        # the healthy devices fire nothing about themselves
        assert not {a for a in firing() if a[1] == "sim-03"}
    finally:
        prometheus.stop()
        fleet.stop()
        service.stop()
