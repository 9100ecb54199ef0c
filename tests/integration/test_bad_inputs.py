"""A hostile corpus: one build over 50+ bad cases in four source formats finishes, rejects each
case for its own reason, reads nothing outside its roots, and is byte-identical when rebuilt.

Everything is generated here; nothing of the demo's shapes. The cases come from issue 12's list
of what a corpus scraped from the internet holds: lone surrogates, folders, FIFOs and links to
/dev/zero or outside files where images should be, deep nesting, tar links and devices,
gif/bmp in tars, byte-order marks, 16-bit PNGs, phone MPOs and EXIF-rotated photos. The parts
that make a whole file unreadable (`[r1][r2]`, a syntax error mid-array, a truncated tar) fail
their source loudly instead, with the file and byte offset: tested at the end.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from hostile_images import exif_rotated, mpo, png16  # noqa: E402
from lladav import storage  # noqa: E402
from lladav.config import load_recipe  # noqa: E402
from lladav.data.build import BuildError, build  # noqa: E402
from lladav.data.images import decode_rgb  # noqa: E402
from lladav.data.manifest import MixtureNotCommitted, open_mixture  # noqa: E402
from lladav.data.sources import SourceError  # noqa: E402

pytestmark = pytest.mark.usefixtures("ray_cluster")

CANARY = b"CANARY-outside-the-image-root-5f1c"
MAX_BYTES = 60_000


def _png(colour=(30, 160, 90), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, "PNG")
    return buf.getvalue()


def _image(fmt: str, colour=(200, 40, 40), size=(24, 16)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, fmt)
    return buf.getvalue()


def _qa(question: str = "<image>\nWhat is shown?", answer: str = "a square") -> list[dict]:
    return [{"from": "human", "value": question}, {"from": "gpt", "value": answer}]


class Corpus:
    """Writes the files and remembers, per case, the reason the build must give."""

    def __init__(self, root: Path):
        self.root = root
        self.images = root / "images"
        self.outside = root / "outside"
        self.images.mkdir(parents=True)
        self.outside.mkdir()
        self.expect: dict[tuple[str, str], str | None] = {}   # (source, record id) -> reason
        self.unreadable: dict[str, Counter] = {}             # source -> reasons without an id
        self.records: Counter = Counter()                    # source -> records in its files

    def case(self, source: str, rid: str, reason: str | None) -> None:
        assert (source, rid) not in self.expect, rid
        self.expect[(source, rid)] = reason
        self.records[source] += 1

    def unreadable_case(self, source: str, reason: str) -> None:
        self.unreadable.setdefault(source, Counter())[reason] += 1
        self.records[source] += 1


def _write_json_source(c: Corpus) -> None:
    """A .json array with a byte-order mark; images below images/."""
    img, out = c.images, c.outside
    (img / "good.png").write_bytes(_png())
    (img / "good2.png").write_bytes(_png((10, 20, 200)))
    (img / "also_good.png").write_bytes(_png((90, 90, 10)))
    os.symlink("also_good.png", img / "inside_link.png")          # a link that stays inside
    (img / "folder.png").mkdir()
    os.mkfifo(img / "fifo.png")
    os.symlink("/dev/zero", img / "zero.png")
    outside_jpg = out / "secret.jpg"                                # a real JPEG, outside
    buf = io.BytesIO()
    Image.new("RGB", (24, 16), (1, 2, 3)).save(buf, "JPEG", comment=CANARY)
    outside_jpg.write_bytes(buf.getvalue())
    (out / "secret.txt").write_bytes(CANARY)
    os.symlink(outside_jpg, img / "outside_link.jpg")
    os.symlink(out / "secret.txt", img / "secret_link.png")
    os.symlink(out, img / "linked_folder")                           # a folder link escaping
    (img / "big.png").write_bytes(_image("PNG", size=(400, 400)) + b"\0" * MAX_BYTES)
    (img / "truncated.png").write_bytes(_image("PNG", size=(64, 64))[:-40])
    (img / "text.jpg").write_bytes(b"this is not a picture\n" * 10)
    (img / "bomb.png").write_bytes(_image("PNG", size=(2000, 1000)))
    (img / "tiny.png").write_bytes(_image("PNG", size=(4, 4)))
    (img / "pic.ppm").write_bytes(_image("PPM"))
    (img / "sixteen.png").write_bytes(png16()[0])
    (img / "phone.jpg").write_bytes(mpo()[0])
    (img / "rotated.jpg").write_bytes(exif_rotated(6)[0])

    S = "json"
    elements: list[str] = []

    def rec(rid: str, reason: str | None, **fields) -> None:
        fields.setdefault("conversations", _qa())
        elements.append(json.dumps({"id": rid, **fields}))  # ensure_ascii: "\ud800" stays an escape
        c.case(S, rid, reason)

    rec("good", None, image="good.png")
    rec("good-no-image", None, conversations=_qa("What colour is the sky?", "blue"))
    rec("inside-link", None, image="inside_link.png")
    rec("sixteen-bit", None, image="sixteen.png")
    rec("mpo", None, image="phone.jpg")
    rec("exif-rotated", None, image="rotated.jpg")
    rec("id-with-surrogate-\ud800", None, image="good2.png")
    rec("surrogate-question", "invalid_text", image="good.png",
        conversations=_qa("<image>\nWhat is \ud800 this?", "a thing"))
    rec("surrogate-answer", "invalid_text", conversations=_qa("Say it", "x\udfff"))
    rec("folder", "image_not_file", image="folder.png")
    rec("fifo", "image_not_file", image="fifo.png")
    rec("dev-zero", "unsafe_path", image="zero.png")
    rec("outside-link", "unsafe_path", image="outside_link.jpg")
    rec("secret-link", "unsafe_path", image="secret_link.png")
    rec("folder-link", "unsafe_path", image="linked_folder/secret.jpg")
    rec("absolute", "unsafe_path", image="/etc/passwd")
    rec("traversal", "unsafe_path", image="../outside/secret.jpg")
    rec("url", "unsafe_path", image="s3://elsewhere/x.png")
    rec("number-path", "unsafe_path", image=7)
    rec("empty-path", "unsafe_path", image="")
    rec("missing", "image_missing", image="nope.png")
    rec("too-big", "image_too_large", image="big.png")
    rec("truncated", "image_truncated", image="truncated.png")
    rec("not-an-image", "image_undecodable", image="text.jpg")
    rec("bomb", "decompression_bomb", image="bomb.png")
    rec("tiny", "image_too_small", image="tiny.png")
    rec("ppm", "image_format", image="pic.ppm")
    rec("conversations-not-list", "malformed_record", conversations="hello")
    rec("unknown-speaker", "malformed_record",
        conversations=[{"from": "narrator", "value": "hi"}, {"from": "gpt", "value": "x"}])
    rec("value-not-string", "malformed_record",
        conversations=[{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}])
    rec("no-answer", "no_assistant_turn", conversations=[{"from": "human", "value": "hi"}])
    rec("two-marks-one-image", "image_count_mismatch", image="good.png",
        conversations=_qa("<image> and <image>?", "both"))
    rec("video", "unsupported_modality", video="clip.mp4")
    rec("duplicate", "duplicate", image="good.png")            # same image and text as "good"
    rec("too-long", "too_long", conversations=_qa("Tell me", "word " * 2000))
    # Elements that are not records at all: one reject row each, no id.
    elements.append('{"id": "deep", "x": ' + "[" * 50_000 + "]" * 50_000 + "}")
    c.unreadable_case(S, "too_deep")
    elements.append('"just a string"')
    c.unreadable_case(S, "malformed_record")
    rec("after-the-deep-one", None, conversations=_qa("Still read?", "yes"))
    text = "[\n" + ",\n".join(elements) + "\n]\n"
    (c.root / "records.json").write_bytes(b"\xef\xbb\xbf" + text.encode("ascii"))


def _write_jsonl_source(c: Corpus) -> None:
    S = "jsonl"
    lines: list[bytes] = []

    def rec(rid: str, reason: str | None, **fields) -> None:
        fields.setdefault("conversations", _qa("Name a fruit", f"apple {rid}"))
        lines.append(json.dumps({"id": rid, **fields}).encode())
        c.case(S, rid, reason)

    rec("ok-1", None)
    lines.append(b'{"id": "broken", "conversations": [}')
    c.unreadable_case(S, "malformed_json")
    lines.append(b"[" * 30_000 + b"]" * 30_000)
    c.unreadable_case(S, "too_deep")
    lines.append(b'{"id": "latin1", "conversations": "caf\xe9"}')
    c.unreadable_case(S, "malformed_json")
    lines.append(b'["an", "array"]')
    c.unreadable_case(S, "malformed_record")
    rec("ok-2", None)
    rec("deep-inside", "malformed_record", conversations=[[[[[[[["x"]]]]]]]])
    (c.root / "lines.jsonl").write_bytes(b"\xef\xbb\xbf" + b"\n".join(lines) + b"\n")


def _write_tar_source(c: Corpus) -> None:
    S = "tars"
    path = c.root / "tars" / "part-000.tar"
    path.parent.mkdir()

    def member(tar: tarfile.TarFile, name: str, data: bytes = b"", **kind) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(data) if not kind else 0
        for k, v in kind.items():
            setattr(info, k, v)
        tar.addfile(info, io.BytesIO(data) if not kind else None)

    def meta(rid: str, answer: str) -> bytes:
        return json.dumps({"conversations": _qa("<image>\nWhat is it?", answer)}).encode()

    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        member(tar, "dir", type=tarfile.DIRTYPE)                     # folders are not records
        member(tar, "ok.json", meta("ok", "a tar image"))
        member(tar, "ok.png", _png((5, 100, 5)))
        c.case(S, "ok", None)
        member(tar, "gif.json", meta("gif", "a gif"))
        member(tar, "gif.gif", _image("GIF", (120, 10, 10)))
        c.case(S, "gif", None)
        member(tar, "bmp.json", meta("bmp", "a bitmap"))
        member(tar, "bmp.bmp", _image("BMP", (10, 10, 120)))
        c.case(S, "bmp", None)
        member(tar, "caption.txt", b"a caption from txt")
        member(tar, "caption.jpg", _image("JPEG", (10, 120, 120)))
        c.case(S, "caption", None)
        member(tar, "symlink.json", meta("symlink", "linked"))
        member(tar, "symlink.jpg", type=tarfile.SYMTYPE, linkname="/etc/passwd")
        c.unreadable_case(S, "tar_link")
        member(tar, "hardlink.json", meta("hardlink", "linked"))
        member(tar, "hardlink.png", type=tarfile.LNKTYPE, linkname="ok.png")
        c.unreadable_case(S, "tar_link")
        member(tar, "fifo.json", meta("fifo", "a pipe"))
        member(tar, "fifo.png", type=tarfile.FIFOTYPE)
        c.unreadable_case(S, "tar_special_member")
        member(tar, "device.json", meta("device", "a device"))
        member(tar, "device.png", type=tarfile.CHRTYPE, devmajor=1, devminor=5)
        c.unreadable_case(S, "tar_special_member")
        member(tar, "/abs.png", _png())
        c.unreadable_case(S, "unsafe_path")
        member(tar, "../escape.png", _png())
        c.unreadable_case(S, "unsafe_path")
        member(tar, "heic.json", meta("heic", "a phone photo"))
        member(tar, "heic.heic", b"\0\0\0\x18ftypheic")
        c.unreadable_case(S, "image_format")
        member(tar, "twice.png", _png())
        member(tar, "twice.png", _png((1, 1, 1)))
        c.unreadable_case(S, "tar_duplicate_member")
        member(tar, "badjson.json", b'{"conversations": [')
        member(tar, "badjson.png", _png((50, 50, 50)))
        c.case(S, "badjson", "malformed_json")
        member(tar, "nothing.png", _png((60, 60, 60)))
        c.case(S, "nothing", "no_assistant_turn")
        member(tar, "broken.json", meta("broken", "a broken png"))
        member(tar, "broken.png", _image("PNG", size=(64, 64))[:-40])
        c.case(S, "broken", "image_truncated")


def _write_parquet_source(c: Corpus) -> None:
    S = "parquet"
    rows = [("p-ok", _png((7, 7, 200)), None), ("p-empty", b"", "image_missing"),
            ("p-garbage", b"\x89PNG garbage", "image_undecodable"),
            ("p-big", b"\xff" * (MAX_BYTES + 1), "image_too_large")]
    table = pa.table({"id": [r[0] for r in rows], "image": [r[1] for r in rows],
                      "conversations": [_qa("<image>\nColour?", f"colour of {r[0]}") for r in rows]})
    (c.root / "pq").mkdir()
    pq.write_table(table, c.root / "pq" / "part.parquet")
    for rid, _, reason in rows:
        c.case(S, rid, reason)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    c = Corpus(tmp_path_factory.mktemp("hostile"))
    _write_json_source(c)
    _write_jsonl_source(c)
    _write_tar_source(c)
    _write_parquet_source(c)
    return c


def _recipe(path: Path, c: Corpus, tokenizer: Path) -> Path:
    data = {"name": "hostile", "tokenizer": str(tokenizer), "max_length": 512,
            "samples_per_shard": 8, "seed": 11,
            "vision": {"tile_size": 32, "patch_size": 8, "max_grid": 2},
            "images": {"max_bytes": MAX_BYTES, "max_pixels": 1_000_000, "min_side": 8},
            "sources": [
                {"name": "json", "kind": "llava_json", "location": str(c.root / "records.json"),
                 "image_root": str(c.images)},
                {"name": "jsonl", "kind": "llava_json", "location": str(c.root / "lines.jsonl")},
                {"name": "tars", "kind": "webdataset", "location": str(c.root / "tars")},
                {"name": "parquet", "kind": "parquet", "location": str(c.root / "pq")}]}
    path.write_text(yaml.safe_dump(data))
    return path


def _files(uri: str) -> dict[str, bytes]:
    return {u[len(uri):].lstrip("/"): storage.read_bytes(u) for u in storage.list_uris(uri)}


def test_a_hostile_corpus_builds_with_every_case_accounted_for(tmp_path, corpus, tiny_tokenizer,
                                                               ray_cluster):
    n_bad = (sum(r is not None for r in corpus.expect.values())
             + sum(sum(v.values()) for v in corpus.unreadable.values()))
    assert n_bad >= 40
    recipe_path = _recipe(tmp_path / "recipe.yaml", corpus, tiny_tokenizer)

    # Through the CLI, bounded in time: a FIFO or /dev/zero read would hang it past the timeout.
    one = tmp_path / "one"
    proc = subprocess.run([str(Path(sys.executable).parent / "lladav"), "data", "build", str(recipe_path),
                           "--out", str(one), "--num-workers", "2"],
                          capture_output=True, text=True, timeout=600,
                          env={**os.environ, "RAY_ADDRESS": ray_cluster})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    mixture = open_mixture(str(one))

    # Every record is a sample or a reject, per source.
    counts = mixture.info["counts"]["by_source"]
    for source, n in corpus.records.items():
        got = counts[source]
        assert got["records"] == n, (source, got)
        assert got["samples"] + got["rejected"] == n, (source, got)

    # Each case has its own reason; the surviving ones are samples.
    rejects = mixture.rejects().to_pylist()
    by_id = {(r["source"], r["source_id"]): r for r in rejects if r["source_id"] is not None}
    manifest = mixture.manifest().to_pylist()
    kept = {(r["source"], r["source_id"]): r for r in manifest}
    for key, reason in corpus.expect.items():
        shown = key[1].encode("utf-8", "backslashreplace").decode()
        key = (key[0], shown)
        if reason is None:
            assert key in kept, (key, by_id.get(key))
        else:
            assert key in by_id, (key, "accepted" if key in kept else "missing")
            assert by_id[key]["reason"] == reason, (key, by_id[key])
            assert by_id[key]["detail"], key
    for source, reasons in corpus.unreadable.items():
        got = Counter(r["reason"] for r in rejects if r["source"] == source and r["source_id"] is None)
        assert got == reasons, source
    # Details name the record's location and never a memory address.
    assert all(r["location"] and " at 0x" not in r["detail"] for r in rejects)

    # Nothing outside the image root reached a shard, nor any other output file.
    outside_jpg = (corpus.outside / "secret.jpg").read_bytes()
    for name, data in _files(str(one)).items():
        assert CANARY not in data and outside_jpg not in data, name

    # Accepted images decode to the right pixels: 16-bit not white, MPO's first frame, EXIF upright.
    images = _shard_images(mixture)
    sixteen = kept[("json", "sixteen-bit")]
    got = np.asarray(decode_rgb(images[sixteen["key"]]))
    assert np.abs(got.astype(int) - png16()[1].astype(int)).max() <= 1
    phone = decode_rgb(images[kept[("json", "mpo")]["key"]])
    assert np.allclose(phone.getpixel((5, 5)), mpo()[1], atol=3)
    rotated = kept[("json", "exif-rotated")]
    upright = exif_rotated(6)[1]
    assert (rotated["image_widths"][0], rotated["image_heights"][0]) == upright
    assert rotated["image_orientations"] == [6]
    img = decode_rgb(images[rotated["key"]])
    assert img.size == upright and img.getpixel((upright[0] // 2, 1))[0] > 200  # red on top
    assert kept[("json", "good")]["image_orientations"] == [1]
    gif = decode_rgb(images[kept[("tars", "gif")]["key"]])
    assert np.allclose(gif.getpixel((3, 3)), (120, 10, 10), atol=8)

    # A second build (in-process, another worker count) is byte-identical, rejects included.
    two = build(load_recipe(recipe_path), str(tmp_path / "two"), num_workers=1)
    a, b = _files(str(one)), _files(two.uri)
    assert sorted(a) == sorted(b) and "rejects.parquet" in a
    assert all(a[k] == b[k] for k in a), [k for k in a if a[k] != b[k]]


def _shard_images(mixture) -> dict[str, bytes]:
    """First image bytes of every sample, by key, read with plain tarfile."""
    out = {}
    for uri in mixture.shard_uris():
        with tarfile.open(fileobj=io.BytesIO(storage.read_bytes(uri))) as tar:
            for m in tar.getmembers():
                key, _, ext = m.name.partition(".")
                if ext.startswith("img0."):
                    out[key] = tar.extractfile(m).read()
    return out


# ---- files that cannot be read past a point fail their source, naming file and byte ----------

@pytest.mark.parametrize("name, content, says", [
    ("concat.json", b'[{"id": "r1", "conversations": []}][{"id": "r2"}]', "byte 35: content after"),
    ("midway.json", b'[{"id": "r1", "conversations": []},\n {"id": "r2", "x": tru}]', "byte 55: Expecting value"),
    ("unclosed.json", b'[{"id": "r1", "conversations": []},', "the array is not closed"),
    ("bad-utf8.json", b'[{"id": "r1", "conversations": []}, {"id": "caf\xe9"}]', "invalid UTF-8"),
    ("object.json", b'{"id": "r1"}', "not a JSON array"),
    ("truncated.tar", None, "not a readable tar"),
    ("notatar.tar", b"definitely not a tar archive" * 40, "not a readable tar"),
])
def test_unreadable_files_fail_their_source_loudly(tmp_path, tiny_tokenizer, name, content, says):
    path = tmp_path / name
    if content is None:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for i in range(3):
                data = _png() * 20
                info = tarfile.TarInfo(f"r{i}.png")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
        content = buf.getvalue()[:1700]  # cut inside the second member
    path.write_bytes(content)
    kind = "webdataset" if name.endswith(".tar") else "llava_json"
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({"name": "one", "tokenizer": str(tiny_tokenizer),
                                      "sources": [{"name": "s", "kind": kind, "location": str(path)}]}))
    out = tmp_path / "out"
    with pytest.raises((SourceError, BuildError)) as err:
        build(load_recipe(recipe), str(out))
    message = str(err.value)
    assert str(path) in message and says in message, message
    with pytest.raises(MixtureNotCommitted):
        open_mixture(str(out))
