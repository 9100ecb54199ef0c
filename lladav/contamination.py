"""Contamination: do a test set's images or questions appear in a mixture it is scored after?

For each record of a test set (a LLaVA file as `lladav eval` reads it, evaluate.read_test_set):
its images' perceptual hashes (data/images.perceptual_hash) and its questions' keys
(conversation.question_key: every user turn before the expected answer, normalized) are looked up
in a mixture's (or view's) manifest, whose rows carry the same two things for every training
sample (`image_phash`, `question_keys`, written by the build). An image overlaps when it is a copy
of a training image within `max_distance` bits on both halves of the hash (data/near_dedup.py:
resized and re-encoded copies are found, not only identical files); a question overlaps when a
training sample asks the same normalized question.

The report (`Report.to_json`) is stored beside the manifest, `<mixture>/contamination/<test
file name>-<sha256[:12] of the test file>.json` (written atomically; a mixture is immutable once
committed, so a report for the same test bytes is reused), logged to every eval run of an export
for each mixture it was trained on (pipeline.py), and named in `lineage show`'s eval nodes.

Owns: the matching and the report. Does not own: hashing (data/images.py, data/conversation.py),
reading test sets (evaluate.py) or MLflow (pipeline.py).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lladav import storage

log = logging.getLogger(__name__)

REPORT_DIR = "contamination"
FORMAT = "lladav.contamination/1"
MAX_LISTED = 20  # training rows named per overlapping question (all are counted)


class ContaminationError(ValueError):
    """A mixture cannot be checked (its manifest predates the hashes); the message says so."""


@dataclass
class EvalItems:
    """A test set's records as hashes: per image (record index, hash) and per question key."""

    ids: list[str]
    image_owner: np.ndarray            # (k,) record index of each image
    image_hash: np.ndarray             # (k, 2) uint64 (phash, dhash)
    questions: dict[str, list[int]] = field(default_factory=dict)  # question key -> record indices


def read_items(test_set: str, *, image_root: str | None = None, limit: int | None = None
               ) -> EvalItems:
    """The images and questions of a test set (evaluate.read_test_set's records)."""
    from lladav.data.conversation import question_key
    from lladav.data.images import decode_rgb, hash_halves, perceptual_hash
    from lladav.data.sources import load_record
    from lladav.evaluate import TestSetError, _test_source, read_test_set

    source = _test_source(test_set, image_root)
    ids, owners, hashes = [], [], []
    questions: dict[str, list[int]] = {}
    for i, rec in enumerate(read_test_set(test_set, image_root=image_root, limit=limit)):
        ids.append(rec.id)
        try:
            for blob in load_record(source, rec.ref).images:
                hashes.append(hash_halves(perceptual_hash(decode_rgb(blob.data))))
                owners.append(i)
        except Exception as e:  # noqa: BLE001 - a broken image names its record
            raise TestSetError(f"{rec.location} (record {rec.id!r}): image unusable: {e}") from None
        for m in rec.prompt:
            if str(m.get("from", "")).lower() in ("human", "user"):
                questions.setdefault(question_key(m["value"]), []).append(i)
    return EvalItems(ids, np.asarray(owners, dtype=np.int64),
                     np.asarray(hashes, dtype=np.uint64).reshape(-1, 2), questions)


@dataclass
class Report:
    mixture: str
    mixture_digest: str
    test_set: str
    test_sha256: str
    records: int
    max_distance: int
    image_overlaps: list[dict[str, Any]]
    question_overlaps: list[dict[str, Any]]

    @property
    def contaminated(self) -> list[str]:
        """Ids of the test records with any overlap."""
        ids = {o["eval_id"] for o in self.image_overlaps} | {o["eval_id"] for o in self.question_overlaps}
        return sorted(ids)

    def counts(self) -> dict[str, int]:
        return {"records": self.records,
                "images": len({(o["eval_id"], o["eval_image"]) for o in self.image_overlaps}),
                "questions": len({(o["eval_id"], o["question_key"]) for o in self.question_overlaps}),
                "contaminated_records": len(self.contaminated)}

    def to_json(self) -> dict[str, Any]:
        return {"format": FORMAT, "mixture": self.mixture, "mixture_digest": self.mixture_digest,
                "test_set": self.test_set, "test_sha256": self.test_sha256,
                "max_distance": self.max_distance, "counts": self.counts(),
                "image_overlaps": self.image_overlaps,
                "question_overlaps": self.question_overlaps}


