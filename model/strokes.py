"""Synthetic pen-drawn digits, extra training signal for the default model (``--synthetic``).

scikit-learn's digits are 8x8 blurs; a digit drawn on the page is a crisp 28 px pen stroke, rounder and thinner
(docs/training.md#drawn-digits). These are digits written with a pen of random width along control points smoothed
by Catmull-Rom splines, each point jittered, the whole turned, slanted, stretched, sized and placed at random, and
rendered with Pillow. Written separately from the drawn-digits evaluation set (evalsets/drawn_digits, arcs and Bezier
curves drawn in Chromium) and seeded apart from it: never train on that set, and never copy its shapes here.
"""

from __future__ import annotations

import math

import numpy as np
from PIL import Image, ImageDraw

SIDE = 280  # rendered at the page canvas's size, then preprocessed as any training image

# digit -> forms -> strokes -> pieces -> control points (x right, y down, in a unit box). The pen goes through a
# piece's points along a smooth curve; between pieces of a stroke it turns a corner.
FORMS: dict[int, list[list[list[list[tuple[float, float]]]]]] = {
    0: [[[[(0.55, 0.02), (0.2, 0.12), (0.05, 0.5), (0.25, 0.92), (0.6, 0.97), (0.92, 0.6), (0.85, 0.2),
           (0.55, 0.02), (0.4, 0.08)]]],
        [[[(0.5, 0.0), (0.85, 0.15), (1.0, 0.5), (0.8, 0.9), (0.45, 1.0), (0.1, 0.8), (0.0, 0.4), (0.25, 0.05),
           (0.55, 0.0)]]]],
    1: [[[[(0.5, 0.0), (0.48, 0.5), (0.45, 1.0)]]],
        [[[(0.2, 0.22), (0.6, 0.0)], [(0.6, 0.0), (0.58, 1.0)]]],
        [[[(0.25, 0.18), (0.55, 0.0)], [(0.55, 0.0), (0.55, 1.0)]], [[(0.2, 1.0), (0.9, 1.0)]]]],
    2: [[[[(0.08, 0.25), (0.4, 0.0), (0.85, 0.12), (0.8, 0.42), (0.4, 0.72), (0.05, 1.0)],
          [(0.05, 1.0), (0.95, 0.98)]]],
        [[[(0.1, 0.15), (0.5, 0.0), (0.9, 0.25), (0.6, 0.6), (0.1, 0.95), (0.35, 0.85), (0.7, 1.0), (1.0, 0.9)]]]],
    3: [[[[(0.1, 0.1), (0.5, 0.0), (0.85, 0.2), (0.45, 0.48)], [(0.45, 0.48), (0.9, 0.7), (0.55, 1.0),
                                                               (0.05, 0.9)]]],
        [[[(0.05, 0.05), (0.9, 0.02)], [(0.9, 0.02), (0.35, 0.42)], [(0.35, 0.42), (0.85, 0.55), (0.8, 0.9),
                                                                      (0.4, 1.0), (0.05, 0.85)]]]],
    4: [[[[(0.75, 0.0), (0.0, 0.7)], [(0.0, 0.7), (1.0, 0.7)]], [[(0.75, 0.0), (0.75, 1.0)]]],
        [[[(0.15, 0.0), (0.05, 0.62)], [(0.05, 0.62), (0.95, 0.6)]], [[(0.7, 0.05), (0.72, 1.0)]]]],
    5: [[[[(0.9, 0.0), (0.2, 0.0)], [(0.2, 0.0), (0.12, 0.45)], [(0.12, 0.45), (0.6, 0.38), (0.95, 0.68),
                                                                (0.6, 1.0), (0.05, 0.9)]]],
        [[[(0.2, 0.02), (0.15, 0.48)], [(0.15, 0.48), (0.7, 0.4), (0.9, 0.75), (0.5, 1.0), (0.0, 0.85)]],
         [[(0.2, 0.02), (0.95, 0.0)]]]],
    6: [[[[(0.8, 0.0), (0.3, 0.2), (0.05, 0.65), (0.35, 1.0), (0.85, 0.85), (0.75, 0.5), (0.3, 0.5),
           (0.08, 0.72)]]],
        [[[(0.65, 0.0), (0.25, 0.4), (0.1, 0.8), (0.5, 1.0), (0.9, 0.75), (0.5, 0.45), (0.12, 0.65)]]]],
    7: [[[[(0.0, 0.02), (1.0, 0.0)], [(1.0, 0.0), (0.6, 0.5), (0.4, 1.0)]]],
        [[[(0.0, 0.02), (1.0, 0.0)], [(1.0, 0.0), (0.3, 1.0)]], [[(0.3, 0.5), (0.9, 0.48)]]]],
    8: [[[[(0.85, 0.12), (0.5, 0.0), (0.15, 0.15), (0.3, 0.4), (0.85, 0.65), (0.6, 1.0), (0.15, 0.85),
           (0.2, 0.6), (0.75, 0.35), (0.8, 0.1), (0.55, 0.0)]]],
        [[[(0.5, 0.45), (0.15, 0.25), (0.5, 0.0), (0.85, 0.25), (0.5, 0.45), (0.05, 0.72), (0.5, 1.0),
           (0.95, 0.72), (0.5, 0.45)]]]],
    9: [[[[(0.85, 0.15), (0.5, 0.0), (0.1, 0.2), (0.3, 0.48), (0.8, 0.35), (0.85, 0.1)], [(0.85, 0.1), (0.8, 1.0)]]],
        [[[(0.9, 0.25), (0.5, 0.0), (0.05, 0.25), (0.5, 0.5), (0.9, 0.25), (0.85, 0.7), (0.5, 1.0),
           (0.15, 0.9)]]]],
}


