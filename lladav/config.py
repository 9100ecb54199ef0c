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
from pydantic import (AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)


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
    """Source record ids to drop (known-bad records), read and refused as `filtered`. For a
    takedown use a takedown list (`Recipe.takedowns`): refused unread, and on record in MLflow."""

    @model_validator(mode="after")
    def _exclusive(self) -> "SourceFilters":
        if self.require_image and self.text_only:
            raise ValueError("require_image and text_only cannot both be true")
        return self


MAX_WEIGHT = 100.0
"""Ceiling of a source's weight: more repeats of one record than this is a typo, not a recipe."""


LICENSE_PATTERN = r"^(unknown|https?://\S+|[A-Za-z0-9.+-]+( (AND|OR|WITH) [A-Za-z0-9.+-]+)*)$"
"""A source's licence: `unknown`, an http(s) URL, or an SPDX id / simple expression (checked for
shape only: an SPDX list would refuse the custom licences (LicenseRef-...) corpora often carry)."""


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
    weight: float = Field(default=1.0, ge=0.0, le=MAX_WEIGHT, allow_inf_nan=False)
    """Deterministic sampling multiplier: 0.3 keeps a seeded 30% of the records, 2.0 repeats every
    record twice, 2.5 repeats all twice and a seeded half a third time. Finite, at most 100."""
    tag: str | None = None
    """Text appended (after a space) to every user turn, e.g. `/think` or `/no_think`."""
    tag_probability: float = Field(default=1.0, ge=0.0, le=1.0)
    """Seeded probability that each user turn gets the tag (the paper's 3b mix uses 0.5 for /think)."""
    caption_prompt: str = "Describe the image briefly."
    """User turn for caption-only records (webdataset tars with a txt caption)."""
    filters: SourceFilters = SourceFilters()
    """Record filters applied before deduplication."""
    license: str = Field(default="unknown", pattern=LICENSE_PATTERN)
    """The corpus's licence: an SPDX id (`CC-BY-4.0`, `Apache-2.0`, an SPDX expression such as
    `CC-BY-4.0 OR MIT`), a URL to the terms, or `unknown` (the default, said out loud in every
    report). It is carried to each manifest row, mixture.json (samples and tokens per licence),
    the stage's MLflow run and the export's model version; a pipeline's `forbid_licenses`
    refuses a source under a listed licence at plan time."""
    terms: str | None = None
    """Free-text terms or notes that go with the licence (attribution, restrictions)."""
    collected: str | None = None
    """When the corpus was collected, as given (e.g. `2023-01..2023-06`), for the content
    summary."""


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


class NearDedup(StrictModel):
    """Perceptual-hash near-duplicate images (data/near_dedup.py): of samples whose images are
    resized, re-encoded or slightly cropped copies of each other, the first in the corpus is
    kept; the others are refused (rejects reason `near_duplicate`, naming the kept key)."""

    max_distance: int = Field(default=8, ge=0, le=16)
    """Most bits (of 64) in which each half of two images' perceptual hashes (phash, dhash) may
    differ for them to be copies. At 8, of 200 generated images' copies, all the resized and
    re-encoded ones and 92% of those cropped 1-3% per side were found (98%), and no two of 1,000
    distinct images came closer than 16 (tests/unit/test_near_dedup.py); larger values find more
    crops and risk false matches."""
    compare: Literal["images_and_text", "images"] = "images_and_text"
    """`images_and_text`: a copy must also have the same normalized text (VQA corpora ask many
    questions about one image, and those are not copies); `images`: the images alone (caption
    corpora scraped twice with different alt texts)."""


