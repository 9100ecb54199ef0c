"""Corpus readers: streamed JSON spans, record read-back by byte range, unsafe paths."""

import json

import pytest

from lladav.config import Source
from lladav.data import sources
from lladav.data.sources import BadRecord, enumerate_source, load_record


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


def test_json_array_syntax_error_fails_the_source_at_its_byte(tmp_path):
    # Nothing after a syntax error can be read reliably, so the source fails loudly: keeping the
    # records before it and dropping the rest silently is what lost records used to look like.
    good = json.dumps(records(2))[:-1]  # drop the closing bracket
    path = tmp_path / "broken.json"
    text = good + ', {"id": "bad", "conversations": [}, {"id": "never"}]'
    path.write_text(text)
    with pytest.raises(sources.SourceError) as err:
        list(enumerate_source(Source(name="s", kind="llava_json", location=str(path))))
    assert str(err.value).startswith(f"{path}: byte {text.index('[}') + 1}: Expecting value")


@pytest.mark.parametrize("tail, why", [('[{"id": "r2"}]', "content after the array's closing"),
                                       ("", "the array is not closed")])
def test_json_array_content_after_the_array_or_a_missing_end_fails_the_source(tmp_path, tail, why):
    path = tmp_path / "two.json"
    body = json.dumps(records(2))
    path.write_text(body[:-1] + tail if not tail else body + tail)
    with pytest.raises(sources.SourceError, match=why) as err:
        list(enumerate_source(Source(name="s", kind="llava_json", location=str(path))))
    assert str(path) in str(err.value)


def test_byte_order_marks_are_skipped_with_exact_spans(tmp_path):
    for name, text in [("a.json", json.dumps(records(3))),
                       ("b.jsonl", "\n".join(json.dumps(r) for r in records(3)))]:
        path = tmp_path / name
        path.write_bytes(b"\xef\xbb\xbf" + text.encode())
        src = Source(name="s", kind="llava_json", location=str(path))
        refs = list(enumerate_source(src))
        assert [r.record_id for r in refs] == ["r0", "r1", "r2"]
        assert all(load_record(src, r).conversations == records(3)[i]["conversations"]
                   for i, r in enumerate(refs))


def test_too_deep_elements_are_one_reject_each_and_the_rest_is_read(tmp_path):
    deep = "[" * 100_000 + "]" * 100_000
    array = tmp_path / "deep.json"
    array.write_text(f'[{json.dumps(records(1)[0])}, {{"id": "deep", "x": {deep}}}, '
                     f'{{"x": "]}}[\\""}}, {json.dumps(records(2)[1])}]')
    lines = tmp_path / "deep.jsonl"
    lines.write_text(f'{json.dumps(records(1)[0])}\n{deep}\n{json.dumps(records(2)[1])}\n')
    for path in (array, lines):
        items = list(enumerate_source(Source(name="s", kind="llava_json", location=str(path))))
        kinds = [(type(i).__name__, getattr(i, "code", None)) for i in items]
        if path == array:  # the element after the deep one has brackets inside a string
            assert kinds == [("RecordRef", None), ("Unreadable", "too_deep"), ("RecordRef", None),
                             ("RecordRef", None)]
        else:
            assert kinds == [("RecordRef", None), ("Unreadable", "too_deep"), ("RecordRef", None)]
        assert items[-1].record_id == "r1"


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
