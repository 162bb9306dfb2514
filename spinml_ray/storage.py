"""Storage addressed by URI: a local path (the default) or `s3://bucket/prefix`, through pyarrow.fs.

Every write is atomic: a reader sees either the old object or the complete new one, never a half file.
Locally a file is written beside its target and renamed into place; on S3 an object only appears when
its upload completes. A stage that writes several files commits them with `commit`, which writes a
`_SUCCESS.json` manifest last; readers (`read_committed_table`) trust only what a manifest lists, so a
crash in the middle of a stage leaves the previous complete output (or none) in force.

S3 settings come from the standard AWS environment variables: `AWS_ENDPOINT_URL` (for MinIO, moto or
any S3-compatible store), `AWS_REGION`/`AWS_DEFAULT_REGION`, and the usual credential variables.
"""

from __future__ import annotations

import functools
import io
import json
import os
import posixpath
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_SUCCESS.json"
S3_ENV_VARS = (
    "AWS_ENDPOINT_URL",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


@functools.lru_cache(maxsize=8)
def _s3(endpoint: str | None, region: str | None) -> pafs.S3FileSystem:
    kwargs: dict = {}
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        if not host:
            scheme, host = "https", endpoint
        kwargs.update(endpoint_override=host.rstrip("/"), scheme=scheme)
    if region:
        kwargs["region"] = region
    return pafs.S3FileSystem(**kwargs)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """The pyarrow filesystem for a URI and the path inside it."""
    if is_s3(uri):
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return _s3(os.environ.get("AWS_ENDPOINT_URL"), region), uri[len("s3://") :].rstrip("/")
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(f"{uri}: unsupported storage scheme (use a local path or s3://bucket/prefix)")
    return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(_local(uri)))


def _local(uri: str) -> str:
    return uri[len("file://") :] if uri.startswith("file://") else uri


def join(uri: str, *parts: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.join(uri[len("s3://") :].rstrip("/"), *parts)
    return os.path.join(_local(uri), *parts)


def parent(uri: str) -> str:
    if is_s3(uri):
        return "s3://" + posixpath.dirname(uri[len("s3://") :].rstrip("/"))
    return os.path.dirname(os.path.abspath(_local(uri)))


def resolve(base: str, uri: str) -> str:
    """`uri` itself when absolute (s3:// or /path), else `uri` relative to the directory `base`."""
    if is_s3(uri) or os.path.isabs(uri) or "://" in uri:
        return uri
    if is_s3(base):
        bucket = base[len("s3://") :].split("/", 1)[0]
        joined = posixpath.normpath(posixpath.join(base[len("s3://") :], uri))
        if joined != bucket and not joined.startswith(bucket + "/"):
            raise ValueError(f"{uri}: relative URI leaves the bucket of {base}")
        return "s3://" + joined
    return os.path.normpath(os.path.join(_local(base), uri))


def is_file(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type == pafs.FileType.File


def exists(uri: str) -> bool:
    fs, path = filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = filesystem(uri)
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    if info.type != pafs.FileType.File:
        raise IsADirectoryError(f"{uri}: is a directory, expected a file")
    with fs.open_input_stream(path) as stream:
        return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Write `data` to `uri` atomically (see the module docstring)."""
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(os.path.dirname(path), recursive=True)
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        try:
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        return
    with fs.open_output_stream(path) as stream:
        stream.write(data)


def delete(uri: str) -> None:
    """Remove a file if it exists."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.File:
        fs.delete_file(path)


def delete_dir(uri: str) -> None:
    """Remove a directory (an S3 prefix) and everything under it, if it exists."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.Directory:
        fs.delete_dir(path)


def write_json(uri: str, value) -> None:
    write_bytes(uri, json.dumps(value, indent=2, sort_keys=True, default=str).encode())


def read_json(uri: str):
    return json.loads(read_bytes(uri))


def write_table(uri: str, table: pa.Table) -> None:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd")
    write_bytes(uri, sink.getvalue())


def read_table(uri: str) -> pa.Table:
    return pq.read_table(io.BytesIO(read_bytes(uri)))


def list_files(uri: str, recursive: bool = False) -> list[str]:
    """URIs of the files directly under a directory (sorted); [] when it does not exist."""
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, allow_not_found=True, recursive=recursive)
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.File)


def list_dirs(uri: str) -> list[str]:
    fs, path = filesystem(uri)
    selector = pafs.FileSelector(path, allow_not_found=True)
    prefix = "s3://" if is_s3(uri) else ""
    return sorted(prefix + info.path for info in fs.get_file_info(selector) if info.type == pafs.FileType.Directory)


def part_uri(directory: str, stem: str = "part") -> str:
    """A fresh, collision-free file name for one part of a stage's output."""
    return join(directory, f"{stem}-{uuid.uuid4().hex[:16]}.parquet")


def commit(directory: str, files: list[str], **info) -> dict:
    """Make `files` (URIs or names under `directory`) the stage's complete output: write the manifest."""
    names = sorted(posixpath.basename(f) for f in files)
    manifest = {"files": names, **info}
    write_json(join(directory, MANIFEST), manifest)
    return manifest


def read_manifest(directory: str) -> dict | None:
    uri = join(directory, MANIFEST)
    return read_json(uri) if exists(uri) else None


def read_committed_table(directory: str) -> pa.Table:
    """The stage output that the last successful commit in `directory` lists, as one table."""
    manifest = read_manifest(directory)
    if manifest is None:
        raise FileNotFoundError(f"{directory}: no committed output ({MANIFEST} missing); run that stage first")
    tables = [read_table(join(directory, name)) for name in manifest["files"]]
    if not tables:
        return pa.table({})
    return pa.concat_tables(tables, promote_options="default")


def download_dir(uri: str, local_dir: str) -> str:
    """Copy every file under `uri` into `local_dir` (kept as a cache); returns `local_dir`."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        raise FileNotFoundError(uri)
    os.makedirs(local_dir, exist_ok=True)
    pafs.copy_files(path, local_dir, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return local_dir


def upload_dir(local_dir: str, uri: str) -> None:
    fs, path = filesystem(uri)
    if isinstance(fs, pafs.LocalFileSystem):
        fs.create_dir(path, recursive=True)
    pafs.copy_files(local_dir, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)


@dataclass(frozen=True)
class RequestPaths:
    """Where one request's stages read and write: `{root}/{tenant}/{request_id}/...`."""

    root: str
    tenant: str
    request_id: str

    @property
    def base(self) -> str:
        return join(self.root, self.tenant, self.request_id)

    @property
    def sanitized(self) -> str:
        return join(self.base, "sanitized")

    @property
    def synthetic(self) -> str:
        return join(self.base, "synthetic")

    @property
    def adapters(self) -> str:
        return join(self.base, "adapters")

    @property
    def model(self) -> str:
        return join(self.base, "model")

    @property
    def train_runs(self) -> str:
        return join(self.base, "train_runs")

    @property
    def request(self) -> str:
        return join(self.base, "request.json")
