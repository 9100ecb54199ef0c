"""The `lladav` command line: thin typer commands that each call one library function.

Heavy imports (ray, torch, pyarrow) happen inside the commands, so `lladav --help` is instant.
Known failures (bad config, missing source, uncommitted mixture, tracking server down) print one
clear message and exit with status 2 instead of a traceback. Everything the process prints or logs
passes lladav.secrets' scrubber first (a password in MLFLOW_TRACKING_URI is in MLflow's own
exception text); any other error prints its scrubbed traceback, without locals, and one line.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from lladav import REPO_ROOT


class _ScrubbedApp(typer.Typer):
    """The root command, run with secrets.install(), scrubbed stdout/stderr and a scrubbed
    last-resort error handler (typer's own would print the raw message, and can print locals)."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from lladav import secrets

        secrets.install()
        with secrets.scrubbed_streams(), secrets.scrubbed_errors():
            return super().__call__(*args, **kwargs)


app = _ScrubbedApp(no_args_is_help=True, add_completion=False, pretty_exceptions_show_locals=False,
                   help="LLaDA-V training, end to end.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect training mixtures.")
app.add_typer(data_app, name="data")
pipeline_app = typer.Typer(no_args_is_help=True, help="Run stage pipelines as durable, keyed steps.")
app.add_typer(pipeline_app, name="pipeline")
lineage_app = typer.Typer(no_args_is_help=True, help="Ask MLflow which data, code and parents made a model.")
app.add_typer(lineage_app, name="lineage")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train a tokenizer for your own corpus.")
app.add_typer(tokenizer_app, name="tokenizer")
base_app = typer.Typer(no_args_is_help=True, help="Tiny base checkpoints for your own corpus.")
app.add_typer(base_app, name="base")
# Piped output (CI logs, `make demo | tee`) gets a fixed width wide enough for the tables.
console = Console(width=None if sys.stdout.isatty() else 120)


@contextmanager
def _known_errors() -> Iterator[None]:
    from lladav.config import ConfigError
    from lladav.data.build import BuildError
    from lladav.data.manifest import MixtureNotCommitted
    from lladav.data.sources import SourceError
    from lladav.data.views import ViewError
    from lladav.evaluate import TestSetError
    from lladav.lease import LeaseHeld, LeaseLost
    from lladav.lineage import LineageError, TrackingError
    from lladav.secrets import scrub
    from lladav.storage import StorageError
    from lladav.suites import SuiteError
    from lladav.takedown import TakedownError
    from lladav.contamination import ContaminationError
    from lladav.data.tokenizer import TokenizerMismatch

    try:
        yield
    except (ConfigError, BuildError, SourceError, MixtureNotCommitted, LineageError,
            TestSetError, StorageError, TrackingError, LeaseHeld, LeaseLost, ViewError,
            SuiteError, TakedownError, ContaminationError, TokenizerMismatch) as e:
        # soft_wrap: one line per message, whatever the width, for logs and grep
        console.print(f"[bold red]error:[/] {escape(scrub(str(e)))}", highlight=False,
                      soft_wrap=True)
        raise typer.Exit(2) from None


@contextmanager
def _progress_bar() -> Iterator[Any]:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description:>6}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=console, transient=False,
                  disable=not sys.stderr.isatty() and not sys.stdout.isatty()) as bar:
        tasks: dict[str, Any] = {}

        def update(phase: str, done: int, total: int) -> None:
            if phase not in tasks:
                tasks[phase] = bar.add_task(phase, total=total)
            bar.update(tasks[phase], completed=done, total=total)

        yield update


