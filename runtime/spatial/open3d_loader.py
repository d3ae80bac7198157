"""The one place Open3D is imported, so every caller gets the same actionable error.

Open3D takes over a second to import and is optional: nothing imports it at module level.
"""

from __future__ import annotations

import functools
from types import ModuleType

from runtime.spatial.errors import SpatialUnavailable

INSTALL_HINT = (
    "pip install 'sightline[spatial]' (on Debian/Ubuntu Open3D also needs the system "
    "library libusb-1.0-0: apt-get install libusb-1.0-0)"
)


@functools.cache
def load_open3d() -> ModuleType:
    """Import Open3D once; call it at start-up to keep the import off the first frame."""
    try:
        import open3d
    except ImportError as error:  # a missing libusb-1.0.so.0 arrives as an ImportError too
        raise SpatialUnavailable(
            f"Open3D is needed for planes and oriented boxes but cannot be imported "
            f"({error}): {INSTALL_HINT}"
        ) from error
    # Open3D logs qhull precision warnings for every flat object's box fit: errors only.
    open3d.utility.set_verbosity_level(open3d.utility.VerbosityLevel.Error)
    return open3d
