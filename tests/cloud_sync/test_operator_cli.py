"""The operator's walk-through as a new user runs it: `sightline keys gen`, two daemons
with `serve --broker`, `sightline push` with a canary, `sightline fleet`, and a headset
(`sightline stream`) that sees the new version without a failed frame."""

from __future__ import annotations

import re
import signal
import stat
import subprocess
import time
from pathlib import Path

from cloud_sync.topics import GROUPS, Channel, fleet_filter, parse_topic
from runtime.models.bundle import Bundle, write_bundle
from tests.cloud_sync.wire import assert_all_valid
from tests.conftest import SIGHTLINE


def _run(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*SIGHTLINE, *args], capture_output=True, text=True, timeout=timeout)


def _new_version(bundle: Bundle, directory: Path, version: str) -> Bundle:
    manifest = bundle.manifest.model_copy(update={"version": version})
    return write_bundle(directory, manifest, bundle.onnx_path.read_bytes())


def test_operator_pushes_a_signed_model_with_a_canary_and_the_fleet_follows(
        broker, daemon_factory, centerface_bundle, short_tmp, observer_factory):
    # the cloud's view: every message of the walk-through must match docs/schemas/
    cloud = observer_factory(broker.port, [
        fleet_filter(Channel.STATUS), fleet_filter(Channel.TELEMETRY),
        fleet_filter(Channel.OTA_PROGRESS), fleet_filter(Channel.OTA_COMMAND),
        f"{GROUPS}/+/{Channel.OTA_COMMAND.value}"])
    keys = short_tmp / "signing"
    generated = _run("keys", "gen", "ops", "--dir", str(keys))
    assert generated.returncode == 0, generated.stderr
    private, public = keys / "ops.ed25519", keys / "ops.ed25519.pub"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600 and public.is_file()
    again = _run("keys", "gen", "ops", "--dir", str(keys))
    assert again.returncode == 2 and "already exists" in again.stderr

    config = short_tmp / "cloud.toml"
    config.write_text("[cloud]\ntelemetry_interval_s = 1\n[cloud.ota]\nprobation_s = 1\n")
    daemons = {}
    for device in ("edge-a", "edge-b"):
        daemons[device] = daemon_factory(
            "--config", str(config), "--broker", f"127.0.0.1:{broker.port}",
            "--device-id", device, "--group", "lab", "--state-dir", str(short_tmp / device),
            "--trusted-key", str(public), endpoint=f"ipc://{short_tmp}/{device}.sock")
    broker_flag = ("--broker", f"127.0.0.1:{broker.port}")
    time.sleep(2.5)  # first telemetry
    before = _run("fleet", "--once", "2", *broker_flag)
    assert before.returncode == 0, before.stderr
    assert "edge-a" in before.stdout and "edge-b" in before.stdout
    assert before.stdout.count("centerface@1.5.0") == 2 and "online" in before.stdout

    headset = subprocess.Popen([*SIGHTLINE, "stream", daemons["edge-b"].endpoint, "--fps", "10"],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        new = _new_version(centerface_bundle, short_tmp / "centerface-1.6.0", "1.6.0")
        pushed = _run("push", str(new.directory), "--to", "lab", "--canary", "edge-a",
                      "--soak", "1", "--key", str(private), *broker_flag)
        time.sleep(1.0)
    finally:
        headset.send_signal(signal.SIGINT)
        headset_out, _ = headset.communicate(timeout=30)
    assert pushed.returncode == 0, pushed.stdout + pushed.stderr
    out = pushed.stdout
    assert out.index("stage 1: canaries edge-a") < out.index("stage 2")
    assert "2 of 2 device(s) serve the new version" in out
    # edge-b got the command only after edge-a confirmed
    lines = out.splitlines()
    first_b = next(i for i, line in enumerate(lines) if line.startswith("edge-b"))
    confirmed_a = next(i for i, line in enumerate(lines)
                       if line.startswith("edge-a") and "confirmed" in line)
    assert confirmed_a < first_b
    assert headset.returncode == 0, headset_out
    # what README's walk-through says it prints: a line per version change, then the sum
    assert re.search(r"^frame 1: centerface@1\.5\.0$", headset_out, re.M), headset_out
    assert re.search(r"^frame \d+: centerface@1\.6\.0$", headset_out, re.M), headset_out
    assert re.search(r"^\d+ frames, \d+ results, failed: none; versions: "
                     r"centerface@1\.5\.0 -> centerface@1\.6\.0$", headset_out, re.M)
    assert "failed: none" in headset_out

    after = _run("fleet", "--once", "2.5", *broker_flag)
    assert after.stdout.count("centerface@1.6.0") >= 2, after.stdout
    assert "confirmed" in after.stdout
    seen = cloud.everything()
    channels = {parse_topic(m.topic).channel for m in seen}
    assert channels == {Channel.STATUS, Channel.TELEMETRY, Channel.OTA_PROGRESS,
                        Channel.OTA_COMMAND}, channels
    assert assert_all_valid(seen) > 10


def test_push_to_an_unknown_target_says_what_the_broker_knows(broker, short_tmp):
    keys = short_tmp / "signing"
    assert _run("keys", "gen", "ops", "--dir", str(keys)).returncode == 0
    result = _run("push", "centerface", "--to", "nowhere", "--key", str(keys / "ops.ed25519"),
                  "--broker", f"127.0.0.1:{broker.port}")
    assert result.returncode == 2
    assert "'nowhere' is neither a device nor a group" in result.stderr


def test_push_without_a_broker_names_the_address(short_tmp):
    keys = short_tmp / "signing"
    assert _run("keys", "gen", "ops", "--dir", str(keys)).returncode == 0
    result = _run("push", "centerface", "--to", "lab", "--key", str(keys / "ops.ed25519"),
                  "--broker", "127.0.0.1:9")
    assert result.returncode == 2
    assert "127.0.0.1:9" in result.stderr


def test_a_failing_canary_stops_the_rollout_before_the_rest_hears_of_it(
        broker, daemon_factory, short_tmp):
    from tests.cloud_sync.ota_harness import nan_model, tiny_bundle

    keys = short_tmp / "signing"
    assert _run("keys", "gen", "ops", "--dir", str(keys)).returncode == 0
    seed = tiny_bundle(short_tmp / "seed", "1.0")
    for device in ("edge-a", "edge-b"):
        daemon_factory("--model", str(seed.directory), "--broker", f"127.0.0.1:{broker.port}",
                       "--device-id", device, "--group", "lab",
                       "--state-dir", str(short_tmp / device),
                       "--trusted-key", str(keys / "ops.ed25519.pub"),
                       endpoint=f"ipc://{short_tmp}/{device}.sock")
    time.sleep(1.0)
    nan = tiny_bundle(short_tmp / "nan", "2.0", onnx_bytes=nan_model().SerializeToString())
    result = _run("push", str(nan.directory), "--to", "lab", "--canary", "edge-a",
                  "--no-reference", "--key", str(keys / "ops.ed25519"),
                  "--broker", f"127.0.0.1:{broker.port}")
    assert result.returncode == 1, result.stdout + result.stderr
    assert "canary failed, rollout stopped before the rest of the fleet" in result.stdout
    assert "edge-a failed: prepared: output 'features' has" in result.stdout
    assert "edge-b" not in result.stdout.split("stage 1")[1]
    fleet = _run("fleet", "--once", "2", "--broker", f"127.0.0.1:{broker.port}")
    assert fleet.stdout.count("tiny@1.0") == 2