class Recipe(StrictModel):
    """A mixture recipe: `lladav data build RECIPE` turns it into tokenized WebDataset shards."""

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    """Mixture name, recorded in mixture.json and in lineage."""
    sources: list[Source] = Field(min_length=1)
    """The corpora to mix."""
    template: Literal["llava_llada", "llada_plain"] = "llava_llada"
    """Chat template: `llava_llada` (stages 2-3, system prompt and headers) or `llada_plain`
    (stage 1: image placeholder + caption + newline)."""
    tokenizer: str | None = None
    """URI of a Hugging Face tokenizer folder (local or s3://). Required to build; in a pipeline
    a data step's `tokenizer` (a tokenizer step's name) supplies it instead."""
    max_length: int = Field(default=8192, ge=8)
    """Samples longer than this (text tokens + image feature tokens) are refused."""
    samples_per_shard: int = Field(default=1000, ge=1)
    """Samples written per tar shard (the last shard may hold fewer)."""
    max_planned: int = Field(default=100_000_000, ge=1)
    """Ceiling of the plan's size (records x weights, summed over sources). The build fails as
    soon as enumerating the sources passes it, before planning any copies: a weight or a corpus
    far larger than meant is caught in seconds, not after hours of scanning."""
    seed: int = 0
    """Seeds weight sampling, tag draws and the mixture order."""
    dedup: bool = True
    """Exact deduplication on (image sha256s, normalized text): later copies are refused."""
    near_dedup: NearDedup | None = None
    """Also refuse near-duplicate images by perceptual hash (e.g. `near_dedup: {max_distance:
    6}`); null (the default) keeps them."""
    images: ImageLimits = ImageLimits()
    """Image validation limits."""
    vision: VisionGeometry = VisionGeometry()
    """Vision geometry used to count image tokens."""
    output: str | None = None
    """URI to write the mixture to; `--out` overrides it. Not part of the mixture's identity."""
    takedowns: str | None = None
    """URI of a takedown list (YAML, written by `lladav lineage takedown`; a pipeline's
    `takedowns` replaces it). The listed records of this recipe's sources are refused at plan
    time, before they are read (rejects.parquet reason `takedown`). A list that does not exist
    yet is empty. Its location is not part of the mixture's identity; `taken_down` is."""
    taken_down: dict[str, list[str]] = {}
    """Filled from `takedowns` when the recipe is loaded: source name -> the record ids taken
    down, for this recipe's sources only (so a takedown rebuilds only the mixtures that hold the
    source). Recorded in mixture.json; not meant to be written by hand."""
    taken_down_images: list[str] = []
    """Filled from `takedowns` too: the perceptual hashes (images.perceptual_hash, 32 hex digits)
    of images taken down with their copies (`lineage takedown --with-copies`). A sample of any
    source holding one of them, or a copy within `near_dedup.max_distance` (8 without
    near_dedup), is refused as `takedown`. Every recipe that reads the list gets them."""

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
        minus `output` and `takedowns` (where a mixture or its takedown list is written does not
        change what it is; the records taken down, `taken_down`, do)."""
        return self.model_dump(mode="json", exclude={"output", "takedowns"})


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
    recipe = _resolve_relative(parse_recipe(data, str(path)), Path(path).resolve().parent)
    if recipe.takedowns:
        from lladav.takedown import taken_down

        recipe = recipe.model_copy(update=taken_down(recipe.takedowns, recipe))
    return recipe


def _resolve_relative(recipe: Recipe, base: Path) -> Recipe:
    def fix(uri: str | None) -> str | None:
        return _resolve(uri, base)

    sources = [s.model_copy(update={"location": fix(s.location), "image_root": fix(s.image_root)})
               for s in recipe.sources]
    return recipe.model_copy(update={"sources": sources, "tokenizer": fix(recipe.tokenizer),
                                     "output": fix(recipe.output),
                                     "takedowns": fix(recipe.takedowns)})


# ---- stages (train/) -------------------------------------------------------------------------

def check_flavor(flavor: str) -> str:
    """`flavor` if model/flavors.py has a multimodal flavour of that name, else ValueError listing
    the valid ones: a typo fails `pipeline plan` and `lladav train` at once, not in a worker."""
    from lladav.model.flavors import FLAVORS

    valid = sorted(n for n, f in FLAVORS.items() if "vision_tower" in f)
    if flavor not in valid:
        raise ValueError(f"unknown flavor {flavor!r}; valid flavors: {valid}")
    return flavor


def check_deepspeed_template(name: str) -> str:
    """`name` if it is a readable JSON DeepSpeed template where train/engine.resolve_template
    looks (as given, else under the repository root; an s3:// URI is checked when the stage
    runs), else ValueError saying where it looked."""
    import json

    from lladav import REPO_ROOT

    if "://" in name:
        return name
    for path in (Path(name), REPO_ROOT / name):
        if path.is_file():
            try:
                json.loads(path.read_text())
            except ValueError as e:
                raise ValueError(f"DeepSpeed template {path} is not valid JSON: {e}") from None
            return name
    raise ValueError(f"DeepSpeed template {name!r} not found as given nor under {REPO_ROOT} "
                     "(e.g. infra/deepspeed/zero3.json)")


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
    """Random initialisation of a named flavour (model/flavors.py), e.g. `tiny`. (The export's
    tokenizer is always its mixture's, checked against the digest mixture.json recorded.)"""

    @field_validator("flavor")
    @classmethod
    def _known_flavor(cls, flavor: str | None) -> str | None:
        return flavor if flavor is None else check_flavor(flavor)

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
    """Learning rate of the SigLIP tower (the paper: frozen in stage 1, 2e-6 after)."""
    projector: float | None = Field(default=None, gt=0)
    """Learning rate of the two-layer MLP projector (the paper: 1e-3 in stage 1, 1e-5 after)."""
    language_model: float | None = Field(default=None, gt=0)
    """Learning rate of LLaDA (the paper: frozen in stage 1, 1e-5 after)."""

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


class EndOfAnswer(StrictModel):
    """What follows a sample's last token in training (data/loader.py applies it).

    A masked-diffusion model learns where an answer ends only from target positions past its
    final `<|eot_id|>`: the sampler's window is longer than most answers, and a model that never
    saw a masked position after an answer fills the window with word pieces ("sixven"). The
    reference gets those positions by accident: it EOS-pads each micro-batch to its longest
    sample and trains on the pads, so what a sample sees depends on its neighbours (and its
    stages 2-3, at one sample per GPU, see none). `eos_tail` gives every sample its own EOS
    targets instead, the same whether it is batched alone, beside a longer sample or in a
    length-grouped batch; batch padding past a sample's tail is then neither attended to nor
    trained (an attention mask hides it).

    Measured on flavor tiny (2,000 images, 10-class one-word answers, 600 steps of 16, tower
    frozen, in-process, one seed): a fixed tail of 4 answered 90% of the test set at sampler
    windows of 8, 16 and 32 tokens alike; a tail drawn in 1..8 gave 68% at 8 and 27% at 32;
    fixed 8 gave 62%, fixed 2 59%, the reference's padding 88%. A long tail dilutes the answer
    among the targets (the loss is normalized per sample by its target count), so the default is
    short and fixed. The other way on the demo's shapes (3 factors, answers of 1-2 tokens whose
    question types differ in length): stage 2 from one stage-1 export, 1,500 steps of 16, gave
    97.8% held-out under pad_to_longest and 75.6% under eos_tail 4 (the tail alone, padding hidden
    or attended alike: the answers were not fitted, train accuracy 0.7), so stages/tiny uses
    pad_to_longest. Measure both on a new corpus."""

    policy: Literal["eos_tail", "pad_to_longest"] = "eos_tail"
    """`eos_tail` (default): each sample ends with its own EOS targets, below. `pad_to_longest`:
    the reference's behaviour, EOS-pad to the micro-batch's longest sample, pads attended and
    trained (with micro_batch 1, as the paper's stages 2-3, no EOS target at all)."""
    eos_tokens: int = Field(default=4, ge=0)
    """eos_tail: EOS targets after a sample's last token (the most, when min_eos_tokens is set)."""
    min_eos_tokens: int | None = Field(default=None, ge=0)
    """eos_tail: if set, each sample draws its count uniformly in [min_eos_tokens, eos_tokens]
    per epoch from (seed, epoch, sample key); default: exactly eos_tokens."""

    @model_validator(mode="after")
    def _range(self) -> "EndOfAnswer":
        if self.min_eos_tokens is not None and self.min_eos_tokens > self.eos_tokens:
            raise ValueError(f"min_eos_tokens {self.min_eos_tokens} > eos_tokens {self.eos_tokens}")
        return self


class Shuffle(StrictModel):
    """The loader's per-epoch sample order (data/loader.py epoch_order). Either way it is a pure
    function of the manifest, the seed, the epoch and these settings, never of the world size
    or the loader workers, and resume continues it at the exact next batch.

    `block` keeps a node's working set to a few shards: the epoch permutes the shards by seeded
    hash, cuts them into blocks of `block_shards`, and shuffles the samples within each block,
    so a stretch of training reads from at most one block (two where a length-grouping window or
    a batch straddles a boundary). `global` shuffles all samples together, so every stretch
    touches every shard (the whole mixture must sit in the shard cache to avoid re-downloads).
    The build already spreads every source over all shards (plan order is a seeded hash), so
    a block is a random sample of the mixture. A mixture of at most `block_shards` shards gets
    exactly the global order."""

    kind: Literal["block", "global"] = "block"
    """`block` (default): a seeded block shuffle over groups of shards; `global`: one seeded
    permutation of every sample."""
    block_shards: int = Field(default=16, ge=1)
    """block: shards per block (16 x 1,000-sample shards: 16,000 samples shuffled together)."""


class ShardCacheSettings(StrictModel):
    """Where a node keeps the shards it reads (data/shard_cache.py): one content-addressed folder
    shared by every rank and loader worker of the node, so each shard is downloaded once per node,
    kept under a byte cap, and fetched ahead of use in the sample order. Shards of a local mixture
    are read in place; the folder then only records that each was verified once."""

    folder: str | None = None
    """Local folder of the cache, shared by the node's ranks; default $LLADAV_SHARD_CACHE, else
    <tmp>/lladav-shard-cache-<uid>."""
    limit_bytes: int | None = Field(default=None, ge=1)
    """Most bytes of shards the folder holds (least recently used shards not in use are evicted);
    default: the block order's working set, (2 x block_shards + prefetch_shards) x the largest
    shard, and no cap under the global order. At least two of the largest shards."""
    prefetch_shards: int = Field(default=16, ge=0)
    """Shards fetched ahead of use (the next first-used ones in this rank's order). At least
    block_shards hides the download of a new block; 0 fetches on demand only."""


class Objective(StrictModel):
    """The masked-diffusion objective of a stage (diffusion.py, train/step.py). The defaults are
    the paper's: one mask per sample, t ~ U[0, 1). Masks are always drawn per sample from
    (stage seed, epoch, sample key), so they are the same at any world size or worker count."""

    complementary: bool = False
    """Two disjoint masks per sample (LaViDa's complementary masking): the second masks exactly
    the targets the first left visible, with weight 1/(1 - p). The vision tower and projector run
    once per sample; the language model sees both copies in one pass (2x its tokens)."""
    t_range: tuple[float, float] = (0.0, 1.0)
    """t ~ U[lo, hi) (then p = (1 - 1e-3) t + 1e-3). A narrower range trains fewer noise levels."""
    head_chunk: int = Field(default=1024, ge=1)
    """Masked rows per chunk of the LM head and its cross-entropy (model/head.py): memory of the
    loss step is a few (head_chunk, vocab) fp32 blocks, whatever the sequence length."""

    @model_validator(mode="after")
    def _range(self) -> "Objective":
        lo, hi = self.t_range
        if not 0.0 <= lo < hi <= 1.0:
            raise ValueError(f"t_range {self.t_range}: need 0 <= lo < hi <= 1")
        return self


class Packing(StrictModel):
    """Several samples per sequence under a token budget (data/loader.py packs, train/step.py
    keeps each sample to itself): attention is block-diagonal per sample, RoPE positions restart
    at 0 for each, and the loss is normalised per sample exactly as unpacked. Needs the eos_tail
    end-of-answer policy (pad_to_longest pads to a batch's longest sample, which packing removes)."""

    token_budget: int = Field(ge=8)
    """Most spliced tokens (text, image tokens and EOS tail) in one packed sequence; a longer
    sample is an error naming it."""
    window: int = Field(default=256, ge=1)
    """Samples of the epoch order packed together (first-fit by decreasing length within the
    window); never scaled by the world size, so packs are the same at any world size."""


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
    warmup_ratio: float = Field(default=0.03, ge=0, lt=1)
    """Linear warm-up share of the steps, then cosine decay to 0."""
    weight_decay: float = Field(default=0.0, ge=0)
    """AdamW weight decay (the paper: 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW betas."""
    adam_eps: float = Field(default=1e-8, gt=0)
    """AdamW epsilon."""
    epochs: int = Field(default=1, ge=1)
    """Passes over the mixture (the paper: 1 per stage)."""
    max_steps: int | None = Field(default=None, ge=1)
    """Stop after this many optimizer steps (default: `epochs` over the mixture)."""
    micro_batch: int = Field(default=1, ge=1)
    """Samples per worker per forward pass."""
    grad_accum: int = Field(default=1, ge=1)
    """Micro-batches per optimizer step."""
    max_length: int = Field(default=8192, ge=8)
    """Longest sample (text + image feature tokens) the stage accepts: a mixture holding a
    longer one is refused before any worker starts (train/launch.preflight), naming both."""
    group_by_length: bool = False
    """Group micro-batches by length to limit padding (the paper: stages 2-3)."""
    end_of_answer: EndOfAnswer = EndOfAnswer()
    """The EOS targets after each sample (see EndOfAnswer); training never depends on which
    samples share a micro-batch unless `policy: pad_to_longest` asks for the reference's way."""
    gradient_clipping: float = Field(default=1.0, gt=0)
    """Global gradient-norm clip (DeepSpeed's gradient_clipping)."""
    gradient_checkpointing: bool = False
    """Recompute the LM's activations in the backward pass (less memory, ~30% more compute)."""
    precision: Literal["bf16", "fp32"] = "bf16"
    """Training precision: bf16 on GPUs (the paper), fp32 on the CPU (tests, demo)."""
    deepspeed: Annotated[str, AfterValidator(check_deepspeed_template)] = "infra/deepspeed/zero3.json"
    """DeepSpeed config template; "auto" fields are filled from this stage (train/engine.py).
    A path (as given, else under the repository root) or an s3:// URI; a missing or invalid
    local file fails the stage's validation."""
    deepspeed_overrides: dict[str, Any] = {}
    """Merged into the rendered DeepSpeed config (e.g. zero_optimization.stage3_param_persistence_threshold)."""
    scaling: Scaling = Scaling()
    """Ray Train workers and their resources (see Scaling)."""
    checkpoint: Checkpointing = Checkpointing()
    """Where and how often checkpoints are written, and how many are kept (see Checkpointing)."""
    loader_workers: int = Field(default=0, ge=0)
    """DataLoader worker processes per training worker."""
    shuffle: Shuffle = Shuffle()
    """The per-epoch sample order (see Shuffle): a block shuffle over groups of shards."""
    shard_cache: ShardCacheSettings = ShardCacheSettings()
    """The node's shard cache: folder, byte cap, prefetch window (see ShardCacheSettings)."""
    objective: Objective = Objective()
    """Masking options (see Objective); the default is the paper's objective."""
    packing: Packing | None = None
    """Pack samples into token-budget sequences (see Packing); micro_batch then counts packed
    sequences. Default: one sample per row, padded to the micro-batch's longest."""
    log_every: int = Field(default=10, ge=1)
    """Optimizer steps per step-log line (global mean loss, grad norm, learning rates,
    throughput; train/loop.py), and the first and last step."""
    max_failures: int = Field(default=2, ge=0)
    """Worker-group restarts from the last checkpoint before the stage fails."""
    seed: int = 0
    """Seeds the initialisation, the sample order and the masks (per sample: diffusion.mask_seed)."""
    output: str
    """URI of the consolidated export (Hugging Face folder) published at the end."""

    @model_validator(mode="after")
    def _packing_needs_own_tails(self) -> "StageConfig":
        if self.packing is not None and self.end_of_answer.policy != "eos_tail":
            raise ValueError("packing needs end_of_answer.policy eos_tail: pad_to_longest trains "
                             "the padding to a micro-batch's longest sample, which packed "
                             "sequences do not have")
        return self

    @model_validator(mode="before")
    @classmethod
    def _geometry_is_the_mixtures(cls, data: Any) -> Any:
        moved = [k for k in GEOMETRY_KEYS if isinstance(data, dict) and k in data]
        if moved:
            raise ValueError(f"{', '.join(moved)}: image geometry belongs to the mixture (the "
                             "recipe's `vision:` block); the stage and its model take it from "
                             "there. Remove these keys from the stage, and set them in the recipe")
        return data


GEOMETRY_KEYS = ("image_aspect", "max_grid", "max_tiles_area", "tile_size", "patch_size")


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
                                         ("export", "language_model", "vision_tower")})
    ckpt = stage.checkpoint.model_copy(update={"uri": fix(stage.checkpoint.uri)})
    return stage.model_copy(update={"init": init, "mixture": fix(stage.mixture),
                                    "output": fix(stage.output), "checkpoint": ckpt})


