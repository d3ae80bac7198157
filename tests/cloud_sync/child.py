"""Child processes for the crash tests: killed with SIGKILL (or stopped with SIGSTOP)
by the test, so what they leave behind is what a crashed device leaves behind.

    python -m tests.cloud_sync.child outbox PATH      # put messages forever, print each id
    python -m tests.cloud_sync.child link PORT DEVICE OUTBOX KEEPALIVE
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path


def fill_outbox(path: str) -> None:
    from cloud_sync.outbox import MessageKind, Outbox

    outbox = Outbox(path, max_messages=1_000_000, max_bytes=1 << 30)
    print("ready", flush=True)
    seq = 0
    while True:
        kind = MessageKind.PROGRESS if seq % 10 == 0 else MessageKind.TELEMETRY
        message_id = outbox.put(kind, "sightline/v1/devices/d/telemetry",
                                json.dumps({"seq": seq}).encode())
        # Printed only after put() returned: the parent counts these as stored.
        print(f"stored {seq} {message_id}", flush=True)
        seq += 1


def run_link(port: str, device_id: str, outbox: str, keepalive: str) -> None:
    from cloud_sync.link import LinkConfig, MqttLink

    link = MqttLink(LinkConfig(host="127.0.0.1", port=int(port), device_id=device_id,
                               outbox_path=Path(outbox), keepalive_s=int(keepalive),
                               reconnect_min_s=1, reconnect_max_s=1))
    link.start()
    if not link.wait_connected(10):
        print("not connected", flush=True)
        sys.exit(1)
    print("connected", flush=True)
    while True:  # until killed; reports every (re)connect
        connects = link.stats().connects
        while link.stats().connects == connects:
            time.sleep(0.05)
        print(f"reconnected {link.stats().connects}", flush=True)


if __name__ == "__main__":
    mode, *args = sys.argv[1:]
    if mode == "outbox":
        fill_outbox(*args)
    elif mode == "link":
        run_link(*args)
    else:
        sys.exit(f"unknown mode {mode!r}")
