"""Decoding and preprocessing one image, in process, as the service does it (``service.preprocessing``), for the
bench's single-image payloads (the PNG digit, the JPEG photos) and a model's preprocessing with and without
``jpeg_luma`` (alike for a PNG); for the JPEGs also the decode alone, with simplejpeg's beside Pillow's when it is
installed (it is not a dependency: pip install simplejpeg), each decode's pixels compared with Pillow's.

    python -m bench.decode --repeats 5

Each figure is the best of ``--repeats`` timings of a loop over the same bytes, in microseconds an image: the
decoder's own cost, which a 2-core machine's noise moves less than a whole request's.
"""

from __future__ import annotations

import argparse
import dataclasses
import io
import tempfile
import timeit
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from bench.run import ROOT, write_payloads
from contract import ModelSpec, Preprocessing
from service.preprocessing import Preprocessor
from service.runtime import Model
from service.settings import Settings


def pillow_decode(pre: Preprocessing, luma: bool) -> Callable[[bytes], np.ndarray]:
    """The decode alone as the contract does it (``Preprocessing.draft``), then, through colour, converted to L."""
    pre = dataclasses.replace(pre, jpeg_luma=luma)

    def decode(data: bytes) -> np.ndarray:
        img = pre.draft(Image.open(io.BytesIO(data)))
        img.load()
        return np.asarray(img if img.mode == pre.colour_mode else img.convert(pre.colour_mode))

    return decode


def candidates(spec: ModelSpec) -> dict[str, Callable[[bytes], object]]:
    """name -> one image's bytes to what the network is given, or, for "decode" entries, to decoded pixels."""
    pre = spec.preprocessing
    out = {}
    for luma in (True, False):
        variant = dataclasses.replace(spec, preprocessing=dataclasses.replace(pre, jpeg_luma=luma))
        out[f"service, jpeg_luma {str(luma).lower()}"] = Preprocessor(variant, max_pixels=10**9)
    if pre.colour_mode == "L":
        out["decode: Pillow, luma"] = pillow_decode(pre, True)
        out["decode: Pillow, colour then L"] = pillow_decode(pre, False)
    else:
        out["decode: Pillow"] = pillow_decode(pre, False)
    try:
        import simplejpeg
    except ImportError:
        return out
    colourspace = "GRAY" if pre.colour_mode == "L" else "RGB"
    side = pre.draft_size()  # the least size the resize needs; None: in full
    scale = {} if side is None else {"min_width": side[0], "min_height": side[1]}
    out[f"decode: simplejpeg, {colourspace}"] = lambda data: simplejpeg.decode_jpeg(
        data, colorspace=colourspace, **scale).squeeze(-1 if colourspace == "GRAY" else ())
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "default.onnx")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)
    spec = Model.load(Settings(model_path=args.model, device="cpu")).spec
    with tempfile.TemporaryDirectory(prefix="decode-bench-") as folder:
        payloads = {name: path.read_bytes() for name, (path, _, _) in write_payloads(Path(folder)).items()}
    found = candidates(spec)
    print(f"{args.model.name}: {spec.preprocessing.colour_mode}, input {spec.preprocessing.input_size}, "
          f"fit to content {spec.preprocessing.fit_to_content is not None}")
    for name in ("png32", "jpeg640", "jpeg12mp"):
        data = payloads[name]
        size = Image.open(io.BytesIO(data)).size
        number = 2000 if size[0] * size[1] < 10**4 else 200 if size[0] * size[1] < 10**6 else 5
        jpeg = name.startswith("jpeg")  # the decode entries are the JPEG decoders'
        reference = next(f for label, f in found.items() if label.startswith("decode: Pillow"))(data) if jpeg else None
        for label, decode in found.items():
            if label.startswith("decode") and not jpeg:
                continue
            best = min(timeit.repeat(lambda f=decode, b=data: f(b), number=number, repeat=args.repeats))
            same = ""
            if label.startswith("decode"):  # against Pillow's decode of what the contract asks for
                pixels = decode(data)
                same = ("  other size" if pixels.shape != reference.shape else
                        f"  max |diff| {int(np.abs(pixels.astype(int) - reference).max())}")
            print(f"{name} {size[0]}x{size[1]}  {label:32s} {best / number * 1e6:9.0f} us{same}")


if __name__ == "__main__":
    main()