# ---- pipelines (pipeline.py) -----------------------------------------------------------------

_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"


class MlflowSettings(StrictModel):
    """Where lineage goes (lladav/lineage/). Credentials never go here: MLflow and S3 read theirs from
    the environment (MLFLOW_TRACKING_TOKEN, AWS_*)."""

    tracking_uri: str | None = None
    """Tracking server or store; default: SQLite under ./.lladav/ (or $MLFLOW_TRACKING_URI)."""
    experiment: str | None = None
    """Experiment name; default: the pipeline's name."""


class OpenLineageSettings(StrictModel):
    """OpenLineage events of every step run (openlineage.py): START, then COMPLETE or FAIL, with
    the step's input and output datasets. MLflow stays the record `lineage show|trace` read; these
    events hand the same facts to Marquez or any OpenLineage consumer. Credentials never go here:
    an API key for the HTTP server comes from $OPENLINEAGE_API_KEY."""

    enabled: bool = True
    """Emit events (an emission that fails is a warning, never a failed step)."""
    namespace: str | None = None
    """Namespace of the pipeline's jobs (`<pipeline>.<step>`); default: the pipeline's name."""
    path: str | None = None
    """Folder or s3:// prefix the events are written to when no `url` is set; default
    <storage>/openlineage. A local folder gets events.jsonl, one event appended per line; S3
    cannot append, so there each event is its own object <time>-<job>-<run id>-<type>.json."""
    url: str | None = None
    """Send events over HTTP instead of writing them: the server's base URL, e.g. Marquez's API
    http://marquez.marquez.svc:5000 (events are POSTed to <url>/api/v1/lineage)."""

    @field_validator("url")
    @classmethod
    def _http_without_credentials(cls, url: str | None) -> str | None:
        from urllib.parse import urlsplit

        if url is None:
            return url
        parts = urlsplit(url)
        if parts.username or parts.password:  # the message must not repeat the URL
            raise ValueError("the URL carries user:password; give the bare URL and put an API "
                             "key in $OPENLINEAGE_API_KEY")
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"{url!r} is not an http(s) URL; give the server's base URL, e.g. "
                             "http://localhost:5000 for Marquez")
        return url


