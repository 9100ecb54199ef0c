"""The `lladav` command line: thin typer commands that each call one library function.

Heavy imports (ray, torch, pyarrow) happen inside the commands, so `lladav --help` is instant.
Known failures (bad config, missing source, uncommitted mixture) print one clear message and exit
with status 2 instead of a traceback.
"""

from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import typer
from rich.console import Console
from rich.table import Table

app = typer.Typer(no_args_is_help=True, add_completion=False, help="LLaDA-V training, end to end.")
data_app = typer.Typer(no_args_is_help=True, help="Build and inspect training mixtures.")
app.add_typer(data_app, name="data")
# Piped output (CI logs, `make demo | tee`) gets a fixed width wide enough for the tables.
console = Console(width=None if sys.stdout.isatty() else 120)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = REPO_ROOT / ".lladav" / "demo"
DEMO_RECIPES = ["tiny_stage1", "tiny_stage2", "tiny_stage3"]


@contextmanager
def _known_errors() -> Iterator[None]:
    from lladav.config import ConfigError
    from lladav.data.build import BuildError
    from lladav.data.manifest import MixtureNotCommitted
    from lladav.data.sources import SourceError

    try:
        yield
    except (ConfigError, BuildError, SourceError, MixtureNotCommitted) as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False)
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

    with _known_errors():
        r = load_recipe(recipe)
        with _progress_bar() as progress:
            mixture = build(r, out, num_workers=num_workers, overwrite=overwrite, progress=progress)
        print_summary(mixture)


@data_app.command("inspect")
def data_inspect(uri: str = typer.Argument(..., help="URI of a committed mixture.")) -> None:
    """Print the summary of an existing mixture."""
    from lladav.data.manifest import open_mixture

    with _known_errors():
        print_summary(open_mixture(uri))


@data_app.command("synth")
def data_synth(
    out: Path = typer.Argument(..., help="Folder to write corpus/ and tokenizer/ into."),
    n_train: int = typer.Option(600, help="Training records per file."),
    n_heldout: int = typer.Option(90, help="Held-out questions."),
    seed: int = typer.Option(0),
) -> None:
    """Generate the synthetic shapes corpus (LLaVA JSON + images) and a tiny tokenizer."""
    from lladav.data.synthetic import synth_all

    result = synth_all(out, n_train=n_train, n_heldout=n_heldout, seed=seed)
    console.print(f"wrote {out}: {result}")


@app.command("demo")
def demo(num_workers: int = typer.Option(2, "--num-workers", min=1)) -> None:
    """The main job on a laptop: synthetic corpus -> the three tiny mixtures -> summaries.

    The corpus goes to .lladav/demo/ in the repository, where data_recipes/tiny_*.yaml point.
    """
    from lladav.config import load_recipe
    from lladav.data.build import build
    from lladav.data.synthetic import synth_all

    workdir = DEMO_DIR
    if not (workdir / "tokenizer" / "tokenizer.json").exists():
        console.print(f"[bold]synthesising the shapes corpus into {workdir}")
        synth_all(workdir)
    with _known_errors():
        for name in DEMO_RECIPES:
            recipe = load_recipe(REPO_ROOT / "data_recipes" / f"{name}.yaml")
            console.rule(f"[bold]{name}")
            with _progress_bar() as progress:
                # The demo owns its folder: a mixture built by older code is replaced.
                mixture = build(recipe, str((workdir / "mixtures" / name).resolve()),
                                num_workers=num_workers, overwrite=True, progress=progress)
            print_summary(mixture)


@app.command("train")
def train_cmd(
    stage: Path = typer.Argument(..., help="Stage YAML (typed by lladav/config.py StageConfig)."),
    run_name: str = typer.Option(None, "--run-name", help="Ray Train run name; the same name resumes its checkpoints."),
) -> None:
    """Run a training stage on Ray Train + DeepSpeed and publish its consolidated export."""
    from lladav.config import load_stage
    from lladav.train.launch import run_stage

    with _known_errors():
        result = run_stage(load_stage(stage), run_name=run_name)
    console.print(f"export: [bold]{result.export_uri}[/]  (last checkpoint {result.checkpoint_path})")
    console.print({k: v for k, v in result.metrics.items() if isinstance(v, (int, float))})


@app.command("generate")
def generate_cmd(
    model: str = typer.Option(..., "--model", help="Exported LLaDA-V folder or URI (model + tokenizer)."),
    image: list[Path] = typer.Option([], "--image", help="Image file; repeat for several."),
    prompt: str = typer.Option(..., "--prompt", help="The question; <image> marks where images go."),
    steps: int = typer.Option(32, "--steps"),
    gen_length: int = typer.Option(32, "--gen-length"),
    block_length: int = typer.Option(32, "--block-length"),
    threshold: float = typer.Option(None, "--threshold", help="Confidence-threshold parallel decoding."),
    temperature: float = typer.Option(0.0, "--temperature"),
    prefix_cache: bool = typer.Option(False, "--prefix-cache", help="Reuse the finished prefix's keys/values."),
) -> None:
    """Answer a question about images with an exported model; prints the answer."""
    from PIL import Image

    from lladav.inference import SamplerSettings, answer, load

    net, tok = load(model)
    settings = SamplerSettings(gen_length=gen_length, block_length=block_length, steps=steps,
                               threshold=threshold, temperature=temperature,
                               use_prefix_cache=prefix_cache)
    result = answer(net, tok, [Image.open(p).convert("RGB") for p in image], prompt, settings)
    print(result.text)


if __name__ == "__main__":
    app()
