"""`sightline bench` as a user runs it: the floor, every daemon configuration, the stage
breakdown, throughput and CPU per frame per client count, JPEG frames, the fast stand-in
engine and the JSON figures."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest

from exporters.onnx_import import ImportOptions, import_onnx
from runtime.config import load_config, tomllib
from runtime.models.bundle import Bundle, SizePolicy
from runtime.tools.bench import _config_with_fused, toml_text
from runtime.tools.fast_model import OUTPUT_NAME, fast_model_bytes
from tests.conftest import SIGHTLINE

WIDE = {**os.environ, "COLUMNS": "220"}  # no wrapped headers


def bench(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([*SIGHTLINE, "bench", "--samples", "5", "--seconds", "0.6", *args],
                          capture_output=True, text=True, timeout=timeout, env=WIDE)


def table_rows(out: str, first_cell: str) -> list[list[str]]:
    rows = []
    for line in out.splitlines():
        cells = [c.strip() for c in line.strip("│┃ ").split("│")]
        if cells and cells[0] == first_cell:
            rows.append(cells)
    return rows


def test_bench_prints_the_floor_beside_every_daemon_configuration_and_where_the_time_goes(
        centerface_bundle):
    done = bench("--model", str(centerface_bundle.directory))
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    paths = ("plain, fused off", "plain, fused auto", "curve, fused off", "curve, fused auto")
    for row in ("bare engine.infer", "floor", *paths, "over floor p50", "hand-over to the model",
                "engine", "output decode", "CPU ms/frame", "beyond engine ms"):
        assert row in out, row
    # the stage table has a column per server, and every one got its breakdown from its
    # reply stamps: no empty cells
    (stage_row,) = table_rows(out, "preprocess")
    assert len(stage_row) == 1 + 1 + len(paths) and "-" not in stage_row[1:]
    # throughput, p99 and CPU per frame for each path and client count
    for path in ("floor", *paths):
        counts = [row[1] for row in table_rows(out, path) if len(row) == 8]
        assert counts == ["1", "2"], path


def test_fast_model_jpeg_frames_and_client_counts_come_back_as_json(tmp_path: Path):
    figures_path = tmp_path / "bench.json"
    done = bench("--model", "fast", "--frame", "800x600", "--encoding", "jpeg",
                 "--clients", "1,3", "--fused", "off", "--json", str(figures_path))
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(figures_path.read_text())
    assert figures["model"]["name"] == "fast"
    assert figures["frame"]["encoding"] == "jpeg" and figures["frame"]["width"] == 800
    assert 0 < figures["frame"]["bytes"] < 800 * 600 * 3  # the JPEG, not the pixels
    assert set(figures["latency_ms"]) == {"bare engine.infer", "floor", "plain, fused off",
                                          "curve, fused off"}
    assert all(v["n"] == 5 for v in figures["latency_ms"].values())
    assert set(figures["stages_ms"]["plain, fused off"]) >= {"decode", "preprocess", "engine"}
    throughput = figures["throughput"]
    bare_cpu = throughput["bare engine"]["cpu_ms_per_inference"]
    assert bare_cpu > 0
    for path, rows in throughput["paths"].items():
        assert set(rows) == {"1", "3"}, path
        for row in rows.values():
            assert row["results_per_s"] > 0 and row["p99_ms"] >= row["p50_ms"] > 0
            # the daemon decodes a JPEG and preprocesses it per frame: more CPU than the
            # engine's own inference, and the column says by how much
            assert row["cpu_ms_per_frame"] > bare_cpu
            assert row["cpu_ms_beyond_engine"] == pytest.approx(row["cpu_ms_per_frame"]
                                                                - bare_cpu)


@pytest.mark.parametrize(("flag", "value", "says"), [
    ("--clients", "0,2", "--clients"), ("--clients", "one", "--clients"),
    ("--frame", "640by480", "WIDTHxHEIGHT"),
])
def test_bad_bench_options_are_one_line_errors(flag, value, says):
    done = subprocess.run([*SIGHTLINE, "bench", "--model", "fast", flag, value],
                          capture_output=True, text=True, timeout=120, env=WIDE)
    assert done.returncode == 2
    assert says in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_fast_stand_in_imports_as_a_raw_bundle_and_runs_in_onnx_runtime(tmp_path: Path):
    source = tmp_path / "fast.onnx"
    source.write_bytes(fast_model_bytes(640, 480))
    bundle = import_onnx(source, ImportOptions(task="raw", name="fast", size=SizePolicy(
        mode="fixed", width=640, height=480)), tmp_path / "fast").bundle
    assert Bundle.load(bundle.directory).manifest.task == "raw"
    session = ort.InferenceSession(str(bundle.onnx_path), providers=["CPUExecutionProvider"])
    image = np.random.default_rng(0).random((1, 3, 480, 640), dtype=np.float32)
    (features,) = session.run([OUTPUT_NAME], {bundle.manifest.input.name: image})
    assert features.shape == (1, 4, 60, 80)
    # an 8x8 average pool then a 1x1 convolution: the first cell mixes the first block's means
    weights = _initializer(bundle, "weights").reshape(4, 3)
    means = image[0, :, :8, :8].mean(axis=(1, 2))
    assert features[0, :, 0, 0] == pytest.approx(weights @ means, rel=1e-4)


def _initializer(bundle: Bundle, name: str) -> np.ndarray:
    import onnx
    from onnx import numpy_helper

    model = onnx.load(str(bundle.onnx_path))
    return next(numpy_helper.to_array(i) for i in model.graph.initializer if i.name == name)


def test_each_daemon_gets_the_users_config_with_its_fused_setting(tmp_path: Path):
    user = tmp_path / "user.toml"
    user.write_text('[server]\ninline_inference = "off"\n[engine]\nintra_op_threads = 1\n'
                    '[profiles.cpu]\nbackends = ["onnxruntime"]\n')
    for fused in ("off", "auto"):
        config = load_config(_config_with_fused(tmp_path, user, fused))
        assert config.engine.fused == fused and config.engine.intra_op_threads == 1
        assert config.server.inline_inference == "off"
        assert config.profiles == {"cpu": {"backends": ["onnxruntime"]}}
    assert load_config(_config_with_fused(tmp_path, None, "off")).engine.fused == "off"


def test_toml_text_reads_back_as_the_data_it_was_written_from():
    data = {"models": ["a b", 'quote"d'], "precision": "auto",
            "server": {"deadline_ms": 250.5, "max_clients": 3, "endpoints": ["ipc:///x"]},
            "engine": {"allow_spinning": False, "providers": []},
            "profiles": {"jetson-orin": {"precision": "int8"}, "cpu": {"workspace_mb": 0}},
            "cloud": {"tls": {"ca": "/etc/ca.pem"}, "groups": ["lab", "ünïcode"]}}
    assert tomllib.loads(toml_text(data)) == data
