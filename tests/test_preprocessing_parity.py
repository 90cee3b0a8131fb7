"""The service re-implements the model's evaluation preprocessing without torch: hold them equal, in every resize
mode, on digits and on photo-like images of every shape and format a client sends."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from contract import INPUT_NAME, LOGITS, FitToContent, ModelSpec, resize_size
from model.data import file_pixels
from model.preprocessing import Preprocessing
from service.preprocessing import Preprocessor
from tests.images import FORMATS, encode, one_per_class, scene, with_transparency


def spec_for(pre: Preprocessing) -> ModelSpec:
    return ModelSpec(name="t", version="0" * 12, labels=[str(i) for i in range(10)], input_name=INPUT_NAME,
                     output_name=LOGITS, preprocessing=pre)


def photo(w: int, h: int, mode: str = "RGB") -> Image.Image:
    rng = np.random.default_rng(w * h)
    arr = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    arr[: h // 2] //= 3  # some structure, so resizing has something to average
    return Image.fromarray(arr, "RGB").convert(mode)


def drawing(w: int, h: int) -> Image.Image:
    """A digit drawn small, off-centre, on a large dark page: a full decode's detail is all in a few pixels."""
    page = Image.new("L", (w, h), 10)
    page.paste(one_per_class()[4][0].resize((96, 96), Image.Resampling.BILINEAR), (w // 2, h // 5))
    return page


CASES = {
    **{f"digit-{name}": (lambda f=f: f(one_per_class()[7][0])) for name, f in FORMATS.items()},
    "rgb-jpeg-60x45": lambda: encode(photo(60, 45), "JPEG", quality=90),
    "rgba-png-50x70": lambda: encode(photo(50, 70, "RGBA"), "PNG"),
    "cmyk-jpeg": lambda: encode(photo(40, 40, "CMYK"), "JPEG"),
    "1x1-png": lambda: encode(photo(1, 1), "PNG"),
    "1x200-png": lambda: encode(photo(1, 200), "PNG"),
    "drawing-jpeg-900x700": lambda: encode(drawing(900, 700), "JPEG", quality=90),
    "landscape-jpeg-160x90": lambda: encode(scene(160, 90), "JPEG", quality=90),
    "portrait-png-75x130": lambda: encode(scene(75, 130, seed=1), "PNG"),
    "landscape-jpeg-1200x800": lambda: encode(scene(1200, 800, seed=2), "JPEG", quality=85),  # reduced decode
    "portrait-jpeg-700x1000": lambda: encode(scene(700, 1000, seed=3), "JPEG", quality=85),
    **{f"transparent-{m.lower()}-png": (lambda m=m: encode(with_transparency(scene(90, 60, seed=4), m), "PNG"))
       for m in ("RGBA", "LA", "P")},
    "transparent-gif": lambda: encode(with_transparency(scene(64, 48, seed=5), "P"), "GIF"),
}
RGB = ((0.49, 0.48, 0.45), (0.25, 0.24, 0.26))
WHITE = (255, 255, 255)


@pytest.mark.parametrize(
    "pre",
    [
        pytest.param(Preprocessing((32, 32), "L", (0.30566,), (0.323522,), "bilinear"), id="digits-L-bilinear"),
        pytest.param(Preprocessing((32, 32), "L", (0.30566,), (0.323522,), "bilinear", jpeg_luma=False),
                     id="digits-L-jpegs-in-colour"),  # files before contract version 3
        pytest.param(Preprocessing((24, 40), "RGB", (0.49, 0.48, 0.45), (0.25, 0.24, 0.26), "bicubic"),
                     id="rgb-bicubic"),
        pytest.param(Preprocessing((32, 32), "RGB", *RGB, background=WHITE), id="stretch-white-background"),
        *[pytest.param(Preprocessing(size, "RGB", *RGB, filt, "shorter-side-crop", fraction), id=f"crop-{name}")
          for name, size, filt, fraction in [
              ("0.875", (48, 48), "bilinear", 0.875), ("0.5", (32, 32), "bicubic", 0.5),
              ("1.0", (32, 32), "lanczos", 1.0), ("0.8-24x40", (24, 40), "bilinear", 0.8)]],
        pytest.param(Preprocessing((32, 32), "L", (0.5,), (0.25,), resize_mode="shorter-side-crop", crop_fraction=0.9,
                                   background=(200,)), id="crop-L-grey-background"),
        pytest.param(Preprocessing((32, 32), "RGB", *RGB, "bilinear", "pad", background=WHITE), id="pad-white"),
        pytest.param(Preprocessing((24, 40), "L", (0.5,), (0.25,), "bicubic", "pad", background=(128,)),
                     id="pad-24x40-grey"),
        pytest.param(Preprocessing((28, 28), "L", (0.13,), (0.31,), fit_to_content=FitToContent(0.2, 32)),
                     id="fit-to-content"),
        pytest.param(Preprocessing((28, 28), "RGB", *RGB, "bilinear", "pad", background=WHITE,
                                   fit_to_content=FitToContent(0.1, 40)), id="fit-to-content-rgb-on-white"),
    ],
)
@pytest.mark.parametrize("case", list(CASES))
def test_service_preprocessing_equals_model_eval_transform(pre, case):
    data = CASES[case]()
    want = pre.normalise(file_pixels(io.BytesIO(data), pre)).numpy()  # as training reads a folder's file
    service = Preprocessor(spec_for(pre), max_pixels=10**8)
    got = service(data).x
    assert got.shape == want.shape == (pre.channels, *pre.input_size)
    assert np.abs(got - want).max() <= 1e-6


@pytest.mark.parametrize("colour_mode", ["L", "RGB"])
def test_normalisation_by_table_equals_the_float32_arithmetic_bit_for_bit(colour_mode):
    channels = len(colour_mode)
    rng = np.random.default_rng(11)
    # every 8-bit value once in each channel, at the input size (nothing to resize)
    pixels = np.stack([rng.permutation(256).reshape(16, 16) for _ in range(channels)], axis=-1).astype(np.uint8)
    pre = Preprocessing((16, 16), colour_mode, *(((0.30566,), (0.323522,)) if channels == 1 else RGB))
    img = Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, colour_mode)
    got = Preprocessor(spec_for(pre), max_pixels=10**6).preprocess(img)
    mean = np.asarray(pre.mean, np.float32).reshape(-1, 1, 1)
    std = np.asarray(pre.std, np.float32).reshape(-1, 1, 1)
    want = (pixels.transpose(2, 0, 1).astype(np.float32) / np.float32(255.0) - mean) / std
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got, want)


