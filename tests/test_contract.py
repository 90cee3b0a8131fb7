"""The contract's preprocessing steps and metadata: what each step does to an image, what a file may declare, and
that files of contract version 1 answer exactly as they did."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageOps

import contract
from contract import FLOAT_INK_MAX_PIXELS, ContractError, FitToContent, Preprocessing, fit_to_content, resize_size
from tests.images import encode, one_per_class, scene, with_transparency

IMAGENET_EVAL = Preprocessing((224, 224), "RGB", (0.485, 0.456, 0.406), (0.229, 0.224, 0.225),
                              resize_mode="shorter-side-crop", crop_fraction=0.875)
GOOD = {"labels": ["a", "b"], "input_size": [8, 8], "colour_mode": "L", "mean": [0.5], "std": [0.25],
        "resize": "bilinear"}


def canvas(size: tuple[int, int], box: tuple[int, int, int, int], mode: str = "L", ink: int | tuple = 255,
           paper: int | tuple = 0) -> Image.Image:
    """A ``size`` image of ``paper`` with a filled rectangle of ``ink`` over ``box`` (left, top, right, bottom),
    right and bottom exclusive."""
    img = Image.new(mode, size, paper)
    img.paste(ink, box)
    return img


def grid(w: int, h: int) -> Image.Image:
    """Every pixel different (its coordinates in two channels), so any offset or size change shows."""
    x, y = np.meshgrid(np.arange(w) % 256, np.arange(h) % 256)
    return Image.fromarray(np.stack([x, y, (x + y) % 256], axis=-1).astype(np.uint8), "RGB")


# --- resize modes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("input_size", "fraction", "want"),
    [
        pytest.param((224, 224), 0.875, (256, 256), id="torchvision-imagenet"),
        pytest.param((224, 224), 0.9, (248, 248), id="timm-floor"),  # 248.9: floored, not rounded
        pytest.param((32, 32), 1.0, (32, 32), id="no-margin"),
        pytest.param((24, 40), 0.8, (30, 50), id="non-square"),
    ],
)
def test_resize_size_follows_timm_floor_of_size_over_crop_fraction(input_size, fraction, want):
    assert resize_size(input_size, fraction) == want


@pytest.mark.parametrize(
    ("size", "resized", "box"),
    [
        # int(256 * 640 / 480) = 341 wide; left round(117 / 2) = 58 (half to even), top 16
        pytest.param((640, 480), (341, 256), (58, 16, 282, 240), id="landscape"),
        # int(256 * 643 / 480) = 342 wide; left round(118 / 2) = 59
        pytest.param((480, 643), (256, 342), (16, 59, 240, 283), id="portrait"),
        pytest.param((256, 256), (256, 256), (16, 16, 240, 240), id="square-no-resize"),
        pytest.param((100, 80), (320, 256), (48, 16, 272, 240), id="small-upscaled"),
    ],
)
def test_shorter_side_crop_is_torchvisions_resize_then_center_crop(size, resized, box):
    img = grid(*size)
    pre = IMAGENET_EVAL
    want = img.resize(resized, Image.Resampling.BILINEAR).crop(box)
    assert np.array_equal(pre.to_array(img), np.asarray(want).transpose(2, 0, 1))


def test_shorter_side_crop_of_an_extreme_aspect_ratio_resizes_only_the_window():
    """A 4000 x 10 image would become 102400 x 256 before the crop; the window alone is resized instead, within a
    grey level of the full resize."""
    img = grid(4000, 10)
    pre = IMAGENET_EVAL
    full = img.resize((102400, 256), Image.Resampling.BILINEAR).crop((51088, 16, 51312, 240))
    diff = np.abs(pre.to_array(img).astype(int) - np.asarray(full).transpose(2, 0, 1).astype(int))
    assert diff.max() <= 1, diff.max()


@pytest.mark.parametrize(
    ("size", "content"),
    [
        pytest.param((100, 50), (0, 8, 32, 24), id="landscape-bars-top-and-bottom"),
        pytest.param((30, 90), (10, 0, 21, 32), id="portrait-bars-left-and-right"),  # round(30 * 32 / 90) = 11 wide
        pytest.param((64, 64), (0, 0, 32, 32), id="square-no-padding"),
    ],
)
def test_pad_fits_the_whole_image_and_centres_it_on_the_background(size, content):
    img = Image.new("RGB", size, (10, 200, 30))
    pre = Preprocessing((32, 32), "RGB", (0.5,) * 3, (0.25,) * 3, resize_mode="pad", background=(255, 255, 255))
    out = np.asarray(pre.resized(img)).astype(int)
    left, top, right, bottom = content
    inside = np.zeros(out.shape[:2], bool)
    inside[top:bottom, left:right] = True
    assert (out[inside] == (10, 200, 30)).all() and (out[~inside] == 255).all()


def test_pad_of_a_thin_image_allocates_no_square():
    pre = Preprocessing((32, 32), "L", (0.5,), (0.25,), resize_mode="pad")
    assert pre.resized(Image.new("L", (1, 10**6), 255)).size == (32, 32)  # padded to a square first: 10^12 pixels


def test_stretch_is_the_default_and_distorts_the_aspect_ratio():
    pre = Preprocessing((32, 32), "RGB", (0.5,) * 3, (0.25,) * 3)
    img = grid(100, 50)
    assert pre.resize_mode == "stretch"
    want = img.resize((32, 32), Image.Resampling.BILINEAR)
    assert np.array_equal(pre.to_array(img), np.asarray(want).transpose(2, 0, 1))


# --- the background -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
def test_transparency_is_flattened_onto_the_declared_background(mode):
    img = with_transparency(scene(90, 60), mode)  # left third fully transparent
    white = Preprocessing((60, 90), "RGB", (0.5,) * 3, (0.25,) * 3, background=(255, 255, 255))
    grey = Preprocessing((60, 90), "L", (0.5,), (0.25,), background=(77,))
    assert (white.to_array(img)[:, :, :25] == 255).all()
    assert (grey.to_array(img)[:, :, :25] == 77).all()
    assert (Preprocessing((60, 90), "L", (0.5,), (0.25,)).to_array(img)[:, :, :25] == 0).all()  # black by default


def test_background_defaults_to_black_per_channel_and_reads_lists_as_tuples():
    assert Preprocessing((8, 8), "RGB", (0.5,) * 3, (0.25,) * 3).background == (0, 0, 0)
    assert Preprocessing((8, 8), "L", (0.5,), (0.25,), background=[9]).background == (9,)


# --- fit to content -------------------------------------------------------------------------------------------------


def test_fit_to_content_crops_to_ink_and_centres_it_in_a_square_with_margin():
    img = canvas((40, 30), (5, 3, 15, 23))  # ink 10 wide, 20 tall
    out = fit_to_content(img, 0, margin=0.1, threshold=32)
    assert out.size == (24, 24)  # 20 + 2 x round(0.1 x 20)
    assert out.getbbox() == (7, 2, 17, 22)  # (24 - 10) // 2 left, (24 - 20) // 2 top
    assert out.mode == "L"


def test_fit_to_content_returns_a_blank_image_unchanged():
    img = canvas((40, 30), (5, 3, 15, 23), ink=20)  # faint: within the threshold of the background
    assert fit_to_content(img, 0, margin=0.1, threshold=32) is img


def test_fit_to_content_ignores_pixels_within_threshold_of_background():
    img = canvas((40, 30), (5, 3, 15, 23))
    img.paste(32, (30, 25, 40, 30))  # differs by exactly the threshold: not ink
    assert fit_to_content(img, 0, margin=0.0, threshold=32).size == (20, 20)
    assert fit_to_content(img, 0, margin=0.0, threshold=31).size == (35, 35)  # now ink: the box reaches (40, 30)


def test_fit_to_content_finds_dark_ink_on_white_paper_in_rgb():
    img = canvas((50, 40), (10, 10, 20, 15), "RGB", ink=(200, 40, 40), paper=(255, 255, 255))
    out = fit_to_content(img, (255, 255, 255), margin=0.5, threshold=32)
    assert out.size == (20, 20)  # 10 + 2 x 5
    arr = np.asarray(out)
    assert (arr[0, 0] == 255).all() and tuple(arr[10, 10]) == (200, 40, 40)


def ink_box_by_definition(img: Image.Image, background: tuple[int, ...], threshold: int
                          ) -> tuple[int, int, int, int] | None:
    """The definition, pixel by pixel in numpy: where some channel differs from the background by more than the
    threshold."""
    arr = np.asarray(img, dtype=np.int16).reshape(img.height, img.width, -1)
    ink = (np.abs(arr - np.asarray(background, dtype=np.int16)) > threshold).any(axis=2)
    rows, cols = np.flatnonzero(ink.any(axis=1)), np.flatnonzero(ink.any(axis=0))
    return None if rows.size == 0 else (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1)


def assert_centred_without_margin(out: Image.Image, ink: Image.Image) -> None:
    """``out`` is the square of ``ink``'s longer side with ``ink`` in its centre (margin 0)."""
    side = max(ink.size)
    left, top = (side - ink.width) // 2, (side - ink.height) // 2
    assert out.size == (side, side), (ink.size, out.size)
    assert np.array_equal(np.asarray(out.crop((left, top, left + ink.width, top + ink.height))), np.asarray(ink))


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_fit_to_content_box_matches_the_pixelwise_definition_on_random_images(mode):
    rng = np.random.default_rng(7)
    channels = len(mode)
    for _ in range(300):
        h, w = (int(v) for v in rng.integers(1, 40, 2))
        background = tuple(int(v) for v in rng.integers(0, 256, channels))
        arr = np.broadcast_to(np.asarray(background, np.int16), (h, w, channels)).copy()
        for _ in range(int(rng.integers(0, 5))):  # a few pixels off the background, some within the threshold
            arr[rng.integers(0, h), rng.integers(0, w), rng.integers(0, channels)] += rng.integers(-90, 90)
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8).squeeze(axis=2) if channels == 1 else
                              arr.clip(0, 255).astype(np.uint8), mode)
        threshold = int(rng.integers(0, 255))
        box = ink_box_by_definition(img, background, threshold)
        out = fit_to_content(img, background if channels > 1 else background[0], margin=0.0, threshold=threshold)
        if box is None:
            assert out is img
            continue
        assert_centred_without_margin(out, img.crop(box))


