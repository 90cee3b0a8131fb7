"""The drawn-digits evaluation set: stroke paths from a seeded generator, drawn with the mouse on the real page (the
service's own ``/``, in Chromium), and the PNG the page POSTs to ``/predict`` kept as the image.

    python -m evalsets.drawn_digits.generate            # rewrites strokes.json and png/ (about 3 minutes)
    python -m evalsets.drawn_digits.generate --check 5  # redraws 5 stored drawings and compares the PNGs

Never train on these: they measure what a person drawing on the page gets (README.md beside this file).
"""

from __future__ import annotations

import argparse
import io
import json
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
STROKES = HERE / "strokes.json"
PNG_DIR = HERE / "png"
SEED = 20261127
VARIATIONS = 12  # per style
CANVAS = 280  # the page's canvas, pixels
PEN = 28  # the page's stroke width, pixels (canvas.width / 10)
SPACING = 8.0  # pixels between successive mouse positions along a stroke (each move waits for a frame)
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEWPORT = {"width": 1280, "height": 900}


# --- stroke shapes --------------------------------------------------------------------------------------------------
# A style is strokes (pen down ... pen up), each a list of segments in a unit box (x right, y down, both 0..1):
# ("L", p0, p1, ...) a polyline, ("C", p0, c1, c2, p3) a cubic Bezier, ("A", cx, cy, rx, ry, deg0, deg1) an
# elliptic arc from deg0 to deg1 (degrees; increasing is clockwise on screen, since y points down).


def ellipse(cx, cy, rx, ry, a0, a1):
    return ("A", cx, cy, rx, ry, a0, a1)


