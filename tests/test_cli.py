"""The `sightline` command as a user runs it: help, import, info, ping, errors, demo."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import onnx

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
    assert "server.deadline_ms" in done.stderr and "server.mystery" in done.stderr


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
