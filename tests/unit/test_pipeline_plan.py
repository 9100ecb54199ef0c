"""Pipeline configs and step keys, without running anything: what reruns when something changes."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import yaml

from lladav import storage
from lladav.config import ConfigError, load_pipeline, parse_pipeline
from lladav.pipeline import plan

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "integration"))
from pipeline_files import write_pipeline  # noqa: E402


def keys(path: Path) -> dict[str, str]:
    return {p.name: p.key for p in plan(load_pipeline(path))}


@pytest.fixture
def files(tmp_path, synth_dir) -> Path:
    return write_pipeline(tmp_path / "p", synth_dir, storage=str(tmp_path / "store"), tracking_uri=None)


def edit(path: Path, fn) -> None:
    data = yaml.safe_load(path.read_text())
    fn(data)
    path.write_text(yaml.safe_dump(data, sort_keys=False))


def test_a_learning_rate_change_rekeys_that_stage_and_everything_after(files):
    before = keys(files)
    edit(files, lambda d: d["steps"][4]["overrides"].update({"trainable": {"language_model": 1e-3}}))
    after = keys(files)
    changed = {k for k in before if before[k] != after[k]}
    assert changed == {"stage2", "stage3", "eval"}


def test_a_recipe_change_rekeys_its_build_and_the_stages_that_read_it(files):
    before = keys(files)
    edit(files.parent / "mix_stage1.yaml", lambda d: d.update(seed=1))
    after = keys(files)
    assert {k for k in before if before[k] != after[k]} == {"mix-stage1", "stage1", "stage2", "stage3", "eval"}


def test_where_outputs_go_is_not_part_of_a_key(files, tmp_path):
    before = keys(files)
    edit(files, lambda d: d.update(storage=str(tmp_path / "elsewhere")))
    assert keys(files) == before


def test_states_follow_the_step_folder_markers(files):
    steps = {p.name: p for p in plan(load_pipeline(files))}
    assert {p.state for p in steps.values()} == {"pending"}
    storage.write_bytes(storage.join(steps["stage1"].folder, "started.json"), b'{"run_id": "r1"}')
    storage.write_bytes(storage.join(steps["mix-stage1"].folder, "done.json"),
                        json.dumps({"key": steps["mix-stage1"].key, "run_id": "r0"}).encode())
    again = {p.name: p for p in plan(load_pipeline(files))}
    assert again["mix-stage1"].state == "done" and again["mix-stage1"].record["run_id"] == "r0"
    assert again["stage1"].state == "interrupted"
    assert again["stage2"].state == "pending"
    # after a change, the folder of the old key still tells what finished before
    edit(files.parent / "mix_stage1.yaml", lambda d: d.update(seed=1))
    changed = {p.name: p for p in plan(load_pipeline(files))}["mix-stage1"]
    assert changed.state == "pending" and changed.previous == steps["mix-stage1"].key


def test_stage_outputs_and_inputs_are_wired_from_the_steps(files):
    steps = {p.name: p for p in plan(load_pipeline(files))}
    s2 = steps["stage2"].config
    assert s2.mixture == storage.join(steps["mix-stage2"].folder, "mixture")
    assert s2.init.export == storage.join(steps["stage1"].folder, "export") and s2.init.flavor is None
    assert s2.output == storage.join(steps["stage2"].folder, "export")
    assert s2.checkpoint.uri == storage.join(steps["stage2"].folder, "checkpoints")
    assert steps["stage1"].config.init.flavor == "tiny"


def base(**step) -> dict:
    return {"name": "p", "steps": [{"name": "mix", "kind": "data", "recipe": "r.yaml"}, step]}


@pytest.mark.parametrize("step, message", [
    ({"name": "s", "kind": "stage", "stage": "s.yaml", "mixture": "nope"}, "mixture 'nope' must name an earlier step"),
    ({"name": "s", "kind": "stage", "stage": "s.yaml", "mixture": "mix", "init": "mix"}, "init 'mix' is a data step, expected a stage step"),
    ({"name": "mix", "kind": "data", "recipe": "r.yaml"}, "step name 'mix' is used twice"),
    ({"name": "e", "kind": "eval", "model": "mix", "data": "/x.json"}, "model 'mix' is a data step"),
    ({"name": "d", "kind": "data", "recipe": "r.yaml", "tokenizer": "mix"},
     "tokenizer 'mix' is a data step, expected a tokenizer or synth step"),
    ({"name": "s", "kind": "stage", "stage": "s.yaml", "base": "mix"}, "base 'mix' is a data step"),
    ({"name": "s", "kind": "stage", "stage": "s.yaml", "base": "b", "init": "s0"},
     "set at most one of `init` (a stage step) and `base`"),
    ({"name": "t", "kind": "tokenizer", "recipe": "r.yaml", "corpus": ["a.json"]},
     "set exactly one of `recipe` and `corpus`"),
    ({"name": "s", "kind": "stage", "stage": "s.yaml", "lr": 1}, "steps.1.stage.lr: unknown key"),
    ({"name": "s", "kind": "train", "stage": "s.yaml"}, "steps.1"),
])
def test_bad_pipelines_name_the_step_and_the_reason(step, message):
    with pytest.raises(ConfigError) as err:
        parse_pipeline(base(**step), "pipe.yaml")
    assert "pipe.yaml" in str(err.value) and message in str(err.value)


def test_a_bad_stage_file_fails_the_plan_naming_that_file(files):
    edit(files.parent / "stage2.yaml", lambda d: d.update(micro_batch=0))
    with pytest.raises(ConfigError, match=r"stage2\.yaml.*\n.*micro_batch"):
        plan(load_pipeline(files))


REPO = Path(__file__).resolve().parent.parent.parent


def test_the_papers_pipeline_plans_typed_and_chained(monkeypatch):
    from typer.testing import CliRunner

    from lladav.cli import app

    steps = {p.name: p for p in plan(load_pipeline(REPO / "pipelines" / "llada_v.yaml"))}
    stages = [p for p in steps.values() if p.kind == "stage"]
    assert [p.name for p in stages] == ["stage1", "stage2a", "stage2b", "stage3a", "stage3b"]
    first = stages[0].config
    assert first.init.language_model and first.init.vision_tower
    assert first.trainable.model_dump() == {"vision_tower": None, "projector": 1e-3, "language_model": None}
    for before, after in zip(stages, stages[1:]):
        assert after.config.init.export == storage.join(before.folder, "export")
        assert after.config.trainable.vision_tower == 2e-6 and after.config.trainable.language_model == 1e-5
    for p in stages:
        assert p.config.mixture.endswith("/mixture") and steps[p.step.mixture].kind == "data"
    # it ends with the paper's lmms-eval suite on the last stage's export
    last = list(steps.values())[-1]
    assert (last.kind, last.step.suite, last.step.model) == ("eval", "llada_v_paper", "stage3b")
    # the CLI validates it without storage credentials: states are "unknown", exit 0
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_ENDPOINT_URL", "AWS_PROFILE"):
        monkeypatch.delenv(k, raising=False)
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    result = CliRunner().invoke(app, ["pipeline", "plan", str(REPO / "pipelines" / "llada_v.yaml")])
    assert result.exit_code == 0, result.output
    assert "stage3b" in result.output and "the configs are valid" in result.output
    assert "paper" in result.output


def test_a_broken_reference_in_the_papers_pipeline_exits_2(tmp_path):
    from typer.testing import CliRunner

    from lladav.cli import app

    data = yaml.safe_load((REPO / "pipelines" / "llada_v.yaml").read_text())
    next(s for s in data["steps"] if s["name"] == "stage3b")["init"] = "stage9"
    bad = REPO / "pipelines" / f".bad-{tmp_path.name}.yaml"
    bad.write_text(yaml.safe_dump(data))
    try:
        result = CliRunner().invoke(app, ["pipeline", "plan", str(bad)])
    finally:
        bad.unlink()
    assert result.exit_code == 2 and "init 'stage9' must name an earlier step" in result.output


def test_step_keys_name_the_package_tree_not_the_commit():
    """A commit touching only docs or configs must not rerun finished stages: the code part of
    a key is lladav/'s git tree (plus any uncommitted diff of it), never the commit id."""
    import subprocess

    from lladav.pipeline import _code_identity

    root = Path(__file__).resolve().parents[2]
    tree = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD:lladav"], capture_output=True,
                          text=True, check=True).stdout.strip()
    identity = _code_identity()
    assert identity["git_tree"] == tree
    assert "git_commit" not in identity