STYLES: dict[int, dict[str, tuple[float, list]]] = {  # digit -> style -> (width / height, strokes)
    0: {
        "oval-ccw": (0.65, [[ellipse(0.5, 0.5, 0.5, 0.5, -90, -460)]]),
        "round-cw": (0.9, [[ellipse(0.5, 0.5, 0.5, 0.5, -95, 275)]]),
        "egg": (0.6, [[("C", (0.55, 0.0), (0.05, 0.05), (-0.02, 0.95), (0.45, 1.0)),
                       ("C", (0.45, 1.0), (1.02, 1.02), (0.95, 0.1), (0.5, 0.02))]]),
    },
    1: {
        "bar": (0.1, [[("L", (0.5, 0.0), (0.5, 1.0))]]),
        "flag": (0.45, [[("L", (0.0, 0.28), (0.6, 0.0), (0.6, 1.0))]]),
        "flag-base": (0.6, [[("L", (0.1, 0.25), (0.55, 0.0), (0.55, 1.0))], [("L", (0.1, 1.0), (1.0, 1.0))]]),
    },
    2: {
        "curved": (0.7, [[ellipse(0.5, 0.28, 0.45, 0.28, 190, 380), ("L", (0.92, 0.38), (0.0, 1.0), (1.0, 1.0))]]),
        "looped": (0.75, [[ellipse(0.5, 0.26, 0.42, 0.26, 190, 375), ("L", (0.91, 0.33), (0.22, 0.8)),
                           ellipse(0.14, 0.88, 0.1, 0.1, -45, -380), ("L", (0.22, 0.81), (1.0, 0.95))]]),
        "angular": (0.7, [[("L", (0.0, 0.18), (0.35, 0.0)), ("C", (0.35, 0.0), (0.9, -0.05), (1.05, 0.25), (0.8, 0.45)),
                           ("L", (0.8, 0.45), (0.0, 1.0), (1.0, 1.0))]]),
    },
    3: {
        "round": (0.65, [[ellipse(0.5, 0.25, 0.45, 0.25, 200, 450), ellipse(0.5, 0.75, 0.5, 0.25, 270, 520)]]),
        "flat-top": (0.7, [[("L", (0.05, 0.0), (0.95, 0.0), (0.4, 0.4)),
                            ("C", (0.4, 0.4), (0.9, 0.35), (1.05, 0.75), (0.75, 0.92)),
                            ("C", (0.75, 0.92), (0.5, 1.05), (0.15, 1.0), (0.0, 0.85))]]),
        "two-strokes": (0.65, [[ellipse(0.45, 0.24, 0.38, 0.24, 200, 440)],
                               [ellipse(0.5, 0.75, 0.5, 0.25, 250, 520)]]),
    },
    4: {
        "closed": (0.75, [[("L", (0.7, 0.0), (0.0, 0.65), (1.0, 0.65))], [("L", (0.7, 0.0), (0.7, 1.0))]]),
        "open": (0.75, [[("L", (0.2, 0.0), (0.05, 0.6), (1.0, 0.6))], [("L", (0.75, 0.2), (0.75, 1.0))]]),
        "open-tall": (0.75, [[("L", (0.1, 0.0), (0.1, 0.55), (0.95, 0.55))], [("L", (0.65, 0.0), (0.65, 1.0))]]),
    },
    5: {
        "two-strokes": (0.7, [[("L", (0.15, 0.0), (0.1, 0.42)),
                               ("C", (0.1, 0.42), (0.5, 0.3), (1.0, 0.45), (0.95, 0.7)),
                               ("C", (0.95, 0.7), (0.9, 1.0), (0.3, 1.05), (0.0, 0.88))],
                              [("L", (0.15, 0.0), (0.9, 0.0))]]),
        "one-stroke": (0.7, [[("L", (0.9, 0.0), (0.15, 0.0), (0.1, 0.42)),
                              ("C", (0.1, 0.42), (0.5, 0.3), (1.0, 0.45), (0.95, 0.7)),
                              ("C", (0.95, 0.7), (0.9, 1.0), (0.3, 1.05), (0.0, 0.88))]]),
        "boxy": (0.7, [[("L", (0.12, 0.0), (0.1, 0.45), (0.65, 0.42)),
                        ("C", (0.65, 0.42), (1.0, 0.45), (1.0, 0.95), (0.6, 0.98)), ("L", (0.6, 0.98), (0.0, 0.95))],
                       [("L", (0.12, 0.0), (0.95, 0.02))]]),
    },
    6: {
        "curved": (0.65, [[("C", (0.85, 0.05), (0.3, 0.0), (0.0, 0.4), (0.05, 0.72)),
                           ellipse(0.5, 0.72, 0.45, 0.28, 180, -170)]]),
        "straight-stem": (0.65, [[("L", (0.75, 0.0), (0.08, 0.7)), ellipse(0.5, 0.72, 0.42, 0.28, 175, -185)]]),
        "big-loop": (0.7, [[("C", (0.7, 0.0), (0.35, 0.05), (0.05, 0.3), (0.05, 0.65)),
                            ellipse(0.5, 0.65, 0.45, 0.35, 180, -160)]]),
    },
    7: {
        "plain": (0.7, [[("L", (0.0, 0.0), (1.0, 0.0), (0.35, 1.0))]]),
        "crossbar": (0.7, [[("L", (0.0, 0.0), (1.0, 0.0), (0.35, 1.0))], [("L", (0.4, 0.52), (0.95, 0.52))]]),
        "serif-curved": (0.7, [[("L", (0.0, 0.2), (0.0, 0.0), (1.0, 0.0)),
                                ("C", (1.0, 0.0), (0.75, 0.3), (0.5, 0.6), (0.45, 1.0))]]),
    },
    8: {
        "one-stroke": (0.65, [[("C", (0.8, 0.12), (0.6, -0.05), (0.1, 0.0), (0.15, 0.25)),
                               ("C", (0.15, 0.25), (0.2, 0.45), (0.9, 0.5), (0.9, 0.75)),
                               ("C", (0.9, 0.75), (0.9, 1.0), (0.1, 1.0), (0.1, 0.75)),
                               ("C", (0.1, 0.75), (0.1, 0.5), (0.85, 0.45), (0.85, 0.22)),
                               ("C", (0.85, 0.22), (0.85, 0.05), (0.7, 0.02), (0.6, 0.02))]]),
        "two-loops": (0.7, [[ellipse(0.5, 0.24, 0.36, 0.24, -90, 270)], [ellipse(0.5, 0.73, 0.46, 0.27, -90, -450)]]),
        "figure-eight": (0.65, [[ellipse(0.5, 0.2, 0.3, 0.2, 90, 450), ellipse(0.5, 0.7, 0.5, 0.3, 270, -90)]]),
    },
    9: {
        "straight-tail": (0.6, [[ellipse(0.45, 0.25, 0.42, 0.25, 0, -360), ("L", (0.87, 0.25), (0.87, 1.0))]]),
        "curved-tail": (0.6, [[ellipse(0.45, 0.25, 0.42, 0.25, 0, -360),
                               ("C", (0.87, 0.25), (0.9, 0.6), (0.8, 0.95), (0.3, 1.0))]]),
        "two-strokes": (0.6, [[ellipse(0.45, 0.27, 0.4, 0.27, -10, -370)], [("L", (0.85, 0.05), (0.75, 1.0))]]),
    },
}


