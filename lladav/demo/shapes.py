"""The demo's synthetic shapes corpus: images with checkable answers, and its tokenizer.

LLaDA-V's corpora (LLaVA-Pretrain, MAmmoTH-VL, VisualWebInstruct) and its 126K-token tokenizer
cannot be fetched by the CPU demo or the tests, so this module generates stand-ins of the same
shape: LLaVA JSON lists + image files, one file per stage (lladav_reference.md, "Stages").

Each image holds one filled shape: 3 kinds x 3 colours x 3 positions (27 classes) on a plain
light background, with a little jitter in size, place and tint. Positions are left / centre /
right only: a vertical axis would add nothing to what the stages exercise and would make the
tiny model (a few hundred K params, minutes on 2 cores) learn a 5-way factor from 48 px images.
Every question asks for one factor, so chance is 1/3 and every answer is one of nine words.

    out_dir/images/{train,heldout}-NNNNN.{png,jpg}   JPEG and PNG alternate by index
    out_dir/captions.json    stage 1: "A red circle on the left."
    out_dir/qa.json          stage 2: one-word answers, a third two-turn, a few text-only records
    out_dir/reasoning.json   stage 3: "The shape has three corners, so it is a triangle. Answer: triangle"
    out_dir/heldout.json     unseen images, one question each (the last turn is the expected
                             answer; also "answer", "choices" and the asked "factor")

Every record carries `meta` = {colour, kind, position}, the truth the pixels were drawn from.
Owns: drawing and the question wording. Does not own: training the tokenizer
(data/tokenizer.py), templating (data/conversation.py), reading corpora (data/sources.py) or
scoring a model's answers (evaluate.py).
Same arguments give byte-identical files (fixed JPEG settings, no metadata, one seeded RNG).
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from PIL import Image, ImageDraw

from lladav.data.conversation import IMAGE, SYSTEM_PROMPT
from lladav.data.tokenizer import TEMPLATE_WORDS, train_tokenizer

KINDS = ("circle", "square", "triangle")
COLOURS = ("red", "green", "blue")
POSITIONS = ("left", "centre", "right")
FACTORS = {"colour": COLOURS, "kind": KINDS, "position": POSITIONS}

# Nominal fill colours; each image jitters them by up to +-_TINT per channel.
RGB = {"red": (210, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 210)}
_TINT = 15
# Shape centre as a fraction of the width, per position; the centre's y is jittered instead.
POSITION_X = {"left": 0.25, "centre": 0.5, "right": 0.75}
_JPEG: dict[str, Any] = {"format": "JPEG", "quality": 95, "subsampling": 0, "optimize": False}

QUESTIONS = {
    "colour": "What colour is the shape?",
    "kind": "What shape is it?",
    "position": "Where is the shape?",
}
SHORT_SUFFIX = "Answer with one word: {} or {}."
THINK_SUFFIX = "Think it through, then answer: {} or {}."
REASONS = {
    ("kind", "circle"): "The shape has no corners, so it is a circle.",
    ("kind", "square"): "The shape has four corners, so it is a square.",
    ("kind", "triangle"): "The shape has three corners, so it is a triangle.",
    ("colour", "red"): "The shape is filled with red, so its colour is red.",
    ("colour", "green"): "The shape is filled with green, so its colour is green.",
    ("colour", "blue"): "The shape is filled with blue, so its colour is blue.",
    ("position", "left"): "The shape is near the left edge, so it is on the left.",
    ("position", "centre"): "The shape is in the middle, so it is in the centre.",
    ("position", "right"): "The shape is near the right edge, so it is on the right.",
}
# Text-only records for stage 2 (no "image" key): facts in the same small vocabulary.
TEXT_ONLY = [
    ("How many corners does a triangle have? Answer with one word.", "three"),
    ("How many corners does a square have? Answer with one word.", "four"),
    ("How many corners does a circle have? Answer with one word.", "none"),
    ("Which word is a colour: red, circle or left? Answer with one word.", "red"),
    ("Which word is a shape: blue, square or right? Answer with one word.", "square"),
    ("Which word is a position: green, triangle or centre? Answer with one word.", "centre"),
]


def question(factor: str, suffix: str = SHORT_SUFFIX) -> str:
    """'What colour is the shape? Answer with one word: red, green or blue.'"""
    options = FACTORS[factor]
    return f"{QUESTIONS[factor]} {suffix.format(', '.join(options[:-1]), options[-1])}"


def caption(meta: dict[str, str]) -> str:
    where = "in the centre" if meta["position"] == "centre" else f"on the {meta['position']}"
    return f"A {meta['colour']} {meta['kind']} {where}."


def draw_shape(meta: dict[str, str], size: int, rng: random.Random) -> Image.Image:
    """One filled shape on a light background; the shape's centre stays within ~size/25 in x
    of POSITION_X, so its pixel centroid says its position (tests/unit/test_synthetic.py)."""
    background = tuple(rng.randint(225, 250) for _ in range(3))
    fill = tuple(min(255, max(0, c + rng.randint(-_TINT, _TINT))) for c in RGB[meta["colour"]])
    r = rng.uniform(0.16, 0.2) * size                 # half-width: 8-9.6 px at 48 px
    cx = (POSITION_X[meta["position"]] + rng.uniform(-0.04, 0.04)) * size
    cy = (0.5 + rng.uniform(-0.18, 0.18)) * size
    img = Image.new("RGB", (size, size), background)
    pen = ImageDraw.Draw(img)
    box = [round(cx - r), round(cy - r), round(cx + r), round(cy + r)]
    if meta["kind"] == "circle":
        pen.ellipse(box, fill=fill)
    elif meta["kind"] == "square":
        pen.rectangle(box, fill=fill)
    else:  # pointing up: apex at the top, base at the bottom of the box
        pen.polygon([((box[0] + box[2]) / 2, box[1]), (box[0], box[3]), (box[2], box[3])], fill=fill)
    return img


def _balanced_metas(n: int, rng: random.Random) -> list[dict[str, str]]:
    # Whole shuffled rounds of the 27 classes, so every factor value appears n/3 +- 9 times.
    classes = [{"colour": c, "kind": k, "position": p}
               for c in COLOURS for k in KINDS for p in POSITIONS]
    metas: list[dict[str, str]] = []
    while len(metas) < n:
        rnd = list(classes)
        rng.shuffle(rnd)
        metas.extend(rnd)
    return metas[:n]


def _save(img: Image.Image, out_dir: Path, stem: str, index: int) -> str:
    name = f"images/{stem}-{index:05d}." + ("png" if index % 2 == 0 else "jpg")
    if index % 2 == 0:
        img.save(out_dir / name, format="PNG")
    else:
        img.save(out_dir / name, **_JPEG)
    return name


def _record(rid: str, image: str | None, turns: list[tuple[str, str]], meta: dict | None,
            **extra: Any) -> dict:
    conversations = []
    for i, (q, a) in enumerate(turns):
        prefix = f"{IMAGE}\n" if (i == 0 and image is not None) else ""
        conversations += [{"from": "human", "value": prefix + q}, {"from": "gpt", "value": a}]
    record: dict[str, Any] = {"id": rid}
    if image is not None:
        record["image"] = image
    record["conversations"] = conversations
    if meta is not None:
        record["meta"] = meta
    record.update(extra)
    return record


def _write_json(path: Path, records: list[dict]) -> None:
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")


def synth_corpus(out_dir: str | Path, *, n_train: int = 600, n_heldout: int = 90,
                 image_size: int = 48, seed: int = 0) -> dict:
    """Draw n_train + n_heldout images and write the four JSON files (see the module docstring).

    Returns {"out_dir", "files": {file name: record count}, "images": image count}.
    """
    if n_train < 3 or n_heldout < 3 or image_size < 24:
        raise ValueError(f"synth_corpus needs n_train >= 3, n_heldout >= 3 and image_size >= 24, "
                         f"got {n_train}, {n_heldout}, {image_size}")
    out_dir = Path(out_dir)
    (out_dir / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    factors = list(FACTORS)

    captions, qa, reasoning = [], [], []
    for i, meta in enumerate(_balanced_metas(n_train, rng)):
        image = _save(draw_shape(meta, image_size, rng), out_dir, "train", i)
        captions.append(_record(f"cap-{i:05d}", image,
                                [("Describe the image briefly.", caption(meta))], meta))
        first = factors[i % 3]                       # question kinds cycle: balanced
        turns = [(question(first), meta[first])]
        # A third of the records are two-turn, chosen across the question kinds: tied to one kind
        # (i % 3), that kind would never be a record's last question, as every held-out one is.
        if (i // 3) % 3 == 1:
            second = rng.choice([f for f in factors if f != first])
            turns.append((question(second), meta[second]))
        qa.append(_record(f"qa-{i:05d}", image, turns, meta))
        asked = factors[(i // 3) % 3]                # decorrelated from the qa question kind
        answer = f"{REASONS[(asked, meta[asked])]} Answer: {meta[asked]}"
        reasoning.append(_record(f"rsn-{i:05d}", image,
                                 [(question(asked, THINK_SUFFIX), answer)], meta))
    for j in range(max(3, n_train // 20)):
        q, a = TEXT_ONLY[j % len(TEXT_ONLY)]
        qa.append(_record(f"txt-{j:05d}", None, [(q, a)], None))

    heldout = []
    for i, meta in enumerate(_balanced_metas(n_heldout, rng)):
        asked = factors[i % 3]
        meta = dict(meta)
        # Balance answers within each factor too: the value asked cycles over its three words.
        meta[asked] = FACTORS[asked][(i // 3) % 3]
        image = _save(draw_shape(meta, image_size, rng), out_dir, "heldout", i)
        heldout.append(_record(f"held-{i:05d}", image, [(question(asked), meta[asked])], meta,
                               factor=asked, answer=meta[asked], choices=list(FACTORS[asked])))

    files = {"captions.json": captions, "qa.json": qa, "reasoning.json": reasoning,
             "heldout.json": heldout}
    for name, records in files.items():
        _write_json(out_dir / name, records)
    return {"out_dir": str(out_dir), "files": {k: len(v) for k, v in files.items()},
            "images": n_train + n_heldout}


def corpus_texts(out_dir: str | Path) -> list[str]:
    """Every human/gpt text of the corpus files in out_dir, plus the template's words
    (system prompt, role names, the stage-3b tags), in a fixed order."""
    out_dir = Path(out_dir)
    texts = [SYSTEM_PROMPT, *TEMPLATE_WORDS]
    for name in ("captions.json", "qa.json", "reasoning.json", "heldout.json"):
        path = out_dir / name
        if path.exists():
            for record in json.loads(path.read_text(encoding="utf-8")):
                texts.extend(turn["value"] for turn in record["conversations"])
    return texts


def synth_all(out_dir: str | Path, *, vocab_size: int = 512, **corpus_kw: Any) -> dict:
    """The corpus under out_dir/corpus/ and its tokenizer under out_dir/tokenizer/."""
    out_dir = Path(out_dir)
    summary = synth_corpus(out_dir / "corpus", **corpus_kw)
    summary["tokenizer"] = str(train_tokenizer(corpus_texts(out_dir / "corpus"),
                                               out_dir / "tokenizer", vocab_size=vocab_size))
    return summary