# ---- the own-corpus template: what `pipeline plan` refuses before any step runs --------------

def own_corpus(tmp_path: Path) -> Path:
    """pipelines/own_corpus.yaml with its recipe and stage, laid out as in the repository, beside
    a two-record LLaVA JSON corpus in my_corpus/; returns the pipeline's path."""
    for rel in ("pipelines/own_corpus.yaml", "data_recipes/own_corpus.yaml", "stages/own_corpus.yaml"):
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text((REPO / rel).read_text())
    corpus = tmp_path / "my_corpus"
    corpus.mkdir()
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 0, 0)).save(corpus / "a.png")
    record = {"id": "a", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]}
    for name in ("train.json", "test.json"):
        (corpus / name).write_text(json.dumps([record, dict(record, id="b")]))
    return tmp_path / "pipelines" / "own_corpus.yaml"


def plan_cli(path: Path):
    from typer.testing import CliRunner

    from lladav.cli import app

    return CliRunner().invoke(app, ["pipeline", "plan", str(path)])


def test_the_own_corpus_template_plans(tmp_path):
    result = plan_cli(own_corpus(tmp_path))
    assert result.exit_code == 0, result.output
    steps = {p.name: p for p in plan(load_pipeline(own_corpus(tmp_path / "again")))}
    assert [p.kind for p in steps.values()] == ["tokenizer", "base", "data", "stage", "eval"]
    mix, train = steps["mix"].config, steps["train"].config
    assert mix.tokenizer == storage.join(steps["tokenizer"].folder, "tokenizer")
    assert steps["base"].config.tokenizer == mix.tokenizer
    base = storage.join(steps["base"].folder, "base")
    assert (train.init.language_model, train.init.vision_tower, train.init.flavor) == (
        storage.join(base, "llada"), storage.join(base, "siglip"), None)
    assert steps["eval"].config.data == str(tmp_path / "again" / "my_corpus" / "test.json")