def sample_segment(seg: tuple) -> np.ndarray:
    """Dense points along one segment, (K, 2) in unit-box coordinates."""
    kind, *args = seg
    if kind == "L":
        pts = np.asarray(args, float)
        return np.concatenate([np.linspace(a, b, 40, endpoint=False) for a, b in zip(pts[:-1], pts[1:], strict=False)]
                              + [pts[-1:]])
    if kind == "C":
        p0, c1, c2, p3 = (np.asarray(p, float) for p in args)
        t = np.linspace(0, 1, 80)[:, None]
        return (1 - t) ** 3 * p0 + 3 * (1 - t) ** 2 * t * c1 + 3 * (1 - t) * t**2 * c2 + t**3 * p3
    if kind == "A":
        cx, cy, rx, ry, a0, a1 = args
        a = np.radians(np.linspace(a0, a1, max(16, int(abs(a1 - a0) / 3))))
        return np.stack([cx + rx * np.cos(a), cy + ry * np.sin(a)], axis=1)
    raise ValueError(f"unknown segment kind {kind!r}")


def resample(line: np.ndarray, spacing: float) -> np.ndarray:
    """The polyline at (about) equal arc-length steps of ``spacing``, end points kept."""
    steps = np.linalg.norm(np.diff(line, axis=0), axis=1)
    s = np.concatenate([[0.0], np.cumsum(steps)])
    at = np.linspace(0, s[-1], max(2, int(math.ceil(s[-1] / spacing)) + 1))
    return np.stack([np.interp(at, s, line[:, 0]), np.interp(at, s, line[:, 1])], axis=1)


@dataclass(frozen=True)
class Variation:
    """How one drawing of a style departs from the style's template."""

    size: float  # the ink's bounding box (pen width included), as a share of the canvas's side
    dx: float  # offset of the ink's centre from the canvas's centre, pixels
    dy: float
    slant_deg: float  # shear: positive leans the top to the right
    aspect: float  # times the style's width / height
    wobble: float  # amplitude of a smooth hand tremor, as a share of the digit's height
    phase: float


def variations(rng: np.random.Generator, n: int) -> list[Variation]:
    return [Variation(size=float(rng.uniform(0.6, 0.95)), dx=float(rng.uniform(-20, 20)),
                      dy=float(rng.uniform(-20, 20)),
                      slant_deg=float(rng.uniform(-15, 15)), aspect=float(rng.uniform(0.85, 1.15)),
                      wobble=float(rng.uniform(0.0, 0.015)), phase=float(rng.uniform(0, 2 * math.pi)))
            for _ in range(n)]


def place(strokes: list, ratio: float, v: Variation) -> list[np.ndarray]:
    """The style's strokes as canvas-pixel polylines: slanted, scaled so the ink spans ``v.size`` of the canvas
    (or less, where a wide digit would leave it), and moved off centre, never past the canvas's edge."""
    lines = [np.concatenate([sample_segment(seg) for seg in stroke]) for stroke in strokes]
    total = sum(len(line) for line in lines)
    k, out = 0, []
    shear = math.tan(math.radians(v.slant_deg))
    for line in lines:
        t = (k + np.arange(len(line))) / total
        k += len(line)
        x = line[:, 0] * ratio * v.aspect
        y = line[:, 1]
        # a smooth tremor along the whole drawing, different per axis
        x = x + v.wobble * np.sin(2 * math.pi * 2 * t + v.phase)
        y = y + v.wobble * np.sin(2 * math.pi * 3 * t + 2 * v.phase)
        x = x + (0.5 - y) * shear
        out.append(np.stack([x, y], axis=1))
    allpts = np.concatenate(out)
    lo, hi = allpts.min(0), allpts.max(0)
    span = max(hi[1] - lo[1], 1e-6)
    target = v.size * CANVAS - PEN  # the path's height, so the ink (pen width on both sides) spans v.size
    scale = min(target / span, (0.95 * CANVAS - PEN) / max(hi[0] - lo[0], 1e-6))
    centre = (lo + hi) / 2
    half = (hi - lo) * scale / 2 + PEN / 2  # the ink's half extent
    limit = CANVAS / 2 - half  # the most the centre may move before ink leaves the canvas
    shift = np.clip([v.dx, v.dy], -limit, limit)
    return [(p - centre) * scale + CANVAS / 2 + shift for p in out]


def drawings(seed: int = SEED, per_style: int = VARIATIONS) -> list[dict]:
    """Every drawing's label, style, variation and strokes (canvas pixels, one decimal), in a fixed order."""
    rng = np.random.default_rng(seed)
    out = []
    for digit, styles in STYLES.items():
        for style, (ratio, strokes) in styles.items():
            for i, v in enumerate(variations(rng, per_style)):
                lines = [resample(line, SPACING) for line in place(strokes, ratio, v)]
                out.append({
                    "id": f"{digit}-{style}-{i:02d}", "label": digit, "style": style,
                    "variation": {k: round(val, 4) for k, val in vars(v).items()},
                    "strokes": [np.round(line, 1).tolist() for line in lines],
                })
    return out


