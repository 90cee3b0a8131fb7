"""Bytes -> the network's input, reproducing the exported model's evaluation preprocessing from its
metadata alone (the reference is ``model/preprocessing.py``; a test holds the two to 1e-6)."""

from __future__ import annotations

import io
import struct
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

from contract import ModelSpec
from service.errors import ImageTooLarge, InvalidImage

# Formats a client may send. An allowlist, because Pillow also opens formats that shell out
# (EPS runs Ghostscript) or that nobody photographs in.
FORMATS = ("JPEG", "PNG", "GIF", "WEBP", "BMP", "TIFF", "PPM", "ICO", "TGA")  # JPEG covers MPO
ICO_MAGIC = b"\0\0\1\0"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ICON_MAX_PIXELS = 256 * 512  # the format's largest frame, 256x256 (a DIB's height counts its mask too)


def icon_pixels(data: bytes) -> int:
    """The most pixels any frame of an icon declares in the frame's own header (PNG IHDR or DIB
    header). Pillow decodes an icon's frame while *opening* it, and the frame need not match the
    icon's directory (at most 256x256), so for icons the size check after ``Image.open`` is too late
    (docs/reliability.md#bugs-these-found)."""
    count = struct.unpack_from("<H", data, 4)[0] if len(data) >= 6 else 0
    most = 0
    for k in range(count):
        entry = 6 + 16 * k
        if entry + 16 > len(data):
            break
        (offset,) = struct.unpack_from("<I", data, entry + 12)
        frame = data[offset:offset + 24]
        if frame.startswith(PNG_MAGIC) and len(frame) >= 24:
            w, h = struct.unpack_from(">II", frame, 16)
        elif len(frame) >= 12 and frame[:4] == b"\x0c\0\0\0":  # BITMAPCOREHEADER: 16-bit sizes
            w, h = struct.unpack_from("<HH", frame, 4)
        elif len(frame) >= 12:  # BITMAPINFOHEADER and later: signed 32-bit (height counts the mask too)
            w, h = struct.unpack_from("<ii", frame, 4)
        else:
            continue
        most = max(most, abs(w) * abs(h))
    return most


# Small images for small model inputs are decoded on the event loop, where a hop to a thread costs more than
# the work; the rest go to the decode pool (docs/throughput.md#where-an-image-is-decoded).
INLINE_PIXELS = 128 * 128
# ...and only from bodies this small: opening inflates PNG metadata chunks, up to ~1000:1
# (docs/reliability.md#bugs-these-found).
INLINE_BYTES = 4096
# A lone request's baseline JPEG up to these sizes is decoded on the loop when its worker has nothing else to do:
# the hop to the pool and back costs more than the idle loop's time. Only baseline JPEG, whose decoding is linear in
# its bytes and pixels; a progressive file's scans may each revisit every block
# (docs/throughput.md#where-an-image-is-decoded).
IDLE_INLINE_BYTES = 2**18
IDLE_INLINE_PIXELS = 2**19
JPEG_MAGIC = b"\xff\xd8\xff"


@dataclass
class ImageHeader:
    image: Image.Image  # header read, pixels not yet decoded
    seconds: float


@dataclass
class ImageInput:
    x: np.ndarray  # (C, H, W): float32 normalised, or uint8 pixels for a model that normalises them itself
    decode_s: float
    preprocess_s: float