_DATA_SUFFIXES = (".json", ".jsonl", ".parquet", ".tar", ".yaml", ".yml")


def is_step_name(value: str | None) -> bool:
    """Whether a step field names another step rather than a path or URI: a bare name (no '/',
    no scheme, no data-file suffix). Write a local folder as ./name to make it a path."""
    return bool(value) and "/" not in value and not value.endswith(_DATA_SUFFIXES)


class _Step(StrictModel):
    name: str = Field(pattern=_NAME)
    """Unique within the pipeline; it names the step's folder and MLflow run."""
    needs: list[str] = []
    """Extra edges: steps that must finish first (references below are edges already)."""

    def refs(self) -> dict[str, str]:
        """Upstream steps this step reads, by role (role -> step name)."""
        return {}


class _CorpusStep(_Step):
    """A step that reads a corpus: a recipe's sources, or corpus files."""

    recipe: str | None = None
    """A recipe YAML whose sources are the corpus (relative to the pipeline file)."""
    corpus: list[str] = []
    """Or corpus files/folders/URIs: LLaVA .json/.jsonl (images relative to the file's folder),
    .parquet, .tar; the format follows the suffix."""
    image_root: str | None = None
    """With `corpus`: the folder relative image paths resolve against (default: each file's)."""

    @model_validator(mode="after")
    def _one_corpus(self) -> "_CorpusStep":
        if bool(self.recipe) == bool(self.corpus):
            raise ValueError("set exactly one of `recipe` and `corpus`")
        return self


