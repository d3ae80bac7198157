"""OTA against real processes: `sightline serve --broker` on a real mosquitto, updates
packaged, signed and published by the operator code, frames streamed by the client SDK."""

from __future__ import annotations

import hashlib
import io
import json
import signal
import tarfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from cloud_sync.commands import MqttChunks, RollbackCommand, Tolerance, UpdateCommand
from cloud_sync.fleet import FleetState
from cloud_sync.ota import FAILPOINT_ENV
from cloud_sync.push import chunk_digests, make_update
from cloud_sync.signing import generate_signing_key, load_private_key, sign
from cloud_sync.topics import GROUPS, Channel, chunk_topic, device_topics, fleet_filter
from runtime.client import Client
from runtime.engines import open_engine
from runtime.models.bundle import Bundle, pack_archive
from runtime.models.validation import sample_feeds, write_sample
from tests.cloud_sync.ota_harness import (
    MODEL,
    Operator,
    frame_64,
    hang_on_white_model,
    nan_model,
    tiny_bundle,
)
from tests.cloud_sync.wire import assert_all_valid

DEVICE = "edge-01"


@pytest.fixture
def operator(broker, observer_factory, short_tmp: Path) -> Operator:
    """The cloud side; it sees every message of the tree (chunks aside), and when the test
    ends each one must validate against its schema in docs/schemas/."""
    observer = observer_factory(broker.port, [
        fleet_filter(Channel.OTA_PROGRESS), fleet_filter(Channel.STATUS),
        fleet_filter(Channel.TELEMETRY), fleet_filter(Channel.OTA_COMMAND),
        f"{GROUPS}/+/{Channel.OTA_COMMAND.value}"])
    yield Operator(short_tmp / "ops", observer)
    assert_all_valid(observer.everything())


@pytest.fixture
def device(broker, daemon_factory, operator, short_tmp: Path):
    """Start `sightline serve` for tiny@1.0 as DEVICE; returns a starter for restarts."""
    seed = tiny_bundle(short_tmp / "seed", "1.0")
    state = short_tmp / "state"

    def start(env: dict | None = None, probation_s: float = 1.0, ota: str = ""):
        config = short_tmp / "cloud.toml"
        config.write_text(f"[cloud]\ntelemetry_interval_s = 1\n"
                          f"[cloud.ota]\nprobation_s = {probation_s}\nstall_timeout_s = 10\n"
                          + ota)
        return daemon_factory("--config", str(config), "--model", str(seed.directory),
                              "--broker", f"127.0.0.1:{broker.port}", "--device-id", DEVICE,
                              "--group", "lab", "--state-dir", str(state),
                              "--trusted-key", str(operator.public_path),
                              endpoint=f"ipc://{short_tmp}/d-{time.monotonic_ns()}.sock", env=env)

    return start


def _version(daemon) -> str:
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        client.send(frame_64())
        reply = client.recv(timeout=10)
    assert reply is not None and reply.ok, reply
    return reply.message["model_version"]


def _store_state(short_tmp: Path) -> dict:
    return json.loads((short_tmp / "state" / "models" / MODEL / "state.json").read_text())


def _statuses(state: dict) -> dict[str, str]:
    return {r["version"]: r["status"] for r in state["versions"]}


def _assert_status_tells_the_truth_after_a_kill(operator, short_tmp, observer_factory,
                                                broker) -> None:
    """After kill -9: the retained status is the Last Will, which names no version; the
    last status the device sent itself names what served when it died (the store's active
    version: the swap follows the store's commit at once), and so does the fleet view."""
    topic = device_topics(DEVICE).status

    def died(messages) -> bool:
        own = [m for m in messages if m.topic == topic]
        return bool(own) and json.loads(own[-1].payload)["state"] == "offline"

    messages = operator.observer.wait_for(died, 10)
    statuses = [json.loads(m.payload) for m in messages if m.topic == topic]
    assert set(statuses[-1]) == {"state", "reason", "ts", "device_id", "groups"}
    late = observer_factory(broker.port, [topic])
    retained = json.loads(late.wait_for(lambda ms: ms)[0].payload)
    assert retained["reason"] == "connection-lost" and "models" not in retained
    said = [s for s in statuses if "models" in s][-1]
    active = _store_state(short_tmp)["active"]
    assert said["state"] == "online" and said["models"][MODEL]["version"] == active, said
    fleet = FleetState()
    for message in messages:
        fleet.apply(message.topic, message.payload)
    (row,) = fleet.rows()
    assert row.online is False and row.models == (f"{MODEL}@{active}",)


