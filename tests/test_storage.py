"""Tests for URI-addressed storage (spinml_ray/storage.py): local paths and S3 (moto)."""

from __future__ import annotations

import builtins
import os
import uuid

import pyarrow as pa
import pytest

from spinml_ray import storage


def table(start: int, n: int) -> pa.Table:
    return pa.table({"i": list(range(start, start + n)), "s": [f"row-{k}" for k in range(start, start + n)]})


def files_in(directory) -> list[str]:
    return sorted(os.listdir(directory))


# ---------------------------------------------------------------- local round trips


def test_bytes_round_trip_creates_parent_dirs(tmp_path):
    uri = str(tmp_path / "a" / "b" / "blob.bin")
    data = bytes(range(256)) * 3
    storage.write_bytes(uri, data)
    assert storage.read_bytes(uri) == data
    assert storage.exists(uri)
    with open(uri, "rb") as handle:
        assert handle.read() == data
    assert files_in(tmp_path / "a" / "b") == ["blob.bin"]


def test_file_scheme_is_the_same_as_a_path(tmp_path):
    storage.write_bytes("file://" + str(tmp_path / "x.bin"), b"hello")
    assert storage.read_bytes(str(tmp_path / "x.bin")) == b"hello"


def test_overwrite_replaces_content(tmp_path):
    uri = str(tmp_path / "f.bin")
    storage.write_bytes(uri, b"old content, longer")
    storage.write_bytes(uri, b"new")
    assert storage.read_bytes(uri) == b"new"


def test_json_round_trip(tmp_path):
    uri = str(tmp_path / "v.json")
    value = {"b": [1, 2.5, None, "x"], "a": {"nested": True}, "unicode": "ünï"}
    storage.write_json(uri, value)
    assert storage.read_json(uri) == value


def test_parquet_round_trip(tmp_path):
    uri = str(tmp_path / "t.parquet")
    original = pa.table({"i": [1, 2, 3], "b": [b"\x00\xff", None, b"z"], "f": [0.5, 1.5, float("inf")]})
    storage.write_table(uri, original)
    assert storage.read_table(uri).equals(original)


def test_read_missing_and_directory(tmp_path):
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(str(tmp_path / "missing.bin"))
    assert not storage.exists(str(tmp_path / "missing.bin"))
    with pytest.raises(IsADirectoryError):
        storage.read_bytes(str(tmp_path))


def test_list_files_and_dirs(tmp_path):
    root = str(tmp_path / "root")
    for name in ("b.bin", "a.bin", "sub/c.bin"):
        storage.write_bytes(storage.join(root, name), name.encode())
    assert storage.list_files(root) == [storage.join(root, "a.bin"), storage.join(root, "b.bin")]
    assert storage.list_files(root, recursive=True) == sorted(
        [storage.join(root, "a.bin"), storage.join(root, "b.bin"), storage.join(root, "sub", "c.bin")]
    )
    assert storage.list_dirs(root) == [storage.join(root, "sub")]
    assert storage.list_files(str(tmp_path / "nothing-here")) == []


# ---------------------------------------------------------------- atomic writes


def test_failed_replace_keeps_old_content_and_no_temp_files(tmp_path, monkeypatch):
    uri = str(tmp_path / "data.bin")
    storage.write_bytes(uri, b"the old, complete content")

    def broken_replace(src, dst):
        raise OSError("disk went away")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError, match="disk went away"):
        storage.write_bytes(uri, b"new content that never lands")
    monkeypatch.undo()
    assert storage.read_bytes(uri) == b"the old, complete content"
    assert files_in(tmp_path) == ["data.bin"]