# --- drawing on the page --------------------------------------------------------------------------------------------


def capture(page) -> list[tuple[bytes, dict]]:
    """Keep, in order, every image the page POSTs to /predict with the service's answer to it."""
    sent: list[tuple[bytes, dict]] = []

    def keep(route) -> None:  # an intercepted request carries its blob body; an observed one may not yet
        body = route.request.post_data_buffer
        response = route.fetch()
        sent.append((body, response.json() if response.ok else {"status": response.status}))
        route.fulfill(response=response)

    page.route("**/predict?*", keep)
    return sent


def draw(page, sent: list[tuple[bytes, dict]], strokes: list[list[list[float]]]) -> tuple[bytes, dict]:
    """Clear the canvas, draw ``strokes`` (canvas pixels) with the mouse, and return the PNG the page sent after
    the last stroke with its answer (the page classifies at every pen-up; the last image holds the whole drawing)."""
    page.get_by_role("button", name="Clear drawing").click()
    box = page.locator("#canvas").bounding_box()
    sx, sy = box["width"] / CANVAS, box["height"] / CANVAS
    before = len(sent)
    for k, stroke in enumerate(strokes):
        page.mouse.move(box["x"] + stroke[0][0] * sx, box["y"] + stroke[0][1] * sy)
        page.mouse.down()
        for x, y in stroke[1:]:
            page.mouse.move(box["x"] + x * sx, box["y"] + y * sy)
        page.mouse.up()
        for _ in range(500):  # the page's toBlob and POST, answered (10 ms polls, 5 s at most)
            if len(sent) >= before + k + 1:
                break
            page.wait_for_timeout(10)
        else:
            raise RuntimeError(f"the page sent no image within 5 s of stroke {k + 1}")
    return sent[-1]


def browser_and_service(log: Path):
    """A started ``python -m service`` on the committed default model and a headless Chromium (context managers)."""
    from playwright.sync_api import sync_playwright

    from bench.harness import serve_service

    return serve_service({"RESNET_MAX_BATCH_SIZE": "4", "RESNET_GRPC_PORT": "0", "RESNET_ACCESS_LOG": "false"},
                         log), sync_playwright()


def png_pixels(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("L"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m evalsets.drawn_digits.generate",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--check", type=int, default=0, metavar="N",
                        help="redraw N stored drawings (spread over the set) and compare them to the stored PNGs")
    args = parser.parse_args(argv)
    items = drawings()
    if args.check:
        stored = json.loads(STROKES.read_text())["drawings"]
        if [d["strokes"] for d in stored] != [d["strokes"] for d in items]:
            sys.exit("strokes.json differs from what the generator makes now: regenerate the set")
        items = items[:: max(1, len(items) // args.check)][: args.check]
    with tempfile.TemporaryDirectory() as tmp:
        service, playwright = browser_and_service(Path(tmp) / "server.log")
        with service as server, playwright as p:
            browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
            page = browser.new_context(viewport=VIEWPORT).new_page()
            sent = capture(page)
            page.goto(server.url + "/")
            page.wait_for_function("document.querySelector('#card-arch').textContent.length > 0")
            if not args.check:
                PNG_DIR.mkdir(exist_ok=True)
                for old in PNG_DIR.glob("*.png"):
                    old.unlink()
            worst = 0.0
            for n, item in enumerate(items):
                png, _ = draw(page, sent, item["strokes"])
                if args.check:
                    kept = png_pixels((PNG_DIR / f"{item['id']}.png").read_bytes())
                    diff = np.abs(png_pixels(png).astype(int) - kept)
                    worst = max(worst, float(diff.mean()))
                    print(f"{item['id']}: mean |difference| {diff.mean():.3f}, max {diff.max()}")
                else:
                    (PNG_DIR / f"{item['id']}.png").write_bytes(png)
                    if n % 30 == 0:
                        print(f"{n}/{len(items)} {item['id']}", flush=True)
            browser.close()
    if not args.check:
        STROKES.write_text(json.dumps({
            "seed": SEED, "canvas": CANVAS, "pen": PEN, "generator": "evalsets/drawn_digits/generate.py",
            "drawings": items}, separators=(",", ":")) + "\n")
        print(f"wrote {len(items)} drawings to {PNG_DIR} and {STROKES}")
    elif worst > 0.5:
        sys.exit(f"the redrawn PNGs differ from the stored ones (worst mean |difference| {worst:.3f})")


if __name__ == "__main__":
    main()