@pytest.mark.parametrize("pixels", [FLOAT_INK_MAX_PIXELS, FLOAT_INK_MAX_PIXELS + 1024],
                         ids=["float-table", "row-and-column-extremes"])
def test_fit_to_content_box_matches_the_pixelwise_definition_either_side_of_the_float_table_bound(pixels):
    rng = np.random.default_rng(5)
    w, h = 1024, pixels // 1024
    # Bounds on either side: ink only above (background 0), only below (255, or 250 + 10 past 255), or both ways.
    for background, threshold in [(0, 32), (255, 40), (128, 0), (10, 20), (250, 10), (128, 127), (0, 254)] * 3:
        arr = np.full((h, w), background, np.int16)
        for _ in range(int(rng.integers(0, 4))):  # ink anywhere or none, some of it within the threshold
            arr[rng.integers(0, h), rng.integers(0, w)] += int(rng.integers(-255, 255))
        img = Image.fromarray(arr.clip(0, 255).astype(np.uint8), "L")
        box = ink_box_by_definition(img, (background,), threshold)
        out = fit_to_content(img, background, margin=0.0, threshold=threshold)
        if box is None:
            assert out is img
            continue
        assert_centred_without_margin(out, img.crop(box))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        pytest.param({"margin": -0.1}, "margin must be a number in", id="negative-margin"),
        pytest.param({"margin": 1.5}, "margin must be a number in", id="margin-above-one"),
        pytest.param({"margin": float("nan")}, "margin must be a number in", id="nan-margin"),
        pytest.param({"margin": "0.1"}, "margin must be a number in", id="string-margin"),
        pytest.param({"threshold": 255}, "threshold must be an integer in", id="threshold-nothing-passes"),
        pytest.param({"threshold": -1}, "threshold must be an integer in", id="negative-threshold"),
        pytest.param({"threshold": 3.5}, "threshold must be an integer in", id="fractional-threshold"),
        pytest.param({"threshold": True}, "threshold must be an integer in", id="bool-threshold"),
    ],
)
def test_fit_to_content_refuses_bad_parameters(kwargs, message):
    with pytest.raises(ContractError, match=message):
        FitToContent(**kwargs)
    with pytest.raises(ContractError, match=message):
        fit_to_content(Image.new("L", (4, 4)), 0, **{"margin": 0.1, "threshold": 32, **kwargs})


