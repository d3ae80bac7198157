"""Where model-input pixels lie in the source frame: the preprocessor's resize/letterbox as
one small value, its wire form (the reply's `transform`), and the mapping of points and
spatial tensors back to source pixels.

Shared by the daemon (tasks, raw replies) and the client SDK, so it imports nothing of
ours and OpenCV only inside the one function that warps.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, slots=True)
class FrameTransform:
    """model_xy = source_xy * scale + pad; its inverse puts model outputs on the source frame.

    Coordinates are continuous, with (0, 0) the top-left corner of the top-left pixel (the
    protocol's convention): pixel (i, j) covers [j, j + 1) x [i, i + 1). OpenCV's resize
    maps pixel centres this way, so the relation is exact for the preprocessor's output.
    """

    scale_x: float
    scale_y: float
    pad_x: float
    pad_y: float
    source_width: int
    source_height: int
    input_width: int
    input_height: int

    def to_source(self, xs: np.ndarray, ys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Model-input pixels -> source pixels, clamped to the source frame."""
        # minimum/maximum, not np.clip: the same result at a third of the call overhead,
        # which is what counts for the handful of points a frame has.
        sx = np.minimum(np.maximum((xs - self.pad_x) / self.scale_x, 0), self.source_width)
        sy = np.minimum(np.maximum((ys - self.pad_y) / self.scale_y, 0), self.source_height)
        return sx, sy

    def affine(self) -> list[float]:
        """The 2x3 matrix, row-major, taking model-input pixels [x, y, 1] to source pixels."""
        # + 0.0: no pad must read 0.0, not the -0.0 that negating it gives
        return [1.0 / self.scale_x, 0.0, -self.pad_x / self.scale_x + 0.0,
                0.0, 1.0 / self.scale_y, -self.pad_y / self.scale_y + 0.0]

    def for_source(self, width: int, height: int) -> FrameTransform:
        """This transform, computed on a downscaled decode of a frame (source_width x
        source_height), re-expressed for the full-size frame of the same content, so replies
        stay in the pixels the request's header declares.

        A JPEG decoded at DCT scale 1/d (libjpeg-turbo) is ceil(width / d) pixels wide and
        small_x = full_x / d exactly, the last pixel covering what is left of the frame; the
        scale is found from that rounding, so a 641-pixel frame at 1/8 (81 pixels) maps by
        1/8, not by 81/641. Sizes no DCT scale explains are taken as a plain resize.
        """
        if (width, height) == (self.source_width, self.source_height):
            return self
        fx = _decode_scale(width, self.source_width)
        fy = _decode_scale(height, self.source_height)
        return FrameTransform(self.scale_x * fx, self.scale_y * fy, self.pad_x, self.pad_y,
                              int(width), int(height), self.input_width, self.input_height)

    def to_wire(self) -> dict[str, Any]:
        """The reply's `transform` map (docs/protocol.md §5.1.2)."""
        return {"input": [self.input_width, self.input_height],
                "scale": [self.scale_x, self.scale_y],
                "pad": [self.pad_x, self.pad_y],
                "to_source": self.affine()}

    @classmethod
    def from_wire(cls, wire: dict[str, Any], source_width: int,
                  source_height: int) -> FrameTransform:
        (in_w, in_h), (sx, sy), (px, py) = wire["input"], wire["scale"], wire["pad"]
        return cls(float(sx), float(sy), float(px), float(py), int(source_width),
                   int(source_height), int(in_w), int(in_h))

    def grid_to_source(self, xs, ys, grid_width: int, grid_height: int, *,
                       clip: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Points in a tensor's pixel grid -> source pixels.

        The grid (a tensor's last two dims, `grid_height` x `grid_width`) is taken to cover
        the model input evenly: a stride-4 map of a 640x480 input is a 160x120 grid. The
        centre of element [..., i, j] is the point (j + 0.5, i + 0.5).
        """
        mx = np.asarray(xs, dtype=np.float64) * (self.input_width / grid_width)
        my = np.asarray(ys, dtype=np.float64) * (self.input_height / grid_height)
        if clip:
            return self.to_source(mx, my)
        return (mx - self.pad_x) / self.scale_x, (my - self.pad_y) / self.scale_y

    def warp_to_source(self, tensor: np.ndarray) -> np.ndarray:
        """A spatial tensor (..., H, W) over the model input -> (..., h, w) over the source
        frame: the letterbox border cropped off, the rest resized to the source size.

        Bilinear for floating-point maps, nearest for integer and bool ones (class maps).
        """
        tensor = np.asarray(tensor)
        if tensor.ndim < 2:
            raise ValueError(f"a tensor of shape {tensor.shape} has no spatial (H, W) dims")
        grid_h, grid_w = tensor.shape[-2:]
        # Source pixel centre j -> grid coordinate with centres at integers: u = a*j + b.
        ax = self.scale_x * grid_w / self.input_width
        bx = (0.5 * self.scale_x + self.pad_x) * grid_w / self.input_width - 0.5
        ay = self.scale_y * grid_h / self.input_height
        by = (0.5 * self.scale_y + self.pad_y) * grid_h / self.input_height - 0.5
        out_w, out_h = self.source_width, self.source_height
        if tensor.dtype.kind != "f":
            cols = np.clip(np.floor(ax * np.arange(out_w) + bx + 0.5), 0, grid_w - 1).astype(int)
            rows = np.clip(np.floor(ay * np.arange(out_h) + by + 0.5), 0, grid_h - 1).astype(int)
            return tensor[..., rows[:, None], cols[None, :]]
        import cv2

        work = tensor.astype(np.float32, copy=False) if tensor.dtype != np.float64 else tensor
        planes = work.reshape(-1, grid_h, grid_w)
        matrix = np.array([[ax, 0.0, bx], [0.0, ay, by]])
        out = np.empty((planes.shape[0], out_h, out_w), dtype=work.dtype)
        for k, plane in enumerate(planes):
            out[k] = cv2.warpAffine(plane, matrix, (out_w, out_h),
                                    flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                    borderMode=cv2.BORDER_REPLICATE)
        return out.reshape(*tensor.shape[:-2], out_h, out_w).astype(tensor.dtype, copy=False)


# Denominators libjpeg-turbo's DCT scaling offers (it also has n/8 for n = 3, 5, 6, 7 and
# up-scaling; the daemon decodes at these only).
_DCT_DENOMINATORS = (1, 2, 4, 8)


def _decode_scale(full: int, small: int) -> float:
    """small / full, by the DCT scale whose ceil-rounded size is `small` where one is."""
    for d in _DCT_DENOMINATORS:
        if -(-full // d) == small:
            return 1.0 / d
    return small / full