class SynthStep(_Step):
    """The demo's synthetic shapes corpus (demo/shapes.py) and its tokenizer and base
    checkpoints, made by the same code as the tokenizer and base steps."""

    kind: Literal["synth"]
    """`synth`: this step is a synthetic shapes corpus."""
    output: str
    """Folder written (corpus/, tokenizer/, base/); the tiny recipes and stages point into it."""
    n_train: int = Field(default=600, ge=1)
    """Training images (each with a caption, a question and a reasoning record)."""
    n_heldout: int = Field(default=90, ge=1)
    """Held-out images, one question each (corpus/heldout.json)."""
    seed: int = 0
    """Seeds drawing, tokenizer and base pretraining."""
    base_steps: int = Field(default=0, ge=0)
    """If > 0: also write base checkpoints under output/base/ (llada/, siglip/), the tower
    pretrained for this many steps on the captions (demo/base.py), for a stage's
    `init.language_model` / `init.vision_tower` (or a stage step's `base: <this step>`).
    0: corpus and tokenizer only."""


class TokenizerStep(_CorpusStep):
    """A byte-level BPE tokenizer trained on a corpus (data/tokenizer.py), written to the step's
    folder: `lladav tokenizer train` as a step. Data and base steps name it in `tokenizer`."""

    kind: Literal["tokenizer"]
    """`tokenizer`: this step is a tokenizer training."""
    vocab_size: int = Field(default=1024, ge=263)
    """Vocabulary size, counting the 256 byte tokens and the 7 LLaDA special tokens."""
    max_records: int | None = Field(default=None, ge=1)
    """Read at most this many records per source (a sample is enough for a big corpus)."""


