"""The One Euro filter (Casiez, Roussel and Vogel, CHI 2012): a low-pass whose cutoff rises
with speed, so a still target stops jittering and a moving one does not lag.

Works element-wise on scalars or numpy arrays; `one_euro_step` is the batched core the
tracker runs over all its tracks at once. NaN means "not measured": such an element keeps
its previous value, and an element with no previous value starts at its measurement.
"""

from __future__ import annotations

import math

import numpy as np

ArrayLike = float | np.ndarray


def _alpha(cutoff: ArrayLike, dt: ArrayLike) -> ArrayLike:
    # The smoothing factor of a first-order low-pass at `cutoff` Hz sampled every `dt` s:
    # 1 / (1 + tau / dt) with tau = 1 / (2 pi cutoff).
    r = (2.0 * math.pi) * cutoff * dt
    return r / (r + 1.0)


def one_euro_step(x: np.ndarray, x_prev: np.ndarray, dx_prev: np.ndarray, dt: ArrayLike,
                  min_cutoff: ArrayLike, beta: ArrayLike,
                  d_cutoff: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(filtered value, filtered speed) after measuring `x`, `dt` seconds after the
    previous filtered value `x_prev` and speed `dx_prev`. All arguments broadcast, so rows
    of a (tracks, values) array may each have their own `dt` (shape (tracks, 1))."""
    dx = (x - x_prev) / dt
    dx_hat = dx_prev + _alpha(d_cutoff, dt) * (dx - dx_prev)
    x_hat = x_prev + _alpha(min_cutoff + beta * np.abs(dx_hat), dt) * (x - x_prev)
    missing, fresh = np.isnan(x), np.isnan(x_prev)
    if missing.any() or fresh.any():
        x_hat = np.where(missing, x_prev, np.where(fresh, x, x_hat))
        dx_hat = np.where(missing, dx_prev, np.where(fresh, 0.0, dx_hat))
    return x_hat, dx_hat


class OneEuroFilter:
    """One filter state for a scalar or an array of fixed shape.

    `min_cutoff` (Hz) sets the smoothing of a still target, `beta` (1 / value unit per
    second) how fast the cutoff rises with speed, `d_cutoff` (Hz) the smoothing of the speed
    estimate; each may be an array broadcasting to the value (different units per element).
    """

    def __init__(self, min_cutoff: ArrayLike = 1.0, beta: ArrayLike = 0.0,
                 d_cutoff: ArrayLike = 1.0) -> None:
        self.min_cutoff = min_cutoff
        self.beta = beta
        self.d_cutoff = d_cutoff
        self.reset()

    def reset(self) -> None:
        self._x: np.ndarray | None = None
        self._dx: np.ndarray | None = None
        self._t = 0.0

    def __call__(self, value: ArrayLike, timestamp_s: float) -> ArrayLike:
        """The filtered value for a measurement taken at `timestamp_s` (seconds, increasing).

        A timestamp not after the previous one changes nothing and returns the last value.
        """
        x = np.array(value, dtype=np.float64)
        if self._x is None:
            self._x, self._dx, self._t = x, np.zeros_like(x), timestamp_s
        elif timestamp_s > self._t:
            self._x, self._dx = one_euro_step(x, self._x, self._dx, timestamp_s - self._t,
                                              self.min_cutoff, self.beta, self.d_cutoff)
            self._t = timestamp_s
        return float(self._x) if self._x.ndim == 0 else self._x.copy()
