"""A small image-question corpus that is not the demo's shapes: coloured textures, one-word answers.

What a new user brings: plain LLaVA JSON (a list of {"id", "image", "conversations"}) beside an
images/ folder, no `answer`, `choices` or any other lladav field. Each image is 64x64 and holds
one of ten patterns (stripes, bars, slashes, checks, dots, rings, grid, waves, noise, gradient)
with a random period and phase, drawn in one of ten colours (the class, jittered) on a random
light or dark grey. The question asks for the colour, in several wordings, with the `<image>`
placeholder before or after the text or left out; every answer is one lower-case word, so
chance is 1/10. (Asking for the pattern instead is `ask="pattern"`: a harder task a tiny model
needs ~3x the steps for.)

    out/images/{train,test}-NNNNN.{png,jpg}   PNG and JPEG alternate
    out/train.json   n_train records, classes balanced
    out/test.json    n_test unseen images, classes balanced

Used by tests/integration/test_own_corpus.py and bench/own_corpus.py; the same arguments give
byte-identical files.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

from PIL import Image, ImageDraw

PATTERNS = ("stripes", "bars", "slashes", "checks", "dots", "rings", "grid", "waves", "noise",
            "gradient")
COLOURS = {"red": (215, 35, 35), "green": (35, 165, 50), "blue": (35, 65, 215),
           "yellow": (235, 215, 40), "purple": (140, 45, 175), "orange": (245, 135, 25),
           "pink": (245, 140, 190), "brown": (120, 70, 30), "cyan": (40, 205, 215),
           "white": (250, 250, 250)}
QUESTIONS = {"colour": ("What colour is the pattern?", "Which colour are the marks?",
                        "Name the colour of the pattern in one word.",
                        "What colour is used for the texture?", "Which colour do you see drawn?"),
             "pattern": ("What pattern fills this image?", "Which texture is shown?",
                         "Name the pattern in one word.", "What kind of texture is this?",
                         "Which pattern do you see?")}
SIZE = 64


def _jitter(rgb: tuple[int, int, int], rng: random.Random, by: int = 20) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-by, by))) for c in rgb)  # type: ignore[return-value]


def draw_texture(kind: str, rng: random.Random, colour: str | None = None) -> Image.Image:
    """One pattern: in `colour` (jittered) on a random light or dark grey, or (None) in two
    random contrasting colours."""
    if colour is None:
        while True:
            fg = tuple(rng.randint(0, 255) for _ in range(3))
            bg = tuple(rng.randint(0, 255) for _ in range(3))
            if sum(abs(x - y) for x, y in zip(fg, bg)) > 240:
                break
    else:
        fg = _jitter(COLOURS[colour], rng)
        grey = rng.choice((rng.randint(25, 70), rng.randint(150, 200)))
        bg = (grey, grey, grey)
        if colour == "white":
            bg = (rng.randint(25, 90),) * 3
    period = rng.randint(10, 18)
    phase = rng.randint(0, period - 1)
    img = Image.new("RGB", (SIZE, SIZE), bg)
    pen = ImageDraw.Draw(img)
    half = period // 2
    if kind == "stripes":
        for y in range(-period + phase, SIZE, period):
            pen.rectangle([0, y, SIZE, y + half - 1], fill=fg)
    elif kind == "bars":
        for x in range(-period + phase, SIZE, period):
            pen.rectangle([x, 0, x + half - 1, SIZE], fill=fg)
    elif kind == "slashes":
        for c in range(-SIZE + phase, 2 * SIZE, period):
            pen.line([(c, SIZE), (c + SIZE, 0)], fill=fg, width=max(3, half - 1))
    elif kind == "checks":
        for y in range(-period + phase, SIZE, period):
            for x in range(-period + phase, SIZE, period):
                if ((x + y - 2 * phase) // period) % 2 == 0:
                    pen.rectangle([x, y, x + period - 1, y + period - 1], fill=fg)
    elif kind == "dots":
        r = max(2, period // 4)
        for y in range(phase - period, SIZE + period, period):
            for x in range(phase - period, SIZE + period, period):
                pen.ellipse([x - r, y - r, x + r, y + r], fill=fg)
    elif kind == "rings":
        cx, cy = rng.randint(16, 48), rng.randint(16, 48)
        for r in range(SIZE + period, 0, -half):
            colour = fg if (r // half) % 2 == 0 else bg
            pen.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif kind == "grid":
        for c in range(phase - period, SIZE, period):
            pen.line([(c, 0), (c, SIZE)], fill=fg, width=2)
            pen.line([(0, c), (SIZE, c)], fill=fg, width=2)
    elif kind == "waves":
        amp = rng.uniform(3, 6)
        for y0 in range(-period + phase, SIZE + period, period):
            points = [(x, y0 + amp * math.sin(2 * math.pi * x / 32 + phase)) for x in range(SIZE + 1)]
            pen.line(points, fill=fg, width=max(3, half - 2))
    elif kind == "noise":
        cell = rng.choice((4, 8))
        for y in range(0, SIZE, cell):
            for x in range(0, SIZE, cell):
                if rng.random() < 0.5:
                    pen.rectangle([x, y, x + cell - 1, y + cell - 1], fill=fg)
    elif kind == "gradient":
        horizontal = rng.random() < 0.5
        for i in range(SIZE):
            t = i / (SIZE - 1)
            colour = tuple(round(a * (1 - t) + b * t) for a, b in zip(bg, fg))
            box = [i, 0, i, SIZE] if horizontal else [0, i, SIZE, i]
            pen.rectangle(box, fill=colour)
    else:
        raise ValueError(f"unknown texture {kind!r}")
    return img


def _record(rid: str, image: str, answer: str, ask: str, rng: random.Random) -> dict:
    question = rng.choice(QUESTIONS[ask])
    where = rng.random()
    text = (f"<image>\n{question}" if where < 0.6 else
            f"{question}\n<image>" if where < 0.8 else question)  # no placeholder: image first
    return {"id": rid, "image": image,
            "conversations": [{"from": "human", "value": text}, {"from": "gpt", "value": answer}]}


def write_textures(out: str | Path, *, n_train: int = 1000, n_test: int = 100, seed: int = 0,
                   ask: str = "colour") -> dict[str, Path]:
    """Draw the corpus into `out`; returns {"train": train.json, "test": test.json}. Classes are
    balanced; `ask` is "colour" (the default) or "pattern"."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        records = []
        for i in range(n):
            if ask == "colour":
                answer = list(COLOURS)[i % len(COLOURS)]
                img = draw_texture(rng.choice(PATTERNS), rng, answer)
            else:
                answer = PATTERNS[i % len(PATTERNS)]
                img = draw_texture(answer, rng)
            name = f"images/{split}-{i:05d}." + ("png" if i % 2 == 0 else "jpg")
            if i % 2 == 0:
                img.save(out / name, format="PNG")
            else:
                img.save(out / name, format="JPEG", quality=92)
            records.append(_record(f"{split}-{i:05d}", name, answer, ask, rng))
        rng.shuffle(records)
        files[split] = out / f"{split}.json"
        files[split].write_text(json.dumps(records, indent=1) + "\n", encoding="utf-8")
    return files
