"""Checkpoint integrity: seal a rank's files when saving, verify them before resuming.

    save:    every rank, in its own local folder, after all its files are written:
             seal(folder, rank, world_size, step) -> lladav-checkpoint-rank<R>.json
             {"rank", "world_size", "step", "files": {relative path: {"size", "sha256"}}}
             (Ray Train then uploads all ranks' folders into one checkpoint folder)
    resume:  verify(folder) -> the problems found, [] for an intact checkpoint;
             fallback_order(latest, siblings) -> the older checkpoints to try, newest first

A checkpoint is intact when every rank's integrity file is there and readable, and every file it
lists is present with its size and sha256. A missing integrity file is a failure too: an upload
that died half way, or a checkpoint from before this file existed, can't be told from a good one.

Cost, for the 8B model (ZeRO-3 model + optimizer states ~ 110 GB over all ranks): sealing reads
back each rank's own files, which it has just written (page cache), once: at the ~1.5 GB/s of
hashlib's sha256 that is ~1 s per checkpoint on 64 ranks. Verifying reads each file once more,
streamed in 1 MiB chunks (no file is held in memory); sizes are compared first, so a truncated
file costs a stat, and with `share` every rank hashes only its part (the shards it loads).

Owns: the integrity file's format and the checks. Does not own: DeepSpeed's files
(train/engine.py), when checkpoints are written (train/loop.py), where they live or which one Ray
hands back (train/launch.py).
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

from lladav.digest import pretty_json, sha256_file

INTEGRITY = "lladav-checkpoint-rank{rank}.json"
_INTEGRITY_NAME = re.compile(r"^lladav-checkpoint-rank(\d+)\.json$")


def integrity_name(rank: int) -> str:
    return INTEGRITY.format(rank=rank)


def seal(folder: str | Path, rank: int, world_size: int, step: int,
         topology: dict | None = None) -> Path:
    """Write this rank's integrity file, listing every other file in its local `folder` (each
    rank saves into a folder of its own, so that is exactly its files). Call it last.
    `topology` ({"micro_batch", "grad_accum"}) is recorded beside the world size, for an
    elastic resume to keep the global batch (read_topology)."""
    root = Path(folder)
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        rel = path.relative_to(root).as_posix()
        if not _INTEGRITY_NAME.match(rel):
            files[rel] = {"size": path.stat().st_size, "sha256": sha256_file(path)}
    target = root / integrity_name(rank)
    tmp = target.with_name(target.name + ".tmp")
    tmp.write_bytes(pretty_json({"rank": rank, "world_size": world_size, "step": step,
                                 "files": files, **({"topology": topology} if topology else {})}))
    os.replace(tmp, target)  # a reader never sees half an integrity file
    return target


def read_step(folder: str | Path) -> int | None:
    """The step rank 0's integrity file records, None if it can't be read."""
    try:
        return int(json.loads((Path(folder) / integrity_name(0)).read_text())["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def read_topology(folder: str | Path) -> dict:
    """{"world_size", "micro_batch", "grad_accum"} of the run that saved the checkpoint (rank
    0's integrity file; the last two are None for checkpoints sealed without them)."""
    record = json.loads((Path(folder) / integrity_name(0)).read_text())
    topology = record.get("topology") or {}
    return {"world_size": int(record["world_size"]), "micro_batch": topology.get("micro_batch"),
            "grad_accum": topology.get("grad_accum")}


def verify(folder: str | Path, share: tuple[int, int] = (0, 1)) -> list[str]:
    """The problems that make the checkpoint in `folder` unusable; [] when it is intact.

    `share=(i, n)` splits the hashing over n processes: this one hashes the files of the saving
    ranks r with r % n == i. Share 0 also reports the integrity files that are missing or
    disagree, so the union of all shares' problems is the whole verdict.
    """
    root = Path(folder)
    index, count = share
    found = sorted((int(m.group(1)), p.name) for p in root.iterdir()
                   if (m := _INTEGRITY_NAME.match(p.name))) if root.is_dir() else []
    if not found:
        return [f"no integrity file ({INTEGRITY.format(rank='<R>')}): an upload that did not "
                "finish, or a checkpoint from before lladav sealed them"]
    problems: list[str] = []
    worlds: dict[int, int] = {}
    sealed: dict[int, dict[str, tuple[int, str]]] = {}
    for rank, name in found:
        try:
            record = json.loads((root / name).read_text())
            worlds[rank] = int(record["world_size"])
            sealed[rank] = {rel: (int(f["size"]), str(f["sha256"]))
                            for rel, f in record["files"].items()}
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            worlds.pop(rank, None)
            if index == 0:
                problems.append(f"unreadable {name}: {type(e).__name__}: {e}")
    if index == 0 and worlds:
        if len(set(worlds.values())) > 1:
            problems.append(f"integrity files disagree on the number of ranks: {worlds}")
        expected = max(worlds.values())
        present = {r for r, _ in found}
        missing = [integrity_name(r) for r in range(expected) if r not in present]
        if missing:
            problems.append(f"missing {', '.join(missing)} (saved by {expected} ranks)")
    for rank in sorted(r for r in sealed if r % count == index):
        problems += _check_files(root, sealed[rank])
    return problems


def _check_files(root: Path, files: dict[str, tuple[int, str]]) -> list[str]:
    problems = []
    for rel, (size, sha256) in sorted(files.items()):
        path = root / rel
        try:
            actual = path.stat().st_size
        except FileNotFoundError:
            problems.append(f"missing file {rel}")
            continue
        except OSError as e:
            problems.append(f"unreadable {rel}: {e}")
            continue
        if actual != size:  # truncated or grown: found without reading the file
            problems.append(f"size mismatch in {rel}: {actual} bytes, sealed with {size}")
            continue
        try:
            if sha256_file(path) != sha256:
                problems.append(f"digest mismatch in {rel}: its bytes changed since it was sealed")
        except OSError as e:
            problems.append(f"unreadable {rel}: {e}")
    return problems


def fallback_order(latest: str, siblings: list[str]) -> list[str]:
    """The checkpoint folders to try when `latest` (the one Ray hands back) is not intact: the
    other folders of the run that are older than it, newest first.

    Ray Train names a checkpoint folder `checkpoint_<creation time to the microsecond>` (fixed
    width), so name order is report order. Folders newer than `latest` are left alone: Ray never
    registered them (a controller lost between upload and registration) and would never delete
    them.
    """
    return sorted((s for s in set(siblings) if s.startswith("checkpoint_") and s < latest),
                  reverse=True)
