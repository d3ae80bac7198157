"""Errors of the spatial layer: bad spatial input from a client, and a missing Open3D."""

from __future__ import annotations

from runtime.errors import SightlineError


class SpatialError(SightlineError):
    """Spatial input (intrinsics, pose, depth frame) is unusable; the message says why."""


class SpatialUnavailable(SpatialError):
    """Open3D, which planes and oriented boxes need, cannot be imported."""