class Preprocessor:
    def __init__(self, spec: ModelSpec, max_pixels: int) -> None:
        self.spec = spec
        self.max_pixels = max_pixels
        mean = np.asarray(spec.preprocessing.mean, np.float32).reshape(-1, 1)
        std = np.asarray(spec.preprocessing.std, np.float32).reshape(-1, 1)
        # (C, 256): each channel's 8-bit values scaled and normalised once, by the float32 operations a pixel would go
        # through, so one lookup gives its pixels bit for bit (docs/throughput.md#small-images-by-table-2026-12-08).
        self.normalised = (np.arange(256, dtype=np.float32) / np.float32(255.0) - mean) / std
        self.channel = np.arange(len(mean)).reshape(-1, 1, 1)
        self.pixels_in = spec.input_dtype == "uint8"  # the graph scales and normalises (export --uint8-input)
        h, w = spec.input_size
        self.small_input = h * w <= INLINE_PIXELS
        Image.init()  # register every format plugin now, not on the first request (tens of ms)

    def inline(self, header: ImageHeader) -> bool:
        """Cheap enough to finish on the event loop: a small image for a model with a small input."""
        return self.small_input and header.image.width * header.image.height <= INLINE_PIXELS

    @staticmethod
    def opens_when_idle(data: bytes) -> bool:
        """A body an idle worker's loop may open, past the small images' bound: a JPEG's (its header is markers, read
        in time linear in its bytes) of at most ``IDLE_INLINE_BYTES``."""
        return INLINE_BYTES < len(data) <= IDLE_INLINE_BYTES and data.startswith(JPEG_MAGIC)

    def inline_when_idle(self, header: ImageHeader) -> bool:
        """Cheap and bounded enough to finish on an idle worker's loop, once opened: a baseline JPEG of at most
        ``IDLE_INLINE_PIXELS``."""
        img = header.image
        return (img.format == "JPEG" and not img.info.get("progressive")
                and img.width * img.height <= IDLE_INLINE_PIXELS)

    def open(self, data: bytes) -> ImageHeader:
        """Read the header only and check the declared size against the pixel limit: cheap, nothing
        is allocated for the pixels yet."""
        start = time.perf_counter()
        if data.startswith(ICO_MAGIC):
            pixels = icon_pixels(data)
            if pixels > self.max_pixels:
                raise ImageTooLarge(self.max_pixels)
            if pixels > ICON_MAX_PIXELS:  # not an icon: and it would be decoded here, on the event loop
                raise InvalidImage()
        try:
            img = Image.open(io.BytesIO(data), formats=FORMATS)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(self.max_pixels) from e
        except (UnidentifiedImageError, OSError, ValueError, SyntaxError, EOFError) as e:
            raise InvalidImage() from e
        w, h = img.size
        if w * h > self.max_pixels:  # from the header alone: nothing is allocated yet
            raise ImageTooLarge(self.max_pixels)
        if w < 1 or h < 1:
            raise InvalidImage()
        return ImageHeader(img, time.perf_counter() - start)

    def decode(self, img: Image.Image) -> Image.Image:
        """Decode the pixels (JPEGs at reduced scale)."""
        self.spec.preprocessing.draft(img)
        try:
            img.load()
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(self.max_pixels) from e
        except Exception as e:  # noqa: BLE001 - a broken file can make any decoder raise anything
            raise InvalidImage() from e
        return img

    def preprocess(self, img: Image.Image) -> np.ndarray:
        """The contract's steps (colour mode, resize) to uint8 (C, H, W), then normalised float32 unless the model
        takes the pixels."""
        pixels = self.spec.preprocessing.to_array(img)
        if self.pixels_in:
            return pixels
        if len(self.normalised) == 1:
            return self.normalised[0].take(pixels)  # the same lookup without fancy indexing's broadcast
        return self.normalised[self.channel, pixels]

    def finish(self, header: ImageHeader) -> ImageInput:
        """Decode and preprocess an image whose header was read."""
        t0 = time.perf_counter()
        img = self.decode(header.image)
        t1 = time.perf_counter()
        try:
            x = self.preprocess(img)
        except (OSError, ValueError) as e:  # e.g. an exotic mode Pillow cannot convert
            raise InvalidImage() from e
        return ImageInput(x, header.seconds + t1 - t0, time.perf_counter() - t1)

    def __call__(self, data: bytes) -> ImageInput:
        return self.finish(self.open(data))
