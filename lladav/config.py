"""Typed configs: mixture recipes, training stages and pipelines, as pydantic models.

Every model forbids unknown keys and is frozen, and every field carries a docstring that the CLI's
help and the error messages reuse. `load_recipe(path)` reads YAML and fails before any work starts
with the YAML path of each bad field (`sources.1.weight: ...`), the file name and the fix.

Owns: the schema of the YAML files and their validation. Does not own: what the fields do (that is
the module named in each model's docstring) or where files live (storage.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator


class ConfigError(ValueError):
    """A config file is unreadable or invalid; the message names the file and each bad field."""


class StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)


class SourceFilters(StrictModel):
    """Per-source record filters (data/build.py). A filtered record is written to rejects.parquet
    with reason `filtered`, so counts always add up."""

    require_image: bool = False
    """Keep only records with at least one image."""
    text_only: bool = False
    """Keep only records without images."""
    max_turns: int | None = Field(default=None, ge=1)
    """Keep only conversations with at most this many messages (human + gpt)."""
    min_response_chars: int | None = Field(default=None, ge=0)
    """Keep only records whose assistant text is at least this long (characters, all turns)."""
    exclude_ids: list[str] = []
    """Source record ids to drop (takedowns, known-bad records)."""

    @model_validator(mode="after")
    def _exclusive(self) -> "SourceFilters":
        if self.require_image and self.text_only:
            raise ValueError("require_image and text_only cannot both be true")
        return self


class Source(StrictModel):
    """One corpus in a mixture (data/sources.py reads it)."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Short unique name; it appears in the manifest, the rejects and lineage queries."""
    kind: Literal["llava_json", "parquet", "webdataset"]
    """Format: `llava_json` (a .json list or .jsonl of LLaVA records), `parquet` (LLaVA-OneVision
    layout: id, image bytes, conversations), `webdataset` (tars of image + json/txt, img2dataset style)."""
    location: str
    """URI of the corpus: a .json/.jsonl file, a parquet file or folder, a tar file or folder of tars."""
    image_root: str | None = None
    """URI that relative `image` paths of llava_json records resolve against (default: the
    folder of `location`)."""
    weight: float = Field(default=1.0, ge=0.0)
    """Deterministic sampling multiplier: 0.3 keeps a seeded 30% of the records, 2.0 repeats every
    record twice, 2.5 repeats all twice and a seeded half a third time."""
    tag: str | None = None
    """Text appended (after a space) to every user turn, e.g. `/think` or `/no_think`."""
    tag_probability: float = Field(default=1.0, ge=0.0, le=1.0)
    """Seeded probability that each user turn gets the tag (the paper's 3b mix uses 0.5 for /think)."""
    caption_prompt: str = "Describe the image briefly."
    """User turn for caption-only records (webdataset tars with a txt caption)."""
    filters: SourceFilters = SourceFilters()
    """Record filters applied before deduplication."""


class ImageLimits(StrictModel):
    """Image validation (data/images.py). Records failing these go to rejects.parquet."""

    max_pixels: int = Field(default=40_000_000, ge=1)
    """Width x height above this is refused as a possible decompression bomb, before decoding."""
    min_side: int = Field(default=8, ge=1)
    """Images whose shorter side is below this many pixels are refused."""
    max_bytes: int = Field(default=64 * 2**20, ge=1)
    """Encoded images larger than this are refused."""


class VisionGeometry(StrictModel):
    """How many feature tokens an image becomes (data/images.py, model/lladav.py): the numbers the
    manifest's image-token counts and the max_length check are computed from."""

    image_aspect: Literal["anyres_max_4", "square"] | None = None
    """`anyres_max_4` (stages 2-3) or `square` (stage 1); default follows the template."""
    tile_size: int = Field(default=384, ge=1)
    """Side of one vision-tower tile in pixels (SigLIP2 so400m: 384)."""
    patch_size: int = Field(default=14, ge=1)
    """Vision patch size in pixels (so400m: 14, i.e. 27x27 = 729 patches per tile)."""
    max_grid: int = Field(default=6, ge=1)
    """Grid pinpoints (1x1)..(NxN) in tiles (the paper: 6)."""
    max_tiles_area: int = Field(default=4, ge=1)
    """The `anyres_max_N` cap: feature maps above N tiles' worth are downscaled (the paper: 4)."""

    @property
    def patches_per_side(self) -> int:
        """Patches along a tile side; the patch convolution drops the remainder (384 // 14 = 27)."""
        return self.tile_size // self.patch_size