class BaseStep(_CorpusStep):
    """Tiny base checkpoints for a corpus (demo/base.py): a random LLaDA speaking the tokenizer
    and a SigLIP tower pretrained on the corpus's image-text pairs: `lladav base init` as a
    step. A stage step names it in `base` to start from them (the paper's stage-1 init)."""

    kind: Literal["base"]
    """`base`: this step is a tiny base checkpoints."""
    tokenizer: str
    """A tokenizer (or synth) step's name, or a tokenizer folder/URI."""
    flavor: Annotated[str, AfterValidator(check_flavor)] = "tiny"
    """Model flavour (model/flavors.py) of both checkpoints."""
    steps: int = Field(default=600, ge=0)
    """Tower pretraining steps (sigmoid image-text loss)."""
    caption_turn: Literal["last", "first"] | int = "last"
    """Which assistant turn of a record is the image's text: `last` (default), `first`, or its
    index among the assistant turns."""
    max_images: int = Field(default=20_000, ge=2)
    """Pretrain on at most this many images (their pixels are held in memory)."""
    seed: int = 0
    """Seeds the initialisation and the pretraining order."""

    def refs(self) -> dict[str, str]:
        return {"tokenizer": self.tokenizer} if is_step_name(self.tokenizer) else {}


class DataStep(_Step):
    """A mixture build (data/build.py) of a recipe; its mixture goes under the step's folder."""

    kind: Literal["data"]
    """`data`: this step is a mixture build."""
    recipe: str
    """Recipe YAML, relative to the pipeline file."""
    tokenizer: str | None = None
    """A tokenizer (or synth) step whose tokenizer replaces the recipe's `tokenizer`."""
    overrides: dict[str, Any] = {}
    """Merged over the recipe before validation."""

    def refs(self) -> dict[str, str]:
        return {"tokenizer": self.tokenizer} if self.tokenizer else {}


