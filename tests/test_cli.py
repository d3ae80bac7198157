"""The `sightline` command as a user runs it: help, import, info, ping, errors, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import onnx

from runtime.client import Client
from tests.conftest import SIGHTLINE
from tests.onnx_models import conv_pool_model


def run(*args: str, cwd: Path | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([*SIGHTLINE, *args], capture_output=True, text=True, cwd=cwd,
                          timeout=timeout)


def test_import_runtime_and_help_work_without_gpu_or_torch_packages():
    code = ("import sys, runtime, runtime.cli, runtime.daemon.server, runtime.client, exporters, "
            "devices, cloud_sync\n"
            "heavy = {'tensorrt', 'torch', 'pycuda', 'cuda', 'open3d'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
    done = run("--help")
    assert done.returncode == 0
    for command in ("serve", "import", "demo", "bench", "info", "ping", "fetch", "status",
                    "keys", "devices", "compile", "compare", "service"):
        assert command in done.stdout


def test_every_command_has_help():
    for command in ("serve", "import", "demo", "bench", "info", "ping", "fetch", "status",
                    "keys", "devices", "compile", "compare", "service"):
        done = run(command, "--help")
        assert done.returncode == 0, done.stderr
        assert "Usage: " in done.stdout


def test_import_writes_a_bundle_and_an_archive_that_info_verifies(tmp_path: Path):
    model_path = tmp_path / "net.onnx"
    onnx.save(conv_pool_model(), model_path)
    done = run("import", str(model_path), "--task", "raw", "--name", "net", "--version", "2",
               "--out", str(tmp_path / "net"), "--archive")
    assert done.returncode == 0, done.stderr
    assert "repaired: made input dims dynamic" in done.stdout
    archive = tmp_path / "net-2.sightline"
    assert archive.is_file()
    info = run("info", str(archive))
    assert info.returncode == 0, info.stderr
    manifest = json.loads(info.stdout.split("\n", 1)[1])
    assert manifest["name"] == "net" and manifest["version"] == "2"


def test_import_of_a_file_that_is_not_onnx_fails_with_one_clear_line(tmp_path: Path):
    bogus = tmp_path / "bogus.onnx"
    bogus.write_bytes(b"this is not a model")
    done = run("import", str(bogus), "--task", "face")
    assert done.returncode == 2
    assert "error:" in done.stderr and "not a readable ONNX model" in done.stderr
    assert "Traceback" not in done.stderr


def test_serve_with_a_bad_config_key_names_the_key_and_refuses_to_start(tmp_path: Path):
    config = tmp_path / "bad.toml"
    config.write_text("[server]\ndeadline_ms = -5\nmystery = 1\n")
    done = run("serve", "--config", str(config), timeout=60)
    assert done.returncode == 2
    (line,) = done.stderr.strip().splitlines()  # one line, however many errors
    assert "server.deadline_ms: got -5, expected greater than 0" in line
    assert "server.mystery: unknown key, expected one of endpoints, max_clients" in line


def test_import_help_shows_every_default_and_the_pad_value_flag():
    done = run("import", "--help")
    assert done.returncode == 0, done.stderr
    help_text = " ".join(done.stdout.split())  # undo click's wrapping
    for flag, default in [
        ("--color", "[default: rgb]"),
        ("--scale", "[default: face: 1; detect, raw, classify, segment, landmarks, ssd: 1/255]"),
        ("--mean", "[default: 0,0,0 (gray: 0)]"),
        ("--std", "[default: 1,1,1 (gray: 1)]"),
        ("--resize", "[default: face, classify, landmarks: stretch; detect, raw, segment, ssd: "
                     "letterbox]"),
        ("--pad-value", "[default: face, detect, raw, classify, landmarks: 114; segment, ssd: 0;"),
        ("--score", "[default: face, raw, segment, landmarks, ssd: 0.5; detect: 0.25; "
                    "classify: 0]"),
        ("--iou", "[default: face, ssd: 0.3; detect, raw, classify, segment, landmarks: 0.45]"),
        ("--fixed-size", "[default: dynamic spatial dims]"),
        ("--resize-to-source", "[default: none,"),
    ]:
        own_help = help_text.split(f" {flag} ", 1)[1].split(" --", 1)[0]  # up to the next flag
        assert default in own_help, (flag, own_help)
    for flag in ("--force", "--labels", "--output"):
        assert f" {flag} " in help_text


def test_a_bad_flag_value_prints_one_line_naming_the_flag(tmp_path: Path):
    model_path = tmp_path / "net.onnx"
    onnx.save(conv_pool_model(), model_path)
    done = run("import", str(model_path), "--task", "raw", "--mean", "0.5,0.5",
               "--out", str(tmp_path / "net"))
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "error: --mean: got 2 values 0.5,0.5, expected 3, one per channel of color rgb"]
    assert not (tmp_path / "net").exists()


def test_import_onto_an_existing_bundle_is_refused_without_force(tmp_path: Path, daemon_factory):
    model_path = tmp_path / "net.onnx"
    onnx.save(conv_pool_model(), model_path)
    out = tmp_path / "net"
    assert run("import", str(model_path), "--task", "raw", "--out", str(out)).returncode == 0
    served = daemon_factory("--model", str(out))
    before = (out / "manifest.json").read_text()

    refused = run("import", str(model_path), "--task", "raw", "--version", "2", "--out", str(out))
    assert refused.returncode == 2
    (line,) = refused.stderr.strip().splitlines()
    assert "already holds the bundle net@1" in line and "--force" in line
    assert (out / "manifest.json").read_text() == before

    forced = run("import", str(model_path), "--task", "raw", "--version", "2", "--out", str(out),
                 "--force")
    assert forced.returncode == 0, forced.stderr
    assert json.loads((out / "manifest.json").read_text())["version"] == "2"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net", "net.onnx"]  # no staging left
    # the daemon serving the replaced bundle carries on with the copy it loaded
    with Client(served.endpoint, max_in_flight=1) as client:
        assert client.wait_connected(10)
        assert client.send(np.zeros((64, 96, 3), np.uint8)) is not None
        reply = client.recv(10)
    assert reply is not None and reply.kind == "result", reply and reply.message
    assert reply.message["model_version"] == "1"


def test_import_never_replaces_a_directory_that_is_not_a_bundle(tmp_path: Path):
    model_path = tmp_path / "net.onnx"
    onnx.save(conv_pool_model(), model_path)
    precious = tmp_path / "photos"
    precious.mkdir()
    (precious / "holiday.jpg").write_bytes(b"jpeg")
    done = run("import", str(model_path), "--task", "raw", "--out", str(precious), "--force")
    assert done.returncode == 2
    assert "is not a bundle" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert (precious / "holiday.jpg").read_bytes() == b"jpeg"


def test_ping_names_the_endpoint_when_no_daemon_answers(short_tmp: Path):
    done = run("ping", f"ipc://{short_tmp}/nobody.sock", "--timeout", "0.3")
    assert done.returncode == 2
    assert "no daemon answered" in done.stderr


def test_ping_lists_models_of_a_running_daemon(daemon):
    done = run("ping", daemon.endpoint)
    assert done.returncode == 0, done.stderr
    assert "centerface@1.5.0" in done.stdout and "(default)" in done.stdout


def test_demo_draws_the_astronauts_face_and_prints_a_latency_table(tmp_path: Path,
                                                                   centerface_bundle):
    # 8 fps: slow enough that a busy CI machine still answers every frame
    done = run("demo", "--frames", "12", "--fps", "8", "--out", str(tmp_path / "out"),
               timeout=300)
    assert done.returncode == 0, done.stderr + done.stdout
    for column in ("p50 ms", "p95 ms", "p99 ms", "inference", "round trip"):
        assert column in done.stdout
    records = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").open()]
    assert len(records) == 12
    faces = [r["detections"] for r in records if r["detections"]]
    assert len(faces) >= 11  # every frame shows the face; one skipped frame is tolerated
    assert all(len(d[0]["landmarks"]) == 5 for d in faces)
    strip = cv2.imread(str(tmp_path / "out" / "strip.jpg"))
    assert strip is not None and strip.shape[0] > 0
    video = cv2.VideoCapture(str(tmp_path / "out" / "annotated.mp4"))
    assert int(video.get(cv2.CAP_PROP_FRAME_COUNT)) == 12