def _last_status(operator) -> dict:
    return json.loads(operator.observer.on(device_topics(DEVICE).status)[-1].payload)


def test_signed_update_swaps_while_a_client_streams_and_no_frame_fails(
        device, operator, short_tmp):
    daemon = device()
    replies = []
    stop = threading.Event()

    def stream() -> None:
        with Client(daemon.endpoint, max_in_flight=1) as client:
            assert client.wait_connected(10)
            while not stop.is_set():
                client.send(frame_64())
                reply = client.recv(timeout=10)
                replies.append(reply)
                time.sleep(0.02)  # a 50 fps headset, under the daemon's per-client cap

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        time.sleep(0.5)
        command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE)
        done = operator.wait_state(DEVICE, command.update_id, "confirmed", "failed", timeout=60)
        time.sleep(0.5)
    finally:
        stop.set()
        streamer.join()
    assert done["state"] == "confirmed", operator.progress(DEVICE)
    states = operator.states(DEVICE, command.update_id)
    steps = [s for s in states if s != "downloading"]
    assert steps == ["accepted", "downloaded", "unpacked", "prepared", "validated", "active",
                     "confirmed"], states
    failed = [(r.kind, r.message) for r in replies if r is None or not r.ok]
    assert not failed, failed[:3]
    versions = [r.message["model_version"] for r in replies]
    assert versions[0] == "1.0" and versions[-1] == "2.0"
    assert versions == sorted(versions), "once swapped, every reply comes from the new model"
    status = json.loads(operator.observer.on(device_topics(DEVICE).status)[-1].payload)
    assert status["models"][MODEL]["version"] == "2.0"
    assert status["models"][MODEL]["previous"] == "1.0"


# -- faults: each ends with the device serving a working model and the failure reported --

def _wait_serving(daemon, version: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (current := _version(daemon)) != version:
        assert time.monotonic() < deadline, f"still serving {current}, expected {version}"
        time.sleep(0.2)


def test_broker_stopped_mid_transfer_then_restarted_resumes_the_download(
        broker, device, operator, short_tmp):
    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=1024)
    data = archive.read_bytes()
    half = len(command.delivery.chunk_sha256) // 2
    for index in range(half):  # only half the chunks are on the broker yet
        operator.publish(operator.client, chunk_topic(command.update_id, index),
                         data[index * 1024:(index + 1) * 1024], retain=True)
    operator.send(command)
    operator.wait_state(DEVICE, command.update_id, "downloading")
    time.sleep(1.0)
    broker.stop()
    time.sleep(1.0)
    broker.start()
    operator.observer.wait_for(lambda _: operator.observer.client.is_connected(), 15)
    for index in range(half, len(command.delivery.chunk_sha256)):
        operator.publish(operator.client, chunk_topic(command.update_id, index),
                         data[index * 1024:(index + 1) * 1024], retain=True)
    done = operator.wait_state(DEVICE, command.update_id, "confirmed", "failed", timeout=60)
    assert done["state"] == "confirmed", operator.progress(DEVICE)
    assert _version(daemon) == "2.0"
    assert "resuming with" in daemon.log or "downloading" in operator.states(DEVICE)


def test_corrupted_chunk_fails_the_update_and_keeps_serving(device, operator, short_tmp):
    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=1024)
    operator.send(command, archive)
    bad = bytearray(archive.read_bytes()[1024:2048])
    bad[10] ^= 0xFF
    operator.publish(operator.client, chunk_topic(command.update_id, 1), bytes(bad),
                     retain=True)
    # the command may have raced the corrupt chunk: publish it again under a new id
    command = make_update(archive, devices=[DEVICE], chunk_size=1024)
    for index in range(len(command.delivery.chunk_sha256)):
        chunk = archive.read_bytes()[index * 1024:(index + 1) * 1024]
        operator.publish(operator.client, chunk_topic(command.update_id, index),
                         bytes(bad) if index == 1 else chunk, retain=True)
    operator.send(command)
    failed = operator.wait_state(DEVICE, command.update_id, "failed", "confirmed", timeout=40)
    assert failed["state"] == "failed"
    assert "chunk 1 " in failed["detail"] and "sha256" in failed["detail"]
    assert _version(daemon) == "1.0"


