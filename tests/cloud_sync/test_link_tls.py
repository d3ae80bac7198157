"""TLS with client certificates and a per-device ACL, on a real mosquitto: a device gets
in with its own certificate, and the broker keeps it inside its own topic subtree."""

from __future__ import annotations

import json
import logging
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

from cloud_sync.link import LinkConfig, MqttLink
from cloud_sync.topics import Channel, device_topics
from tests.cloud_sync.pki import Pki, make_pki

A, B = device_topics("dev-a"), device_topics("dev-b")

# The ACL docs/mqtt.md recommends: %u is the certificate's CN (use_identity_as_username).
ACL = """\
pattern write sightline/v1/devices/%u/status
pattern write sightline/v1/devices/%u/telemetry
pattern write sightline/v1/devices/%u/ota/progress
pattern read sightline/v1/devices/%u/ota/command
topic read sightline/v1/updates/+/chunks/+

user dev-a
topic read sightline/v1/groups/lab/ota/command

user cloud
topic readwrite sightline/v1/#
"""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


def tls_listener(pki: Pki, directory: Path, server: str = "server") -> str:
    acl = directory / "acl"
    acl.parent.mkdir(parents=True, exist_ok=True)
    acl.write_text(ACL)
    return (f"cafile {pki.ca}\n"
            f"certfile {pki.directory / (server + '.pem')}\n"
            f"keyfile {pki.directory / (server + '.key')}\n"
            "require_certificate true\n"
            "use_identity_as_username true\n"
            "allow_anonymous false\n"
            f"acl_file {acl}\n")


@pytest.fixture
def tls_broker(broker_factory, pki, work_dir):
    return broker_factory(tls_listener(pki, work_dir / "tls"))


def tls_options(pki: Pki, name: str) -> dict:
    cert, key = pki.client(name)
    return {"ca_certs": str(pki.ca), "certfile": str(cert), "keyfile": str(key)}


def link_config(pki: Pki, port: int, work_dir: Path, device_id: str, cert_of: str,
                **overrides) -> LinkConfig:
    cert, key = pki.client(cert_of)
    settings = dict(host="127.0.0.1", port=port, device_id=device_id,
                    outbox_path=work_dir / f"{device_id}.db", reconnect_min_s=1,
                    reconnect_max_s=1, groups=("lab",),
                    tls={"ca_file": pki.ca, "cert_file": cert, "key_file": key})
    settings.update(overrides)
    return LinkConfig(**settings)


class RawDevice:
    """A bare paho client holding a device certificate: it tries what our link never
    would (publishing into another device's topics) to show the broker refuses it."""

    def __init__(self, pki: Pki, port: int, name: str, protocol: MQTTProtocolVersion) -> None:
        self.acks: dict[int, object] = {}
        self.received: list[str] = []
        self._cond = threading.Condition()
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"raw-{name}",
                                  protocol=protocol)
        self.client.tls_set(**tls_options(pki, name))
        self.client.on_publish = self._on_publish
        self.client.on_message = lambda c, u, m: self.received.append(m.topic)
        self.client.connect("127.0.0.1", port, keepalive=10)
        self.client.loop_start()

    def _on_publish(self, client, userdata, mid, reason_code, properties) -> None:
        with self._cond:
            self.acks[mid] = reason_code
            self._cond.notify_all()

    def publish(self, topic: str, payload: bytes):
        info = self.client.publish(topic, payload, qos=1)
        with self._cond:
            assert self._cond.wait_for(lambda: info.mid in self.acks, 5), "no PUBACK"
            return self.acks[info.mid]

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def raw_devices():
    devices: list[RawDevice] = []

    def factory(*args) -> RawDevice:
        device = RawDevice(*args)
        devices.append(device)
        return device

    yield factory
    for device in devices:
        device.close()


@pytest.fixture
def links():
    started: list[MqttLink] = []

    def factory(config: LinkConfig, **kwargs) -> MqttLink:
        link = MqttLink(config, **kwargs)
        started.append(link)
        link.start()
        return link

    yield factory
    for link in started:
        link.stop(timeout=0.5)


def test_device_connects_with_its_certificate_and_publishes(tls_broker, pki, work_dir, links,
                                                            observer_factory):
    cloud = observer_factory(tls_broker.port, [A.status, A.telemetry],
                             tls=tls_options(pki, "cloud"))
    link = links(link_config(pki, tls_broker.port, work_dir, "dev-a", "dev-a"))
    assert link.wait_connected(5)
    link.publish(Channel.TELEMETRY, {"fps": 30})
    messages = cloud.wait_for(lambda ms: len(ms) >= 2)
    assert json.loads(messages[0].payload)["state"] == "online"
    assert json.loads(messages[1].payload)["fps"] == 30


@pytest.mark.parametrize("protocol", [MQTTProtocolVersion.MQTTv5, MQTTProtocolVersion.MQTTv311],
                         ids=["mqtt5", "mqtt311"])
