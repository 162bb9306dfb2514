"""Storage addressed by URI: a local path (the default) or `s3://bucket/prefix`, through pyarrow.fs.

Every write is atomic: a reader sees either the old object or the complete new one, never a half file.
Locally a file is written beside its target and renamed into place; on S3 an object only appears when
its upload completes. A stage that writes several files commits them with `commit`, which writes a
`_SUCCESS.json` manifest last; readers (`read_committed_table`) trust only what a manifest lists, so a
crash in the middle of a stage leaves the previous complete output (or none) in force.

S3 settings come from the standard AWS environment variables: `AWS_ENDPOINT_URL` (for MinIO, moto or
any S3-compatible store), `AWS_REGION`/`AWS_DEFAULT_REGION`, and the usual credential variables (or
the node's instance profile / pod identity).

Every URI that a caller names goes through `confine(root, uri)` before use: resolved (dot segments,
symlinks, `file://` percent-encoding, bucket and key) and refused unless it lies inside the prefix
the caller owns.
"""

from __future__ import annotations

import functools
import io
import json
import os
import posixpath
import re
import urllib.parse
import uuid
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

MANIFEST = "_SUCCESS.json"
# The one rule for every name that becomes a path segment (tenant, request id, label, image id):
# letters, digits, '.', '_' and '-', starting with a letter or digit, at most 128 characters.
IDENTIFIER = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
IDENTIFIER_RULE = "1-128 characters of letters, digits, '.', '_' or '-', starting with a letter or digit"
# Where the S3 store is: safe to hand to Ray workers. Credentials are not: workers take them from
# their node (its environment, instance profile or pod identity), never from a runtime environment.
S3_LOCATION_ENV = ("AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


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


# --- Confinement: every URI a caller names is resolved, then refused unless it lies in the caller's prefix.

MAX_URI_LENGTH = 4096


class OutsidePrefix(PermissionError):
    """A caller-named URI that does not resolve inside the prefix it is confined to (a 403-class error)."""


def _clean(uri, what: str) -> str:
    if not isinstance(uri, str) or not uri:
        raise OutsidePrefix(f"{what}: expected a non-empty URI string")
    if len(uri) > MAX_URI_LENGTH:
        raise OutsidePrefix(f"{what}: URI longer than {MAX_URI_LENGTH} characters")
    if any(ord(c) < 32 or ord(c) == 127 for c in uri):
        raise OutsidePrefix(f"{what}: URI contains control characters")
    return uri


def _s3_parts(uri: str) -> tuple[str, str]:
    bucket, _, key = uri[len("s3://") :].partition("/")
    return bucket, key


def _s3_key(key: str) -> str:
    normal = posixpath.normpath("/" + key).lstrip("/")
    return "" if normal == "." else normal


def confine(root: str, uri: str, what: str = "uri") -> str:
    """The canonical location of the caller-named `uri` if it lies inside `root`; OutsidePrefix otherwise.

    `root` is trusted (a tenant's prefix, a request's folder); `uri` is not. A relative `uri` resolves
    against `root`. Local paths are normalised and their symlinks resolved (on both sides) before the
    comparison; `file://` URIs are percent-decoded as URLs are (plain paths and S3 keys are literal,
    as the storage layer uses them). On S3 the bucket must be the root's and the normalised key must
    lie under the root's key. Any other scheme, or a local path under an S3 root (and the reverse), is
    refused. The result is what callers must use from then on: never the string they were given."""
    uri = _clean(uri, what)
    if is_s3(root):
        bucket, prefix = _s3_parts(root)
        prefix = _s3_key(prefix)
        if is_s3(uri):
            other, key = _s3_parts(uri)
            if other != bucket:
                raise OutsidePrefix(f"{what}: {uri!r} is outside {root}")
            key = _s3_key(key)
        elif "://" in uri or uri.startswith("/"):
            raise OutsidePrefix(f"{what}: {uri!r} is outside {root}")
        else:
            key = _s3_key(posixpath.join(prefix, uri))
        if prefix and key != prefix and not key.startswith(prefix + "/"):
            raise OutsidePrefix(f"{what}: {uri!r} is outside {root}")
        return f"s3://{bucket}/{key}" if key else f"s3://{bucket}"
    if uri.startswith("file://"):
        uri = urllib.parse.unquote(uri[len("file://") :])
        _clean(uri, what)
    elif "://" in uri:
        raise OutsidePrefix(f"{what}: {uri!r} is outside {root} (scheme not allowed here)")
    base = os.path.realpath(_local(root))
    path = os.path.realpath(os.path.join(base, uri))
    if path != base and not path.startswith(base.rstrip(os.sep) + os.sep):
        raise OutsidePrefix(f"{what}: {uri!r} is outside {root}")
    return path


def write_within(root: str, uri: str, data: bytes) -> str:
    """`write_bytes` that refuses to write outside `root` (defence in depth behind name validation)."""
    location = confine(root, uri, "write")
    write_bytes(location, data)
    return location


@dataclass(frozen=True)
class RequestPaths:
    """Where one request's stages read and write: `{root}/{tenant}/{request_id}/...`."""

    root: str
    tenant: str
    request_id: str

    def __post_init__(self):
        for what, name in (("tenant", self.tenant), ("request_id", self.request_id)):
            if not isinstance(name, str) or not IDENTIFIER.fullmatch(name):
                raise OutsidePrefix(f"{what}: {name!r} is not an identifier ({IDENTIFIER_RULE})")

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
