"""Real PyTorch models for the export tests, each built to make one behaviour checkable.

Weights that decide an outcome are set by hand and the rest come from a fixed seed, so
the tests can assert what a model computes (a detection, a shape) and not only that the
ONNX graph agrees with PyTorch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

STRIDE = 32
DETECTOR_LABELS = ("bright", "red")


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    # Default initialisation from our own seed, without moving the caller's RNG.
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        yield


class TinyDetector(nn.Module):
    """A YOLOv8-style single-scale detector: [N, 4 + 2, anchors], one anchor per 32x32 cell.

    A random-weight (seeded) conv backbone with BatchNorm feeds the head, but hand-set
    1x1 convs decide: class 0 ("bright") scores a cell's mean brightness, class 1 ("red")
    its redness, each through sigmoid(20 * cue - 10); boxes are the cell itself (cx, cy at
    the cell centre from an anchor grid built from the input's shape, w = h = 32, in
    input pixels). A white 32x32 square on a cell is therefore one "bright" box there with
    a score above 0.99, a red one a "red" box; black cells score below 0.01.
    Input: RGB scaled to 0..1 (the detect task's default preprocessing).
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        with _seeded(seed):
            def block(cin: int, cout: int, bn: bool) -> list[nn.Module]:
                return [nn.Conv2d(cin, cout, 3, 2, 1),
                        *([nn.BatchNorm2d(cout)] if bn else []), nn.SiLU()]

            self.backbone = nn.Sequential(*block(3, 8, True), *block(8, 16, True),
                                          *block(16, 16, False), *block(16, 16, False),
                                          *block(16, 16, False))
            for module in self.backbone:
                if isinstance(module, nn.BatchNorm2d):  # non-trivial statistics to fold
                    module.running_mean.uniform_(-0.2, 0.2)
                    module.running_var.uniform_(0.5, 1.5)
            self.cues = nn.Conv2d(3, 2, 1)
            self.pool = nn.AvgPool2d(STRIDE)
            self.cls = nn.Conv2d(16 + 2, len(DETECTOR_LABELS), 1)
            self.box = nn.Conv2d(16, 2, 1)
            nudge = 0.02 * torch.randn(len(DETECTOR_LABELS), 16)
        with torch.no_grad():
            # brightness = mean(R, G, B); redness = R - (G + B) / 2
            self.cues.weight.copy_(torch.tensor([[1 / 3, 1 / 3, 1 / 3], [1.0, -0.5, -0.5]])
                                   .view(2, 3, 1, 1))
            self.cues.bias.zero_()
            cls_weight = torch.zeros(len(DETECTOR_LABELS), 16 + 2)
            cls_weight[:, :16] = nudge  # the backbone moves logits by a few hundredths
            cls_weight[0, 16] = 20.0
            cls_weight[1, 17] = 20.0
            self.cls.weight.copy_(cls_weight.view(len(DETECTOR_LABELS), 16 + 2, 1, 1))
            self.cls.bias.fill_(-10.0)
            self.box.weight.zero_()
            self.box.bias.zero_()
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.backbone(x)
        cues = self.pool(self.cues(x))
        n, _, grid_h, grid_w = features.shape
        scores = torch.sigmoid(self.cls(torch.cat([features, cues], 1)))
        sizes = STRIDE * torch.exp(self.box(features))
        ys = (torch.arange(grid_h, dtype=x.dtype) + 0.5) * STRIDE
        xs = (torch.arange(grid_w, dtype=x.dtype) + 0.5) * STRIDE
        cy, cx = torch.meshgrid(ys, xs, indexing="ij")
        centres = torch.stack([cx, cy]).unsqueeze(0).expand(n, 2, grid_h, grid_w)
        return torch.cat([centres, sizes, scores], 1).flatten(2)


def tiny_detector() -> TinyDetector:
    return TinyDetector()


class SegmentAndClassify(nn.Module):
    """Two outputs by name: a mask at half resolution and image-level class logits."""

    def __init__(self, seed: int = 1, classes: int = 5) -> None:
        super().__init__()
        with _seeded(seed):
            self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.BatchNorm2d(8), nn.ReLU(),
                                      nn.Conv2d(8, 8, 3, 2, 1), nn.ReLU())
            self.mask_head = nn.Conv2d(8, 1, 1)
            self.classifier = nn.Linear(8, classes)
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        features = self.stem(x)
        mask = nn.functional.interpolate(self.mask_head(features), scale_factor=2.0,
                                         mode="bilinear", align_corners=False)
        pooled = features.mean(dim=(2, 3))
        return {"mask": torch.sigmoid(mask), "logits": self.classifier(pooled)}


def segment_and_classify() -> SegmentAndClassify:
    return SegmentAndClassify()


class HeightSpecialised(nn.Module):
    """Right at its export size, wrong at others: the way tracing breaks real models.

    `forward` branches in Python on the input's height. torch.export evaluates the
    condition at the traced size and keeps only that branch (the guard it records does
    not survive into ONNX), so the exported "mask" is multiplied by `off_size_gain` when
    eager PyTorch would not multiply it, on every input lower than `min_height`.
    "features" does not depend on the branch and stays right.
    """

    def __init__(self, off_size_gain: float = 0.5, min_height: int = 64, seed: int = 2) -> None:
        super().__init__()
        with _seeded(seed):
            self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.off_size_gain = off_size_gain
        self.min_height = min_height
        self.eval()

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        y = self.conv(x)
        mask = torch.sigmoid(y)
        if x.shape[-2] >= self.min_height:
            mask = mask * self.off_size_gain
        return {"features": torch.relu(y), "mask": mask}


def height_specialised() -> HeightSpecialised:
    return HeightSpecialised()


def height_specialised_by_one_percent() -> HeightSpecialised:
    return HeightSpecialised(off_size_gain=1.01)


@torch.library.custom_op("sightline_tests::wiggle", mutates_args=())
def wiggle(x: torch.Tensor) -> torch.Tensor:
    """A custom operator with no ONNX translation, as a vendor kernel would be."""
    return x.clone()


@wiggle.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class CustomOpNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, 1, 1)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return wiggle(self.conv(x))


def custom_op_net() -> CustomOpNet:
    return CustomOpNet()
