"""Distinct images and their near copies, for near-duplicate and contamination tests.

`distinct(n, seed)` draws n images that share nothing: a random 3x3..6x6 colour field, bicubic
upscaled to 96..199 px (aspect 0.7..1.4), with 2-5 random ellipses and rectangles over it.
`copy(img, kind, rng)` is what a scraped corpus holds twice: kind 0 half size, 1 JPEG
re-encoded at quality 35-75, 2 cropped by 1-3% on every side, 3 enlarged 1.6x and saved as a
JPEG. Both return PIL images or encoded bytes; the same arguments give the same bytes.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw

KINDS = ("half size", "re-encoded", "cropped", "enlarged jpeg")


def _image(rng: np.random.Generator) -> Image.Image:
    side = int(rng.integers(96, 200))
    grid = rng.integers(0, 256, (int(rng.integers(3, 7)), int(rng.integers(3, 7)), 3), dtype=np.uint8)
    img = Image.fromarray(grid, "RGB").resize((side, int(side * rng.uniform(0.7, 1.4))),
                                              Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(2, 6))):
        x0, y0 = int(rng.integers(0, img.width - 10)), int(rng.integers(0, img.height - 10))
        x1 = x0 + int(rng.integers(8, img.width // 2 + 10))
        y1 = y0 + int(rng.integers(8, img.height // 2 + 10))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        (draw.ellipse if rng.random() < 0.5 else draw.rectangle)([x0, y0, x1, y1], fill=colour)
    return img


def distinct(n: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    return [_image(rng) for _ in range(n)]


def encode(img: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


def copy(img: Image.Image, kind: int, rng: np.random.Generator) -> bytes:
    w, h = img.size
    if kind == 0:
        return encode(img.resize((w // 2, h // 2), Image.LANCZOS))
    if kind == 1:
        return encode(img, "JPEG", quality=int(rng.integers(35, 76)))
    if kind == 2:
        m = rng.uniform(0.01, 0.03)
        return encode(img.crop((int(w * m), int(h * m), int(w * (1 - m)), int(h * (1 - m)))))
    return encode(img.resize((int(w * 1.6), int(h * 1.6)), Image.BICUBIC), "JPEG", quality=80)