def test_tampered_command_with_a_wrong_signature_is_rejected(device, operator, short_tmp):
    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=4096)
    envelope = sign(command.model_dump(mode="json"), operator.key)
    envelope["payload"] = envelope["payload"].replace('"2.0"', '"2.1"')
    operator.publish(operator.client, device_topics(DEVICE).ota_command,
                     json.dumps(envelope).encode())
    rejected = operator.wait_state(DEVICE, None, "rejected")
    assert "signature does not verify" in rejected["detail"]
    assert rejected["unverified"]["update_id"] == command.update_id
    assert rejected["unverified"]["version"] == "2.1" and "update_id" not in rejected
    assert _version(daemon) == "1.0"


def test_command_signed_by_an_unknown_key_is_rejected(device, operator, short_tmp):
    daemon = device()
    _, stranger = generate_signing_key(short_tmp / "stranger", "mallory")
    stranger_key = load_private_key(short_tmp / "stranger" / "mallory.ed25519")
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=4096)
    operator.send(command, archive, key=stranger_key)
    rejected = operator.wait_state(DEVICE, None, "rejected")
    assert "unknown key" in rejected["detail"]
    assert _version(daemon) == "1.0"


def test_bundle_whose_hash_differs_from_the_signed_one_fails(device, operator, short_tmp):
    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=4096)
    command = command.model_copy(update={"sha256": "0" * 64})
    operator.send(command, archive)
    failed = operator.wait_state(DEVICE, command.update_id, "failed")
    assert failed["detail"].startswith("downloading:") and "does not match" in failed["detail"]
    assert _version(daemon) == "1.0"


def _push_archive(operator: Operator, archive: Path):
    command = make_update_unchecked(archive, devices=[DEVICE])
    operator.send(command, archive)
    return command


def make_update_unchecked(archive: Path, *, devices, model: str = MODEL, version: str = "2.0",
                          **fields) -> UpdateCommand:
    """A correctly signed command for an archive that may not even be a bundle."""
    return UpdateCommand(update_id=f"u-{time.monotonic_ns()}", model=model, version=version,
                         sha256=hashlib.sha256(archive.read_bytes()).hexdigest(),
                         size=archive.stat().st_size,
                         delivery=MqttChunks(chunk_size=4096, chunk_sha256=tuple(
                             chunk_digests(archive, 4096))), devices=tuple(devices), **fields)