def test_broker_refuses_device_a_publishing_into_device_b_topics(
        tls_broker, pki, raw_devices, observer_factory, protocol):
    cloud = observer_factory(tls_broker.port, ["sightline/v1/devices/#"],
                             tls=tls_options(pki, "cloud"))
    device_a = raw_devices(pki, tls_broker.port, "dev-a", protocol)
    forged = device_a.publish(B.telemetry, b'{"forged":true}')
    forged_status = device_a.publish(B.status, b'{"state":"offline"}')
    if protocol == MQTTProtocolVersion.MQTTv5:
        # MQTT 5 lets mosquitto say so: PUBACK reason code 0x87 Not authorized
        assert forged == 0x87 and forged_status == 0x87
        assert str(forged) == "Not authorized"
    # 3.1.1 has no way to refuse a PUBLISH: the PUBACK is plain, the message is dropped.
    assert device_a.publish(A.telemetry, b'{"own":true}') < 0x80
    messages = cloud.wait_for(lambda ms: any(m.topic == A.telemetry for m in ms))
    assert [m.topic for m in messages] == [A.telemetry], "B's topics never got A's messages"
    assert "Denied PUBLISH from raw-dev-a" in tls_broker.log_text()


def test_device_cannot_read_another_devices_commands(tls_broker, pki, work_dir, raw_devices,
                                                     links, observer_factory):
    got_b: list[bytes] = []
    link_b = links(link_config(pki, tls_broker.port, work_dir, "dev-b", "dev-b"),
                   on_downlink=lambda d: got_b.append(d.payload))
    assert link_b.wait_connected(5)
    device_a = raw_devices(pki, tls_broker.port, "dev-a", MQTTProtocolVersion.MQTTv5)
    device_a.client.subscribe("sightline/v1/devices/dev-b/ota/#", qos=1)
    time.sleep(0.3)
    cloud = observer_factory(tls_broker.port, [], tls=tls_options(pki, "cloud"))
    cloud.client.publish(B.ota_command, b"for-b", qos=1).wait_for_publish(5)
    deadline = time.monotonic() + 5
    while not got_b and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.2)
    assert got_b == [b"for-b"]
    assert device_a.received == []


def test_link_drops_and_counts_messages_the_broker_refuses(tls_broker, pki, work_dir, links,
                                                           observer_factory):
    # Misconfigured device: it calls itself dev-b but holds dev-a's certificate, so the
    # ACL refuses everything it publishes. The link must not retry those forever.
    link = links(link_config(pki, tls_broker.port, work_dir, "dev-b", "dev-a"))
    assert link.wait_connected(5)
    link.publish(Channel.TELEMETRY, {"n": 1})
    link.publish(Channel.OTA_PROGRESS, {"n": 2})
    assert link.wait_drained(5)
    stats = link.stats().outbox
    assert (stats.messages, stats.rejected_by_broker) == (0, 2)


def test_device_without_a_certificate_is_refused(tls_broker, pki, work_dir, links):
    link = links(link_config(pki, tls_broker.port, work_dir, "dev-a", "dev-a",
                             tls={"ca_file": pki.ca}))
    assert not link.wait_connected(1.5)


def test_broker_certificate_for_another_host_is_refused_unless_insecure(
        broker_factory, pki, work_dir, links, caplog):
    broker = broker_factory(tls_listener(pki, work_dir / "tls", server="server-elsewhere"))
    strict = links(link_config(pki, broker.port, work_dir, "dev-a", "dev-a"))
    with caplog.at_level(logging.WARNING, logger="cloud_sync.link"):
        assert not strict.wait_connected(1.5)
    assert "CERTIFICATE_VERIFY_FAILED" in caplog.text  # the log says why
    strict.stop()
    cert, key = pki.client("dev-a")
    insecure = links(link_config(pki, broker.port, work_dir, "dev-a", "dev-a",
                                 tls={"ca_file": pki.ca, "cert_file": cert, "key_file": key,
                                      "insecure": True}))
    assert insecure.wait_connected(5)


def test_operator_fleet_command_over_tls_with_a_client_certificate(tls_broker, pki, work_dir):
    """`sightline fleet` as the cloud user (certificate CN "cloud") sees a TLS device;
    without a client certificate the broker refuses the operator, and the error says so."""
    import subprocess
    import sys

    device = MqttLink(link_config(pki, tls_broker.port, work_dir, "dev-a", "dev-a"))
    device.start()
    try:
        assert device.wait_connected(10)
        cert, key = pki.client("cloud")
        base = [sys.executable, "-m", "runtime.cli", "fleet", "--once", "1.5",
                "--broker", f"127.0.0.1:{tls_broker.port}", "--tls-ca", str(pki.ca)]
        seen = subprocess.run([*base, "--tls-cert", str(cert), "--tls-key", str(key)],
                              capture_output=True, text=True, timeout=60)
        assert seen.returncode == 0, seen.stderr
        assert "dev-a" in seen.stdout and "online" in seen.stdout
        refused = subprocess.run(base, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2
        assert f"127.0.0.1:{tls_broker.port}" in refused.stderr
    finally:
        device.stop()