@pytest.mark.parametrize("damage, message", [
    (lambda c: (c / "test.json").unlink(), r"test\.json"),
    (lambda c: (c / "test.json").write_text('[{"id": "a", "conversations": [}]'),
     r"test\.json: byte 31: Expecting value.* \(at record 1 of the test set\)"),
    (lambda c: (c / "test.json").write_text(json.dumps([{"id": "q1", "conversations": [
        {"from": "human", "value": "What?"}]}])), r"test\.json#byte=1 \(record 'q1'\): no assistant turn"),
])
def test_a_bad_eval_file_fails_the_plan_naming_file_and_record(tmp_path, damage, message):
    path = own_corpus(tmp_path)
    damage(tmp_path / "my_corpus")
    result = plan_cli(path)
    assert result.exit_code == 2, result.output
    assert re.search(message, " ".join(result.output.split())), result.output


def test_a_recipe_built_for_another_tower_fails_the_plan_naming_both(tmp_path):
    path = own_corpus(tmp_path)
    edit(tmp_path / "data_recipes" / "own_corpus.yaml", lambda d: d.pop("vision"))
    result = plan_cli(path)
    assert result.exit_code == 2, result.output
    text = " ".join(result.output.split())
    assert "stage train" in text and "own_corpus.yaml" in text
    assert "384 px tiles of 14 px patches" in text and "32 px tiles of 8 px patches" in text
    assert "flavor tiny" in text and "tile_size: 32, patch_size: 8" in text


def test_a_forbidden_licence_fails_the_plan_naming_the_sources(files):
    assert {p.name for p in plan(load_pipeline(files))} >= {"mix-stage1", "stage3"}
    edit(files, lambda d: d.update(forbid_licenses=["unknown", "CC-BY-NC-4.0"]))
    with pytest.raises(ConfigError) as err:
        plan(load_pipeline(files))
    text = str(err.value)
    assert "forbids the licences ['unknown', 'CC-BY-NC-4.0']" in text
    assert re.search(r"step mix-stage2 \(recipe \S*mix_stage2.yaml\): source qa is unknown", text)
    assert re.search(r"step mix-stage3 \(recipe \S*mix_stage3.yaml\): source reasoning is "
                     r"unknown", text)
    assert "mix-stage1" not in text                        # CC-BY-4.0 is allowed
    edit(files, lambda d: d.update(forbid_licenses=["CC-BY-4.0"]))
    with pytest.raises(ConfigError, match="source captions is CC-BY-4.0"):
        plan(load_pipeline(files))


def test_a_source_licence_is_an_spdx_id_a_url_or_unknown():
    from lladav.config import Source

    base = {"name": "s", "kind": "llava_json", "location": "x.json"}
    assert Source.model_validate(base).license == "unknown"
    for ok in ("CC-BY-4.0", "Apache-2.0", "CC-BY-4.0 OR MIT", "LicenseRef-internal-1",
               "https://example.org/terms"):
        assert Source.model_validate({**base, "license": ok}).license == ok
    for bad in ("", "free for research", "CC BY 4.0"):
        with pytest.raises(ValueError):
            Source.model_validate({**base, "license": bad})


@pytest.mark.parametrize("field, value, named", [
    ("init", {"flavor": "tinny"}, "init.flavor: Value error, unknown flavor 'tinny'"),
    ("deepspeed", "infra/deepspeed/zero4.json",
     "deepspeed: Value error, DeepSpeed template 'infra/deepspeed/zero4.json' not found"),
])
def test_a_misspelled_flavour_or_deepspeed_template_fails_the_plan_naming_the_field(
        files, field, value, named):
    from typer.testing import CliRunner

    from lladav.cli import app

    edit(files.parent / "stage2.yaml", lambda d: d.update({field: value}))
    result = CliRunner().invoke(app, ["pipeline", "plan", str(files)])
    assert result.exit_code == 2, result.output
    assert "stage2.yaml: invalid stage" in result.output and named in result.output


def test_the_plan_reads_and_validates_each_yaml_once(files, monkeypatch):
    from lladav import pipeline

    calls: list[str] = []
    for name in ("load_recipe", "load_stage"):
        real = getattr(pipeline, name)
        monkeypatch.setattr(pipeline, name, lambda path, *a, _real=real, **k: calls.append(
            Path(path).name) or _real(path, *a, **k))
    plan(load_pipeline(files))
    assert sorted(calls) == sorted(["mix_stage1.yaml", "mix_stage2.yaml", "mix_stage3.yaml",
                                    "stage1.yaml", "stage2.yaml", "stage3.yaml"])