class Recipe(StrictModel):
    """A mixture recipe: `lladav data build RECIPE` turns it into tokenized WebDataset shards."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Mixture name, recorded in mixture.json and in lineage."""
    sources: list[Source] = Field(min_length=1)
    """The corpora to mix."""
    template: Literal["llava_llada", "llada_plain"] = "llava_llada"
    """Chat template: `llava_llada` (stages 2-3, system prompt and headers) or `llada_plain`
    (stage 1: image placeholder + caption + newline)."""
    tokenizer: str
    """URI of a Hugging Face tokenizer folder (local or s3://)."""
    max_length: int = Field(default=8192, ge=8)
    """Samples longer than this (text tokens + image feature tokens) are refused."""
    samples_per_shard: int = Field(default=1000, ge=1)
    """Samples written per tar shard (the last shard may hold fewer)."""
    seed: int = 0
    """Seeds weight sampling, tag draws and the mixture order."""
    dedup: bool = True
    """Exact deduplication on (image sha256s, normalized text): later copies are refused."""
    images: ImageLimits = ImageLimits()
    """Image validation limits."""
    vision: VisionGeometry = VisionGeometry()
    """Vision geometry used to count image tokens."""
    output: str | None = None
    """URI to write the mixture to; `--out` overrides it. Not part of the mixture's identity."""

    @field_validator("sources")
    @classmethod
    def _unique_names(cls, sources: list[Source]) -> list[Source]:
        names = [s.name for s in sources]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"source names must be unique; repeated: {', '.join(dupes)}")
        return sources

    @property
    def image_aspect(self) -> str:
        if self.vision.image_aspect is not None:
            return self.vision.image_aspect
        return "square" if self.template == "llada_plain" else "anyres_max_4"

    def identity(self) -> dict[str, Any]:
        """The resolved recipe as recorded in mixture.json: every field with defaults filled in,
        minus `output` (where a mixture is written does not change what it is)."""
        return self.model_dump(mode="json", exclude={"output"})


def _format_errors(err: ValidationError) -> str:
    lines = []
    for e in err.errors():
        where = ".".join(str(p) for p in e["loc"]) or "(top level)"
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key (remove it or check its spelling)"
        elif e["type"] == "missing":
            msg = "required field is missing"
        lines.append(f"  {where}: {msg}")
    return "\n".join(lines)


def load_yaml(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(data).__name__}")
    return data