def print_summary(mixture: Any) -> None:
    """The table `data build` ends with and `data inspect` prints."""
    from lladav.data.manifest import View

    if isinstance(mixture, View):
        return print_view_summary(mixture)
    info = mixture.info
    counts = info["counts"]
    table = Table(title=f"mixture {info['name']}  {mixture.uri}", title_justify="left")
    for col in ("source", "records", "selected", "samples", "rejected", "tokens", "targets", "image tok"):
        table.add_column(col, justify="left" if col == "source" else "right", no_wrap=True)
    for name, c in counts["by_source"].items():
        table.add_row(name, str(c["records"]), str(c["selected"]), str(c["samples"]),
                      str(c["rejected"]), f"{c['tokens']:,}", f"{c['target_tokens']:,}",
                      f"{c['image_tokens']:,}")
    table.add_row("[bold]total", "", "", f"[bold]{counts['samples']}", f"[bold]{counts['rejected']}",
                  f"[bold]{counts['tokens']:,}", "", "")
    console.print(table)
    for name, c in counts["by_source"].items():
        if c["rejected_by_reason"]:
            reasons = ", ".join(f"{k} {v}" for k, v in c["rejected_by_reason"].items())
            console.print(f"  rejected from {name}: {reasons}", highlight=False)
    console.print(f"shards {counts['shards']} · template {info['recipe']['template']} · tokenizer "
                  f"{info['tokenizer']['digest'][:12]} · digest [bold]{mixture.digest[:16]}[/]",
                  highlight=False)


def print_view_summary(view: Any) -> None:
    """The table `data view` ends with (and `data inspect` prints for a view)."""
    info = view.info
    table = Table(title=f"view {info['name']}  {view.uri}", title_justify="left")
    for col in ("mixture", "source", "weight", "available", "samples"):
        table.add_column(col, justify="left" if col in ("mixture", "source") else "right",
                         no_wrap=True)
    for m in info["mixtures"]:
        for name, c in m["sources"].items():
            table.add_row(m["name"], name, f"{c['weight']:g}", str(c["available"]), str(c["samples"]))
    counts = info["counts"]
    table.add_row("[bold]total", "", "", "", f"[bold]{counts['samples']}")
    console.print(table)
    console.print(f"seed {info['seed']} · {counts['shards']} shards of its mixtures, none written · "
                  f"tokens {counts['tokens']:,} · tokenizer {info['tokenizer']['digest'][:12]} · "
                  f"digest [bold]{view.digest[:16]}[/]", highlight=False, soft_wrap=True)


def _weights(items: list[str]) -> dict[str, float]:
    from lladav.config import ConfigError

    out: dict[str, float] = {}
    for item in items:
        name, _, value = item.partition("=")
        try:
            out[name.strip()] = float(value)
        except ValueError:
            name = ""
        if not name.strip():
            raise ConfigError(f"--weight {item!r}: write NAME=NUMBER, e.g. --weight captions=0.5")
    return out