@pytest.mark.parametrize(("size", "fraction"), [((32, 32), 0.5), ((48, 48), 0.875), ((24, 40), 0.3)])
def test_jpeg_reduced_decode_keeps_the_pixels_the_crop_resizes_from(size, fraction):
    """With shorter-side-crop the image is scaled to resize_size, larger than the input: decoding a JPEG at reduced
    scale down to the input size alone would leave too few pixels and upsample them."""
    pre = Preprocessing(size, "RGB", *RGB, resize_mode="shorter-side-crop", crop_fraction=fraction)
    need = max(resize_size(size, fraction))
    data = encode(scene(2 * need + 10, 2 * need + 20), "JPEG", quality=90)  # large enough for a 1/2 decode
    service = Preprocessor(spec_for(pre), max_pixels=10**8)
    img = service.decode(service.open(data).image)
    assert min(img.size) >= need, (img.size, need)
    assert img.size[0] < 2 * need + 10  # and it was reduced, or the case tests nothing
    want = pre.normalise(file_pixels(io.BytesIO(data), pre)).numpy()
    assert np.abs(service(data).x - want).max() <= 1e-6


@pytest.mark.parametrize(
    ("image_size", "input_size", "inline"),
    [
        pytest.param((32, 32), (32, 32), True, id="digit-for-resnet20"),
        pytest.param((128, 128), (32, 32), True, id="largest-inline-image"),
        pytest.param((129, 128), (32, 32), False, id="larger-image-to-pool"),
        pytest.param((32, 32), (224, 224), False, id="small-image-large-input-to-pool"),
    ],
)
def test_inline_decode_only_when_image_and_model_input_are_small(image_size, input_size, inline):
    """The event loop finishes only cheap images: resizing to a 224x224 input costs ms even from 32x32."""
    spec = spec_for(Preprocessing(input_size=input_size, colour_mode="RGB", mean=(0.5,) * 3, std=(0.25,) * 3))
    pre = Preprocessor(spec, 10**7)
    assert pre.inline(pre.open(encode(photo(*image_size), "PNG"))) is inline


@pytest.mark.parametrize(
    ("image_size", "fmt", "kwargs", "inline"),
    [
        pytest.param((640, 480), "JPEG", {}, True, id="baseline-jpeg"),
        pytest.param((1024, 512), "JPEG", {}, True, id="largest-baseline-jpeg"),
        pytest.param((1025, 512), "JPEG", {}, False, id="larger-jpeg-to-pool"),
        pytest.param((640, 480), "JPEG", {"progressive": True}, False, id="progressive-jpeg-to-pool"),
        pytest.param((640, 480), "PNG", {}, False, id="png-to-pool"),
    ],
)
def test_inline_when_idle_only_for_baseline_jpegs_within_the_pixel_bound(image_size, fmt, kwargs, inline):
    """An idle worker's loop finishes only what decodes in time linear in its size: a progressive JPEG's scans may
    each revisit every block, and a PNG's chunks inflate."""
    spec = spec_for(Preprocessing(input_size=(32, 32), colour_mode="L", mean=(0.5,), std=(0.25,)))
    pre = Preprocessor(spec, 10**7)
    assert pre.inline_when_idle(pre.open(encode(photo(*image_size), fmt, **kwargs))) is inline
