"""Hostile inputs, made from the real digit images: every accepted format in its awkward variants
(CMYK, 16-bit, palette, alpha, multi-frame, huge metadata, extreme shapes), the ways a file goes
wrong on the wire (truncated, bit-flipped, headers that lie about the size), and decompression bombs."""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable
from functools import cache

import numpy as np
from PIL import Image

from tests.images import FORMATS, as_png16, encode, one_per_class


def _cmyk_jpeg(img: Image.Image) -> bytes:
    return encode(img.convert("CMYK"), "JPEG", quality=95)


def _jpeg_with_huge_exif(img: Image.Image) -> bytes:
    exif = Image.Exif()
    exif[0x010E] = "x" * 60_000  # ImageDescription: the APP1 segment near its 64 kB ceiling
    exif[0x0112] = 1
    return encode(img, "JPEG", quality=95, exif=exif)


def _jpeg_with_huge_icc(img: Image.Image) -> bytes:
    # 1 MB of profile: Pillow splits it over ~16 APP2 segments; the service never interprets it.
    return encode(img.convert("RGB"), "JPEG", quality=95, icc_profile=bytes(range(256)) * 4096)


def _png_with_huge_icc(img: Image.Image) -> bytes:
    rng = np.random.default_rng(1)
    return encode(img, "PNG", icc_profile=rng.bytes(500_000))  # incompressible; under Pillow's 1 MB chunk cap


def _tiff_multiframe(img: Image.Image) -> bytes:
    frames = [img.rotate(90), img.convert("RGB")]
    return encode(img, "TIFF", save_all=True, append_images=frames, compression="tiff_deflate")


def _tiff_16bit(img: Image.Image) -> bytes:
    return encode(Image.open(io.BytesIO(as_png16(img))), "TIFF")


def _la_png(img: Image.Image) -> bytes:
    return encode(Image.merge("LA", (img, img)), "PNG")


def _animated_webp(img: Image.Image) -> bytes:
    return encode(img, "WEBP", save_all=True, append_images=[img.rotate(90)], duration=100, lossless=True)


def _stretched(size: tuple[int, int]) -> Callable[[Image.Image], bytes]:
    return lambda img: encode(img.resize(size, Image.Resampling.BILINEAR), "PNG")


# name -> encoder. Each must decode and be classified (200) when sent unmodified.
VALID: dict[str, Callable[[Image.Image], bytes]] = {
    **FORMATS,
    "jpeg-progressive": lambda img: encode(img, "JPEG", quality=90, progressive=True),
    "jpeg-cmyk": _cmyk_jpeg,
    "jpeg-huge-exif": _jpeg_with_huge_exif,
    "jpeg-huge-icc": _jpeg_with_huge_icc,
    "png-huge-icc": _png_with_huge_icc,
    "png-la": _la_png,
    "png-1bit": lambda img: encode(img.convert("1"), "PNG"),
    "png-1x1": lambda img: encode(img.resize((1, 1)), "PNG"),
    "png-1x20000": _stretched((1, 20_000)),
    "png-20000x1": _stretched((20_000, 1)),
    "gif-1x20000": lambda img: encode(img.resize((1, 20_000)).convert("P"), "GIF"),
    "webp-lossy": lambda img: encode(img, "WEBP", quality=80),
    "webp-animated": _animated_webp,
    "tiff-multiframe": _tiff_multiframe,
    "tiff-16bit": _tiff_16bit,
    "tiff-cmyk": lambda img: encode(img.convert("CMYK"), "TIFF"),
    "bmp-rgb": lambda img: encode(img.convert("RGB"), "BMP"),
    "ppm": lambda img: encode(img, "PPM"),
    "ico": lambda img: encode(img, "ICO", sizes=[(32, 32)]),
    "tga": lambda img: encode(img, "TGA"),
}


@cache
def valid_image(fmt: str, digit: int) -> bytes:
    return VALID[fmt](one_per_class()[digit][0])


# --- lying about the size -----------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _lie_png(data: bytes, w: int, h: int) -> bytes:
    """IHDR dimensions replaced, CRC recomputed: a well-formed header that lies."""
    ihdr = data[16:29]
    return data[:8] + _png_chunk(b"IHDR", struct.pack(">II", w, h) + ihdr[8:]) + data[33:]


def _jpeg_segments(data: bytes) -> list[tuple[int, int]]:
    """(offset, marker) of each segment before the entropy-coded data."""
    out, i = [], 2
    while i + 4 <= len(data) and data[i] == 0xFF:
        marker = data[i + 1]
        out.append((i, marker))
        if marker == 0xDA:  # start of scan: compressed data follows
            break
        i += 2 + struct.unpack(">H", data[i + 2:i + 4])[0]
    return out


