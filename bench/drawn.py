"""Score an ONNX file on the drawn-digits set (evalsets/drawn_digits): each stored PNG exactly as the page sent it,
through the service's own decode and preprocessing and an onnxruntime session. No torch.

    python -m bench.drawn models/default.onnx           # top-1, per digit and per style, and the confusion matrix
    python -m bench.drawn models/default.onnx --json    # the same as one JSON object
    python -m bench.drawn models/default.onnx --record  # and write the top-1 into the file's metrics (needs onnx)
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
EVALSET = ROOT / "evalsets" / "drawn_digits"
DRAWN_KEY = "drawn_accuracy"  # in a model's metrics: top-1 on this set


def load_set(folder: Path = EVALSET) -> list[dict]:
    """Every drawing's id, label and style, with its PNG's bytes under ``png``."""
    items = json.loads((folder / "strokes.json").read_text())["drawings"]
    return [{"id": d["id"], "label": d["label"], "style": d["style"],
             "png": (folder / "png" / f"{d['id']}.png").read_bytes()} for d in items]


def predict(model_path: Path, pngs: list[bytes], batch: int = 64) -> np.ndarray:
    """The index of the top class for each PNG, as ``/predict`` would answer it."""
    from service.preprocessing import Preprocessor
    from service.runtime import Model
    from service.settings import Settings

    settings = Settings(model_path=model_path, device="cpu")
    model = Model.load(settings)
    pre = Preprocessor(model.spec, settings.max_image_pixels)
    x = np.stack([pre(data).x for data in pngs])  # x: (N, C, H, W) float32, normalised
    return np.concatenate([model.run(x[i:i + batch]).argmax(1) for i in range(0, len(x), batch)])


def score(model_path: Path, folder: Path = EVALSET) -> dict:
    """Top-1 accuracy, per digit and per style, the confusion matrix (rows: true digit), and the misread ids."""
    items = load_set(folder)
    y = np.array([d["label"] for d in items])
    top = predict(model_path, [d["png"] for d in items])
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (y, top), 1)
    styles: dict[str, list[bool]] = defaultdict(list)
    for d, p in zip(items, top, strict=True):
        styles[f"{d['label']} {d['style']}"].append(bool(p == d["label"]))
    return {
        "model": str(model_path), "drawings": len(items), "top1": float((top == y).mean()),
        "per_digit": {str(k): float((top[y == k] == k).mean()) for k in range(10)},
        "per_style": {k: float(np.mean(v)) for k, v in styles.items()},
        "confusion": confusion.tolist(),
        "misread": [f"{d['id']}->{p}" for d, p in zip(items, top, strict=True) if p != d["label"]],
    }


def record(model_path: Path, top1: float) -> None:
    """The file's ``metrics`` metadata with ``drawn_accuracy`` set: the weights and the rest stay as they are."""
    import onnx

    proto = onnx.load(model_path)
    entry = next(p for p in proto.metadata_props if p.key == "metrics")
    entry.value = json.dumps({**json.loads(entry.value), DRAWN_KEY: top1})
    onnx.save(proto, model_path)


def report(s: dict) -> str:
    lines = [f"{s['model']}: top-1 {s['top1'] * 100:.1f}% on {s['drawings']} drawn digits", "",
             "true \\ read  " + " ".join(f"{k:>3d}" for k in range(10)) + "   acc"]
    for k, row in enumerate(s["confusion"]):
        lines.append(f"{k:>11d}  " + " ".join(f"{v:>3d}" for v in row) + f"  {s['per_digit'][str(k)] * 100:4.0f}%")
    worst = sorted(s["per_style"].items(), key=lambda kv: kv[1])[:6]
    lines += ["", "weakest styles: " + ", ".join(f"{k} {v * 100:.0f}%" for k, v in worst)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drawn", description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+", type=Path, help="ONNX files to score")
    parser.add_argument("--json", action="store_true", help="one JSON object per model instead of the tables")
    parser.add_argument("--record", action="store_true",
                        help=f"write the top-1 into each file's metrics as {DRAWN_KEY} (a new file version)")
    args = parser.parse_args(argv)
    for path in args.models:
        s = score(path)
        print(json.dumps(s) if args.json else report(s) + "\n")
        if args.record:
            record(path, s["top1"])


if __name__ == "__main__":
    main()