def test_fit_to_content_preprocessing_ignores_where_and_how_large_the_drawing_is():
    """The point of the step: a digit drawn small in a corner reads like one drawn large in the middle."""
    digit = one_per_class()[3][0]  # 32 x 32, white on black
    pre = Preprocessing((16, 16), "L", (0.5,), (0.25,), fit_to_content=FitToContent(margin=0.1, threshold=32))
    small = Image.new("L", (200, 120))
    small.paste(digit, (150, 70))
    large = Image.new("L", (100, 100))
    large.paste(digit.resize((64, 64), Image.Resampling.NEAREST), (20, 10))
    a, b = pre.to_array(small).astype(int), pre.to_array(large).astype(int)
    assert np.abs(a - b).mean() < 2, np.abs(a - b).mean()  # the same pixels, up to resampling
    plain = Preprocessing((16, 16), "L", (0.5,), (0.25,))
    assert np.abs(plain.to_array(small).astype(int) - plain.to_array(large).astype(int)).mean() > 20


def test_fit_to_content_of_a_long_thin_stroke_keeps_the_square_small():
    img = Image.new("L", (1, 200_000), 255)  # 200 kpx, whose square would be 200_000^2 pixels
    out = fit_to_content(img, 0, margin=0.1, threshold=32)
    assert out.width == out.height and out.width * out.height <= 4 * 200_000 + 2**20


