"""Prometheus families per headset and for the handshake gate, from the status document.

Read at scrape time only (runtime/daemon/metrics.py calls in); labelled by enrolled name,
so under CURVE the label set is bounded by the allow-list.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

HEADSET_COUNTERS = (
    ("frames", "Frames accepted from the headset (after the rate cap)."),
    ("dropped", "The headset's frames dropped: superseded by its newer frame, or expired."),
    ("rate_limited", "The headset's frames answered RATE_LIMITED."),
    ("connections", "Connections that served the headset (reconnects add one each)."),
    ("replaced", "The headset's connections replaced by a newer one with its key."),
)


def headset_metrics(status: Mapping[str, Any]) -> Iterator[Metric]:
    """Per headset, labelled by its enrolled name (CURVE: bounded by the allow-list)."""
    headsets = status.get("headsets", [])
    for field, documentation in HEADSET_COUNTERS:
        family = CounterMetricFamily(f"sightline_headset_{field}", documentation,
                                     labels=["headset"])
        for headset in headsets:
            family.add_metric([str(headset.get("name"))], headset.get(field, 0))
        yield family
    handshakes = status.get("handshakes") or {}
    if handshakes:
        accepted = CounterMetricFamily("sightline_handshakes_accepted",
                                       "CURVE handshakes admitted by the ZAP handler.")
        accepted.add_metric([], handshakes.get("accepted", 0))
        yield accepted
        refused = CounterMetricFamily(
            "sightline_handshakes_refused", "CURVE handshakes refused, by reason (unknown_key, "
            "key_rate, address_rate, address_connections).", labels=["reason"])
        for reason, n in sorted(handshakes.get("refused", {}).items()):
            refused.add_metric([str(reason)], n)
        yield refused
    connections = status.get("connections") or {}
    if connections:
        open_ = GaugeMetricFamily("sightline_connections_open",
                                  "Transport connections open on the frame socket.")
        open_.add_metric([], connections.get("open", 0))
        yield open_