@data_app.command("build")
def data_build(
    recipe: Path = typer.Argument(..., help="Recipe YAML (data_recipes/*.yaml)."),
    out: str = typer.Option(None, "--out", help="Output URI (local path or s3://); overrides the recipe's `output`."),
    num_workers: int = typer.Option(2, "--num-workers", min=1, help="Ray tasks running at once."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different mixture already committed at the output."),
) -> None:
    """Build a recipe into tokenized WebDataset shards with a manifest, on Ray."""
    from lladav.config import load_recipe
    from lladav.data.build import build

    from lladav.data.build import vision_note

    with _known_errors():
        r = load_recipe(recipe)
        if note := vision_note(r):
            console.print(f"[yellow]note:[/] {note}", highlight=False)
        with _progress_bar() as progress:
            mixture = build(r, out, num_workers=num_workers, overwrite=overwrite, progress=progress)
        print_summary(mixture)


@data_app.command("view")
def data_view(
    mixture: list[str] = typer.Option(..., "--mixture", help="URI of a committed mixture; repeat for several."),
    weight: list[str] = typer.Option([], "--weight", help="NAME=W: a source, a mixture's name or mixture/source, repeated W times (0.5 keeps a seeded half); repeat for several. Unnamed sources keep 1."),
    out: str = typer.Option(..., "--out", help="URI to write the view to (view.json + manifest.parquet; no shard)."),
    seed: int = typer.Option(0, "--seed", help="Seeds which samples a fractional weight keeps."),
    name: str = typer.Option(None, "--name", help="The view's name (default: its mixtures' names + '-view')."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a different view already committed at --out."),
) -> None:
    """Re-weight committed mixtures without rebuilding: a view usable wherever a mixture URI is."""
    from lladav.data.views import make_view

    with _known_errors():
        view = make_view(mixture, _weights(weight), out, seed=seed, name=name, overwrite=overwrite)
    print_view_summary(view)


@data_app.command("inspect")
def data_inspect(uri: str = typer.Argument(..., help="URI of a committed mixture or view.")) -> None:
    """Print the summary of an existing mixture."""
    from lladav.data.manifest import open_mixture

    with _known_errors():
        print_summary(open_mixture(uri))


@data_app.command("contamination")
def data_contamination(
    mixture: str = typer.Argument(..., help="URI of a committed mixture or view."),
    test_set: str = typer.Argument(..., help="A test file as `lladav eval` reads it (.json/.jsonl/.parquet)."),
    image_root: str = typer.Option(None, "--image-root", help="Folder the test set's relative image paths resolve against."),
    max_distance: int = typer.Option(8, "--max-distance", min=0, max=16, help="Perceptual-hash bits a copy may differ by."),
) -> None:
    """Which test images (copies too) and questions appear in a mixture; the report is stored
    beside its manifest (contamination/) and printed."""
    from lladav.contamination import check

    with _known_errors():
        report, where = check(mixture, test_set, image_root=image_root, max_distance=max_distance)
    c = report.counts()
    console.print(f"{c['contaminated_records']} of {c['records']} test records overlap {mixture}: "
                  f"{c['images']} images, {c['questions']} questions", soft_wrap=True)
    table = Table(title="overlaps")
    for col in ("test record", "what", "training sample(s)", "source"):
        table.add_column(col, overflow="fold")
    for o in report.image_overlaps:
        table.add_row(o["eval_id"], f"image {o['eval_image']} ({o['distance']} bits)",
                      f"key {o['mixture_key']} ({o['source_id']})", o["source"])
    for o in report.question_overlaps:
        table.add_row(o["eval_id"], "question", f"{o['rows']} rows, e.g. key {o['mixture_keys'][0]}",
                      ", ".join(o["sources"]))
    console.print(table)
    console.print(f"report: {where}", soft_wrap=True)


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Folder to write corpus/ and tokenizer/ into."),
    n_train: int = typer.Option(600, help="Training records per file."),
    n_heldout: int = typer.Option(90, help="Held-out questions."),
    seed: int = typer.Option(0),
) -> None:
    """Generate the demo's synthetic shapes corpus (LLaVA JSON + images) and a tiny tokenizer."""
    from lladav.demo.shapes import synth_all

    result = synth_all(out, n_train=n_train, n_heldout=n_heldout, seed=seed)
    console.print(f"wrote {out}: {result}")


@app.command("demo")
def demo() -> None:
    """The main job on a laptop: pipelines/tiny.yaml, then the accuracy and the final lineage.

    Synthetic shapes corpus -> three mixtures -> stage 1 (projector) -> stage 2 (all) -> stage 3
    (/think-/no_think reasoning) -> held-out eval with the sampler. Everything lands in ./.lladav/
    (storage, MLflow SQLite store); a rerun skips what is done.
    """
    pipeline_run(REPO_ROOT / "pipelines" / "tiny.yaml")


@app.command("train")
def train_cmd(
    stage: Path = typer.Argument(..., help="Stage YAML (typed by lladav/config.py StageConfig)."),
    run_name: str = typer.Option(None, "--run-name", help="Ray Train run name; the same name resumes its checkpoints."),
) -> None:
    """Run a training stage on Ray Train + DeepSpeed and publish its consolidated export."""
    from lladav.config import load_stage
    from lladav.ray_cluster import ensure_ray
    from lladav.train.launch import preflight, run_stage

    with _known_errors():
        config = load_stage(stage)
        preflight(config)                # before Ray starts: geometry, tokenizer digest
        ensure_ray(log_to_driver=True)   # the workers' step lines reach this console
        result = run_stage(config, run_name=run_name)
    console.print(f"export: [bold]{result.export_uri}[/]  (last checkpoint {result.checkpoint_path})")
    console.print({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})


@app.command("generate")
def generate_cmd(
    model: str = typer.Option(..., "--model", help="Exported LLaDA-V folder or URI (model + tokenizer)."),
    image: list[Path] = typer.Option([], "--image", help="Image file; repeat for several."),
    prompt: str = typer.Option(..., "--prompt", help="The question. <image> marks where images go; without one, the images go first."),
    steps: int = typer.Option(32, "--steps"),
    gen_length: int = typer.Option(32, "--gen-length"),
    block_length: int = typer.Option(32, "--block-length"),
    threshold: float = typer.Option(None, "--threshold", help="Confidence-threshold parallel decoding."),
    temperature: float = typer.Option(0.0, "--temperature"),
    prefix_cache: bool = typer.Option(False, "--prefix-cache", help="Reuse the finished prefix's keys/values."),
    tag: str = typer.Option(None, "--tag", help="Appended to the question, as a recipe's `tag` was in training (e.g. /no_think)."),
) -> None:
    """Answer a question about images with an exported model; prints the answer."""
    from PIL import Image

    from lladav.data.images import to_rgb
    from lladav.inference import SamplerSettings, answer, load

    net, tok = load(model)
    settings = SamplerSettings(gen_length=gen_length, block_length=block_length, steps=steps,
                               threshold=threshold, temperature=temperature,
                               use_prefix_cache=prefix_cache)
    result = answer(net, tok, [to_rgb(Image.open(p)) for p in image], prompt, settings, tag=tag)
    print(result.text)


# ---- your own corpus: tokenizer, base checkpoints, evaluation ----------------------------------

def _corpus_sources(recipe: Path | None, corpus: list[str], image_root: str | None) -> list[Any]:
    from lladav.config import ConfigError, load_recipe
    from lladav.data.sources import corpus_source

    if bool(recipe) == bool(corpus):
        raise ConfigError("give exactly one of --recipe and --corpus")
    if recipe:
        return list(load_recipe(recipe).sources)
    return [corpus_source(c, name=f"corpus{i}", image_root=image_root) for i, c in enumerate(corpus)]


@tokenizer_app.command("train")
def tokenizer_train(
    out: str = typer.Option(..., "--out", help="Folder or URI to write the tokenizer to."),
    recipe: Path = typer.Option(None, "--recipe", help="Train on the texts of this recipe's sources."),
    corpus: list[str] = typer.Option([], "--corpus", help="Or a corpus file/folder/URI (.json, .jsonl, .parquet, .tar); repeat for several."),
    vocab_size: int = typer.Option(1024, "--vocab-size", min=263, help="Vocabulary size incl. 256 bytes and 7 special tokens."),
    max_records: int = typer.Option(None, "--max-records", help="Read at most this many records per source."),
) -> None:
    """A byte-level BPE with LLaDA's special tokens, trained on your corpus's texts."""
    from lladav.data.tokenizer import corpus_texts, load_tokenizer, train_to_uri

    with _known_errors():
        sources = _corpus_sources(recipe, corpus, None)
        uri = train_to_uri(corpus_texts(sources, max_records), out, vocab_size=vocab_size)
        tok = load_tokenizer(uri)
    console.print(f"tokenizer: [bold]{uri}[/] ({len(tok.tokenizer)} tokens; special ids "
                  f"{tok.special_ids()})", highlight=False)


@base_app.command("init")
def base_init(
    tokenizer: str = typer.Option(..., "--tokenizer", help="Tokenizer folder or URI (lladav tokenizer train)."),
    out: str = typer.Option(..., "--out", help="Folder or URI to write llada/ and siglip/ to."),
    recipe: Path = typer.Option(None, "--recipe", help="Pretrain on this recipe's sources."),
    corpus: list[str] = typer.Option([], "--corpus", help="Or a corpus file/folder/URI; repeat for several."),
    image_root: str = typer.Option(None, "--image-root", help="With --corpus: where relative image paths resolve."),
    flavor: str = typer.Option("tiny", "--flavor", help="Model flavour (lladav/model/flavors.py)."),
    steps: int = typer.Option(600, "--steps", min=0, help="Tower pretraining steps."),
    caption_turn: str = typer.Option("last", "--caption-turn", help="The image's text: last, first, or an index among a record's assistant turns."),
    max_images: int = typer.Option(20_000, "--max-images", min=2),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """A random LLaDA speaking the tokenizer + a SigLIP tower pretrained on the corpus's
    image-text pairs: a stage's init.language_model / init.vision_tower."""
    from lladav.demo.base import write_base

    turn: str | int = int(caption_turn) if caption_turn.lstrip("-").isdigit() else caption_turn
    with _known_errors():
        sources = _corpus_sources(recipe, corpus, image_root)
        paths = write_base(sources, tokenizer, out, flavor=flavor, steps=steps, seed=seed,
                           caption_turn=turn, max_images=max_images)
    for k, v in paths.items():
        console.print(f"init.{k}: [bold]{v}[/]", highlight=False)


@app.command("eval")
def eval_cmd(
    model: str = typer.Option(..., "--model", help="Exported LLaDA-V folder or URI."),
    data: str = typer.Option(None, "--data", help="Test set: LLaVA .json/.jsonl or .parquet; the last assistant turn of each record is the expected answer."),
    suite: str = typer.Option(None, "--suite", help="Run an lmms-eval suite instead: cpu_mini (over --data) or llada_v_paper."),
    tasks: str = typer.Option(None, "--tasks", help="With --suite: a comma-separated subset of its tasks."),
    out: Path = typer.Option(None, "--out", help="With --suite: where lmms-eval's logs go (default: a temporary folder)."),
    image_root: str = typer.Option(None, "--image-root", help="Where relative image paths resolve (default: the file's folder)."),
    scoring: str = typer.Option("exact", "--scoring", help="exact | choice | contains | regex"),
    tag: str = typer.Option(None, "--tag", help="Appended to every user turn, as a recipe's `tag` was in training."),
    limit: int = typer.Option(None, "--limit", min=1),
    gen_length: int = typer.Option(8, "--gen-length", min=1),
    block_length: int = typer.Option(None, "--block-length", min=1, help="Default: gen-length."),
    steps: int = typer.Option(None, "--steps", min=1, help="Default: gen-length."),
    remasking: str = typer.Option("low_confidence", "--remasking", help="low_confidence | random"),
    threshold: float = typer.Option(None, "--threshold"),
    group_by: str = typer.Option(None, "--group-by", help="A record field to break accuracy down by."),
    samples_out: Path = typer.Option(None, "--samples", help="Write every answer as JSON here."),
) -> None:
    """Answer a test set with an export and score it: accuracy, per-class table, confusions.
    With --suite, run lmms-eval's CLI on the export instead (lladav/suites/)."""
    import json

    if suite is not None:
        _eval_suite(model, suite, data, tasks, out, image_root, limit, threshold)
        return
    if data is None:
        console.print("[red]--data (the test set) is required without --suite[/]")
        raise typer.Exit(2)

    from lladav.evaluate import evaluate
    from lladav.inference import SamplerSettings

    with _known_errors():
        settings = SamplerSettings(gen_length=gen_length, block_length=block_length or gen_length,
                                   steps=steps or gen_length, remasking=remasking,
                                   threshold=threshold)
        with _progress_bar() as progress:
            result = evaluate(model, data, settings, image_root=image_root, scoring=scoring,
                              tag=tag, limit=limit, group_by=group_by, progress=progress)
    print_eval(result, data)
    if samples_out:
        samples_out.write_text(json.dumps(result.samples, indent=1, ensure_ascii=False))
        console.print(f"samples: {samples_out}")


def print_eval(result: Any, data: str) -> None:
    """Accuracy, then a table per expected answer with its most frequent wrong predictions."""
    table = Table(title=f"{data}: accuracy {result.accuracy:.1%} on {result.n} "
                        f"(chance {result.chance:.0%})", title_justify="left")
    for col in ("expected", "n", "accuracy", "most confused with"):
        table.add_column(col, justify="right" if col in ("n", "accuracy") else "left")
    for want, acc in result.by_class.items():
        row = result.confusion.get(want, {})
        wrong = sorted(((n, p) for p, n in row.items() if p != want), reverse=True)[:3]
        table.add_row(want, str(sum(row.values())), f"{acc:.0%}",
                      ", ".join(f"{p} ({n})" for n, p in wrong))
    console.print(table)
    for group, acc in result.by_group.items():
        console.print(f"  {group}: {acc:.1%}", highlight=False)


# ---- pipelines and lineage -------------------------------------------------------------------

@contextmanager
def _step_bars() -> Iterator[Any]:
    """One progress bar per pipeline step (and per phase of it: scan, write, train, eval)."""
    with _progress_bar() as update:
        yield lambda step: (lambda phase, done, total: update(f"{step} {phase}", done, total))


_SHOWN = ("corpus", "mixture", "digest", "export", "steps", "accuracy")


def _short(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    return text[:16] if len(text) == 64 and "/" not in text else text  # a sha256


def _plan_table(steps: list[Any]) -> Table:
    table = Table(title="pipeline steps")
    for col in ("step", "kind", "key", "state", "run", "outputs"):
        table.add_column(col, overflow="fold")
    for p in steps:
        state = p.state + (f" (changed; was {p.previous[:12]})" if p.previous and p.state != "done" else "")
        rec = p.record or {}
        outs = rec.get("outputs") or {}
        table.add_row(p.name, p.kind, p.key[:12], state, (rec.get("run_id") or "")[:8],
                      "\n".join(f"{k}: {_short(v)}" for k, v in outs.items() if k in _SHOWN))
    return table


@pipeline_app.command("plan")
def pipeline_plan(pipeline: Path = typer.Argument(..., help="Pipeline YAML (pipelines/*.yaml).")) -> None:
    """Validate a pipeline and every recipe and stage it names; show each step's key and state."""
    from lladav.config import load_pipeline
    from lladav.pipeline import plan

    with _known_errors():
        steps = plan(load_pipeline(pipeline))
    console.print(_plan_table(steps))
    unknown = [p for p in steps if p.state == "unknown"]
    if unknown:
        console.print(f"[yellow]state unknown[/] (the configs are valid): {unknown[0].record['error']}",
                      highlight=False)


@pipeline_app.command("status")
def pipeline_status(pipeline: Path = typer.Argument(..., help="Pipeline YAML.")) -> None:
    """Which steps are done, interrupted (will resume) or pending (will run)."""
    pipeline_plan(pipeline)


@pipeline_app.command("run")
def pipeline_run(pipeline: Path = typer.Argument(..., help="Pipeline YAML.")) -> None:
    """Run the steps that are not done; an interrupted step resumes, a changed one reruns."""
    from lladav import lineage
    from lladav.config import load_pipeline
    from lladav.pipeline import run

    with _known_errors():
        pipe = load_pipeline(pipeline)
        with _step_bars() as bars:
            steps = run(pipe, progress=bars, say=lambda m: console.print(m, highlight=False))
        console.print(_plan_table(steps))
        for p in steps:
            if p.kind == "eval" and "suite" in p.record["outputs"]:
                from lladav.suites import score_lines

                out = p.record["outputs"]
                for line in score_lines(out["scores"], out["stats"]):
                    console.print(f"[bold]{p.name}:[/] {line}", highlight=False)
            elif p.kind == "eval":
                out = p.record["outputs"]
                console.print(f"[bold]{p.name}: accuracy {out['accuracy']:.1%}[/] on {out['n']} "
                              f"records of {out.get('data', 'the test set')} (chance "
                              f"{out['chance']:.0%}) for {out['export']}", highlight=False)
        last = [p for p in steps if p.kind == "stage"]
        if last:
            export = last[-1].record["outputs"]["export"]
            console.print(f"\n[bold]lineage of {export}")
            console.print(lineage.render_tree(lineage.show(export, pipe.mlflow.tracking_uri)))


def _eval_suite(model: str, suite: str, data: str | None, tasks: str | None, out: Path | None,
                image_root: str | None, limit: int | None, threshold: float | None) -> None:
    import tempfile

    from lladav.suites import run_suite, score_lines

    with _known_errors(), tempfile.TemporaryDirectory() as tmp:
        result = run_suite(model, suite, out or tmp, data=data, image_root=image_root, limit=limit,
                           tasks=tasks.split(",") if tasks else None, threshold=threshold)
        for line in score_lines(result.scores, result.stats):
            console.print(line, highlight=False)
        console.print(f"lmms-eval: {result.wall_seconds:.1f} s" + (f"; logs in {out}" if out else ""))


@lineage_app.command("show")
def lineage_show(
    ref: str = typer.Argument(..., help="An export URI or a stage run id."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or ./.lladav/mlflow.db."),
    graph: Path = typer.Option(None, "--graph", help="Also write the lineage graph as a PNG here."),
) -> None:
    """The chain from an export down to its mixtures and their source corpora."""
    from lladav import lineage

    with _known_errors():
        node = lineage.show(ref, tracking_uri)
        console.print(lineage.render_tree(node))
        if graph:
            lineage.render_graph(node, graph)
            console.print(f"graph: {graph}")


@lineage_app.command("summary")
def lineage_summary(
    ref: str = typer.Argument(..., help="An export URI or its stage run id."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="Default: $MLFLOW_TRACKING_URI or ./.lladav/mlflow.db."),
    as_json: bool = typer.Option(False, "--json", help="JSON instead of Markdown."),
    out: Path = typer.Option(None, "--out", help="Also write it to this file."),
    log: bool = typer.Option(True, "--log/--no-log", help="Log both forms as artifacts of the export's run."),
) -> None:
    """The training-content summary of an export (EU template order): per source and stage,
    modality, samples, tokens and shares, licence, collection period, dedup and filters."""
    import json

    from lladav import summary as sm

    with _known_errors():
        s = sm.summarize(ref, tracking_uri)
        text = json.dumps(s.to_json(), indent=2) + "\n" if as_json else sm.render_markdown(s)
        if out:
            out.write_text(text)
        if log:
            sm.log_summary(s, tracking_uri)
    sys.stdout.write(text)


@lineage_app.command("trace")
def lineage_trace(
    source: str = typer.Option(..., "--source", help="Source name as in the recipes."),
    record: str = typer.Option(None, "--record", help="One record id of that source."),
    tracking_uri: str = typer.Option(None, "--tracking-uri"),
) -> None:
    """Every export that trained on a source's records (from the manifests), or descends from one."""
    from lladav import lineage

    with _known_errors():
        hits = lineage.trace(source, record, tracking_uri)
    table = Table(title=f"exports trained on {source}" + (f" record {record}" if record else ""))
    for col in ("export", "step", "run", "status", "how"):
        table.add_column(col, overflow="fold")
    for h in hits:
        how = h.how + (f" · superseded by {h.superseded}" if h.superseded else "")
        table.add_row(h.export or "(none)", h.step, h.run_id, h.status, how)
    console.print(table)


@lineage_app.command("takedown")
def lineage_takedown(
    source: str = typer.Option(None, "--source", help="Source name as in the recipes."),
    record: list[str] = typer.Option([], "--record", help="A record id of that source (repeatable)."),
    records: str = typer.Option(None, "--records", help="A file of record ids, one per line."),
    reason: str = typer.Option("", "--reason", help="Why (a notice's reference), kept in the list and MLflow."),
    pipeline: Path = typer.Option(None, "--pipeline", help="A pipeline YAML: its `takedowns` list and MLflow settings."),
    takedown_list: str = typer.Option(None, "--list", help="Or the takedown list's URI (a recipe's `takedowns`)."),
    tracking_uri: str = typer.Option(None, "--tracking-uri", help="Default: the pipeline's, $MLFLOW_TRACKING_URI or ./.lladav/mlflow.db."),
    show_status: bool = typer.Option(False, "--status", help="Instead: where every takedown of the list stands."),
    with_copies: bool = typer.Option(False, "--with-copies", help="Also refuse copies of the records' images in every source (rebuilds every mixture reading the list)."),
    mixture: list[str] = typer.Option([], "--mixture", help="A mixture to look in besides those MLflow knows (repeatable)."),
) -> None:
    """Take records down: list the mixtures and exports holding them, add them to the takedown
    list the recipes read (the next `pipeline run` rebuilds without them), record it in MLflow.
    With --status: the rebuilt mixtures, the stages retrained and what was superseded."""
    from lladav import takedown as td
    from lladav.config import ConfigError, load_pipeline

    with _known_errors():
        experiment = "lladav"
        if pipeline is not None:
            pipe = load_pipeline(pipeline)
            if not pipe.takedowns:
                raise ConfigError(f"{pipeline}: no `takedowns:`; add e.g. `takedowns: takedowns.yaml` "
                                  "so its data steps read the list")
            takedown_list = takedown_list or pipe.takedowns
            tracking_uri = tracking_uri or pipe.mlflow.tracking_uri
            experiment = pipe.mlflow.experiment or pipe.name
        if not takedown_list:
            raise ConfigError("name the takedown list: --pipeline PIPELINE.yaml or --list URI")
        if show_status:
            _print_takedown_status(td.status(takedown_list, tracking_uri))
            return
        if not source:
            raise ConfigError("--source is required (the source name as in the recipes)")
        ids = list(record) + (td.read_records_file(records) if records else [])
        req = td.request(takedown_list, source, ids, reason=reason, tracking_uri=tracking_uri,
                         experiment=experiment, with_copies=with_copies, mixtures=mixture)
    table = Table(title=f"takedown {req.entry.id}: {len(req.entry.records)} record(s) of {source}")
    for col in ("held by", "uri", "step", "run", "how"):
        table.add_column(col, overflow="fold")
    for m in req.mixtures:
        table.add_row(m["kind"], m["uri"], m["step"], m["run_id"], f"{m['samples']} samples")
    for h in req.exports:
        table.add_row("export", h.export or "(none)", h.step, h.run_id, h.how)
    console.print(table)
    console.print(f"added to {req.list_uri} (MLflow run {req.entry.run_id}); run the pipeline "
                  "to rebuild without them, then `lladav lineage takedown --status`")


def _print_takedown_status(statuses: list[Any]) -> None:
    for st in statuses:
        e = st.entry
        console.print(f"[bold]{e.id}[/] {e.source}: {len(e.records)} record(s), requested "
                      f"{e.requested} — {'[green]complete' if st.complete else '[yellow]pending'}[/]",
                      soft_wrap=True)
        for label, items in (("rebuilt without them", st.rebuilt),
                             ("STILL HOLDING", st.still_holding),
                             ("superseded mixture", st.superseded)):
            for m in items:
                console.print(f"  {label}: {m['kind']} {m['step']} {m['uri']} (run {m['run_id'][:8]})", soft_wrap=True)
        for r in st.retrained:
            console.print(f"  retrained: stage {r['step']} -> {r['export']} (run {r['run_id'][:8]})", soft_wrap=True)
        for h in st.superseded_exports:
            mark = f"superseded by {h.superseded}" if h.superseded else "NOT SUPERSEDED"
            console.print(f"  export that read them: {h.step} {h.export} ({h.how}; {mark})", soft_wrap=True)


if __name__ == "__main__":
    app()