def test_fit_to_content_metadata_round_trips_and_defaults_to_none():
    pre = Preprocessing((8, 8), "L", (0.5,), (0.25,), fit_to_content=FitToContent(margin=0.2, threshold=10))
    meta = pre.to_metadata()
    assert meta["fit_to_content"] == {"margin": 0.2, "threshold": 10}
    assert Preprocessing.from_metadata(meta) == pre
    assert Preprocessing.from_metadata(GOOD).fit_to_content is None
    assert Preprocessing.from_metadata({**GOOD, "fit_to_content": None}).fit_to_content is None


def test_fit_to_content_decodes_jpegs_in_full():
    """A drawing's ink may be a small part of the file: a reduced decode would lose its detail."""
    assert Preprocessing((32, 32), "L", (0.5,), (0.25,)).draft_size() == (32, 32)
    crop = Preprocessing((224, 224), "L", (0.5,), (0.25,), resize_mode="shorter-side-crop", crop_fraction=0.875)
    assert crop.draft_size() == (256, 256)
    assert Preprocessing((32, 32), "L", (0.5,), (0.25,), fit_to_content=FitToContent()).draft_size() is None


# --- what a file may declare ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        pytest.param({"contract_version": 4}, "contract version 4; this reader knows up to 3", id="newer-version"),
        pytest.param({"contract_version": "2"}, "contract_version must be a positive integer", id="version-string"),
        pytest.param({"contract_version": 0}, "contract_version must be a positive integer", id="version-zero"),
        pytest.param({"fit_to_content": {"margin": 0.1}}, "fit_to_content must be null or", id="fit-missing-key"),
        pytest.param({"fit_to_content": {"margin": 0.1, "threshold": 3, "x": 1}}, "fit_to_content must be null or",
                     id="fit-unknown-key"),
        pytest.param({"fit_to_content": True}, "fit_to_content must be null or", id="fit-bool"),
        pytest.param({"fit_to_content": {"margin": 2, "threshold": 3}}, "margin must be a number in",
                     id="fit-margin"),
        pytest.param({"resize_mode": "squash"}, "resize_mode must be one of", id="unknown-resize-mode"),
        pytest.param({"resize_mode": "shorter-side-crop"}, "needs crop_fraction in", id="crop-without-fraction"),
        pytest.param({"resize_mode": "shorter-side-crop", "crop_fraction": 0}, "needs crop_fraction in",
                     id="crop-fraction-zero"),
        pytest.param({"resize_mode": "shorter-side-crop", "crop_fraction": 1.2}, "needs crop_fraction in",
                     id="crop-fraction-above-one"),
        pytest.param({"resize_mode": "shorter-side-crop", "crop_fraction": "0.875"}, "needs crop_fraction in",
                     id="crop-fraction-string"),
        pytest.param({"crop_fraction": 0.875}, "crop_fraction applies only to resize_mode shorter-side-crop",
                     id="crop-fraction-with-stretch"),
        pytest.param({"background": [0, 0, 0]}, "background needs 1 integers in", id="background-channels"),
        pytest.param({"background": [256]}, "background needs 1 integers in", id="background-above-255"),
        pytest.param({"background": [0.5]}, "background needs 1 integers in", id="background-fraction"),
        pytest.param({"background": [True]}, "background needs 1 integers in", id="background-bool"),
        pytest.param({"background": "white"}, "background needs 1 integers in", id="background-string"),
        pytest.param({"background": 0}, "malformed preprocessing metadata", id="background-scalar"),
        pytest.param({"jpeg_luma": "true"}, "jpeg_luma must be true or false", id="jpeg-luma-string"),
        pytest.param({"jpeg_luma": 1}, "jpeg_luma must be true or false", id="jpeg-luma-int"),
        pytest.param({"jpeg_luma": None}, "jpeg_luma must be true or false", id="jpeg-luma-null"),
    ],
)
def test_from_metadata_refuses_bad_contract_metadata(meta, message):
    assert Preprocessing.from_metadata(GOOD) == Preprocessing((8, 8), "L", (0.5,), (0.25,), "bilinear",
                                                              jpeg_luma=False)
    with pytest.raises(ContractError, match=message):
        Preprocessing.from_metadata({**GOOD, **meta})


