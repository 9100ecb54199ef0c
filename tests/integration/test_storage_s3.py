"""storage.py's contract on both backends, and the S3-only behaviour, against a real moto server.

The shared tests take a `root` URI that is either a local temp folder or a fresh S3 bucket
prefix, so one body pins that both backends behave the same.
"""

import os
from concurrent.futures import ThreadPoolExecutor

import boto3
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from lladav import storage


@pytest.fixture(params=["local", "s3"])
def root(request, tmp_path) -> str:
    if request.param == "local":
        return str(tmp_path / "root")
    return request.getfixturevalue("s3_bucket") + "/root"


def _s3():
    return boto3.session.Session().client("s3")


def _keys(bucket_uri: str) -> list[str]:
    bucket = bucket_uri[len("s3://"):]
    return [o["Key"] for o in _s3().list_objects_v2(Bucket=bucket).get("Contents", [])]


# ---- the shared contract ----------------------------------------------------------------------

def test_round_trip_and_range(root):
    uri = storage.join(root, "dir", "obj.bin")
    payload = os.urandom(3 * 2**20 + 17)  # spans several read buffers
    storage.write_bytes(uri, payload)
    assert storage.exists(uri)
    assert storage.read_bytes(uri) == payload
    assert storage.read_range(uri, 2**20 - 5, 10) == payload[2**20 - 5:2**20 + 5]
    with storage.open_read(uri) as f:
        chunks = list(iter(lambda: f.read(2**20), b""))
    assert b"".join(chunks) == payload and len(chunks) == 4
    with pytest.raises(storage.StorageError, match="obj.bin"):
        storage.read_range(uri, len(payload) - 1, 2)


def test_open_read_supports_line_iteration(root):
    uri = storage.join(root, "data.jsonl")
    storage.write_bytes(uri, b'{"a": 1}\n{"a": 2}\n')
    with storage.open_read(uri) as f:
        assert list(f) == [b'{"a": 1}\n', b'{"a": 2}\n']


def test_overwrite_replaces(root):
    uri = storage.join(root, "mixture.json")
    storage.write_bytes(uri, b"old")
    storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"
    assert storage.list_uris(root) == [uri]


def test_listing_is_recursive_sorted_and_prefix_is_a_folder(root):
    for name in ["p/b.txt", "p/a.json", "p/sub/c.txt", "px/d.txt", "p.txt"]:
        storage.write_bytes(storage.join(root, name), b"x")
    base = storage.join(root, "p")
    expected = [storage.join(base, n) for n in ["a.json", "b.txt", "sub/c.txt"]]
    assert storage.list_uris(base) == expected
    assert storage.list_uris(base + "/", suffix=".txt") == [storage.join(base, "b.txt"),
                                                             storage.join(base, "sub/c.txt")]
    assert storage.list_uris(storage.join(root, "missing")) == []


def test_missing_object_raises_file_not_found_naming_the_uri(root):
    uri = storage.join(root, "absent.bin")
    assert not storage.exists(uri)
    for call in (storage.read_bytes, lambda u: storage.read_range(u, 0, 1)):
        with pytest.raises(FileNotFoundError, match="absent.bin"):
            call(uri)
    with pytest.raises(FileNotFoundError, match="absent.bin"):
        with storage.open_read(uri):
            pass


def test_open_write_publishes_only_on_success(root):
    uri = storage.join(root, "shards", "shard-000000.tar")
    with pytest.raises(RuntimeError, match="boom"):
        with storage.open_write(uri) as f:
            f.write(b"partial" * 1000)
            raise RuntimeError("boom")
    assert not storage.exists(uri)
    assert storage.list_uris(root) == []
    with storage.open_write(uri) as f:
        f.write(b"complete")
        assert not storage.exists(uri)  # invisible until the block exits
    assert storage.read_bytes(uri) == b"complete"


