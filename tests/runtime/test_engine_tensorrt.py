"""The TensorRT engine's CPU-checkable parts (the GPU round trip is in
tests/exporters/test_tensorrt_build.py and bench/gpu_check.sh)."""

from __future__ import annotations

import subprocess
import sys

from runtime.engines.tensorrt import spec_shape


def test_dynamic_dimensions_read_as_unknown_like_onnxruntime_specs():
    # TensorRT's Dims mark a dynamic axis -1; TensorSpec's contract is None for unknown.
    assert spec_shape((-1, 3, -1, -1)) == (None, 3, None, None)
    assert spec_shape((1, 4, 120, 160)) == (1, 4, 120, 160)


def test_importing_the_backend_module_needs_neither_tensorrt_nor_cuda():
    code = ("import sys, runtime.engines.tensorrt, runtime.engines.tensorrt_target\n"
            "heavy = {'tensorrt', 'cuda', 'pycuda'} & set(sys.modules)\n"
            "assert not heavy, heavy")
    subprocess.run([sys.executable, "-c", code], check=True)