class ViewStep(_Step):
    """A view over committed mixtures (data/views.py): per-source weights and a seed, written to
    the step's folder without a shard of its own. A stage step names it in `mixture`, as it
    names a data step; changing a weight reruns this step and the stages after it, not a build."""

    kind: Literal["view"]
    """`view`: this step is a view."""
    mixtures: list[str] = Field(min_length=1)
    """Data steps' names (their mixtures), or committed mixture URIs."""
    weights: dict[str, Annotated[float, Field(ge=0.0, le=MAX_WEIGHT, allow_inf_nan=False)]] = {}
    """Repeat factor per source name, mixture name (all its sources) or `mixture/source` (the
    most specific applies; others keep 1.0): 0.5 keeps a seeded half, 2.0 every sample twice."""
    seed: int = 0
    """Seeds which samples a fractional weight keeps."""

    def refs(self) -> dict[str, str]:
        return {f"mixtures.{i}": m for i, m in enumerate(self.mixtures)
                if is_step_name(m) and "://" not in m}


class StageStep(_Step):
    """A training stage (train/launch.py); its export and checkpoints go under the step's folder."""

    kind: Literal["stage"]
    """`stage`: this step is a training stage."""
    stage: str
    """Stage YAML, relative to the pipeline file."""
    mixture: str | None = None
    """A data or view step's name (its mixture replaces the stage's `mixture`), or a mixture
    (or view) URI."""
    init: str | None = None
    """A stage step's name whose export initialises this stage; null keeps the stage's `init`."""
    base: str | None = None
    """A base (or synth) step's name whose checkpoints initialise this stage (`init.language_model`
    + `init.vision_tower`); null keeps the stage's `init`."""
    overrides: dict[str, Any] = {}
    """Merged over the stage YAML before validation (e.g. {max_steps: 10})."""

    @model_validator(mode="after")
    def _one_init(self) -> "StageStep":
        if self.init and self.base:
            raise ValueError("set at most one of `init` (a stage step) and `base` (a base step)")
        return self

    def refs(self) -> dict[str, str]:
        out = {}
        if self.mixture and is_step_name(self.mixture) and "://" not in self.mixture:
            out["mixture"] = self.mixture
        if self.init:
            out["init"] = self.init
        if self.base:
            out["base"] = self.base
        return out


class EvalStep(_Step):
    """A test set answered by a stage's export with the sampler and scored (evaluate.py):
    `lladav eval` as a step."""

    kind: Literal["eval"]
    """`eval`: this step is a evaluation."""
    model: str
    """The stage step whose export is evaluated."""
    data: str | None = None
    """The test set: a LLaVA .json/.jsonl or .parquet file/URI whose records end with the
    expected answer as their last assistant turn; or a synth step's name (its heldout.json).
    Required, except with `suite: llada_v_paper` (lmms-eval's own datasets)."""
    suite: Literal["cpu_mini", "llada_v_paper"] | None = None
    """Run an lmms-eval suite (lladav/suites/) instead of lladav's own scoring: `cpu_mini` (two
    tasks over `data`, offline on a CPU) or `llada_v_paper` (the paper's 17 tasks with their
    settings; needs lmms-eval's datasets, a cluster's job). Scores, seconds per sample and
    forward passes per answer go to MLflow per task."""
    tasks: list[str] | None = None
    """With `suite`: run only these of its tasks."""
    prefix_cache: bool = False
    """With `suite`: the sampler's prefix cache."""
    image_root: str | None = None
    """Folder relative image paths resolve against (default: the test file's folder)."""
    scoring: Literal["exact", "choice", "contains", "regex"] = "exact"
    """How an answer is judged (evaluate.py): `exact` (normalized), `choice` (a multiple-choice
    letter or option), `contains` (the expected answer appears in it), `regex` (the expected
    answer is a pattern the answer must match)."""
    tag: str | None = None
    """Appended (after a space) to every user turn, as a recipe's `tag` was in training (e.g.
    /no_think); default none: the questions as the test set has them."""
    group_by: str | None = None
    """A record field to break the accuracy down by (e.g. the shapes' `factor`)."""
    limit: int | None = Field(default=None, ge=1)
    """Evaluate only the first N records."""
    gen_length: int = Field(default=8, ge=1)
    """Answer positions the sampler fills (the answer stops at <|eot_id|>)."""
    block_length: int | None = Field(default=None, ge=1)
    """Semi-autoregressive block length; default: gen_length (one block)."""
    steps: int | None = Field(default=None, ge=1)
    """Sampler steps; default: gen_length (one token per step)."""
    remasking: Literal["low_confidence", "random"] = "low_confidence"
    """Which masked positions are revealed first."""
    threshold: float | None = Field(default=None, gt=0)
    """Confidence-threshold parallel decoding."""
    min_accuracy: float | None = Field(default=None, ge=0, le=1)
    """Fail the step (and the pipeline) below this accuracy."""

    @model_validator(mode="after")
    def _suite_needs(self) -> "EvalStep":
        if self.data is None and self.suite != "llada_v_paper":
            raise ValueError("`data` (the test set) is required" + (
                f" by suite {self.suite}" if self.suite else ""))
        if self.tasks is not None:
            if self.suite is None:
                raise ValueError("`tasks` needs a `suite`")
            from lladav.suites import suite_tasks

            known = suite_tasks(self.suite)
            if unknown := [t for t in self.tasks if t not in known]:
                raise ValueError(f"suite {self.suite} has no task(s) {unknown}; its tasks: {known}")
        return self

    def refs(self) -> dict[str, str]:
        out = {"model": self.model}
        if self.data is not None and is_step_name(self.data) and "://" not in self.data:
            out["data"] = self.data
        return out