def test_truncated_bundle_fails_at_unpack(device, operator, short_tmp):
    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    truncated = short_tmp / "truncated.sightline"
    truncated.write_bytes(archive.read_bytes()[: archive.stat().st_size // 2])
    command = _push_archive(operator, truncated)
    failed = operator.wait_state(DEVICE, command.update_id, "failed")
    assert failed["detail"].startswith("downloaded:") and "damaged" in failed["detail"]
    assert _version(daemon) == "1.0"


def test_bundle_with_a_path_traversal_member_is_refused(device, operator, short_tmp):
    daemon = device()
    hostile = short_tmp / "hostile.sightline"
    with tarfile.open(hostile, "w:gz") as tar:
        payload = b"owned"
        info = tarfile.TarInfo("../../escaped.txt")
        info.size = len(payload)
        tar.addfile(info, io.BytesIO(payload))
    command = _push_archive(operator, hostile)
    failed = operator.wait_state(DEVICE, command.update_id, "failed")
    assert "refusing archive member '../../escaped.txt'" in failed["detail"]
    assert not list(short_tmp.rglob("escaped.txt"))
    assert _version(daemon) == "1.0"


def test_model_that_fails_to_load_is_not_activated(device, operator, short_tmp):
    daemon = device()
    broken = tiny_bundle(short_tmp / "v2", "2.0", onnx_bytes=b"not an onnx model at all")
    archive = operator.package_without_reference(broken)  # `push` would refuse it locally
    command = make_update(archive, devices=[DEVICE], chunk_size=4096)
    operator.send(command, archive)
    failed = operator.wait_state(DEVICE, command.update_id, "failed")
    assert failed["detail"].startswith("unpacked:") and "failed to load" in failed["detail"]
    assert _version(daemon) == "1.0"


def test_model_that_outputs_nan_fails_validation(device, operator, short_tmp):
    daemon = device()
    nan = tiny_bundle(short_tmp / "v2", "2.0", onnx_bytes=nan_model().SerializeToString())
    archive = operator.package_without_reference(nan)
    command = make_update(archive, devices=[DEVICE], chunk_size=4096)
    operator.send(command, archive)
    failed = operator.wait_state(DEVICE, command.update_id, "failed")
    assert failed["detail"].startswith("prepared:") and "NaN" in failed["detail"]
    assert _version(daemon) == "1.0"


def test_model_slower_than_its_budget_fails_validation(device, operator, short_tmp):
    daemon = device()
    command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE,
                            latency_budget_ms=0.001)
    failed = operator.wait_state(DEVICE, command.update_id, "failed")
    assert "exceeds the budget of 0.001 ms" in failed["detail"]
    assert _version(daemon) == "1.0"


def test_outputs_off_the_reference_fail_validation(device, operator, short_tmp):
    daemon = device()
    bundle = tiny_bundle(short_tmp / "v2", "2.0")
    inputs, _ = sample_feeds(bundle)
    engine = open_engine(bundle.onnx_path)
    outputs = engine.infer(inputs)
    engine.close()
    write_sample(bundle, inputs, {k: v + 0.5 for k, v in outputs.items()})  # wrong references
    manifest = bundle.manifest.model_copy(update={"sample": "sample.npz"})
    (bundle.directory / "manifest.json").write_text(manifest.model_dump_json())
    archive = pack_archive(Bundle(bundle.directory, manifest), short_tmp / "ref.sightline")
    command = make_update(archive, devices=[DEVICE], chunk_size=4096,
                          tolerance=Tolerance(atol=0.01, rtol=0.01))
    operator.send(command, archive)
    failed = operator.wait_state(DEVICE, command.update_id, "failed", "confirmed")
    assert failed["state"] == "failed"
    assert "differs from its reference by up to 0.5" in failed["detail"]
    assert _version(daemon) == "1.0"


def test_http_delivery_with_range_requests_updates_the_model(device, operator, short_tmp):
    from tests.cloud_sync.http_server import serve_bytes

    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    with serve_bytes({"/bundles/tiny-2.0.sightline": archive.read_bytes()}) as server:
        url = server.url("/bundles/tiny-2.0.sightline")
        command = make_update(archive, url=url, devices=[DEVICE])
        operator.send(command)
        done = operator.wait_state(DEVICE, command.update_id, "confirmed", "failed", timeout=40)
    assert done["state"] == "confirmed", operator.progress(DEVICE)
    assert _version(daemon) == "2.0"


def test_https_delivery_from_a_private_ca_named_in_the_config(device, operator, short_tmp):
    from tests.cloud_sync.http_server import make_tls_files, serve_bytes

    (short_tmp / "cdn").mkdir()
    tls = make_tls_files(short_tmp / "cdn")
    daemon = device(ota=f'http_ca_file = "{tls.ca}"\n')
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    with serve_bytes({"/tiny.sightline": archive.read_bytes()},
                     tls=tls.server_context()) as server:
        url = server.url("/tiny.sightline")
        assert url.startswith("https://")
        command = make_update(archive, url=url, devices=[DEVICE])
        operator.send(command)
        done = operator.wait_state(DEVICE, command.update_id, "confirmed", "failed", timeout=40)
    assert done["state"] == "confirmed", operator.progress(DEVICE)
    assert _version(daemon) == "2.0"


def test_rollback_command_serves_the_previous_version_again(device, operator, short_tmp):
    daemon = device()
    command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE)
    operator.wait_state(DEVICE, command.update_id, "confirmed")
    rollback = RollbackCommand(command_id="rb-1", model=MODEL, devices=(DEVICE,))
    operator.send(rollback)
    done = operator.wait_state(DEVICE, "rb-1", "rolled_back", "failed")
    assert done["state"] == "rolled_back" and done["serving"][MODEL] == "1.0"
    _wait_serving(daemon, "1.0")
    state = _store_state(short_tmp)
    assert _statuses(state) == {"2.0": "rejected", "1.0": "active"}
    assert state["versions"][0]["reason"] == "rolled back by command rb-1"