def test_read_spec_refuses_an_unknown_resize_mode():
    inputs = [contract.Tensor(contract.INPUT_NAME, "tensor(float)", ["N", 1, 8, 8])]
    outputs = [contract.Tensor(contract.LOGITS, "tensor(float)", ["N", 2])]
    with pytest.raises(ContractError, match="resize_mode must be one of"):
        contract.read_spec({**GOOD, "contract_version": 2, "resize_mode": "letterbox"}, inputs, outputs, name="m",
                           version="v")


def test_metadata_of_every_field_round_trips():
    pre = Preprocessing((24, 40), "RGB", (0.4, 0.5, 0.6), (0.2, 0.3, 0.4), "bicubic", "shorter-side-crop", 0.875,
                        (255, 250, 240), FitToContent(0.2, 16), jpeg_luma=False)
    meta = pre.to_metadata()
    assert {k: meta[k] for k in contract.PREPROCESSING_V2_KEYS + contract.PREPROCESSING_V3_KEYS} == {
        "resize_mode": "shorter-side-crop", "crop_fraction": 0.875, "background": [255, 250, 240],
        "fit_to_content": {"margin": 0.2, "threshold": 16}, "jpeg_luma": False}
    assert Preprocessing.from_metadata(meta) == pre


def test_metadata_of_contract_version_1_reads_as_stretch_onto_black():
    pre = Preprocessing.from_metadata({**GOOD, "contract_version": 1})
    assert (pre.resize_mode, pre.crop_fraction, pre.background, pre.fit_to_content) == ("stretch", None, (0,), None)
    assert pre.jpeg_luma is False


