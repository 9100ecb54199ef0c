"""Step hooks for drills and tests: record every step, or kill a worker once (a lost node).

They live in the package, not in a test file, because Ray Train pickles the hook into its
worker processes, which import it by module name.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass


@dataclass
class StepRecorder:
    """Appends {"step", "rank", "loss", "local", "grad_norm", "lr"} per optimizer step to `path`
    (JSON lines). With
    `die_at`, rank `die_rank` exits abruptly at that step the first time (a marker file beside
    `path` remembers it), as a lost worker would: no cleanup, no exception."""

    path: str
    die_at: int | None = None
    die_rank: int = 1

    def __call__(self, step: int, rank: int, metrics: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, "rank": rank, "loss": metrics["loss"],
                                "local": metrics["local_param_fraction"],
                                "grad_norm": metrics.get("grad_norm"),
                                "lr": {k: v for k, v in metrics.items() if k.startswith("lr/")}})
                    + "\n")
        marker = self.path + ".died"
        if self.die_at == step and rank == self.die_rank and not os.path.exists(marker):
            open(marker, "w").close()
            os._exit(1)