@pytest.mark.parametrize("step", ["accepted", "downloading", "downloaded", "unpacked",
                                  "prepared", "validated", "installed"])
def test_sigkill_before_activation_resumes_the_update_after_the_restart(
        device, operator, short_tmp, step, observer_factory, broker):
    daemon = device(env={FAILPOINT_ENV: f"ota:{step}"})
    command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE, chunk_size=1024)
    assert daemon.process.wait(30) == -signal.SIGKILL
    _assert_status_tells_the_truth_after_a_kill(operator, short_tmp, observer_factory, broker)
    daemon = device()
    done = operator.wait_state(DEVICE, command.update_id, "confirmed", "failed", "interrupted",
                               timeout=60)
    assert done["state"] == "confirmed", operator.progress(DEVICE, command.update_id)
    resumed = [d for d in operator.progress(DEVICE, command.update_id)
               if "resumed after a restart (try 2 of 3)" in d.get("detail", "")]
    assert [d["state"] for d in resumed] == ["accepted"]
    assert _version(daemon) == "2.0"
    assert _last_status(operator)["models"][MODEL]["version"] == "2.0"
    staging = short_tmp / "state" / "models" / ".staging"
    assert not staging.exists() or not any(staging.iterdir()), "staging left behind"


def _start_and_see_it_killed(device, env: dict) -> None:
    """Start a daemon whose resumed update kills it (maybe before it answered a ping)."""
    try:
        daemon = device(env=env)
    except RuntimeError as exc:  # died before its first answer
        assert "exited with -9" in str(exc), exc
        return
    assert daemon.process.wait(30) == -signal.SIGKILL


def test_an_update_that_kills_the_daemon_on_every_try_is_given_up_and_the_old_model_serves(
        device, operator, short_tmp):
    env = {FAILPOINT_ENV: "ota:validated"}  # as a model that crashes the process would
    daemon = device(env=env)
    command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE)
    assert daemon.process.wait(30) == -signal.SIGKILL
    for _ in range(2):  # tries 2 and 3, each after a restart
        _start_and_see_it_killed(device, env)
    daemon = device(env=env)
    interrupted = operator.wait_state(DEVICE, command.update_id, "interrupted", timeout=30)
    assert "on each of 3 tries" in interrupted["detail"]
    assert "tiny@1.0 serves" in interrupted["detail"]
    assert _version(daemon) == "1.0"