@pytest.mark.parametrize("version", [1, 2, 3])
def test_metadata_without_jpeg_luma_decodes_jpegs_in_colour_as_before_version_3(version):
    assert Preprocessing.from_metadata({**GOOD, "contract_version": version}).jpeg_luma is False
    assert Preprocessing.from_metadata({**GOOD, "contract_version": 3, "jpeg_luma": True}).jpeg_luma is True


def colour_jpeg(size: tuple[int, int] = (96, 64), mode: str = "RGB") -> bytes:
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    arr[: size[1] // 2] //= 4  # structure for the chroma to carry
    return encode(Image.fromarray(arr, "RGB").convert(mode), "JPEG", quality=90)


@pytest.mark.parametrize(
    ("data", "colour_mode", "jpeg_luma", "decoded_mode"),
    [
        pytest.param(colour_jpeg(), "L", True, "L", id="colour-jpeg-to-grey-model"),
        pytest.param(colour_jpeg(), "L", False, "RGB", id="colour-jpeg-before-version-3"),
        pytest.param(colour_jpeg(), "RGB", True, "RGB", id="colour-jpeg-to-colour-model"),
        pytest.param(colour_jpeg(mode="L"), "L", True, "L", id="grey-jpeg"),
        pytest.param(colour_jpeg(mode="CMYK"), "L", True, "CMYK", id="cmyk-jpeg-decoded-as-stored"),
        pytest.param(encode(Image.new("RGB", (40, 30), (200, 10, 10)), "PNG"), "L", True, "RGB", id="png"),
    ],
)
def test_draft_decodes_only_a_colour_jpegs_luma_for_a_grey_model(data, colour_mode, jpeg_luma, decoded_mode):
    channels = {"L": 1, "RGB": 3}[colour_mode]
    pre = Preprocessing((16, 16), colour_mode, (0.5,) * channels, (0.25,) * channels,
                        fit_to_content=FitToContent(), jpeg_luma=jpeg_luma)  # fit: a full-scale decode
    img = pre.draft(Image.open(io.BytesIO(data)))
    img.load()
    assert img.mode == decoded_mode and img.size == Image.open(io.BytesIO(data)).size, (img.mode, img.size)


@pytest.mark.parametrize("fit", [FitToContent(), None], ids=["full-scale", "reduced-scale"])
def test_luma_decode_differs_from_colour_then_convert_only_where_a_colour_clips(fit):
    """The luma the encoder stored against the same luma recomputed from decoded RGB, which clips saturated
    colours at 0 or 255: a photo-like scene's pixels agree but for a few grey levels on a fraction of them."""
    data = encode(scene(640, 480), "JPEG", quality=90)
    luma, colour = (Preprocessing((32, 32), "L", (0.5,), (0.25,), fit_to_content=fit, jpeg_luma=flag)
                    for flag in (True, False))
    before = np.asarray(colour.draft(Image.open(io.BytesIO(data))).convert("L")).astype(int)
    after = np.asarray(luma.draft(Image.open(io.BytesIO(data)))).astype(int)
    diff = np.abs(after - before)
    assert diff.max() <= 8 and (diff > 0).mean() < 0.01, (diff.max(), (diff > 0).mean())
    a, b = (np.asarray(p.resized(p.draft(Image.open(io.BytesIO(data))))).astype(int) for p in (luma, colour))
    assert np.abs(a - b).max() <= 2, np.abs(a - b).max()  # the network's input


def test_preprocessing_refuses_fit_to_content_that_is_not_one():
    with pytest.raises(ContractError, match="fit_to_content must be a FitToContent or None"):
        Preprocessing((8, 8), "L", (0.5,), (0.25,), fit_to_content={"margin": 0.1, "threshold": 32})


# --- contract version 1 answers as it did ---------------------------------------------------------------------------


def v1_pixels(img: Image.Image, meta: dict) -> np.ndarray:
    """Contract version 1's steps, frozen as they were written: EXIF, 16-bit scaled, transparency flattened onto
    black, converted, stretched to the input size; then normalised. Never edit this to make a test pass."""
    img = ImageOps.exif_transpose(img)
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        img = Image.fromarray((np.asarray(img, dtype=np.int64) >> 8).clip(0, 255).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = Image.alpha_composite(Image.new("RGBA", img.size, (0, 0, 0, 255)), img.convert("RGBA"))
    img = img.convert(meta["colour_mode"])
    h, w = meta["input_size"]
    if img.size != (w, h):
        img = img.resize((w, h), contract.RESIZE_FILTERS[meta["resize"]])
    arr = np.asarray(img, dtype=np.uint8)
    arr = (arr[:, :, None] if arr.ndim == 2 else arr).transpose(2, 0, 1)
    mean = np.asarray(meta["mean"], np.float32).reshape(-1, 1, 1)
    std = np.asarray(meta["std"], np.float32).reshape(-1, 1, 1)
    return (arr.astype(np.float32) / np.float32(255.0) - mean) / std


def v1_images() -> dict[str, bytes]:
    """Digits and photos in the forms a client sends: transparency, palettes, 16 bits, EXIF, large JPEGs."""
    rng = np.random.default_rng(1)
    photo = Image.fromarray(rng.integers(0, 256, (300, 500, 3), dtype=np.uint8), "RGB").resize((1000, 600))
    rgba = photo.convert("RGBA")
    rgba.putalpha(Image.linear_gradient("L").resize(photo.size))
    palette = photo.convert("P")
    palette.info["transparency"] = 0
    out = {f"digit-{y}": encode(img, "PNG") for img, y in one_per_class()}
    out |= {
        "photo-jpeg-large": encode(photo, "JPEG", quality=90),  # decoded at reduced scale by the service
        "photo-rgba-png": encode(rgba, "PNG"),
        "photo-la-png": encode(rgba.convert("LA"), "PNG"),
        "photo-palette-transparent-png": encode(palette, "PNG", transparency=0),
        "photo-16bit-png": encode(Image.fromarray(np.asarray(photo.convert("L"), np.uint16) * 257), "PNG"),
    }
    return out


def test_default_model_of_contract_version_1_answers_bit_identically(version_1_model):
    """A contract version 1 file (the committed model's weights, its metadata as version 1 wrote it) gets the same
    input tensor, and so the same logits, as the version 1 code gave it, through the service's own path."""
    from service.preprocessing import Preprocessor
    from service.runtime import Model
    from service.settings import Settings

    model = Model.load(Settings(model_path=version_1_model, device="cpu"))
    meta = model.spec.metadata
    assert meta["contract_version"] == 1
    service = Preprocessor(model.spec, max_pixels=10**8)
    for name, data in v1_images().items():
        img = Image.open(io.BytesIO(data))
        if img.format == "JPEG":
            img.draft(None, (max(meta["input_size"]),) * 2)  # version 1's reduced decode
        want = v1_pixels(img, meta)[None]
        got = service(data).x[None]
        assert got.tobytes() == want.tobytes(), name
        assert model.run(got).tobytes() == model.run(want).tobytes(), name