def catmull_rom(points: np.ndarray, per_span: int = 12) -> np.ndarray:
    """A smooth curve through ``points`` (K, 2): uniform Catmull-Rom, end points doubled."""
    if len(points) < 3:
        return np.linspace(points[0], points[-1], per_span * (len(points) - 1) + 1)
    p = np.concatenate([points[:1], points, points[-1:]])
    t = np.linspace(0, 1, per_span, endpoint=False)[:, None]
    spans = []
    for i in range(1, len(p) - 2):
        p0, p1, p2, p3 = p[i - 1], p[i], p[i + 1], p[i + 2]
        spans.append(0.5 * (2 * p1 + (p2 - p0) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2
                            + (3 * p1 - p0 - 3 * p2 + p3) * t**3))
    return np.concatenate(spans + [points[-1:]])


def render(digit: int, rng: np.random.Generator) -> Image.Image:
    """One digit of a random form, written with a random pen at a random size, place and slant (L, white on black)."""
    forms = FORMS[digit]
    strokes = forms[rng.integers(len(forms))]
    angle, slant = math.radians(rng.uniform(-12, 12)), math.tan(math.radians(rng.uniform(-20, 20)))
    width = rng.uniform(0.45, 0.85) * rng.uniform(0.8, 1.25)  # width / height
    lines = []
    for stroke in strokes:
        pieces = [catmull_rom(np.asarray(piece) + rng.normal(0, 0.035, (len(piece), 2))) for piece in stroke]
        lines.append(np.concatenate(pieces))
    cos, sin = math.cos(angle), math.sin(angle)
    for k, line in enumerate(lines):
        x, y = (line[:, 0] - 0.5) * width, line[:, 1] - 0.5
        x = x - y * slant
        lines[k] = np.stack([x * cos - y * sin, x * sin + y * cos], 1)
    allpts = np.concatenate(lines)
    lo, hi = allpts.min(0), allpts.max(0)
    pen = rng.uniform(14, 42)
    height = rng.uniform(0.45, 0.95) * SIDE
    scale = min(height / max(hi[1] - lo[1], 1e-6), 0.9 * SIDE / max(hi[0] - lo[0], 1e-6))
    room = np.maximum(SIDE - (hi - lo) * scale - pen, 0) / 2
    centre = SIDE / 2 + rng.uniform(-room, room)
    img = Image.new("L", (SIDE, SIDE), 0)
    draw = ImageDraw.Draw(img)
    for line in lines:
        pts = [tuple(p) for p in (line - (lo + hi) / 2) * scale + centre]
        draw.line(pts, fill=255, width=int(round(pen)), joint="curve")
        for px, py in (pts[0], pts[-1]):  # round caps, as the page's pen has
            draw.ellipse((px - pen / 2, py - pen / 2, px + pen / 2, py + pen / 2), fill=255)
    return img


def synthetic_digits(per_class: int, seed: int) -> tuple[list[Image.Image], np.ndarray]:
    """``per_class`` rendered digits of each of 0-9 (in class order), from their own seeded generator."""
    rng = np.random.default_rng([seed, 0x5EED])  # a stream of its own, apart from the run's other seeds
    labels = np.repeat(np.arange(10), per_class)
    return [render(int(d), rng) for d in labels], labels