def test_write_file_and_delete(root, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(b"payload")
    for name in ["d/a", "d/sub/b", "keep"]:
        storage.write_file(storage.join(root, name), src)
    storage.delete(storage.join(root, "d/a"))
    storage.delete(storage.join(root, "d/a"))  # missing is fine
    assert storage.list_uris(storage.join(root, "d")) == [storage.join(root, "d/sub/b")]
    storage.delete_prefix(storage.join(root, "d"))
    assert storage.list_uris(root) == [storage.join(root, "keep")]
    assert storage.read_bytes(storage.join(root, "keep")) == b"payload"


def test_arrow_filesystem_reads_parquet_back(root):
    uri = storage.join(root, "t.parquet")
    with storage.open_write(uri) as f:
        pq.write_table(pa.table({"x": [1, 2, 3]}), f)
    fs, path = storage.arrow_filesystem(uri)
    assert pq.read_table(path, filesystem=fs).column("x").to_pylist() == [1, 2, 3]


# ---- S3 only ----------------------------------------------------------------------------------

def test_boto3_takes_the_endpoint_from_the_environment(s3_server):
    # storage.py passes no endpoint_url: it relies on botocore reading AWS_ENDPOINT_URL.
    assert boto3.session.Session().client("s3").meta.endpoint_url == s3_server


def test_large_file_is_uploaded_in_parts(s3_bucket, tmp_path):
    src = tmp_path / "big.bin"
    payload = os.urandom(12 * 2**20)
    src.write_bytes(payload)
    uri = f"{s3_bucket}/big.bin"
    storage.write_file(uri, src, multipart_threshold=5 * 2**20, multipart_chunksize=5 * 2**20)
    head = _s3().head_object(Bucket=s3_bucket[len("s3://"):], Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")  # 5 + 5 + 2 MiB
    assert storage.read_bytes(uri) == payload


def test_large_bytes_are_uploaded_in_parts(s3_bucket, monkeypatch):
    monkeypatch.setattr(storage, "MULTIPART_THRESHOLD", 5 * 2**20)
    monkeypatch.setattr(storage, "MULTIPART_CHUNKSIZE", 5 * 2**20)
    payload = os.urandom(11 * 2**20)
    storage.write_bytes(f"{s3_bucket}/big.bin", payload)
    head = _s3().head_object(Bucket=s3_bucket[len("s3://"):], Key="big.bin")
    assert head["ETag"].strip('"').endswith("-3")
    assert storage.read_bytes(f"{s3_bucket}/big.bin") == payload


def test_small_file_is_a_single_put(s3_bucket, tmp_path):
    src = tmp_path / "small.bin"
    src.write_bytes(b"x" * 1000)
    storage.write_file(f"{s3_bucket}/small.bin", src, multipart_threshold=5 * 2**20)
    head = _s3().head_object(Bucket=s3_bucket[len("s3://"):], Key="small.bin")
    assert "-" not in head["ETag"]


def test_aborted_open_write_leaves_no_object(s3_bucket):
    uri = f"{s3_bucket}/mix/mixture.json"
    with pytest.raises(KeyboardInterrupt):
        with storage.open_write(uri) as f:
            f.write(b"{}")
            raise KeyboardInterrupt
    assert _keys(s3_bucket) == []
    multipart = _s3().list_multipart_uploads(Bucket=s3_bucket[len("s3://"):])
    assert multipart.get("Uploads", []) == []


def test_local_folder_downloads_the_prefix(s3_bucket):
    for name, data in [("tok/tokenizer.json", b"{}"), ("tok/sub/vocab.txt", b"a\nb"),
                       ("tokx/other.json", b"no")]:
        storage.write_bytes(f"{s3_bucket}/{name}", data)
    with storage.local_folder(f"{s3_bucket}/tok") as path:
        files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
        assert files == ["sub/vocab.txt", "tokenizer.json"]
        assert (path / "sub" / "vocab.txt").read_bytes() == b"a\nb"
    assert not path.exists()  # the temp copy is gone once the block exits
    with pytest.raises(FileNotFoundError, match="nothing"):
        with storage.local_folder(f"{s3_bucket}/nothing"):
            pass


def test_listing_paginates(s3_bucket):
    uris = [f"{s3_bucket}/many/{i:04d}" for i in range(1005)]  # > 1000 keys per page
    with ThreadPoolExecutor(8) as pool:  # overlap the round trips of 1005 PUTs
        list(pool.map(lambda u: storage.write_bytes(u, b""), uris))
    assert storage.list_uris(f"{s3_bucket}/many") == uris
    storage.delete_prefix(f"{s3_bucket}/many")
    assert _keys(s3_bucket) == []


def test_missing_bucket_is_file_not_found(s3_server):
    with pytest.raises(FileNotFoundError, match="s3://no-such-bucket-here/k"):
        storage.read_bytes("s3://no-such-bucket-here/k")


def test_refuses_to_delete_a_bucket_root(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/k", b"x")
    with pytest.raises(storage.StorageError, match=s3_bucket):
        storage.delete_prefix(s3_bucket)
    assert _keys(s3_bucket) == ["k"]


def test_client_is_cached_per_endpoint(s3_server, monkeypatch):
    first = storage._client()
    assert storage._client() is first
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    other = storage._client()
    assert other is not first and other.meta.endpoint_url == "http://127.0.0.1:9"


def _client_id_and_read(uri: str) -> tuple[int, bytes]:
    return id(storage._client()), storage.read_bytes(uri)


def test_forked_worker_builds_its_own_client(s3_bucket):
    import multiprocessing

    storage.write_bytes(f"{s3_bucket}/k", b"from parent")
    parent_client = storage._client()
    with multiprocessing.get_context("fork").Pool(1) as pool:
        child_client_id, data = pool.apply(_client_id_and_read, (f"{s3_bucket}/k",))
    assert data == b"from parent"
    assert child_client_id != id(parent_client)  # the parent's pool of sockets is not shared