Step = Annotated[Union[SynthStep, TokenizerStep, BaseStep, DataStep, ViewStep, StageStep,
                       EvalStep], Field(discriminator="kind")]
_REF_KINDS = {"mixture": ("data", "view"), "mixtures": ("data",), "init": ("stage",),
              "model": ("stage",), "data": ("synth",), "tokenizer": ("tokenizer", "synth"),
              "base": ("base", "synth")}
"""Which step kinds a reference may name, by role (`mixtures.N` is role `mixtures`)."""


class PipelineConfig(StrictModel):
    """A stage DAG: `lladav pipeline plan|run|status PIPELINE.yaml` (pipeline.py)."""

    name: str = Field(pattern=_NAME)
    """The pipeline's name: its default storage folder, MLflow experiment and job namespace."""
    storage: str | None = None
    """Root URI of every step's outputs (<storage>/steps/<step>/<key>/); default ./.lladav/<name>."""
    mlflow: MlflowSettings = MlflowSettings()
    """Where lineage is recorded (see MlflowSettings)."""
    openlineage: OpenLineageSettings = OpenLineageSettings()
    """OpenLineage events of every step run (see OpenLineageSettings)."""
    ray_address: str | None = None
    """Ray cluster to run on; default: $RAY_ADDRESS, else a local Ray."""
    forbid_licenses: list[str] = []
    """Licences no source of this pipeline may carry (e.g. `[unknown, CC-BY-NC-4.0]` for a
    commercial export): `pipeline plan` fails naming each step, recipe and source that does."""
    takedowns: str | None = None
    """A takedown list (`lladav lineage takedown --pipeline` writes it) read by every data step's
    recipe, replacing the recipes' own `takedowns`: a takedown reruns the data steps whose
    sources it names and the steps downstream of them, nothing else."""
    steps: list[Step] = Field(min_length=1)
    """The steps, in an order where every reference points to an earlier step."""

    @model_validator(mode="after")
    def _graph(self) -> "PipelineConfig":
        kinds: dict[str, str] = {}
        for i, step in enumerate(self.steps):
            if step.name in kinds:
                raise ValueError(f"steps.{i}: step name {step.name!r} is used twice")
            for role, ref in step.refs().items():
                if ref not in kinds:
                    raise ValueError(f"steps.{i} ({step.name}): {role} {ref!r} must name an earlier step")
                allowed = _REF_KINDS[role.partition(".")[0]]
                if kinds[ref] not in allowed:
                    raise ValueError(f"steps.{i} ({step.name}): {role} {ref!r} is a {kinds[ref]} step, "
                                     f"expected a {' or '.join(allowed)} step")
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
        refs = s.refs()
        update: dict[str, Any] = {}
        for field in ("recipe", "stage", "output", "image_root", "mixture", "tokenizer", "data"):
            if getattr(s, field, None) and field not in refs:
                update[field] = _resolve(getattr(s, field), base)
        if getattr(s, "corpus", None):
            update["corpus"] = [_resolve(c, base) for c in s.corpus]
        if isinstance(s, ViewStep):
            update["mixtures"] = [m if m in refs.values() else _resolve(m, base) for m in s.mixtures]
        steps.append(s.model_copy(update=update))
    return pipe.model_copy(update={"steps": steps, "storage": _resolve(pipe.storage, base),
                                   "takedowns": _resolve(pipe.takedowns, base),
                                   "openlineage": pipe.openlineage.model_copy(
                                       update={"path": _resolve(pipe.openlineage.path, base)})})