def report_uri(mixture_uri: str, test_set: str, test_sha256: str) -> str:
    name = storage.basename(test_set.rstrip("/")) or "test"
    return storage.join(mixture_uri, REPORT_DIR, f"{name}-{test_sha256[:12]}.json")


def check(mixture_uri: str, test_set: str, *, image_root: str | None = None,
          max_distance: int = 8, limit: int | None = None, items: EvalItems | None = None
          ) -> tuple[Report, str]:
    """The contamination report of `test_set` against the mixture at `mixture_uri`, and where it
    is stored beside the manifest (reused when one for the same test bytes and settings is
    there)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    from lladav.data.manifest import open_mixture
    from lladav.data.near_dedup import matches
    from lladav.digest import sha256_bytes

    mixture = open_mixture(mixture_uri)
    test_sha = sha256_bytes(storage.read_bytes(test_set))
    where = report_uri(mixture.uri, test_set, test_sha)
    try:
        stored = json.loads(storage.read_bytes(where))
        if (stored.get("mixture_digest"), stored.get("max_distance")) == (mixture.digest, max_distance) \
                and limit is None:
            return _from_json(stored), where
    except FileNotFoundError:
        pass
    items = items or read_items(test_set, image_root=image_root, limit=limit)
    table = mixture.manifest()
    if "image_phash" not in table.column_names:
        raise ContaminationError(f"{mixture.uri}: its manifest has no image_phash/question_keys columns "
                         "(built before lladav recorded them); rebuild it to check contamination")
    table = table.select(["key", "source", "source_id", "image_phash", "question_keys"])
    # images: every training image's hash, with the row it belongs to
    flat = pc.list_flatten(table["image_phash"])
    rows = pc.list_parent_indices(table["image_phash"]).to_numpy()
    hexes = flat.to_pylist()
    known = np.array([h is not None for h in hexes], dtype=bool)  # null: a view of an old mixture
    rows = rows[known]
    corpus = np.array([(int(h[:16], 16), int(h[16:], 16)) for h in hexes if h is not None],
                      dtype=np.uint64).reshape(-1, 2)
    q, c, dist = matches(items.image_hash, corpus, max_distance)
    keys, sources, source_ids = (table[k].to_pylist() for k in ("key", "source", "source_id"))
    image_overlaps = []
    for qi, ci, d in zip(q.tolist(), c.tolist(), dist.tolist()):
        r = int(rows[ci])
        image_overlaps.append({"eval_id": items.ids[items.image_owner[qi]], "eval_image": qi,
                               "mixture_key": keys[r], "source": sources[r],
                               "source_id": source_ids[r], "distance": d})
    # questions: training rows asking the same normalized question
    question_overlaps = []
    if items.questions:
        qflat = pc.list_flatten(table["question_keys"])
        qrows = pc.list_parent_indices(table["question_keys"]).to_numpy()
        hit = pc.is_in(qflat, value_set=pa.array(sorted(items.questions), pa.string()))
        idx = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
        by_key: dict[str, list[int]] = {}
        for k, r in zip(qflat.take(pa.array(idx)).to_pylist(), qrows[idx].tolist()):
            by_key.setdefault(k, []).append(int(r))
        for k, rs in sorted(by_key.items()):
            rs = sorted(set(rs))
            for record in items.questions[k]:
                question_overlaps.append({
                    "eval_id": items.ids[record], "question_key": k, "rows": len(rs),
                    "mixture_keys": [keys[r] for r in rs[:MAX_LISTED]],
                    "sources": sorted({sources[r] for r in rs})})
    report = Report(mixture.uri, mixture.digest, test_set, test_sha, len(items.ids), max_distance,
                    image_overlaps, question_overlaps)
    if limit is None:
        storage.write_bytes(where, (json.dumps(report.to_json(), indent=1, sort_keys=True) + "\n").encode())
    return report, where


def _from_json(data: dict[str, Any]) -> Report:
    return Report(data["mixture"], data["mixture_digest"], data["test_set"], data["test_sha256"],
                  data["counts"]["records"], data["max_distance"], data["image_overlaps"],
                  data["question_overlaps"])