def test_write_failing_midway_keeps_old_content_and_no_temp_files(tmp_path, monkeypatch):
    uri = str(tmp_path / "data.bin")
    storage.write_bytes(uri, b"A" * 1000)
    written = []

    class HalfWriter:
        """A file handle whose write stores half of the data, then fails."""

        def __init__(self, handle):
            self._handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._handle.close()
            return False

        def write(self, data):
            self._handle.write(data[: len(data) // 2])
            self._handle.flush()
            written.append(self._handle.name)
            raise OSError("no space left on device")

        def __getattr__(self, name):
            return getattr(self._handle, name)

    real_open = builtins.open
    monkeypatch.setattr(storage, "open", lambda *a, **k: HalfWriter(real_open(*a, **k)), raising=False)
    with pytest.raises(OSError, match="no space left"):
        storage.write_bytes(uri, b"B" * 1000)
    monkeypatch.undo()
    assert written, "the patched handle was not used"
    assert written[0] != uri  # it wrote beside the target, not into it
    assert storage.read_bytes(uri) == b"A" * 1000
    assert files_in(tmp_path) == ["data.bin"]


def test_failed_first_write_leaves_nothing(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "fsync", lambda fd: (_ for _ in ()).throw(OSError("fsync failed")))
    with pytest.raises(OSError, match="fsync failed"):
        storage.write_bytes(str(tmp_path / "new.bin"), b"data")
    monkeypatch.undo()
    assert files_in(tmp_path) == []


# ---------------------------------------------------------------- commit / manifest


def test_commit_reads_only_listed_parts(tmp_path):
    directory = str(tmp_path / "stage")
    part1, part2, stray = (storage.part_uri(directory) for _ in range(3))
    assert len({part1, part2, stray}) == 3
    storage.write_table(part1, table(0, 3))
    storage.write_table(part2, table(100, 2))
    storage.write_table(stray, table(999, 5))  # written by a crashed attempt, never committed
    manifest = storage.commit(directory, [part1, os.path.basename(part2)], rows=5)
    assert manifest["rows"] == 5
    assert sorted(manifest["files"]) == sorted(os.path.basename(p) for p in (part1, part2))
    assert storage.read_manifest(directory) == manifest
    result = storage.read_committed_table(directory)
    assert sorted(result.column("i").to_pylist()) == [0, 1, 2, 100, 101]


def test_read_committed_without_manifest_names_directory(tmp_path):
    directory = str(tmp_path / "stage")
    storage.write_table(storage.part_uri(directory), table(0, 2))
    assert storage.read_manifest(directory) is None
    with pytest.raises(FileNotFoundError) as info:
        storage.read_committed_table(directory)
    assert directory in str(info.value)
    assert storage.MANIFEST in str(info.value)


def test_second_commit_replaces_first(tmp_path):
    directory = str(tmp_path / "stage")
    first = storage.part_uri(directory)
    storage.write_table(first, table(0, 4))
    storage.commit(directory, [first])
    second = storage.part_uri(directory)
    storage.write_table(second, table(50, 1))
    storage.commit(directory, [second], attempt=2)
    assert storage.read_committed_table(directory).column("i").to_pylist() == [50]
    assert storage.read_manifest(directory)["attempt"] == 2


def test_commit_of_nothing_is_an_empty_table(tmp_path):
    directory = str(tmp_path / "stage")
    storage.commit(directory, [])
    assert storage.read_committed_table(directory).num_rows == 0


def test_committed_parts_with_different_columns_are_combined(tmp_path):
    directory = str(tmp_path / "stage")
    a, b = storage.part_uri(directory), storage.part_uri(directory)
    storage.write_table(a, pa.table({"i": [1]}))
    storage.write_table(b, pa.table({"i": [2], "extra": ["x"]}))
    storage.commit(directory, [a, b])
    result = storage.read_committed_table(directory)
    assert dict(zip(result.column("i").to_pylist(), result.column("extra").to_pylist())) == {1: None, 2: "x"}


# ---------------------------------------------------------------- URIs


def test_local_confine_join_parent(tmp_path):
    base = str(tmp_path / "req")
    assert storage.confine(base, "refs/a.png") == os.path.join(base, "refs", "a.png")
    assert storage.confine(base, "./refs/../b.png") == os.path.join(base, "b.png")
    assert storage.confine(base, os.path.join(base, "c.png")) == os.path.join(base, "c.png")
    assert storage.confine(base, "file://" + os.path.join(base, "d%20e.png")) == os.path.join(base, "d e.png")
    for outside in ("../x.png", "/abs/path.png", "s3://bucket/k.png", "http://host/x", "file:///etc/passwd",
                    "file://" + base + "/%2e%2e/x", base + "-sibling/x.png", "a\x00b", "a\nb"):
        with pytest.raises(storage.OutsidePrefix):
            storage.confine(base, outside)
    assert storage.join(base, "a", "b.bin") == os.path.join(base, "a", "b.bin")
    assert storage.parent(os.path.join(base, "request.yaml")) == base


def test_local_parent_of_relative_path_is_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert storage.parent("sub/request.yaml") == str(tmp_path / "sub")
    assert storage.parent("request.yaml") == str(tmp_path)


def test_local_confine_follows_symlinks(tmp_path):
    base, outside = tmp_path / "tenant", tmp_path / "other"
    base.mkdir(), outside.mkdir()
    (base / "link").symlink_to(outside)
    with pytest.raises(storage.OutsidePrefix):
        storage.confine(str(base), "link/secret.png")
    assert storage.confine(str(base), "real/x.png") == str(base / "real" / "x.png")


def test_s3_confine_join_parent():
    assert storage.confine("s3://bucket/t/req", "refs/a.png") == "s3://bucket/t/req/refs/a.png"
    assert storage.confine("s3://bucket/t/req", "./a/./b.png") == "s3://bucket/t/req/a/b.png"
    assert storage.confine("s3://bucket/t/req", "s3://bucket/t/req/x//y.png") == "s3://bucket/t/req/x/y.png"
    for outside in ("../other/a.png", "s3://other/t/req/x.png", "/local/abs.png", "s3://bucket/t/req/../r2/x",
                    "s3://bucket/t/req2/x", "file:///t/req/x", "../../../../x.png"):
        with pytest.raises(storage.OutsidePrefix):
            storage.confine("s3://bucket/t/req", outside)
    assert storage.join("s3://bucket/prefix", "a", "b.bin") == "s3://bucket/prefix/a/b.bin"
    assert storage.join("s3://bucket/prefix/", "c.bin") == "s3://bucket/prefix/c.bin"
    assert storage.parent("s3://bucket/t/req/request.yaml") == "s3://bucket/t/req"
    assert storage.parent("s3://bucket/t/req/") == "s3://bucket/t"


def test_filesystem_refuses_unknown_scheme():
    for uri in ("gs://x", "http://host/file.png"):
        with pytest.raises(ValueError) as info:
            storage.filesystem(uri)
        assert uri in str(info.value)
    with pytest.raises(ValueError, match="gs://bucket/obj"):
        storage.read_bytes("gs://bucket/obj")


def test_filesystem_local_paths_are_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    _, path = storage.filesystem("rel/file.bin")
    assert path == str(tmp_path / "rel" / "file.bin")
    _, path = storage.filesystem("file://" + str(tmp_path / "f"))
    assert path == str(tmp_path / "f")


def test_s3_filesystem_path_strips_scheme():
    _, path = storage.filesystem("s3://bucket/a/b/")
    assert path == "bucket/a/b"


@pytest.mark.parametrize("root", ["/data/spinml", "s3://bucket/spinml"])
def test_request_paths_layout(root):
    paths = storage.RequestPaths(root=root, tenant="acme", request_id="req-7")
    assert paths.base == storage.join(root, "acme", "req-7")
    assert paths.base.endswith("/acme/req-7") and paths.base.startswith(root)
    for name in ("sanitized", "synthetic", "model", "train_runs"):
        assert getattr(paths, name) == f"{root}/acme/req-7/{name}"
    assert paths.request == f"{root}/acme/req-7/request.json"


# ---------------------------------------------------------------- S3 (moto)


@pytest.fixture()
def s3_prefix(s3_server):
    _, bucket = s3_server
    return f"s3://{bucket}/test-{uuid.uuid4().hex[:8]}"


def test_s3_bytes_json_parquet_round_trip(s3_prefix):
    blob = storage.join(s3_prefix, "dir", "blob.bin")
    data = os.urandom(5000)
    storage.write_bytes(blob, data)
    assert storage.read_bytes(blob) == data
    assert storage.exists(blob)
    storage.write_json(storage.join(s3_prefix, "v.json"), {"k": [1, 2]})
    assert storage.read_json(storage.join(s3_prefix, "v.json")) == {"k": [1, 2]}
    original = table(0, 10)
    storage.write_table(storage.join(s3_prefix, "t.parquet"), original)
    assert storage.read_table(storage.join(s3_prefix, "t.parquet")).equals(original)
    with pytest.raises(FileNotFoundError):
        storage.read_bytes(storage.join(s3_prefix, "missing.bin"))
    assert not storage.exists(storage.join(s3_prefix, "missing.bin"))


def test_s3_commit_round_trip(s3_prefix):
    directory = storage.join(s3_prefix, "sanitized")
    with pytest.raises(FileNotFoundError) as info:
        storage.read_committed_table(directory)
    assert directory in str(info.value)
    kept, stray = storage.part_uri(directory), storage.part_uri(directory)
    assert kept.startswith(directory + "/")
    storage.write_table(kept, table(0, 3))
    storage.write_table(stray, table(10, 3))
    storage.commit(directory, [kept])
    assert storage.read_committed_table(directory).column("i").to_pylist() == [0, 1, 2]
    replacement = storage.part_uri(directory)
    storage.write_table(replacement, table(7, 1))
    storage.commit(directory, [replacement])
    assert storage.read_committed_table(directory).column("i").to_pylist() == [7]


def test_s3_list_files(s3_prefix):
    for name in ("b.bin", "a.bin", "sub/c.bin"):
        storage.write_bytes(storage.join(s3_prefix, name), name.encode())
    assert storage.list_files(s3_prefix) == [storage.join(s3_prefix, "a.bin"), storage.join(s3_prefix, "b.bin")]
    assert storage.list_files(s3_prefix, recursive=True) == sorted(
        storage.join(s3_prefix, n) for n in ("a.bin", "b.bin", "sub/c.bin")
    )
    assert storage.list_dirs(s3_prefix) == [storage.join(s3_prefix, "sub")]
    assert storage.list_files(storage.join(s3_prefix, "nothing")) == []


def test_s3_upload_download_round_trip(s3_prefix, tmp_path):
    source = tmp_path / "src"
    contents = {"model.bin": os.urandom(3000), "config.json": b'{"a": 1}', "nested/deep/w.txt": b"weights"}
    for name, data in contents.items():
        (source / name).parent.mkdir(parents=True, exist_ok=True)
        (source / name).write_bytes(data)
    remote = storage.join(s3_prefix, "model")
    storage.upload_dir(str(source), remote)
    assert storage.read_bytes(storage.join(remote, "nested", "deep", "w.txt")) == b"weights"
    target = tmp_path / "dst"
    assert storage.download_dir(remote, str(target)) == str(target)
    for name, data in contents.items():
        assert (target / name).read_bytes() == data
    with pytest.raises(FileNotFoundError):
        storage.download_dir(storage.join(s3_prefix, "absent"), str(tmp_path / "never"))


def test_parent_of_file_uri():
    assert storage.parent("file:///data/req/request.yaml") == "/data/req"  # a local path, the scheme dropped


def test_upload_dir_creates_a_missing_local_destination(tmp_path):
    source = tmp_path / "src"
    source.mkdir()
    (source / "a.txt").write_text("x")
    destination = tmp_path / "not" / "yet" / "there"
    storage.upload_dir(str(source), str(destination))
    assert (destination / "a.txt").read_text() == "x"


@pytest.mark.parametrize("where", ["local", "s3"])
def test_delete_dir_removes_only_that_tree(where, tmp_path, request):
    root = str(tmp_path) if where == "local" else request.getfixturevalue("s3_prefix")
    for name in ("run/a.bin", "run/sub/b.bin", "runs-kept/c.bin"):
        storage.write_bytes(storage.join(root, name), b"x")
    storage.delete_dir(storage.join(root, "run"))
    assert storage.list_files(root, recursive=True) == [storage.join(root, "runs-kept", "c.bin")]
    storage.delete_dir(storage.join(root, "run"))  # gone already: nothing to do
    storage.delete_dir(storage.join(root, "runs-kept", "c.bin"))  # a file is not a directory: kept
    assert storage.exists(storage.join(root, "runs-kept", "c.bin"))
