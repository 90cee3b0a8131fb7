"""Real test images: scikit-learn digits rendered exactly as the default model was trained on them
(``model.data``, without torch: a test holds the two byte for byte), then saved in every format the
service accepts."""

from __future__ import annotations

import io
from functools import lru_cache

import numpy as np
from PIL import Image

from contract import Preprocessing

# The default model's data: 32x32 bilinear, 20% stratified validation split, seed 0 (``make model``).
IMAGE_SIZE, VAL_FRACTION, SPLIT_SEED, RESIZE = 32, 0.2, 0, "bilinear"


@lru_cache(maxsize=1)
def validation_digits() -> tuple[list[Image.Image], list[int]]:
    """The default model's validation images at 32x32 (8-bit, white ink on black) and their labels."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    pixels = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)  # ink counts 0..16 -> 0..255, (1797, 8, 8)
    _, val_idx = train_test_split(np.arange(len(digits.target)), test_size=VAL_FRACTION, stratify=digits.target,
                                  random_state=SPLIT_SEED)
    pre = Preprocessing((IMAGE_SIZE, IMAGE_SIZE), "L", (0.0,), (1.0,), RESIZE)
    val_idx = np.sort(val_idx)
    return [pre.resized(Image.fromarray(pixels[i], "L")) for i in val_idx], digits.target[val_idx].tolist()


def one_per_class() -> list[tuple[Image.Image, int]]:
    images, labels = validation_digits()
    seen: dict[int, Image.Image] = {}
    for img, y in zip(images, labels, strict=True):
        seen.setdefault(y, img)
    return [(seen[y], y) for y in sorted(seen)]


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


def as_png16(img: Image.Image) -> bytes:
    arr = np.asarray(img, dtype=np.uint16) * 257  # 0..255 -> 0..65535
    return encode(Image.fromarray(arr), "PNG")


def as_rgba_png(img: Image.Image) -> bytes:
    """Ink opaque white, background fully transparent: flattened onto black it is the digit again."""
    arr = np.asarray(img)
    rgba = np.stack([np.full_like(arr, 255)] * 3 + [arr], axis=-1)
    return encode(Image.fromarray(rgba, "RGBA"), "PNG")


def as_animated_gif(img: Image.Image) -> bytes:
    blank = Image.new("L", img.size, 0)
    return encode(img.convert("P"), "GIF", save_all=True, append_images=[blank.convert("P")], duration=100)


def as_exif_rotated_jpeg(img: Image.Image) -> bytes:
    """Stored rotated 90 degrees, with the EXIF orientation that tells a viewer to turn it back."""
    stored = img.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation 6: rotate 90 CW to display, undoing the CCW rotation above
    return encode(stored, "JPEG", quality=98, exif=exif)


FORMATS = {
    "png": lambda img: encode(img, "PNG"),
    "png-16bit": as_png16,
    "png-palette": lambda img: encode(img.convert("P"), "PNG"),
    "png-rgba-transparent": as_rgba_png,
    "jpeg": lambda img: encode(img, "JPEG", quality=98),
    "jpeg-rgb": lambda img: encode(img.convert("RGB"), "JPEG", quality=98),
    "jpeg-exif-rotated": as_exif_rotated_jpeg,
    "gif-animated": as_animated_gif,
    "webp-lossless": lambda img: encode(img, "WEBP", lossless=True),
    "bmp": lambda img: encode(img, "BMP"),
    "tiff": lambda img: encode(img, "TIFF"),
}


def bomb_png(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes whose header declares width x height pixels (IHDR patched, CRC fixed)."""
    import struct
    import zlib

    raw = encode(Image.new("L", (1, 1)), "PNG")
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    chunk = b"IHDR" + ihdr
    patched = struct.pack(">I", 13) + chunk + struct.pack(">I", zlib.crc32(chunk))
    return raw[:8] + patched + raw[8 + 25:]


def scene(w: int, h: int, seed: int = 0) -> Image.Image:
    """A photo-like RGB image: a sky gradient, a sun, hills and a house, with a little sensor noise; nothing is
    symmetric, so a crop or pad that lands a pixel off shows."""
    from PIL import ImageDraw

    y = np.linspace(0, 1, h)[:, None, None]
    sky = (np.array([70, 130, 220]) * (1 - y) + np.array([230, 200, 170]) * y) * np.ones((1, w, 1))
    img = Image.fromarray(sky.astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    draw.ellipse((0.7 * w, 0.1 * h, 0.85 * w, 0.1 * h + 0.15 * w), fill=(255, 230, 120))
    draw.polygon([(0, 0.7 * h), (0.3 * w, 0.5 * h), (0.65 * w, 0.72 * h), (w, 0.6 * h), (w, h), (0, h)],
                 fill=(60, 120, 50))
    draw.rectangle((0.15 * w, 0.55 * h, 0.35 * w, 0.8 * h), fill=(180, 60, 40))
    draw.rectangle((0.22 * w, 0.68 * h, 0.27 * w, 0.8 * h), fill=(40, 30, 20))
    noise = np.random.default_rng(seed).normal(0, 6, (h, w, 3))
    return Image.fromarray(np.clip(np.asarray(img) + noise, 0, 255).astype(np.uint8), "RGB")


def with_transparency(img: Image.Image, mode: str) -> Image.Image:
    """``img`` with its left third fully transparent and an alpha ramp across the rest, as RGBA, LA or a palette
    image with one transparent index."""
    alpha = np.tile(np.clip(np.linspace(-0.5, 1.0, img.width), 0, 1) * 255, (img.height, 1)).astype(np.uint8)
    if mode == "P":
        pal = img.convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
        arr = np.asarray(pal).copy()
        arr[:, : img.width // 3] = 255  # the transparent index
        out = Image.fromarray(arr, "P")
        out.putpalette(pal.getpalette())
        out.info["transparency"] = 255
        return out
    rgba = img.convert("RGBA")
    rgba.putalpha(Image.fromarray(alpha, "L"))
    return rgba.convert(mode)
