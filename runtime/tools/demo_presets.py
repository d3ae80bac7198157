"""`sightline demo --task hands|segment|emotion`: which built-in models, which cascade and
which frames each AR task is shown with. Names only: the CLI resolves them to bundles
(fetching and importing the pinned .tflite files the first time).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from runtime.config import CascadeSettings
from runtime.tools.demo_frames import DemoFrame, astronaut_sequence
from runtime.tools.hand_scene import draw_hand

# MediaPipe's palm -> hand crop (rect transformation: scale 2.6, shift -0.5 box heights,
# wrist -> middle-finger base upright) and, for ROI tracking, landmarks -> next crop.
HAND_CASCADE = CascadeSettings(on="palm-detection", run="hand-landmarks", margin=0.8,
                               shift_y=-0.5, rotate_from=(0, 2), track_roi=0.5,
                               roi_margin=0.5, roi_shift_y=-0.1, roi_rotate_from=(0, 9))
EMOTION_CASCADE = CascadeSettings(on="face-detection-short", run="emotion", margin=0.0)


def hand_sequence(count: int) -> list[DemoFrame]:
    """The synthetic hand drifting and turning slowly across the frame."""
    frames = []
    for i in range(count):
        phase = i / max(1, count - 1)
        image, _ = draw_hand(center=(260 + 120 * phase, 300 - 20 * phase),
                             angle_deg=-15 + 30 * phase)
        frames.append(DemoFrame(image))
    return frames


def astronaut_frames(count: int) -> list[DemoFrame]:
    return [DemoFrame(frame) for frame in astronaut_sequence(count)]


@dataclass(frozen=True)
class Preset:
    model: str
    cascades: tuple[CascadeSettings, ...]
    frames: Callable[[int], list[DemoFrame]]


PRESETS = {
    "hands": Preset("palm-detection", (HAND_CASCADE,), hand_sequence),
    "segment": Preset("selfie-segmentation", (), astronaut_frames),
    "emotion": Preset("face-detection-short", (EMOTION_CASCADE,), astronaut_frames),
}
