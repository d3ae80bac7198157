"""Open3D is optional: the numpy parts work without it, the rest says how to install it."""

from __future__ import annotations

import subprocess
import sys

import pytest

from runtime.spatial import open3d_loader
from runtime.spatial.anchors import AnchorParams, compute_anchor
from runtime.spatial.errors import SpatialUnavailable
from runtime.spatial.planes import PlaneCache
from runtime.spatial.tracking import Tracker
from tests.runtime.spatial import scenes


def test_importing_the_spatial_layer_does_not_import_open3d():
    code = ("import sys\n"
            "import runtime.spatial.anchors, runtime.spatial.camera, runtime.spatial.one_euro\n"
            "import runtime.spatial.planes, runtime.spatial.tracking\n"
            "assert 'open3d' not in sys.modules, 'open3d imported at module level'\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stderr


@pytest.fixture
def no_open3d(monkeypatch):
    """Open3D as on a machine without it: `import open3d` raises ImportError."""
    monkeypatch.setitem(sys.modules, "open3d", None)
    open3d_loader.load_open3d.cache_clear()
    yield
    open3d_loader.load_open3d.cache_clear()


def test_anchors_and_tracking_work_without_open3d(no_open3d):
    frame = scenes.depth_frame(0)
    detection = scenes.detection_of(scenes.FACE, scenes.HOME)
    anchor = compute_anchor(frame, detection, AnchorParams(oriented_boxes=False))
    assert anchor.depth_m is not None and anchor.obb is None
    assert Tracker().update([detection], 0.0, [anchor])[0].track_id == 1


def test_planes_and_oriented_boxes_without_open3d_say_what_to_install(no_open3d):
    frame = scenes.depth_frame(0)
    with pytest.raises(SpatialUnavailable) as planes_error:
        PlaneCache().update(frame)
    with pytest.raises(SpatialUnavailable) as box_error:
        compute_anchor(frame, scenes.detection_of(scenes.FACE, scenes.HOME))
    for error in (planes_error, box_error):
        message = str(error.value)
        assert "pip install 'sightline[spatial]'" in message
        assert "libusb-1.0-0" in message