def _lie_jpeg(data: bytes, w: int, h: int) -> bytes:
    """Every start-of-frame header (SOF0..SOF15 but DHT/JPG/DAC) declares w x h."""
    out = bytearray(data)
    for i, marker in _jpeg_segments(data):
        if 0xC0 <= marker <= 0xCF and marker not in (0xC4, 0xC8, 0xCC):
            out[i + 5:i + 9] = struct.pack(">HH", h, w)
    return bytes(out)


def _lie_gif(data: bytes, w: int, h: int) -> bytes:
    """Logical screen and first image descriptor both declare w x h."""
    out = bytearray(data)
    out[6:10] = struct.pack("<HH", w, h)
    i = data.find(b"\x2c\x00\x00\x00\x00")  # image separator at (0, 0), as Pillow writes the first frame
    if i > 0:
        out[i + 5:i + 9] = struct.pack("<HH", w, h)
    return bytes(out)


def _lie_bmp(data: bytes, w: int, h: int) -> bytes:
    out = bytearray(data)
    out[18:26] = struct.pack("<ii", w, h)
    return bytes(out)


def _lie_tiff(data: bytes, w: int, h: int) -> bytes:
    """ImageWidth (256) and ImageLength (257) of the first IFD, as LONGs."""
    out = bytearray(data)
    endian = "<" if data[:2] == b"II" else ">"
    ifd = struct.unpack(endian + "I", data[4:8])[0]
    (count,) = struct.unpack(endian + "H", data[ifd:ifd + 2])
    for k in range(count):
        e = ifd + 2 + 12 * k
        tag = struct.unpack(endian + "H", data[e:e + 2])[0]
        if tag in (256, 257):
            out[e + 2:e + 12] = struct.pack(endian + "HII", 4, 1, w if tag == 256 else h)
    return bytes(out)


LIARS: dict[bytes, Callable[[bytes, int, int], bytes]] = {
    b"\x89PNG": _lie_png,
    b"\xff\xd8": _lie_jpeg,
    b"GIF8": _lie_gif,
    b"BM": _lie_bmp,
    b"II*\x00": _lie_tiff,
    b"MM\x00*": _lie_tiff,
}


def lie_about_size(data: bytes, w: int, h: int) -> bytes | None:
    """The same file with a header declaring w x h, or None for formats without a liar here."""
    for magic, liar in LIARS.items():
        if data.startswith(magic):
            return liar(data, w, h)
    return None


# --- bombs --------------------------------------------------------------------------------------


def bomb_jpeg(width: int = 50_000, height: int = 50_000) -> bytes:
    """A few hundred bytes of baseline JPEG whose SOF0 declares width x height."""
    return _lie_jpeg(encode(Image.new("L", (8, 8)), "JPEG"), width, height)


def bomb_gif(width: int = 50_000, height: int = 50_000) -> bytes:
    return _lie_gif(encode(Image.new("P", (1, 1)), "GIF"), width, height)


def bomb_tiff(width: int = 50_000, height: int = 50_000) -> bytes:
    return _lie_tiff(encode(Image.new("L", (1, 1)), "TIFF"), width, height)


def bomb_bmp(width: int = 50_000, height: int = 50_000) -> bytes:
    return _lie_bmp(encode(Image.new("L", (1, 1)), "BMP"), width, height)


def zeros_png(width: int, height: int, mode: str = "L") -> bytes:
    """A real, fully decodable black PNG of width x height, compressed about 1000:1 by deflate."""
    channels = {"L": 1, "RGBA": 4}[mode]
    row = b"\0" * (1 + width * channels)  # filter byte + pixels
    z = zlib.compressobj(9)
    idat = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 8, {"L": 0, "RGBA": 6}[mode], 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")


def bomb_ico(width: int = 9_000, height: int = 9_000) -> bytes:
    """An icon whose directory says 16x16 while its embedded PNG is width x height, fully decodable:
    the pixel count is known only once the icon is opened."""
    png = zeros_png(width, height)
    return struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png


def text_bomb_png(megabytes: int = 63) -> bytes:
    """A 32x32 digit PNG carrying `megabytes` zTXt chunks of 1 MB each (Pillow's per-chunk cap; 64 MB
    in all is its total cap): ~1 kB each on the wire, inflated by Pillow when it opens the file."""
    png = valid_image("png", 3)
    text = _png_chunk(b"zTXt", b"comment\0\0" + zlib.compress(b"\0" * (1024 * 1024 - 1), 9))
    return png[:33] + text * megabytes + png[33:]  # after IHDR, before IDAT
