"""The One Euro filter: a still target stops jittering, a moving one is not left behind.

Both are checked with the tracker's default parameters, in pixels (box corners) and in
metres (anchors), at 30 frames per second.

Lag, as measured here: the target steps from 0 to S between two frames, so the first
measurement at S is frame k. The lag is the smallest n >= 0 such that the filtered value at
frame k + n has covered at least 90% of the step (n = 0: on the step's own frame). It must
be at most 3 frames (100 ms), for every one of ten steps up and down in a noisy sequence.
"""

from __future__ import annotations

import numpy as np
import pytest

from runtime.spatial.one_euro import OneEuroFilter
from runtime.spatial.tracking import TrackerParams

FPS = 30.0
DEFAULTS = TrackerParams()
# (unit, jitter sigma, step size, min_cutoff, beta): a box corner jittering by a pixel and
# jumping 40 px (a quick head turn); an anchor jittering by 5 mm and jumping 20 cm.
UNITS = [
    ("pixels", 1.0, 40.0, DEFAULTS.pixel_min_cutoff, DEFAULTS.pixel_beta),
    ("metres", 0.005, 0.2, DEFAULTS.metre_min_cutoff, DEFAULTS.metre_beta),
]


def filtered(values: np.ndarray, min_cutoff: float, beta: float) -> np.ndarray:
    one_euro = OneEuroFilter(min_cutoff, beta, DEFAULTS.d_cutoff)
    return np.array([one_euro(v, i / FPS) for i, v in enumerate(values)])


@pytest.mark.parametrize(("unit", "sigma", "step", "min_cutoff", "beta"), UNITS,
                         ids=[u[0] for u in UNITS])
def test_still_target_loses_at_least_80_percent_of_its_jitter_variance(
        unit, sigma, step, min_cutoff, beta):
    raw = 3.0 * step + np.random.default_rng(0).normal(0.0, sigma, 900)  # 30 s, standing still
    smooth = filtered(raw, min_cutoff, beta)
    settled = slice(30, None)  # after the first second
    assert smooth[settled].var() <= 0.2 * raw[settled].var()


@pytest.mark.parametrize(("unit", "sigma", "step", "min_cutoff", "beta"), UNITS,
                         ids=[u[0] for u in UNITS])
def test_step_is_followed_within_3_frames(unit, sigma, step, min_cutoff, beta):
    period = 60  # a step every 2 s, alternating up and down
    level = np.where((np.arange(11 * period) // period) % 2 == 1, step, 0.0)  # 10 steps
    raw = level + np.random.default_rng(1).normal(0.0, sigma, level.size)
    smooth = filtered(raw, min_cutoff, beta)
    lags = []
    for k in range(period, level.size, period):
        before, after = level[k - 1], level[k]
        covered = (smooth[k:k + period] - before) / (after - before)
        lags.append(int(np.argmax(covered >= 0.9)))
    assert max(lags) <= 3, lags


def test_vector_elements_are_independent_filters_with_their_own_units():
    rng = np.random.default_rng(2)
    values = np.cumsum(rng.normal(0.0, 1.0, (50, 2)), axis=0) * (1.0, 0.01)
    together = OneEuroFilter(min_cutoff=np.array([1.0, 2.0]), beta=np.array([0.05, 10.0]))
    pixels, metres = OneEuroFilter(1.0, 0.05), OneEuroFilter(2.0, 10.0)
    for i, (p, m) in enumerate(values):
        t = i / FPS
        assert np.allclose(together(np.array([p, m]), t), (pixels(p, t), metres(m, t)))


def test_unmeasured_elements_hold_and_new_ones_start_at_their_measurement():
    one_euro = OneEuroFilter(1.0, 0.0)
    one_euro(np.array([1.0, np.nan]), 0.0)
    held = one_euro(np.array([np.nan, 5.0]), 1 / FPS)
    assert held[0] == 1.0  # not measured: unchanged
    assert held[1] == 5.0  # first measurement: taken as is
    moved = one_euro(np.array([2.0, 6.0]), 2 / FPS)
    assert 1.0 < moved[0] < 2.0 and 5.0 < moved[1] < 6.0


def test_scalar_in_scalar_out_and_a_repeated_timestamp_changes_nothing():
    one_euro = OneEuroFilter(1.0, 0.0)
    assert one_euro(1.0, 0.0) == 1.0 and isinstance(one_euro(1.0, 0.0), float)
    first = one_euro(3.0, 1 / FPS)
    assert one_euro(100.0, 1 / FPS) == first  # same time: no update, no division by zero
    one_euro.reset()
    assert one_euro(7.0, 0.5) == 7.0
