"""Corpus readers: streamed JSON spans, record read-back by byte range, unsafe paths."""

import json

import pytest

from lladav.config import Source
from lladav.data import sources
from lladav.data.sources import BadRecord, RecordRef, Unreadable, enumerate_source, load_record


@pytest.fixture(autouse=True)
def tiny_chunks(monkeypatch):
    # Chunks of 7 bytes put element, string and multi-byte UTF-8 boundaries mid-chunk.
    monkeypatch.setattr(sources, "_CHUNK", 7)


def records(n):
    return [{"id": f"r{i}", "conversations": [{"from": "human", "value": f"Größe {i}? ✓"},
                                               {"from": "gpt", "value": "x" * i}]} for i in range(n)]


def test_json_array_is_streamed_into_exact_byte_spans(tmp_path):
    path = tmp_path / "data.json"
    path.write_text(json.dumps(records(5), indent=1, ensure_ascii=False), encoding="utf-8")
    src = Source(name="s", kind="llava_json", location=str(path))
    refs = list(enumerate_source(src))
    assert [r.record_id for r in refs] == [f"r{i}" for i in range(5)]
    raw = path.read_bytes()
    for i, ref in enumerate(refs):
        _, offset, length = ref.locator
        assert json.loads(raw[offset:offset + length]) == records(5)[i]
        assert ref.location == f"{path}#byte={offset}"
        assert load_record(src, ref).conversations == records(5)[i]["conversations"]


def test_json_array_syntax_error_keeps_earlier_records_and_says_where(tmp_path):
    good = json.dumps(records(2))[:-1]  # drop the closing bracket
    path = tmp_path / "broken.json"
    path.write_text(good + ', {"id": "bad", "conversations": [}, {"id": "never"}]')
    items = list(enumerate_source(Source(name="s", kind="llava_json", location=str(path))))
    assert [i.record_id for i in items if isinstance(i, RecordRef)] == ["r0", "r1"]
    (err,) = [i for i in items if isinstance(i, Unreadable)]
    assert err.code == "malformed_json" and "rest of the file was not read" in err.detail
    assert err.location == f"{path}#byte={len(good) + 2}"


def test_jsonl_records_missing_ids_get_positional_ids(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"conversations": []}\n\n["not", "an", "object"]\n{"id": "z", "conversations": []}\n')
    items = list(enumerate_source(Source(name="s", kind="llava_json", location=str(path))))
    assert [type(i).__name__ for i in items] == ["RecordRef", "Unreadable", "RecordRef"]
    assert items[0].record_id == "d.jsonl:0" and items[2].record_id == "z"
    assert items[1].code == "malformed_record"


@pytest.mark.parametrize("image", ["../x.png", "/etc/passwd", "a/../../x.png", "s3://other/x.png"])
def test_image_paths_must_stay_inside_image_root(tmp_path, image):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"id": "a", "image": image, "conversations": []}) + "\n")
    src = Source(name="s", kind="llava_json", location=str(path))
    (ref,) = enumerate_source(src)
    with pytest.raises(BadRecord) as err:
        load_record(src, ref)
    assert err.value.code == "unsafe_path"
