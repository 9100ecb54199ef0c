"""The local backend of storage.py: round-trips, atomic publishing, listing, addresses."""

import os

import pytest

from lladav import storage


def test_write_then_read_round_trips_and_creates_parents(tmp_path):
    uri = str(tmp_path / "a" / "b" / "obj.bin")
    payload = bytes(range(256)) * 10
    storage.write_bytes(uri, payload)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == payload
    with storage.open_read(uri) as f:
        assert f.read(3) == b"\x00\x01\x02"
        assert f.read() == payload[3:]


def test_file_uri_is_the_same_file(tmp_path):
    storage.write_bytes(f"file://{tmp_path}/x.txt", b"hello")
    assert (tmp_path / "x.txt").read_bytes() == b"hello"
    assert storage.read_bytes(f"file://{tmp_path}/x.txt") == b"hello"
    assert storage.list_uris(f"file://{tmp_path}") == [f"file://{tmp_path}/x.txt"]


def test_read_range_returns_exactly_the_span(tmp_path):
    uri = str(tmp_path / "r.bin")
    storage.write_bytes(uri, b"0123456789")
    assert storage.read_range(uri, 3, 4) == b"3456"
    assert storage.read_range(uri, 0, 0) == b""
    with pytest.raises(storage.StorageError, match="r.bin"):
        storage.read_range(uri, 8, 5)  # past the end: an error, not a silent short read


def test_list_is_recursive_sorted_and_treats_the_prefix_as_a_folder(tmp_path):
    for name in ["p/b.txt", "p/a.json", "p/sub/c.txt", "px/d.txt", "p.txt"]:
        storage.write_bytes(str(tmp_path / name), b"x")
    base = str(tmp_path / "p")
    assert storage.list_uris(base) == [f"{base}/a.json", f"{base}/b.txt", f"{base}/sub/c.txt"]
    assert storage.list_uris(base, suffix=".txt") == [f"{base}/b.txt", f"{base}/sub/c.txt"]
    assert storage.list_uris(str(tmp_path / "missing")) == []


def test_open_write_publishes_only_on_success(tmp_path):
    uri = str(tmp_path / "out" / "shard.tar")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write(uri) as f:
            f.write(b"partial")
            raise RuntimeError("boom")
    assert not os.path.exists(uri)
    assert os.listdir(tmp_path / "out") == []  # no temp file left behind

    with storage.open_write(uri) as f:
        f.write(b"complete")
        assert not os.path.exists(uri)  # invisible until the block exits
    assert storage.read_bytes(uri) == b"complete"
    assert os.listdir(tmp_path / "out") == ["shard.tar"]


def test_open_write_tolerates_a_writer_that_closes_the_file(tmp_path):
    uri = str(tmp_path / "closed.bin")
    with storage.open_write(uri) as f:
        f.write(b"abc")
        f.close()
    assert storage.read_bytes(uri) == b"abc"


def test_write_bytes_replaces_an_existing_file_by_rename(tmp_path):
    uri = str(tmp_path / "mixture.json")
    storage.write_bytes(uri, b"old")
    with open(uri, "rb") as reader:  # a reader holding the old file keeps seeing the old bytes
        old_inode = os.fstat(reader.fileno()).st_ino
        storage.write_bytes(uri, b"new")
        assert reader.read() == b"old"
    assert os.stat(uri).st_ino != old_inode
    assert storage.read_bytes(uri) == b"new"
    assert os.listdir(tmp_path) == ["mixture.json"]


def test_in_flight_temp_files_are_not_listed(tmp_path):
    (tmp_path / f"shard.tar.tmp-{'0' * 32}").write_bytes(b"half")
    storage.write_bytes(str(tmp_path / "done.bin"), b"x")
    assert storage.list_uris(str(tmp_path)) == [str(tmp_path / "done.bin")]


def test_write_file_copies(tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    storage.write_file(str(tmp_path / "dst" / "copy.bin"), src)
    assert (tmp_path / "dst" / "copy.bin").read_bytes() == b"payload"
    with pytest.raises(FileNotFoundError, match="nope.bin"):
        storage.write_file(str(tmp_path / "x.bin"), tmp_path / "nope.bin")


@pytest.mark.parametrize("call", [storage.read_bytes, lambda u: storage.read_range(u, 0, 1),
                                  lambda u: storage.open_read(u).__enter__()])
def test_missing_file_raises_file_not_found_naming_the_uri(tmp_path, call):
    uri = f"file://{tmp_path}/absent.bin"
    with pytest.raises(FileNotFoundError, match=f"file://{tmp_path}/absent.bin"):
        call(uri)
    assert not storage.exists(uri)


def test_delete_and_delete_prefix(tmp_path):
    for name in ["d/a", "d/sub/b", "keep"]:
        storage.write_bytes(str(tmp_path / name), b"x")
    storage.delete(str(tmp_path / "d" / "a"))
    storage.delete(str(tmp_path / "d" / "a"))  # missing is fine
    assert storage.list_uris(str(tmp_path / "d")) == [str(tmp_path / "d" / "sub" / "b")]
    storage.delete_prefix(str(tmp_path / "d"))
    assert storage.list_uris(str(tmp_path)) == [str(tmp_path / "keep")]
    with pytest.raises(storage.StorageError, match="root"):
        storage.delete_prefix("/")


def test_local_folder_yields_the_folder_itself(tmp_path):
    with storage.local_folder(str(tmp_path)) as path:
        assert path == tmp_path
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        with storage.local_folder(str(tmp_path / "nothing-here")):
            pass


def test_arrow_filesystem_local_reads_back(tmp_path):
    storage.write_bytes(str(tmp_path / "f.bin"), b"arrow")
    fs, path = storage.arrow_filesystem(f"file://{tmp_path}/f.bin")
    assert path == str(tmp_path / "f.bin")
    with fs.open_input_stream(path) as f:
        assert f.read() == b"arrow"


@pytest.mark.parametrize("base, parts, expected", [
    ("s3://b/p", ("x/y",), "s3://b/p/x/y"),
    ("s3://b/p/", ("/x/", "y"), "s3://b/p/x/y"),
    ("s3://b", ("k",), "s3://b/k"),
    ("s3://b/p", ("",), "s3://b/p"),
    ("/data/mix", ("shards", "s.tar"), "/data/mix/shards/s.tar"),
    ("rel", ("a",), "rel/a"),
])
def test_join(base, parts, expected):
    assert storage.join(base, *parts) == expected


@pytest.mark.parametrize("uri, parent, name", [
    ("s3://b/p/x.tar", "s3://b/p", "x.tar"),
    ("s3://b/x.tar", "s3://b", "x.tar"),
    ("s3://b/p/", "s3://b", "p"),
    ("/data/mix/x.tar", "/data/mix", "x.tar"),
    ("file:///data/x", "file:///data", "x"),
])
def test_parent_and_basename(uri, parent, name):
    assert storage.parent(uri) == parent
    assert storage.basename(uri) == name


def test_is_s3_and_unknown_schemes_are_refused():
    assert storage.is_s3("s3://b/k") and not storage.is_s3("/tmp/s3://x")
    with pytest.raises(storage.StorageError, match="gs://b/k"):
        storage.read_bytes("gs://b/k")
