"""render_ds_config fills every "auto" from the stage and refuses what lladav owns; the schedule
and the parameter-group checks fail before any DeepSpeed work starts."""

from __future__ import annotations

import json

import pytest
from torch import nn

from lladav.train.engine import initialize, lr_multiplier, render_ds_config, resolve_template

STAGE = dict(micro_batch=4, grad_accum=8, world_size=2, gradient_clipping=1.0, precision="bf16",
             hidden_size=64)


def _autos(node, path=""):
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in _autos(v, f"{path}{k}.")]
    return [path] if node == "auto" else []


@pytest.mark.parametrize("template", ["infra/deepspeed/zero3.json",
                                      "infra/deepspeed/zero3_offload.json"])
def test_every_auto_is_filled_from_the_stage(template):
    config = render_ds_config(template, **STAGE)
    assert not _autos(config)
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 8
    assert config["train_batch_size"] == 4 * 8 * 2
    assert config["gradient_clipping"] == 1.0
    assert config["bf16"] == {"enabled": True}
    zero = config["zero_optimization"]
    assert zero["reduce_bucket_size"] == 2**20          # hidden² = 4096, raised to the floor
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 2**20)
    assert zero["stage3_param_persistence_threshold"] == 640
    big = render_ds_config(template, **{**STAGE, "hidden_size": 4096})["zero_optimization"]
    assert big["reduce_bucket_size"] == 4096**2 and big["stage3_prefetch_bucket_size"] == int(
        0.9 * 4096**2)                                   # LLaDA-8B: Hugging Face's rule as is
    assert "optimizer" not in config and "scheduler" not in config


def test_fp32_and_world_size_change_the_arithmetic():
    config = render_ds_config("infra/deepspeed/zero3.json", **{**STAGE, "precision": "fp32",
                                                               "world_size": 3, "grad_accum": 1})
    assert config["bf16"]["enabled"] is False and config["train_batch_size"] == 12


def test_overrides_nested_or_dotted_win_over_auto_and_the_input_is_not_mutated():
    template = resolve_template("infra/deepspeed/zero3.json")
    before = json.dumps(template, sort_keys=True)
    config = render_ds_config(template, **STAGE, overrides={
        "zero_optimization.stage3_param_persistence_threshold": 0,
        "zero_optimization": {"overlap_comm": False}, "steps_per_print": 1})
    zero = config["zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 0 and zero["overlap_comm"] is False
    assert zero["reduce_bucket_size"] == 2**20 and config["steps_per_print"] == 1
    assert json.dumps(template, sort_keys=True) == before


def test_template_resolves_from_the_repo_root_whatever_the_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_template("infra/deepspeed/zero3.json")["zero_optimization"]["stage"] == 3
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"train_batch_size": "auto", "zero_optimization": {"stage": 2}}))
    assert render_ds_config(path, **STAGE)["train_batch_size"] == 64
    with pytest.raises(FileNotFoundError, match="nope.json"):
        resolve_template("nope.json")


@pytest.mark.parametrize("block", ["optimizer", "scheduler"])
def test_an_optimizer_or_scheduler_block_is_refused(block):
    with pytest.raises(ValueError, match=f"'{block}' block"):
        render_ds_config({block: {"type": "AdamW"}}, **STAGE)
    with pytest.raises(ValueError, match=f"'{block}' block"):
        render_ds_config({}, **STAGE, overrides={block: {"type": "AdamW"}})


def test_an_auto_without_a_rule_is_named():
    with pytest.raises(ValueError, match=r"zero_optimization\.sub_group_size"):
        render_ds_config({"zero_optimization": {"sub_group_size": "auto"}}, **STAGE)


@pytest.mark.parametrize("field,value", [("train_batch_size", 32), ("gradient_clipping", 0.5),
                                         ("train_micro_batch_size_per_gpu", 2)])
def test_a_template_contradicting_the_stage_is_named(field, value):
    with pytest.raises(ValueError, match=field):
        render_ds_config({field: value}, **STAGE)
    assert render_ds_config({"train_batch_size": 64}, **STAGE)["train_batch_size"] == 64


def test_precision_and_fp16_are_checked():
    with pytest.raises(ValueError, match="precision"):
        render_ds_config({}, **{**STAGE, "precision": "fp16"})
    with pytest.raises(ValueError, match="fp16.enabled"):
        render_ds_config({"fp16": {"enabled": True}}, **STAGE)
    with pytest.raises(ValueError, match="bf16.enabled"):
        render_ds_config({"bf16": {"enabled": True}}, **{**STAGE, "precision": "fp32"})


def test_cosine_schedule_with_linear_warmup():
    assert lr_multiplier(0, 10, 110) == 0.0
    assert lr_multiplier(5, 10, 110) == 0.5
    assert lr_multiplier(10, 10, 110) == 1.0
    assert lr_multiplier(60, 10, 110) == pytest.approx(0.5)
    assert lr_multiplier(110, 10, 110) == pytest.approx(0.0, abs=1e-12)
    assert lr_multiplier(200, 10, 110) == 0.0
    assert lr_multiplier(0, 0, 5) == 1.0


def test_parameter_groups_are_checked_before_deepspeed_starts():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2))
    model[1].requires_grad_(False)
    with pytest.raises(ValueError, match=r"in no group.*0\.weight"):
        initialize(model, [{"name": "a", "lr": 1.0, "params": [model[0].bias]}], {}, 10, 0.1)
    with pytest.raises(ValueError, match=r"1\.weight.*frozen"):
        both = [*model[0].parameters(), model[1].weight]
        initialize(model, [{"name": "a", "lr": 1.0, "params": both}], {}, 10, 0.1)
    with pytest.raises(ValueError, match="needs 'name' and 'lr'"):
        initialize(model, [{"params": list(model[0].parameters())}], {}, 10, 0.1)
    with pytest.raises(ValueError, match="trains nothing"):
        initialize(model, [], {}, 10, 0.1)
