"""lladav: LLaDA-V training, end to end.

Importing the package pulls in nothing heavy (no torch, ray or mlflow), so the CLI starts fast and
importing has no side effects. The version is the single source for lineage's "code version".
"""

from collections.abc import Callable
from pathlib import Path

__version__ = "0.1.0"

REPO_ROOT = Path(__file__).resolve().parent.parent
"""The checkout this package runs from: its git commit is the code version (digest.code_version),
and repo-relative names (pipelines/, a stage's DeepSpeed template) resolve against it."""

Progress = Callable[[str, int, int], None]
"""A long job's progress callback, progress(phase, done, total): the phases of `data build`, the
records of `eval`, a pipeline stage's optimizer steps. The CLI draws them (cli._progress_bar)."""
