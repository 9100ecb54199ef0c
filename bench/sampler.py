"""Sampler speed: baseline low-confidence decoding vs confidence-threshold parallel decoding.

Takes the demo's final model (stage 3 of pipelines/tiny.yaml, run here first if it is not done:
a rerun of a finished pipeline only skips its steps) or any export given with --model, and
decodes every held-out question twice with it:
    baseline   steps = gen_length = block_length: one token revealed per forward pass
    threshold  every masked position of the block above tau, at least one per pass
and prints forward passes per answer, wall time, accuracy, and the fraction of identical answers.
Target (issue 3): >= 3x fewer forward passes with >= 99% identical answers.

    .venv/bin/python bench/sampler.py [--tau 0.9] [--model EXPORT --corpus SYNTH_CORPUS_DIR]

Questions are asked the /think way, so an answer is a sentence of ~15 tokens ending
"Answer: <word>": a one-word answer would leave nothing to decode in parallel. The model is
trained with EOS padding as targets (LLaDA's SFT way), so EOS stays allowed at masked positions:
the span after the answer's <|eot_id|> fills with EOS, which the threshold rule can reveal in
parallel.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

import torch  # noqa: E402
from PIL import Image  # noqa: E402

from lladav.data.conversation import BOS, END_HEADER, START_HEADER  # noqa: E402
from lladav.inference import SamplerSettings, answer, load  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "pipelines" / "tiny.yaml"


def demo_model() -> tuple[Path, Path]:
    """(stage-3 export, synthetic corpus folder) of the demo pipeline, running what is not done."""
    from lladav.config import load_pipeline
    from lladav.pipeline import run

    pipe = load_pipeline(DEMO)
    steps = run(pipe, say=lambda m: print(" ", m, flush=True))
    synth = next(p for p in steps if p.kind == "synth")
    stage3 = [p for p in steps if p.kind == "stage"][-1]
    return Path(stage3.record["outputs"]["export"]), Path(synth.config.output) / "corpus"


def held_out_questions(corpus: Path) -> list[dict]:
    """Every factor of every held-out image: 3 questions per image (heldout.json asks one), so
    the identical-answer fraction rests on 270 answers, not 90."""
    from lladav.data.synthetic import FACTORS

    return [{"image": rec["image"], "factor": f, "answer": rec["meta"][f], "meta": rec["meta"]}
            for rec in json.loads((corpus / "heldout.json").read_text()) for f in FACTORS]


def evaluate(model, tok, heldout: list[dict], root: Path, settings: SamplerSettings) -> dict:
    """Held-out images asked the reasoning way, so an answer is a sentence (~15 tokens) that
    ends "Answer: <word>": one-word answers would leave nothing to decode in parallel."""
    from lladav.data.synthetic import THINK_SUFFIX, question

    answers, passes, correct = [], 0, 0
    t0 = time.time()
    for rec in heldout:
        image = Image.open(root / rec["image"]).convert("RGB")
        prompt = "<image>\n" + question(rec["factor"], THINK_SUFFIX) + " /think"
        out = answer(model, tok, [image], prompt, settings)
        answers.append(out.text)
        passes += out.forward_passes
        correct += out.text.strip().lower().endswith(f"answer: {rec['answer']}")
    return {"answers": answers, "passes": passes / len(heldout), "seconds": time.time() - t0,
            "accuracy": correct / len(heldout)}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="an exported tiny LLaDA-V folder (default: the demo's stage 3)")
    ap.add_argument("--corpus", help="with --model: the synthetic corpus folder (heldout.json)")
    ap.add_argument("--tau", type=float, default=0.9, help="confidence threshold")
    ap.add_argument("--gen-length", type=int, default=32)
    args = ap.parse_args()
    torch.set_num_threads(max(1, (os.cpu_count() or 2)))

    if bool(args.model) != bool(args.corpus):
        ap.error("--model and --corpus go together")
    t0 = time.time()
    export, corpus = (Path(args.model), Path(args.corpus)) if args.model else demo_model()
    train_s = time.time() - t0
    model, tok = load(str(export))
    heldout = held_out_questions(corpus)

    base = SamplerSettings(gen_length=args.gen_length, block_length=args.gen_length,
                           steps=args.gen_length, banned=(BOS, START_HEADER, END_HEADER))
    fast = replace(base, threshold=args.tau)
    b = evaluate(model, tok, heldout, corpus, base)
    f = evaluate(model, tok, heldout, corpus, fast)
    same = sum(x == y for x, y in zip(b["answers"], f["answers"])) / len(heldout)

    for i in range(3):
        print(f"  e.g. {heldout[i]['meta']}, {heldout[i]['factor']} -> {b['answers'][i]!r}")
    print(f"\nmodel {export} (ready in {train_s:.0f} s)")
    print(f"held-out questions: {len(heldout)} (3 per held-out image; chance 1/3)")
    print(f"{'decoding':<22}{'passes/answer':>14}{'wall s':>9}{'accuracy':>10}")
    print(f"{'baseline (1/step)':<22}{b['passes']:>14.2f}{b['seconds']:>9.2f}{b['accuracy']:>10.1%}")
    print(f"{f'threshold tau={args.tau}':<22}{f['passes']:>14.2f}{f['seconds']:>9.2f}{f['accuracy']:>10.1%}")
    ratio = b["passes"] / f["passes"]
    print(f"\nforward passes: {ratio:.2f}x fewer (target >= 3x); wall time {b['seconds'] / f['seconds']:.2f}x; "
          f"identical answers {same:.1%} (target >= 99%)")
    ok = ratio >= 3 and same >= 0.99
    print("TARGET MET" if ok else "TARGET MISSED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