def _validate(model: type[StrictModel], data: dict[str, Any], origin: str, what: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise ConfigError(f"{origin}: invalid {what}\n{_format_errors(e)}") from None


def _resolve(uri: str | None, base: Path) -> str | None:
    """A relative local path against the YAML's folder; URIs and absolute paths as they are."""
    if uri is None or "://" in uri or Path(uri).is_absolute():
        return uri
    return str((base / uri).resolve())


def parse_recipe(data: dict[str, Any], origin: str = "<recipe>") -> Recipe:
    return _validate(Recipe, data, origin, "recipe")


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read and validate a recipe YAML (with `overrides` deep-merged over it, as a pipeline step
    gives them). Relative local URIs resolve against the YAML's folder."""
    data = merge(load_yaml(path), overrides or {})
    recipe = parse_recipe(data, str(path))
    return _resolve_relative(recipe, Path(path).resolve().parent)


def _resolve_relative(recipe: Recipe, base: Path) -> Recipe:
    def fix(uri: str | None) -> str | None:
        return _resolve(uri, base)

    sources = [s.model_copy(update={"location": fix(s.location), "image_root": fix(s.image_root)})
               for s in recipe.sources]
    return recipe.model_copy(update={"sources": sources, "tokenizer": fix(recipe.tokenizer),
                                     "output": fix(recipe.output)})


# ---- stages (train/) -------------------------------------------------------------------------

class StageInit(StrictModel):
    """Where a stage's weights come from: a previous stage's export, or the base checkpoints, or
    (demo and tests) a random initialisation of `flavor`."""

    export: str | None = None
    """A previous stage's exported LLaDA-V folder (folder or URI)."""
    language_model: str | None = None
    """LLaDA weights (official or LLaMA layout; folder or URI), with `vision_tower`."""
    vision_tower: str | None = None
    """SigLIP/SigLIP2 weights (Hugging Face folder or URI), with `language_model`."""
    flavor: str | None = None
    """Random initialisation of a named flavour (model/flavors.py), e.g. `tiny`."""
    tokenizer: str | None = None
    """Tokenizer folder/URI exported with the model (default: the mixture's tokenizer)."""

    @model_validator(mode="after")
    def _one_source(self) -> "StageInit":
        chosen = [bool(self.export), bool(self.language_model or self.vision_tower), bool(self.flavor)]
        if sum(chosen) != 1:
            raise ValueError("set exactly one of: export, language_model + vision_tower, flavor")
        if (self.language_model is None) != (self.vision_tower is None):
            raise ValueError("language_model and vision_tower go together")
        return self


class Trainable(StrictModel):
    """Learning rate per component; a component left out (null) is frozen (train/stage.py)."""

    vision_tower: float | None = Field(default=None, gt=0)
    projector: float | None = Field(default=None, gt=0)
    language_model: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> "Trainable":
        if not any(v is not None for v in self.model_dump().values()):
            raise ValueError("no component is trainable; give at least one a learning rate")
        return self


class Scaling(StrictModel):
    """Ray Train's ScalingConfig for the stage (train/launch.py)."""

    workers: int = Field(default=1, ge=1)
    """Ray Train workers = data-parallel ranks."""
    gpus_per_worker: int = Field(default=0, ge=0)
    """0 runs on CPU (gloo backend)."""
    cpus_per_worker: float = Field(default=1.0, gt=0)
    """Fractional values let several workers share a small machine."""
    resources: dict[str, float] = {}
    """Extra custom Ray resources per worker (e.g. a node label)."""


class Checkpointing(StrictModel):
    every_steps: int = Field(default=100, ge=1)
    """Optimizer steps between checkpoints."""
    keep: int = Field(default=2, ge=1)
    """Checkpoints kept; older ones are deleted."""
    uri: str | None = None
    """Ray Train storage path (local or s3://) for checkpoints; default: under `output`."""


class StageConfig(StrictModel):
    """One training stage: `lladav train STAGE.yaml`."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Stage name (run names, lineage)."""
    init: StageInit
    """Initial weights."""
    mixture: str
    """URI of a committed mixture (lladav data build)."""
    trainable: Trainable
    """Learning rate per trained component (the paper: projector 1e-3 in stage 1; later 1e-5
    with the vision tower at 2e-6)."""
    image_aspect: Literal["anyres_max_4", "square"] | None = None
    """Image handling; default: the mixture's."""
    max_grid: int | None = Field(default=None, ge=1)
    """Anyres grid pinpoints (1x1)..(NxN), the reference's `image_grid_pinpoints` training flag;
    default: the init export's, or 6 (the paper) from base checkpoints. Must match the mixture's."""
    max_tiles_area: int | None = Field(default=None, ge=1)
    """The anyres_max_N cap; default: the init export's, or 4 (the paper) from base checkpoints."""
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Linear warm-up share of the steps, then cosine decay to 0."""
    weight_decay: float = Field(default=0.0, ge=0)
    betas: tuple[float, float] = (0.9, 0.999)
    adam_eps: float = Field(default=1e-8, gt=0)
    epochs: int = Field(default=1, ge=1)
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (default: `epochs` over the mixture)."""
    micro_batch: int = Field(default=1, ge=1)
    """Samples per worker per forward pass."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    max_length: int = Field(default=8192, ge=8)
    """Longest spliced sequence accepted (the mixture already refused longer samples)."""
    group_by_length: bool = False
    """Group micro-batches by length to limit padding (the paper: stages 2-3)."""
    gradient_clipping: float = Field(default=1.0, gt=0)
    gradient_checkpointing: bool = False
    precision: Literal["bf16", "fp32"] = "bf16"
    deepspeed: str = "infra/deepspeed/zero3.json"
    """DeepSpeed config template; "auto" fields are filled from this stage (train/engine.py)."""
    deepspeed_overrides: dict[str, Any] = {}
    """Merged into the rendered DeepSpeed config (e.g. zero_optimization.stage3_param_persistence_threshold)."""
    scaling: Scaling = Scaling()
    checkpoint: Checkpointing = Checkpointing()
    loader_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes per training worker."""
    max_failures: int = Field(default=2, ge=0)
    """Worker-group restarts from the last checkpoint before the stage fails."""
    seed: int = 0
    output: str
    """URI of the consolidated export (Hugging Face folder) published at the end."""


def parse_stage(data: dict[str, Any], origin: str = "<stage>") -> StageConfig:
    return _validate(StageConfig, data, origin, "stage")


def load_stage(path: str | Path, overrides: dict[str, Any] | None = None) -> StageConfig:
    """Read and validate a stage YAML (with `overrides` deep-merged over it; a pipeline supplies
    `mixture`, `output` and `init` this way); relative local paths resolve against its folder."""
    stage = parse_stage(merge(load_yaml(path), overrides or {}), str(path))
    base = Path(path).resolve().parent

    def fix(uri: str | None) -> str | None:
        return _resolve(uri, base)

    init = stage.init.model_copy(update={k: fix(getattr(stage.init, k)) for k in
                                         ("export", "language_model", "vision_tower", "tokenizer")})
    ckpt = stage.checkpoint.model_copy(update={"uri": fix(stage.checkpoint.uri)})
    return stage.model_copy(update={"init": init, "mixture": fix(stage.mixture),
                                    "output": fix(stage.output), "checkpoint": ckpt})


# ---- pipelines (pipeline.py) -----------------------------------------------------------------

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class MlflowSettings(StrictModel):
    """Where lineage goes (lineage.py). Credentials never go here: MLflow and S3 read theirs from
    the environment (MLFLOW_TRACKING_TOKEN, AWS_*)."""

    tracking_uri: str | None = None
    """Tracking server or store; default: SQLite under ./.lladav/ (or $MLFLOW_TRACKING_URI)."""
    experiment: str | None = None
    """Experiment name; default: the pipeline's name."""


class _Step(StrictModel):
    name: str = Field(pattern=_NAME)
    """Unique within the pipeline; it names the step's folder and MLflow run."""
    needs: list[str] = []
    """Extra edges: steps that must finish first (references below are edges already)."""

    def refs(self) -> dict[str, str]:
        """Upstream steps this step reads, by role (role -> step name)."""
        return {}


class SynthStep(_Step):
    """The demo's synthetic shapes corpus + tokenizer (data/synthetic.py)."""

    kind: Literal["synth"]
    output: str
    """Folder written (corpus/, tokenizer/, base/); the tiny recipes and stages point into it."""
    n_train: int = Field(default=600, ge=1)
    n_heldout: int = Field(default=90, ge=1)
    seed: int = 0
    base_steps: int = Field(default=0, ge=0)
    """If > 0: also write base checkpoints under output/base/ (llada/, siglip/), the tower
    pretrained for this many steps on the captions (model/base.py), for a stage's
    `init.language_model` / `init.vision_tower`. 0: corpus and tokenizer only."""


class DataStep(_Step):
    """A mixture build (data/build.py) of a recipe; its mixture goes under the step's folder."""

    kind: Literal["data"]
    recipe: str
    """Recipe YAML, relative to the pipeline file."""
    overrides: dict[str, Any] = {}
    """Merged over the recipe before validation."""


class StageStep(_Step):
    """A training stage (train/launch.py); its export and checkpoints go under the step's folder."""

    kind: Literal["stage"]
    stage: str
    """Stage YAML, relative to the pipeline file."""
    mixture: str | None = None
    """A data step's name (its mixture replaces the stage's `mixture`), or a mixture URI."""
    init: str | None = None
    """A stage step's name whose export initialises this stage; null keeps the stage's `init`."""
    overrides: dict[str, Any] = {}
    """Merged over the stage YAML before validation (e.g. {max_steps: 10})."""

    def refs(self) -> dict[str, str]:
        out = {}
        if self.mixture and "://" not in self.mixture and "/" not in self.mixture:
            out["mixture"] = self.mixture
        if self.init:
            out["init"] = self.init
        return out


class EvalStep(_Step):
    """Held-out questions answered by a stage's export with the sampler (evaluate.py)."""

    kind: Literal["eval"]
    model: str
    """The stage step whose export is evaluated."""
    heldout: str
    """A synth step's name, or a folder/URI holding heldout.json and its images."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate only the first N questions."""
    gen_length: int = Field(default=8, ge=1)
    steps: int | None = Field(default=None, ge=1)
    """Sampler steps; default: gen_length (one token per step)."""
    threshold: float | None = Field(default=None, gt=0)
    """Confidence-threshold parallel decoding."""
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Fail the step (and the pipeline) below this held-out accuracy."""

    def refs(self) -> dict[str, str]:
        out = {"model": self.model}
        if "://" not in self.heldout and "/" not in self.heldout:
            out["heldout"] = self.heldout
        return out


Step = Annotated[Union[SynthStep, DataStep, StageStep, EvalStep], Field(discriminator="kind")]
_REF_KINDS = {"mixture": "data", "init": "stage", "model": "stage", "heldout": "synth"}


class PipelineConfig(StrictModel):
    """A stage DAG: `lladav pipeline plan|run|status PIPELINE.yaml` (pipeline.py)."""

    name: str = Field(pattern=_NAME)
    storage: str | None = None
    """Root URI of every step's outputs (<storage>/steps/<step>/<key>/); default ./.lladav/<name>."""
    mlflow: MlflowSettings = MlflowSettings()
    ray_address: str | None = None
    """Ray cluster to run on; default: $RAY_ADDRESS, else a local Ray."""
    steps: list[Step] = Field(min_length=1)

    @model_validator(mode="after")
    def _graph(self) -> "PipelineConfig":
        kinds: dict[str, str] = {}
        for i, step in enumerate(self.steps):
            if step.name in kinds:
                raise ValueError(f"steps.{i}: step name {step.name!r} is used twice")
            for role, ref in step.refs().items():
                if ref not in kinds:
                    raise ValueError(f"steps.{i} ({step.name}): {role} {ref!r} must name an earlier step")
                if kinds[ref] != _REF_KINDS[role]:
                    raise ValueError(f"steps.{i} ({step.name}): {role} {ref!r} is a {kinds[ref]} step, "
                                     f"expected a {_REF_KINDS[role]} step")
            for ref in step.needs:
                if ref not in kinds:
                    raise ValueError(f"steps.{i} ({step.name}): needs {ref!r} must name an earlier step")
            kinds[step.name] = step.kind
        return self

    def step(self, name: str) -> Any:
        return next(s for s in self.steps if s.name == name)


def merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    """Deep merge: mappings merge key by key, everything else in `over` replaces."""
    out = dict(base)
    for k, v in over.items():
        out[k] = merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def parse_pipeline(data: dict[str, Any], origin: str = "<pipeline>") -> PipelineConfig:
    return _validate(PipelineConfig, data, origin, "pipeline")


def load_pipeline(path: str | Path) -> PipelineConfig:
    """Read and validate a pipeline YAML; relative step files and folders resolve against it.
    The recipes and stages it names are validated too (`pipeline.resolve` loads them)."""
    pipe = parse_pipeline(load_yaml(path), str(path))
    base = Path(path).resolve().parent
    steps = []
    for s in pipe.steps:
        update: dict[str, Any] = {}
        for field in ("recipe", "stage", "output"):
            if hasattr(s, field):
                update[field] = _resolve(getattr(s, field), base)
        if isinstance(s, StageStep) and s.mixture and "mixture" not in s.refs():
            update["mixture"] = _resolve(s.mixture, base)
        if isinstance(s, EvalStep) and "heldout" not in s.refs():
            update["heldout"] = _resolve(s.heldout, base)
        steps.append(s.model_copy(update=update))
    return pipe.model_copy(update={"steps": steps, "storage": _resolve(pipe.storage, base)})
