"""lladav as an lmms-eval model: `lmms-eval --model lladav --model_args pretrained=EXPORT ...`.

lmms-eval (PyPI) owns the tasks, prompts, metrics and sample logs; this module only answers its
`generate_until` requests with our sampler (lladav.inference.answer), the way `lladav eval`
answers a test record: the same prompt template, image tiles and sampler settings, so the two
give the same answer to the same record. It is registered through lmms-eval's entry-point group
`lmms_eval.models` (pyproject.toml), not by editing lmms-eval.

Generation settings per request, from the task's `generation_kwargs` or `--gen_kwargs` (the
reference's names, eval/scripts/evaluate.sh):
    gen_length, block_length, gen_steps (or steps)   the sampler's lengths (paper suite: per task)
    think_mode         "think" | "no_think" | none: " /think" or " /no_think" after each question
    until              extra stop strings: the answer is cut before the first one (chartqa: "\\n")
    remasking, temperature, cfg, threshold, prefix_cache, seed
    max_new_tokens     used as gen_length (and block_length, steps) when gen_length is not given
and lmms-eval's generic keys (do_sample, num_beams, top_p, ...) at their greedy values. Anything
else fails the request, naming the task: a setting silently ignored is a different benchmark.

`loglikelihood` is refused: LLaDA's Monte-Carlo ELBO estimate is not implemented (the paper's
suite uses generation only).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms

from lladav.data.conversation import IMAGE
from lladav.inference import SamplerSettings

GREEDY_DEFAULTS = {"do_sample": (False, None), "num_beams": (1, None), "top_p": (None, 1.0, 0, 0.0),
                   "top_k": (None, 0), "image_aspect_ratio": None, "max_length": None}
OUR_KEYS = ("gen_length", "block_length", "gen_steps", "steps", "think_mode", "until",
            "remasking", "temperature", "cfg", "threshold", "prefix_cache", "seed",
            "max_new_tokens")


class LmmsRequestError(ValueError):
    """A request lladav cannot answer as asked; the message names the task and document."""


def request_settings(gen_kwargs: dict[str, Any], where: str, *, threshold: float | None = None,
                     prefix_cache: bool = False) -> tuple[SamplerSettings, str | None, list[str]]:
    """(sampler settings, think tag or None, extra stop strings) for one request's gen kwargs.
    `where` names the request in errors."""
    unknown = [k for k in gen_kwargs if k not in OUR_KEYS and k not in GREEDY_DEFAULTS]
    if unknown:
        raise LmmsRequestError(f"{where}: unknown generation setting(s) {sorted(unknown)}; "
                               f"lladav understands {list(OUR_KEYS)}")
    for key, allowed in GREEDY_DEFAULTS.items():
        if allowed is not None and key in gen_kwargs and gen_kwargs[key] not in allowed:
            raise LmmsRequestError(f"{where}: {key}={gen_kwargs[key]!r} is not supported (lladav "
                                   f"decodes by iterative unmasking; allowed: {allowed})")
    kw = dict(gen_kwargs)
    gen_length = int(kw.get("gen_length") or kw.get("max_new_tokens") or 32)
    block_length = int(kw.get("block_length") or gen_length)
    steps = int(kw.get("gen_steps") or kw.get("steps") or gen_length)
    think = kw.get("think_mode")
    if think not in (None, "", "think", "no_think"):
        raise LmmsRequestError(f"{where}: think_mode={think!r}; expected think, no_think or none")
    until = kw.get("until") or []
    until = [until] if isinstance(until, str) else list(until)
    threshold = kw.get("threshold", threshold)
    settings = SamplerSettings(
        gen_length=gen_length, block_length=block_length, steps=steps,
        temperature=float(kw.get("temperature") or 0.0),
        remasking=str(kw.get("remasking") or "low_confidence"),
        threshold=None if threshold in (None, "", "none") else float(threshold),
        cfg_scale=float(kw.get("cfg") or 0.0),
        use_prefix_cache=_bool(kw.get("prefix_cache", prefix_cache)),
        seed=int(kw.get("seed") or 0))
    return settings, (f"/{think}" if think else None), [u for u in until if u]


def cut_at_stops(text: str, stops: list[str]) -> str:
    """The answer before the first stop string (the reference stops decoding there)."""
    for stop in stops:
        text = text.split(stop, 1)[0]
    return text.strip()


def _bool(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).strip().lower() in ("1", "true", "yes")


class LLaDAV(lmms):
    """`--model_args pretrained=EXPORT_URI[,threshold=0.9][,prefix_cache=true][,think_mode=...]`:
    an exported LLaDA-V folder (local or s3://). Batch size 1, on the CPU or the first GPU."""

    def __init__(self, pretrained: str, threshold: float | None = None, prefix_cache: bool = False,
                 think_mode: str | None = None, suite: str | None = None, stats: str | None = None,
                 batch_size: int = 1, device: str | None = None, **kwargs: Any) -> None:
        super().__init__()
        if kwargs:
            raise LmmsRequestError(f"lladav: unknown --model_args {sorted(kwargs)}; expected "
                                   "pretrained, threshold, prefix_cache, think_mode, suite, stats, "
                                   "batch_size, device")
        if suite is not None:
            from lladav.suites import suite_settings

            suite_settings(suite)  # an unknown suite fails here, naming the known ones
        self.suite, self.stats_path = suite, stats
        self.stats: dict[str, dict[str, float]] = {}
        import torch

        from lladav.inference import load

        self.model, self.tok = load(pretrained)
        if device and str(device).startswith("cuda") and torch.cuda.is_available():
            self.model.to(torch.device(device))  # lmms-eval passes its --device; CPU otherwise
        self.defaults: dict[str, Any] = {"threshold": threshold, "prefix_cache": _bool(prefix_cache)}
        self.think_mode = think_mode
        self.forward_passes: list[int] = []

    def generate_until(self, requests: list[Instance]) -> list[str]:
        from lladav.inference import answer

        out = []
        for req in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = req.args
            where = f"task {task}, doc {doc_id}"
            kwargs = dict(gen_kwargs or {})
            if self.suite is not None:
                kwargs = self._with_suite(kwargs, task, where)
            if self.think_mode and "think_mode" not in kwargs:
                kwargs["think_mode"] = self.think_mode
            settings, tag, stops = request_settings(kwargs, where, **self.defaults)
            visuals = doc_to_visual(self.task_dict[task][split][doc_id]) if doc_to_visual else []
            images = [_rgb(v, where) for v in (visuals or [])]
            marks = context.count(IMAGE)
            if marks and marks != len(images):
                raise LmmsRequestError(f"{where}: the prompt has {marks} {IMAGE} placeholders "
                                       f"for {len(images)} images")
            # No placeholders: the template puts them before the question, as `lladav eval` does.
            start = time.perf_counter()
            result = answer(self.model, self.tok, images, context, settings, tag=tag)
            st = self.stats.setdefault(task, {"n": 0, "seconds": 0.0, "forward_passes": 0})
            st["n"] += 1
            st["seconds"] += time.perf_counter() - start
            st["forward_passes"] += result.forward_passes
            self.forward_passes.append(result.forward_passes)
            text = cut_at_stops(result.text, stops)
            out.append(text)
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
        if self.stats_path:  # rewritten after every batch of requests: complete at the end
            Path(self.stats_path).write_text(json.dumps(self.stats, indent=1, sort_keys=True))
        return out

    def _with_suite(self, kwargs: dict[str, Any], task: str, where: str) -> dict[str, Any]:
        """The request's kwargs under the suite's settings for its task, as the reference's
        --gen_kwargs update a task's generation_kwargs (stop strings are joined)."""
        from lladav.suites import settings_for_task

        mine = settings_for_task(self.suite, task)
        if mine is None:
            raise LmmsRequestError(f"{where}: suite {self.suite} has no settings for task {task}")
        merged = {**kwargs, **mine}
        until = kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        merged["until"] = until + [u for u in mine.get("until", []) if u not in until]
        return merged

    def loglikelihood(self, requests: list[Instance]) -> list[tuple[float, bool]]:
        raise NotImplementedError(
            "lladav does not score log-likelihoods: a masked-diffusion model has no exact "
            "likelihood, and LLaDA's Monte-Carlo ELBO estimate is not implemented here. Use a "
            "generation task (output_type: generate_until), as the paper's suite does.")

    def generate_until_multi_round(self, requests: list[Instance]) -> list[str]:
        raise NotImplementedError("lladav answers single-round requests (generate_until) only")


def _rgb(visual: Any, where: str) -> Any:
    from PIL import Image

    if isinstance(visual, str):
        try:
            with Image.open(visual) as img:
                return img.convert("RGB")
        except OSError as e:
            raise LmmsRequestError(f"{where}: image {visual}: {e}") from None
    if isinstance(visual, Image.Image):
        return visual.convert("RGB")
    raise LmmsRequestError(f"{where}: unsupported visual {type(visual).__name__} (images only: "
                           "video and audio are not supported)")


def manifest() -> Any:
    """The entry point lmms-eval loads (group `lmms_eval.models`)."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return ModelManifest(model_id="lladav", simple_class_path="lladav.lmms_model.LLaDAV")
