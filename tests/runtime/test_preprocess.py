"""Preprocessing: input sizes, resize transforms and inverses, colour, normalisation, buffers."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from runtime.daemon.decode import decode_pixels, jpeg_denominator
from runtime.models.bundle import InputSpec, Preprocess, SizePolicy
from runtime.models.preprocess import FrameTransform, Preprocessor, input_size, needed_scale
from runtime.protocol import FrameHeader

IDENTITY = dict(scale=1.0, mean=(0.0, 0.0, 0.0), std=(1.0, 1.0, 1.0))
IMAGENET = dict(scale=1.0 / 255.0, mean=(0.485, 0.456, 0.406), std=(0.229, 0.224, 0.225))


def fixed(width: int, height: int, layout: str = "NCHW") -> InputSpec:
    return InputSpec(name="image", layout=layout,
                     size=SizePolicy(mode="fixed", width=width, height=height))


def dynamic(layout: str = "NCHW", **size) -> InputSpec:
    return InputSpec(name="image", layout=layout, size=SizePolicy(mode="dynamic", **size))


def uniform(width: int, height: int, color: tuple[int, ...]) -> np.ndarray:
    if len(color) == 1:
        return np.full((height, width), color[0], dtype=np.uint8)
    return np.tile(np.array(color, dtype=np.uint8), (height, width, 1))


# -- input sizes ----------------------------------------------------------------------------


def test_fixed_size_ignores_the_frame_size():
    assert input_size(fixed(320, 192), 1920, 1080) == (320, 192)
    assert input_size(fixed(320, 192), 17, 3000) == (320, 192)


@pytest.mark.parametrize(
    ("multiple_of", "frame", "expected"),
    [
        (32, (640, 480), (640, 480)),
        (32, (500, 300), (512, 320)),
        (32, (641, 481), (672, 512)),
        (32, (10, 10), (32, 32)),
        (64, (500, 300), (512, 320)),
        (64, (100, 70), (128, 128)),
        (8, (101, 99), (104, 104)),
    ],
)
def test_dynamic_size_rounds_each_dim_up_to_the_multiple(multiple_of, frame, expected):
    assert input_size(dynamic(multiple_of=multiple_of), *frame) == expected


def test_dynamic_size_shrinks_large_frames_keeping_the_aspect():
    spec = dynamic(max_width=1920, max_height=1088)
    assert input_size(spec, 3840, 2160) == (1920, 1088)  # 1920x1080, height rounded up
    assert input_size(spec, 1000, 4000) == (288, 1088)  # 272x1088, width rounded up


@pytest.mark.parametrize("max_size", [(1920, 1088), (640, 640), (1280, 720)])
def test_dynamic_size_never_exceeds_the_maximum(max_size):
    # Widths like 2094 used to round 1920.0000000000002 up to 1952.
    max_w, max_h = max_size
    spec = dynamic(max_width=max_w, max_height=max_h)
    for width in range(max_w - 40, 3 * max_w, 7):
        for height in (max_h // 2, max_h + 1, 2 * max_h + 3):
            in_w, in_h = input_size(spec, width, height)
            assert in_w <= max_w and in_h <= max_h, (width, height, in_w, in_h)
            assert in_w % 32 == 0 and in_h % 32 == 0


# -- resize transforms ----------------------------------------------------------------------


def content_extent(tensor: np.ndarray, pad: float) -> tuple[int, int, int, int]:
    """(x1, y1, x2, y2) of the non-pad region of a 1-channel-or-more NCHW tensor."""
    content = np.any(tensor[0] != pad, axis=0)
    rows, cols = np.nonzero(content.any(axis=1))[0], np.nonzero(content.any(axis=0))[0]
    return int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1


@pytest.mark.parametrize(
    ("source", "model"),
    [
        ((200, 100), (64, 64)),  # exact ratio 0.32, pad top and bottom
        ((100, 200), (64, 64)),  # pad left and right
        ((500, 300), (512, 320)),  # 300 * 1.024 = 307.2 rounds to 307
        ((333, 777), (96, 64)),
        ((1280, 720), (640, 640)),
        ((2, 1000), (64, 64)),  # narrower than one model pixel
    ],
)
def test_letterbox_inverse_maps_the_content_edges_onto_the_source_edges(source, model):
    src_w, src_h = source
    pre = Preprocess(color="rgb", resize="letterbox", pad_value=114, **IDENTITY)
    tensor, transform = Preprocessor(fixed(*model), pre)(uniform(src_w, src_h, (200, 10, 60)),
                                                         "rgb")
    x1, y1, x2, y2 = content_extent(tensor, 114.0)
    sx, sy = transform.to_source(np.array([x1, x2], float), np.array([y1, y2], float))
    assert sx.tolist() == pytest.approx([0, src_w], abs=1e-9)
    assert sy.tolist() == pytest.approx([0, src_h], abs=1e-9)
    # The padding is split evenly (to within a pixel) and the aspect is kept.
    in_w, in_h = model
    assert abs(x1 - (in_w - x2)) <= 1 and abs(y1 - (in_h - y2)) <= 1
    assert x1 == 0 or y1 == 0


def test_letterbox_transform_values_for_a_wide_frame():
    transform = Preprocessor(fixed(640, 640), Preprocess())(uniform(1280, 720, (1, 2, 3)),
                                                            "bgr")[1]
    assert transform == FrameTransform(0.5, 0.5, 0.0, 140.0, 1280, 720, 640, 640)
    sx, sy = transform.to_source(np.array([0.0, 320.0, 640.0]), np.array([140.0, 320.0, 500.0]))
    assert sx.tolist() == [0.0, 640.0, 1280.0]
    assert sy.tolist() == [0.0, 360.0, 720.0]


def test_points_in_the_padding_clip_to_the_frame_edge():
    transform = FrameTransform(0.5, 0.5, 0.0, 140.0, 1280, 720, 640, 640)
    sx, sy = transform.to_source(np.array([-5.0, 700.0]), np.array([0.0, 640.0]))
    assert sx.tolist() == [0.0, 1280.0] and sy.tolist() == [0.0, 720.0]


def test_stretch_scales_each_axis_and_inverts_exactly():
    pre = Preprocess(resize="stretch", **IDENTITY)
    tensor, transform = Preprocessor(fixed(64, 64), pre)(uniform(100, 50, (9, 9, 9)), "rgb")
    assert transform == FrameTransform(0.64, 1.28, 0.0, 0.0, 100, 50, 64, 64)
    assert np.all(tensor == 9.0)  # no padding anywhere
    sx, sy = transform.to_source(np.array([0.0, 32.0, 64.0]), np.array([0.0, 16.0, 64.0]))
    assert sx.tolist() == pytest.approx([0.0, 50.0, 100.0])
    assert sy.tolist() == pytest.approx([0.0, 12.5, 50.0])


def test_transform_inverse_undoes_the_forward_map():
    rng = np.random.default_rng(1)
    transform = FrameTransform(0.37, 0.41, 3.0, 17.0, 1000, 700, 384, 320)
    xs, ys = rng.uniform(0, 1000, 50), rng.uniform(0, 700, 50)
    sx, sy = transform.to_source(xs * 0.37 + 3.0, ys * 0.41 + 17.0)
    np.testing.assert_allclose(sx, xs, rtol=0, atol=1e-9)
    np.testing.assert_allclose(sy, ys, rtol=0, atol=1e-9)


def test_transform_travels_as_input_size_scale_pad_and_an_affine_to_source_pixels():
    transform = FrameTransform(0.5, 0.25, 0.0, 140.0, 1280, 720, 640, 320)
    wire = transform.to_wire()
    assert wire == {"input": [640, 320], "scale": [0.5, 0.25], "pad": [0.0, 140.0],
                    "to_source": [2.0, 0.0, 0.0, 0.0, 4.0, -560.0]}
    assert FrameTransform.from_wire(wire, 1280, 720) == transform
    a, b, c, d, e, f = wire["to_source"]
    xs, ys = np.array([0.0, 320.0, 640.0]), np.array([140.0, 200.0, 320.0])
    np.testing.assert_allclose(transform.to_source(xs, ys),
                               (a * xs + b * ys + c, d * xs + e * ys + f))


def test_points_in_a_strided_grid_map_through_the_model_input():
    transform = FrameTransform(0.5, 0.5, 0.0, 140.0, 1280, 720, 640, 640)
    # a stride-4 map (160x160) of the 640x640 input: cell (35, 0) starts at model row 140
    sx, sy = transform.grid_to_source([0.0, 80.0, 160.0], [35.0, 80.0, 125.0], 160, 160)
    assert sx.tolist() == [0.0, 640.0, 1280.0] and sy.tolist() == [0.0, 360.0, 720.0]
    outside = transform.grid_to_source(0.0, 0.0, 160, 160, clip=False)
    assert float(outside[1]) == -280.0


@pytest.mark.parametrize(("source", "model"), [((630, 470), (640, 480)), ((500, 300), (512, 320)),
                                               ((300, 500), (256, 256))])
def test_warp_to_source_undoes_the_letterbox_of_a_smooth_image(source, model):
    src_w, src_h = source
    ys, xs = np.mgrid[0:src_h, 0:src_w]
    smooth = (100 + 80 * np.sin(xs / 37.0) * np.cos(ys / 23.0)).astype(np.uint8)
    pre = Preprocess(color="gray", mean=(0.0,), std=(1.0,), scale=1.0, resize="letterbox",
                     pad_value=0)
    tensor, transform = Preprocessor(fixed(*model), pre)(smooth, "gray")
    back = transform.warp_to_source(tensor)
    assert back.shape == (1, 1, src_h, src_w) and back.dtype == np.float32
    # bilinear there and back: within a couple of grey levels away from the edges
    np.testing.assert_allclose(back[0, 0, 2:-2, 2:-2], smooth[2:-2, 2:-2], atol=3)


def test_warp_to_source_keeps_class_maps_integer_with_nearest_cells():
    # an 8x4 frame at half size is 4x2 of a 4x6 input: rows 0-1 and 4-5 are padding
    transform = FrameTransform(0.5, 0.5, 0.0, 2.0, 8, 4, 4, 6)
    classes = np.arange(24, dtype=np.int64).reshape(6, 4)
    back = transform.warp_to_source(classes)
    assert back.dtype == np.int64 and back.shape == (4, 8)
    for dy in (0, 1):  # each content cell covers 2x2 source pixels
        for dx in (0, 1):
            assert back[dy::2, dx::2].tolist() == classes[2:4].tolist()


def test_frame_already_at_the_input_size_is_not_resized():
    image = np.random.default_rng(2).integers(0, 256, (64, 96, 3), dtype=np.uint8)
    tensor, transform = Preprocessor(fixed(96, 64), Preprocess(**IDENTITY))(image, "rgb")
    assert transform == FrameTransform(1.0, 1.0, 0.0, 0.0, 96, 64, 96, 64)
    np.testing.assert_array_equal(tensor[0], image.transpose(2, 0, 1))


def test_dynamic_letterbox_pads_to_the_rounded_size():
    tensor, transform = Preprocessor(dynamic(), Preprocess(**IDENTITY))(
        uniform(500, 300, (1, 1, 1)), "rgb")
    assert tensor.shape == (1, 3, 320, 512)
    assert (transform.pad_x, transform.pad_y) == (0.0, 6.0)


# -- colour ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("source_color", "model_color", "expected"),
    [
        ("bgr", "rgb", [30, 20, 10]),
        ("rgb", "bgr", [30, 20, 10]),
        ("bgr", "bgr", [10, 20, 30]),
        ("rgb", "rgb", [10, 20, 30]),
    ],
)
def test_channel_order_is_converted_to_the_models(source_color, model_color, expected):
    pre = Preprocess(color=model_color, **IDENTITY)
    tensor, _ = Preprocessor(fixed(8, 4), pre)(uniform(8, 4, (10, 20, 30)), source_color)
    assert tensor.shape == (1, 3, 4, 8)
    for channel, value in enumerate(expected):
        assert np.all(tensor[0, channel] == value)


@pytest.mark.parametrize("source_color", ["bgr", "rgb"])
def test_colour_frame_into_gray_model_uses_luma_of_the_right_channels(source_color):
    # B=10, G=20, R=30: luma 0.299 R + 0.587 G + 0.114 B = 21.85. Reading the channels in
    # the wrong order would give 18.15.
    pixel = (10, 20, 30) if source_color == "bgr" else (30, 20, 10)
    pre = Preprocess(color="gray", scale=1.0, mean=(0.0,), std=(1.0,))
    tensor, _ = Preprocessor(fixed(8, 4), pre)(uniform(8, 4, pixel), source_color)
    assert tensor.shape == (1, 1, 4, 8)
    assert np.all(tensor == 22.0)


def test_gray_frame_into_colour_model_fills_every_channel():
    tensor, _ = Preprocessor(fixed(8, 4), Preprocess(**IDENTITY))(uniform(8, 4, (77,)), "gray")
    assert tensor.shape == (1, 3, 4, 8)
    assert np.all(tensor == 77.0)


def test_gray_frame_into_gray_model_is_copied_as_is():
    image = np.random.default_rng(3).integers(0, 256, (12, 16), dtype=np.uint8)
    pre = Preprocess(color="gray", scale=1.0, mean=(0.0,), std=(1.0,))
    tensor, _ = Preprocessor(fixed(16, 12), pre)(image, "gray")
    np.testing.assert_array_equal(tensor, image[None, None].astype(np.float32))


# -- normalisation and layout ----------------------------------------------------------------


def reference(image_rgb: np.ndarray, scale: float, mean, std) -> np.ndarray:
    """(pixel * scale - mean) / std in float64, HWC."""
    return (image_rgb.astype(np.float64) * scale - np.array(mean)) / np.array(std)


@pytest.mark.parametrize("source_color", ["rgb", "bgr"])
def test_mean_std_scale_match_a_numpy_reference_nchw(source_color):
    image = np.random.default_rng(4).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    rgb = image if source_color == "rgb" else image[:, :, ::-1]
    tensor, _ = Preprocessor(fixed(80, 48), Preprocess(color="rgb", **IMAGENET))(
        image, source_color)
    assert tensor.dtype == np.float32 and tensor.shape == (1, 3, 48, 80)
    expected = reference(rgb, **IMAGENET).transpose(2, 0, 1)[None]
    np.testing.assert_allclose(tensor, expected, rtol=1e-6, atol=1e-6)


def test_mean_std_scale_match_a_numpy_reference_nhwc():
    image = np.random.default_rng(5).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    pre = Preprocess(color="bgr", scale=0.5, mean=(10.0, 20.0, 30.0), std=(2.0, 4.0, 8.0))
    tensor, _ = Preprocessor(fixed(80, 48, layout="NHWC"), pre)(image, "bgr")
    assert tensor.shape == (1, 48, 80, 3)
    expected = reference(image, 0.5, (10.0, 20.0, 30.0), (2.0, 4.0, 8.0))[None]
    np.testing.assert_allclose(tensor, expected, rtol=1e-6, atol=1e-6)


def test_gray_nhwc_tensor_has_one_trailing_channel():
    image = np.random.default_rng(6).integers(0, 256, (12, 16), dtype=np.uint8)
    pre = Preprocess(color="gray", scale=2.0, mean=(1.0,), std=(4.0,))
    tensor, _ = Preprocessor(fixed(16, 12, layout="NHWC"), pre)(image, "gray")
    assert tensor.shape == (1, 12, 16, 1)
    np.testing.assert_allclose(tensor[0, :, :, 0], (image * 2.0 - 1.0) / 4.0, rtol=1e-6)


def test_padding_is_normalised_like_pixels():
    pre = Preprocess(color="rgb", resize="letterbox", pad_value=114, **IMAGENET)
    tensor, _ = Preprocessor(fixed(64, 64), pre)(uniform(200, 100, (0, 0, 0)), "rgb")
    expected = (114 / 255 - np.array(IMAGENET["mean"])) / np.array(IMAGENET["std"])
    np.testing.assert_allclose(tensor[0, :, 0, 0], expected, rtol=1e-6, atol=1e-6)  # top pad
    np.testing.assert_allclose(tensor[0, :, 32, 32], -np.array(IMAGENET["mean"])
                               / np.array(IMAGENET["std"]), rtol=1e-6, atol=1e-6)  # black


def test_source_frame_is_not_modified():
    image = np.random.default_rng(7).integers(0, 256, (48, 80, 3), dtype=np.uint8)
    before = image.copy()
    Preprocessor(fixed(80, 48), Preprocess(**IMAGENET))(image, "bgr")
    np.testing.assert_array_equal(image, before)


# -- buffers --------------------------------------------------------------------------------


def test_consecutive_frames_get_different_buffers():
    # The engine may still be reading the previous tensor while the next one is built.
    preprocess = Preprocessor(fixed(32, 32), Preprocess(**IDENTITY))
    first, _ = preprocess(uniform(32, 32, (1, 1, 1)), "rgb")
    second, _ = preprocess(uniform(32, 32, (2, 2, 2)), "rgb")
    assert not np.shares_memory(first, second)
    assert np.all(first == 1.0) and np.all(second == 2.0)


def test_buffers_are_reused_in_steady_state():
    preprocess = Preprocessor(fixed(32, 32), Preprocess(**IDENTITY))
    tensors = [preprocess(uniform(32, 32, (i, i, i)), "rgb")[0] for i in range(4)]
    assert tensors[2] is tensors[0] and tensors[3] is tensors[1]


def test_each_input_size_gets_buffers_of_its_own_shape():
    preprocess = Preprocessor(dynamic(), Preprocess(**IDENTITY))
    small, _ = preprocess(uniform(64, 32, (1, 1, 1)), "rgb")
    large, _ = preprocess(uniform(128, 96, (2, 2, 2)), "rgb")
    assert small.shape == (1, 3, 32, 64) and large.shape == (1, 3, 96, 128)
    assert np.all(small == 1.0) and np.all(large == 2.0)


# -- decoding at a smaller scale: needed_scale and FrameTransform.for_source ------------------


@pytest.mark.parametrize(("spec", "resize", "frame", "expected"), [
    (fixed(640, 480), "letterbox", (1280, 720), 0.5),  # width limits: 640/1280
    (fixed(640, 480), "stretch", (1280, 720), 480 / 720),  # each axis alone: the larger
    (fixed(640, 480), "letterbox", (640, 480), 1.0),
    (fixed(640, 480), "letterbox", (320, 240), 1.0),  # upscaled: from the full frame
    (fixed(320, 320), "letterbox", (1920, 1080), 320 / 1920),
    (dynamic(), "stretch", (640, 480), 1.0),  # dynamic: the input follows the frame
    (dynamic(), "stretch", (3840, 2160), 1088 / 2160),  # shrunk to 1920x1088
    (dynamic(), "letterbox", (3840, 2160), 0.5),
])
def test_needed_scale_is_how_far_preprocessing_shrinks_the_frame_anyway(spec, resize, frame,
                                                                        expected):
    assert needed_scale(spec, Preprocess(resize=resize), *frame) == pytest.approx(expected)


@settings(max_examples=200, deadline=None)
@given(width=st.integers(8, 4000), height=st.integers(8, 4000),
       spec=st.sampled_from([fixed(640, 480), fixed(320, 320), fixed(96, 64), dynamic(),
                             dynamic(multiple_of=64, max_width=640, max_height=640)]),
       resize=st.sampled_from(["letterbox", "stretch"]))
def test_decoding_at_the_needed_scale_gives_the_model_the_same_input_and_no_upscaling(
        width, height, spec, resize):
    scale = needed_scale(spec, Preprocess(resize=resize), width, height)
    d = jpeg_denominator(scale)
    small_w, small_h = -(-width // d), -(-height // d)
    in_w, in_h = input_size(spec, width, height)
    assert input_size(spec, small_w, small_h) == (in_w, in_h)
    # what the resize makes of the smaller decode is no larger than the decode itself,
    # unless the full frame was upscaled too (d == 1)
    ratios = (in_w / small_w, in_h / small_h)
    ratio = min(ratios) if resize == "letterbox" else max(ratios)
    assert d == 1 or ratio <= 1.0 + 1e-9


def square_frame(width: int, height: int, box: tuple[int, int, int, int]) -> np.ndarray:
    frame = np.full((height, width, 3), 40, np.uint8)
    x1, y1, x2, y2 = box
    frame[y1:y2, x1:x2] = 230
    return frame


@pytest.mark.parametrize("spec", [fixed(320, 320), fixed(640, 480), dynamic()])
@pytest.mark.parametrize("resize", ["letterbox", "stretch"])
@pytest.mark.parametrize("denominator", [2, 4, 8])
def test_a_box_found_on_a_scaled_decode_maps_to_where_the_full_decode_puts_it(
        spec, resize, denominator):
    width, height, box = 1279, 721, (400, 200, 560, 296)  # odd sizes: the DCT rounds up
    data = cv2.imencode(".jpg", square_frame(width, height, box),
                        [cv2.IMWRITE_JPEG_QUALITY, 95])[1].tobytes()
    head = FrameHeader(seq=1, capture_ts=0.0, width=width, height=height, encoding="jpeg")
    pre = Preprocess(resize=resize, **IDENTITY)
    found = {}
    for d in (1, denominator):
        image, color = decode_pixels(head, data, 1.0 / d)
        tensor, transform = Preprocessor(spec, pre)(image, color)
        transform = transform.for_source(width, height)
        assert (transform.source_width, transform.source_height) == (width, height)
        ys, xs = np.nonzero(tensor[0, 0] > 135)  # the square's pixels in the model input
        corners = (np.array([xs.min(), xs.max() + 1.0]), np.array([ys.min(), ys.max() + 1.0]))
        sx, sy = transform.to_source(*corners)
        found[d] = np.array([sx[0], sy[0], sx[1], sy[1]])
    # where the full-size decode puts the box, within a model pixel of the scaled decode
    # (each model pixel is 1/scale source pixels) plus the DCT scaling's half pixel
    model_pixel = max(1.0 / transform.scale_x, 1.0 / transform.scale_y)
    assert np.abs(found[denominator] - found[1]).max() <= model_pixel + 0.5 * denominator
    assert np.abs(found[1] - np.array(box)).max() <= model_pixel + 0.5


def test_for_source_finds_the_dct_scale_from_the_rounded_up_size():
    # 641 pixels at 1/8 decode to 81: the scale is 1/8, not 81/641
    small = FrameTransform(0.5, 0.5, 0.0, 10.0, 81, 61, 40, 50)
    full = small.for_source(641, 481)
    assert full == FrameTransform(0.0625, 0.0625, 0.0, 10.0, 641, 481, 40, 50)
    sx, sy = full.to_source(np.array([0.0, 20.0]), np.array([10.0, 25.0]))
    assert sx.tolist() == [0.0, 320.0] and sy.tolist() == [0.0, 240.0]
    assert small.for_source(81, 61) is small  # a full-size decode needs nothing
    # a size no DCT scale gives is taken as a plain resize
    assert small.for_source(100, 61).scale_x == pytest.approx(0.5 * 81 / 100)


def test_for_source_keeps_the_wire_form_in_the_headers_pixels():
    small = FrameTransform(1.0, 1.0, 0.0, 60.0, 320, 180, 320, 320)  # 1280x720 at 1/4
    wire = small.for_source(1280, 720).to_wire()
    assert wire["scale"] == [0.25, 0.25] and wire["pad"] == [0.0, 60.0]
    assert wire["to_source"] == [4.0, 0.0, 0.0, 0.0, 4.0, -240.0]