def test_a_clean_stop_during_the_download_pauses_the_update_and_the_restart_finishes_it(
        device, operator, short_tmp):
    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=1024)
    data = archive.read_bytes()
    count = len(command.delivery.chunk_sha256)
    for index in range(count // 2):  # only half the chunks are on the broker yet
        operator.publish(operator.client, chunk_topic(command.update_id, index),
                         data[index * 1024:(index + 1) * 1024], retain=True)
    operator.send(command)
    operator.wait_state(DEVICE, command.update_id, "downloading")
    time.sleep(1.0)
    assert daemon.stop(signal.SIGTERM) == 0, daemon.log
    assert "paused at step downloading by the shutdown" in daemon.log
    assert not {"failed", "interrupted"} & set(operator.states(DEVICE, command.update_id))
    daemon = device()
    for index in range(count // 2, count):
        operator.publish(operator.client, chunk_topic(command.update_id, index),
                         data[index * 1024:(index + 1) * 1024], retain=True)
    done = operator.wait_state(DEVICE, command.update_id, "confirmed", "failed", "interrupted",
                               timeout=60)
    assert done["state"] == "confirmed", operator.progress(DEVICE, command.update_id)
    # a clean stop is not a try that died: the resumed run is try 1 again
    assert any("resumed after a restart (try 1 of 3)" in d.get("detail", "")
               for d in operator.progress(DEVICE, command.update_id))
    assert _version(daemon) == "2.0"


def test_sigkill_right_after_activation_keeps_the_new_model_on_probation(
        device, operator, short_tmp, observer_factory, broker):
    daemon = device(env={FAILPOINT_ENV: "ota:active"})
    command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE)
    assert daemon.process.wait(30) == -signal.SIGKILL
    _assert_status_tells_the_truth_after_a_kill(operator, short_tmp, observer_factory, broker)
    daemon = device()
    resumed = operator.wait_state(DEVICE, command.update_id, "active", timeout=30)
    assert "restarted while this version was on probation" in resumed.get("detail", "") or \
        resumed["serving"][MODEL] == "2.0"
    operator.wait_state(DEVICE, command.update_id, "confirmed", timeout=30)
    assert _version(daemon) == "2.0"
    assert _last_status(operator)["models"][MODEL] == {"version": "2.0", "previous": "1.0",
                                                       "probation": False}


def _wait_resumed(operator: Operator, update_id: str, timeout: float = 30.0) -> dict:
    """The `active` a restarted daemon reports when it resumes a probation."""
    topic = device_topics(DEVICE).ota_progress

    def resumed(message) -> bool:
        document = json.loads(message.payload)
        return (message.topic == topic and document.get("update_id") == update_id
                and document.get("state") == "active"
                and "probation starts again" in document.get("detail", ""))

    messages = operator.observer.wait_for(lambda ms: any(map(resumed, ms)), timeout)
    return json.loads(next(m for m in messages if resumed(m)).payload)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_a_restart_during_probation_keeps_the_update_resumes_and_confirms_it(
        device, operator, short_tmp, sig):
    daemon = device(probation_s=60)
    command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE)
    operator.wait_state(DEVICE, command.update_id, "active")
    time.sleep(3)  # the window: 3-13 s after active, no client connected
    assert daemon.stop(sig) == (0 if sig == signal.SIGTERM else -signal.SIGKILL), daemon.log
    assert "rolled back" not in daemon.log, daemon.log
    if sig == signal.SIGTERM:
        assert "stopped cleanly" in daemon.log
    state = _store_state(short_tmp)
    assert state["active"] == "2.0" and state["probation"]["version"] == "2.0"
    assert state["probation"]["stopped_cleanly"] is (sig == signal.SIGTERM)
    assert "rolled_back" not in operator.states(DEVICE, command.update_id)

    daemon = device(probation_s=2)
    resumed = _wait_resumed(operator, command.update_id)
    # a clean stop is no crash: it does not count towards the crash loop
    restarts = 0 if sig == signal.SIGTERM else 1
    assert f"restart {restarts} of 2 allowed" in resumed["detail"]
    assert resumed["serving"] == {MODEL: "2.0"}
    done = operator.wait_state(DEVICE, command.update_id, "confirmed", "rolled_back")
    assert done["state"] == "confirmed", operator.progress(DEVICE, command.update_id)
    assert _version(daemon) == "2.0"
    state = _store_state(short_tmp)
    assert state["probation"] is None and _statuses(state) == {"1.0": "good", "2.0": "active"}


def test_a_model_that_hangs_in_the_engine_during_probation_is_rolled_back_as_stalled(
        device, operator, short_tmp):
    daemon = device(probation_s=60, ota="probation_stall_s = 1.5\n")
    hang = tiny_bundle(short_tmp / "v2", "2.0",
                       onnx_bytes=hang_on_white_model().SerializeToString())
    command = operator.push(hang, DEVICE)
    operator.wait_state(DEVICE, command.update_id, "active")
    time.sleep(3)  # idle on probation for twice the stall time: not a stall
    assert "rolled_back" not in operator.states(DEVICE, command.update_id)
    client = Client(daemon.endpoint, max_in_flight=1)
    try:
        assert client.wait_connected(10)
        client.send(np.full((64, 64, 3), 255, np.uint8))  # the frame the engine hangs on
        rolled = operator.wait_state(DEVICE, command.update_id, "rolled_back", "confirmed")
    finally:
        client.close()
    assert rolled["state"] == "rolled_back"
    assert "tiny@2.0 rolled back to 1.0 during probation: its pipeline stalled" in \
        rolled["detail"]
    assert rolled["serving"] == {MODEL: "1.0"}
    state = _store_state(short_tmp)
    assert _statuses(state) == {"2.0": "rejected", "1.0": "active"}
    assert "stalled" in state["versions"][0]["reason"] and state["probation"] is None
    status = json.loads(operator.observer.on(device_topics(DEVICE).status)[-1].payload)
    assert status["models"][MODEL] == {"version": "1.0", "previous": None, "probation": False}


