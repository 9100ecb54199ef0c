"""lladav's lmms-eval model (lladav/lmms_model.py) and the suites as data (lladav/suites/)."""

from __future__ import annotations

import pytest

pytest.importorskip("lmms_eval", reason="lmms-eval is installed by `make setup` (the eval extra)")

from PIL import Image  # noqa: E402
from lmms_eval.api.instance import Instance  # noqa: E402

from lladav.lmms_model import LLaDAV, LmmsRequestError, cut_at_stops, request_settings  # noqa: E402
from lladav.suites import paper_suite  # noqa: E402

# The reference's table (shared/lladav_digest.md §5.3, eval/scripts/evaluate.sh):
# (gen_length, block_length, steps, think mode, extra stops)
MC = (2, 2, 2, "no_think", [])
REFERENCE = {
    **{t: MC for t in ("mmmu_val", "mmmu_pro_standard", "mmmu_pro_vision", "mmstar", "ai2d",
                       "seedbench", "mmbench_en_dev", "muirbench", "videomme", "mlvu_dev", "mme",
                       "realworldqa")},
    "chartqa": (16, 16, 16, "no_think", ["\n"]),
    "docvqa_val": (32, 32, 16, "no_think", []),
    "infovqa_val": (32, 32, 16, "no_think", []),
    "mathvista_testmini": (96, 96, 48, "think", []),
    "mathverse_testmini_vision": (64, 64, 32, "think", []),
}


def test_the_paper_suite_is_the_references_table():
    suite = paper_suite()
    assert len(suite["tasks"]) == 17 and set(suite["tasks"]) == set(REFERENCE)
    assert suite["defaults"] == {"temperature": 0, "remasking": "low_confidence", "cfg": 0}
    for task, kwargs in suite["tasks"].items():
        settings, tag, stops = request_settings({**suite["defaults"], **kwargs}, task)
        got = (settings.gen_length, settings.block_length, settings.steps, tag.lstrip("/"), stops)
        assert got == REFERENCE[task], task
        assert settings.temperature == 0 and settings.remasking == "low_confidence"
        assert settings.threshold is None and settings.cfg_scale == 0


def test_request_settings_follow_the_request_and_refuse_what_they_do_not_know():
    settings, tag, stops = request_settings(
        {"max_new_tokens": 12, "until": "\n", "do_sample": False, "num_beams": 1, "top_p": 1.0},
        "task t, doc 0", threshold=0.9)
    assert (settings.gen_length, settings.block_length, settings.steps) == (12, 12, 12)
    assert tag is None and stops == ["\n"] and settings.threshold == 0.9
    with pytest.raises(LmmsRequestError, match=r"task chartqa, doc 3: unknown generation "
                                               r"setting\(s\) \['top_q'\]"):
        request_settings({"top_q": 0.5}, "task chartqa, doc 3")
    with pytest.raises(LmmsRequestError, match="task t, doc 0: num_beams=4 is not supported"):
        request_settings({"num_beams": 4}, "task t, doc 0")
    with pytest.raises(LmmsRequestError, match="think_mode='maybe'"):
        request_settings({"think_mode": "maybe"}, "task t, doc 0")
    assert cut_at_stops("blue\nthe shape", ["\n"]) == "blue"


def _request(context, images, gen_kwargs=None):
    docs = {"t": {"test": [{"images": images}]}}
    inst = Instance("generate_until", (context, gen_kwargs or {"gen_length": 2}, lambda d: d["images"],
                                        0, "t", "test"), idx=0,
                    metadata={"task": "t", "doc_id": 0, "repeats": 1})
    return docs, inst


@pytest.fixture(scope="module")
def model(random_export):
    return LLaDAV(pretrained=str(random_export))


def test_more_images_than_placeholders_fails_naming_the_request(model):
    img = Image.new("RGB", (32, 32), "red")
    model.task_dict, inst = _request("<image>\nWhich is red?", [img, img])
    with pytest.raises(LmmsRequestError, match="task t, doc 0: the prompt has 1 <image> "
                                               "placeholders for 2 images"):
        model.generate_until([inst])
    model.task_dict, inst = _request("Which is red?", [img], {"gen_length": 2, "beams": 2})
    with pytest.raises(LmmsRequestError, match=r"task t, doc 0: unknown generation setting\(s\) \['beams'\]"):
        model.generate_until([inst])
    model.task_dict, inst = _request("Which is red?", [img])
    assert isinstance(model.generate_until([inst])[0], str) and model.forward_passes[-1] >= 1


def test_loglikelihood_is_refused_with_the_reason(model):
    with pytest.raises(NotImplementedError, match="no exact likelihood"):
        model.loglikelihood([])


def test_unknown_model_args_fail(random_export):
    with pytest.raises(LmmsRequestError, match=r"unknown --model_args \['temprature'\]"):
        LLaDAV(pretrained=str(random_export), temprature=0)


def test_an_eval_step_with_a_suite_is_checked_when_the_pipeline_is_read():
    from pydantic import ValidationError

    from lladav.config import EvalStep

    ok = EvalStep.model_validate({"name": "p", "kind": "eval", "model": "s", "suite": "llada_v_paper",
                                  "tasks": ["chartqa", "mme"]})
    assert ok.data is None and ok.refs() == {"model": "s"}
    with pytest.raises(ValidationError, match=r"suite llada_v_paper has no task\(s\) \['chart_qa'\]"):
        EvalStep.model_validate({"name": "p", "kind": "eval", "model": "s",
                                 "suite": "llada_v_paper", "tasks": ["chart_qa"]})
    with pytest.raises(ValidationError, match="`data` .* is required by suite cpu_mini"):
        EvalStep.model_validate({"name": "p", "kind": "eval", "model": "s", "suite": "cpu_mini"})
    with pytest.raises(ValidationError, match="`data` .* is required"):
        EvalStep.model_validate({"name": "p", "kind": "eval", "model": "s"})


def test_suite_settings_reach_every_subtask_of_a_group():
    from lladav.suites import settings_for_task

    assert settings_for_task("llada_v_paper", "mathverse_testmini_vision_intensive")["gen_steps"] == 32
    assert settings_for_task("llada_v_paper", "chartqa")["until"] == ["\n"]
    assert settings_for_task("llada_v_paper", "ocrbench") is None
