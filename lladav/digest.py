"""The single definition of identity: canonical JSON and sha256 digests.

Every "is this the same thing?" question in lladav (same recipe, same shard, same tokenizer, same
pipeline step) is answered by a digest computed here, so two modules can never disagree on what
"the same" means. Digests are lowercase hex sha256 strings without a prefix.

Owns: canonical JSON encoding, digests of bytes, configs, local files and folders, and the
seeded hash draws used wherever a deterministic pseudo-random choice is needed (hash-based draws
do not change when a library upgrades its RNG algorithm).
Does not own: where bytes live (storage.py) or what a mixture contains (data/manifest.py).
"""

from __future__ import annotations

import functools
import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> bytes:
    """JSON with sorted keys, no insignificant whitespace and UTF-8 text: equal values, equal bytes."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def pretty_json(obj: Any) -> bytes:
    """Human-readable but still canonical (sorted keys, fixed indent) JSON, newline-terminated."""
    return (json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False)
            + "\n").encode("utf-8")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def digest_obj(obj: Any) -> str:
    """Digest of a JSON-serialisable value (a resolved config, a plan, a row)."""
    return sha256_bytes(canonical_json(obj))


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def digest_folder(path: str | Path, names: list[str] | None = None) -> str:
    """Digest of a folder's files: their relative names and contents, in sorted order.

    `names` restricts it to those files (missing ones are skipped); hidden files are ignored.
    """
    root = Path(path)
    files = sorted(p for p in root.rglob("*") if p.is_file()
                   and not any(part.startswith(".") for part in p.relative_to(root).parts))
    if names is not None:
        files = [p for p in files if p.relative_to(root).as_posix() in set(names)]
    return digest_obj({p.relative_to(root).as_posix(): sha256_file(p) for p in files})


def hash_unit(*parts: Any) -> float:
    """A deterministic draw in [0, 1) from the sha256 of `parts` (e.g. seed, source, record id)."""
    h = hashlib.sha256(canonical_json([str(p) for p in parts])).digest()
    return int.from_bytes(h[:8], "big") / 2**64


def hash_key(*parts: Any) -> str:
    """A deterministic sort key (hex) from the sha256 of `parts`."""
    return hashlib.sha256(canonical_json([str(p) for p in parts])).hexdigest()


def code_version() -> dict[str, Any]:
    """The code that produced an artifact: package version, and the git commit and the tree of
    lladav/ when run from a checkout (with `dirty` and a digest of the diff when it has
    uncommitted changes).

    Read once per process: the code a process runs is what it imported at start, so edits made
    to the checkout while it runs must not change the identity of what it produces."""
    return dict(_code_version())


@functools.lru_cache(maxsize=1)
def _code_version() -> dict[str, Any]:
    import subprocess

    from lladav import REPO_ROOT, __version__

    version: dict[str, Any] = {"lladav": __version__, "git_commit": None, "git_dirty": None}
    root = REPO_ROOT
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "lladav"],
                                capture_output=True, text=True, timeout=10, check=True).stdout
        # The package's own tree: what a pipeline step's key names, so a commit that only
        # touches docs, tests or configs leaves every finished step valid.
        tree = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD:lladav"],
                              capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        version.update(git_commit=commit, git_tree=tree, git_dirty=bool(status.strip()))
        if status.strip():  # uncommitted edits: name them by the digest of the diff
            diff = subprocess.run(["git", "-C", str(root), "diff", "HEAD", "--", "lladav"],
                                  capture_output=True, timeout=10, check=True).stdout
            version["git_diff_sha256"] = sha256_bytes(diff)
    except (OSError, subprocess.SubprocessError):
        pass  # not a checkout (an installed wheel): the package version is all there is
    return version