def test_a_captured_command_published_again_is_rejected_as_a_replay(device, operator, short_tmp):
    daemon = device()
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=4096)
    envelope = json.dumps(sign(command.model_dump(mode="json"), operator.key)).encode()
    topic = device_topics(DEVICE).ota_command
    from cloud_sync.push import publish_chunks

    publish_chunks(operator.client, command, archive, operator.publish)
    operator.publish(operator.client, topic, envelope)
    operator.wait_state(DEVICE, command.update_id, "confirmed")
    daemon.stop(signal.SIGTERM)
    daemon = device()  # the seen ids survive a restart
    operator.publish(operator.client, topic, envelope)  # the captured bytes, again
    replay = operator.wait_state(DEVICE, None, "rejected")
    assert replay["check"] == "replay" and "accepted on this device before" in replay["detail"]
    assert replay["replay_of"]["update_id"] == command.update_id
    assert replay["command_sha256"] == hashlib.sha256(envelope).hexdigest()
    assert _version(daemon) == "2.0"
    assert operator.states(DEVICE, command.update_id).count("accepted") == 1


def test_an_expired_command_is_rejected_with_the_reason(device, operator, short_tmp):
    daemon = device(ota="max_command_age_s = 60\n")
    archive = operator.package(tiny_bundle(short_tmp / "v2", "2.0"))
    command = make_update(archive, devices=[DEVICE], chunk_size=4096).model_copy(
        update={"issued_at": time.time() - 3600})
    operator.send(command, archive)
    expired = operator.wait_state(DEVICE, command.update_id, "rejected")
    assert expired["check"] == "expired" and "ota.max_command_age_s (60 s)" in expired["detail"]
    assert _version(daemon) == "1.0"


def test_crash_loop_after_activation_rolls_back_to_the_last_good_model(
        device, operator, short_tmp, observer_factory, broker):
    daemon = device(probation_s=60)
    command = operator.push(tiny_bundle(short_tmp / "v2", "2.0"), DEVICE)
    operator.wait_state(DEVICE, command.update_id, "active")
    for _ in range(2):  # two restarts on probation are tolerated...
        daemon.stop(signal.SIGKILL)
        _assert_status_tells_the_truth_after_a_kill(operator, short_tmp, observer_factory,
                                                    broker)
        daemon = device(probation_s=60)
        assert _version(daemon) == "2.0"
    daemon.stop(signal.SIGKILL)  # ...the third is a crash loop
    daemon = device(probation_s=60)
    rolled = operator.wait_state(DEVICE, command.update_id, "rolled_back", timeout=30)
    assert "crash loop" in rolled["detail"]
    assert _version(daemon) == "1.0"
    # the version rolled back and rejected is not what the status names
    assert _last_status(operator)["models"][MODEL]["version"] == "1.0"
    state = _store_state(short_tmp)
    assert _statuses(state) == {"2.0": "rejected", "1.0": "active"}
    assert "crash loop" in state["versions"][0]["reason"]


def test_daemon_reports_telemetry_and_a_retained_status_with_its_model(
        broker, device, observer_factory):
    daemon = device()
    topics = device_topics(DEVICE)
    cloud = observer_factory(broker.port, [topics.telemetry, topics.status])
    with Client(daemon.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        for _ in range(40):
            client.send(frame_64())
            assert client.recv(timeout=10).ok
            time.sleep(0.02)

    def served(messages) -> bool:
        return any(m.topic == topics.telemetry and json.loads(m.payload)["frames"]["results"]
                   for m in messages)

    messages = cloud.wait_for(served, timeout=15)
    sample = next(json.loads(m.payload) for m in reversed(messages)
                  if m.topic == topics.telemetry)
    (model,) = sample["models"]
    assert (model["name"], model["version"]) == (MODEL, "1.0")
    assert model["latency_ms"]["total"]["p99"] > 0 and sample["frames"]["results"] >= 1
    assert sample["host"]["cpu_percent"] is not None and sample["host"]["memory_total_mb"] > 0
    assert assert_all_valid(messages) >= 2  # each telemetry sample and status: the schemas
    status = json.loads(next(m for m in messages if m.topic == topics.status).payload)
    assert status["state"] == "online" and status["groups"] == ["lab"]
    assert status["models"][MODEL] == {"version": "1.0", "previous": None, "probation": False}
