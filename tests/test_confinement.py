"""Confinement with generated hostile strings: a caller-named URI resolves inside the caller's prefix or
is refused; nothing is ever read or written outside it, whatever the string."""

from __future__ import annotations

import os

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from spinml_ray import storage
from spinml_ray.spec import SpecError, load_request
from spinml_ray.synthesis.auth import load_tokens

PROPS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

SEGMENTS = st.sampled_from([
    "..", ".", "", "other", "demo", "demo-evil", "r", "sanitized", "adapters", "%2e%2e", "%2E%2E", ".%2e", "%2f",
    "..%2f..", "~", "~root", "etc", "passwd", "a b", "é", "\u202e", "\x00", "\n", "\t", "\x7f", "-", ".hidden",
    "..\\..", "C:", "s3:", "file:", "bucket",
])
SEPARATORS = st.sampled_from(["/", "//", "\\", "/./", "%2f", "%2F"])
SCHEMES = st.sampled_from(["", "/", "./", "../", "file://", "file:///", "s3://", "s3://bucket/", "s3://bucket/t/",
                           "s3://bucket/t/demo/", "s3://other/", "http://", "gs://", "FILE://", "S3://", "{root}/",
                           "{root}-evil/", "{root}/../", "file://{root}/", "file://{root}/%2e%2e/", "{parent}/"])


@st.composite
def hostile_uris(draw) -> str:
    """URIs assembled from dot segments, encodings, separators, schemes, sibling and parent prefixes,
    control characters and very long strings."""
    parts = draw(st.lists(SEGMENTS | st.text(max_size=12), max_size=8))
    path = ""
    for part in parts:
        path += part + draw(SEPARATORS)
    uri = draw(SCHEMES) + path
    if draw(st.booleans()):
        uri += "x" * draw(st.sampled_from([1, 200, 5000]))
    return uri


@pytest.fixture()
def layout(tmp_path):
    """A storage root with the caller's prefix, another tenant's, a symlink out, and files outside."""
    root = tmp_path / "store"
    for folder in ("demo/r", "other/r/sanitized", "demo-evil"):
        (root / folder).mkdir(parents=True)
    (root / "other" / "r" / "sanitized" / "secret.parquet").write_bytes(b"secret")
    (tmp_path / "outside.txt").write_bytes(b"secret")
    (root / "demo" / "escape").symlink_to(root / "other")
    return tmp_path, root / "demo"


def _fill(uri: str, prefix) -> str:
    return uri.replace("{root}", str(prefix)).replace("{parent}", str(prefix.parent))


def _inside_local(location: str, prefix: str) -> bool:
    real, base = os.path.realpath(location), os.path.realpath(prefix)
    return real == location and (real == base or real.startswith(base + os.sep))


@PROPS
@given(uri=hostile_uris())
def test_local_confine_never_leaves_the_prefix(layout, uri):
    _, prefix = layout
    uri = _fill(uri, prefix)
    try:
        location = storage.confine(str(prefix), uri, "bundle")
    except storage.OutsidePrefix as exc:
        assert str(exc).startswith("bundle: ")
        return
    assert _inside_local(location, str(prefix)), (uri, location)


@PROPS
@given(uri=hostile_uris())
def test_s3_confine_never_leaves_the_prefix(uri):
    root = "s3://bucket/t/demo"
    uri = uri.replace("{root}", root).replace("{parent}", "s3://bucket/t")
    try:
        location = storage.confine(root, uri)
    except storage.OutsidePrefix:
        return
    key = location[len("s3://bucket/"):]
    assert location.startswith("s3://bucket/") and (key == "t/demo" or key.startswith("t/demo/")), (uri, location)
    assert not {"", ".", ".."} & set(key.split("/")), location


@PROPS
@given(uri=hostile_uris(), data=st.binary(min_size=1, max_size=8))
def test_write_within_writes_nothing_outside_the_prefix(layout, uri, data):
    tmp_path, prefix = layout
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not str(p).startswith(str(prefix) + "/r")}
    try:
        location = storage.write_within(str(prefix), _fill(uri, prefix), data)
    except (storage.OutsidePrefix, OSError):  # refused, or a name the file system itself rejects
        location = None
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file() and not str(p).startswith(str(prefix) + "/r")}
    changed = {p for p in set(before) | set(after) if before.get(p) != after.get(p)}
    assert all(_inside_local(str(p), str(prefix)) for p in changed), changed
    if location is not None:
        assert _inside_local(location, str(prefix))
        os.remove(location)


@PROPS
@given(field=st.sampled_from(["uri", "mask_uri", "test_set", "bundle", "pretrained"]), uri=hostile_uris())
def test_a_request_names_only_files_in_its_own_folder(layout, field, uri):
    tmp_path, prefix = layout
    folder = prefix / "r"
    document = {"request_id": "r", "tenant": "demo", "subject": "duck",
                "labels": [{"name": "a", "phrase": "a"}, {"name": "b", "phrase": "b"}],
                "references": [{"uri": "ref.png"}]}
    if field in ("uri", "mask_uri"):
        document["references"][0][field] = _fill(uri, prefix)
    elif field == "bundle":
        document = {**document, "references": [], "bundle": _fill(uri, prefix)}
    elif field == "pretrained":
        document["training"] = {"pretrained": _fill(uri, prefix)}
    else:
        document["test_set"] = _fill(uri, prefix)
    request = folder / "request.yaml"
    try:
        request.write_text(yaml.safe_dump(document))
    except (ValueError, yaml.YAMLError):
        return
    try:
        spec = load_request(str(request))
    except SpecError:
        return
    named = [spec.test_set, spec.bundle] + [u for ref in spec.references for u in (ref.uri, ref.mask_uri)]
    if spec.training.pretrained not in ("auto", "none"):
        named.append(spec.training.pretrained)
    assert all(_inside_local(u, str(folder)) for u in named if u), named


def test_relative_uris_resolve_against_the_prefix(layout):
    _, prefix = layout
    assert storage.confine(str(prefix), "r/sanitized") == str(prefix / "r" / "sanitized")
    assert storage.confine("s3://bucket/t/demo", "r/adapters") == "s3://bucket/t/demo/r/adapters"


@pytest.mark.parametrize("text, problem", [
    ("null: demo\n", "line 1: the token must be a string"),
    ("long-enough-token-aaaa: demo\ntrue: other\n", "line 2: the token must be a string"),
    ("123456: demo\n", "line 1: the token must be a string"),
    ("'abc-token-long-enough': 7\n", "line 1: the tenant must be a string"),
    ("'abc-token-long-enough': [a]\n", "line 1: the tenant must be a string"),
    ("'abc-token-long-enough': ../etc\n", "line 1: tenant is not an identifier"),
    ("- a\n- b\n", "expected a mapping"),
    ("{bad yaml\n", "not valid YAML"),
])
def test_a_token_file_must_map_strings_to_tenants(tmp_path, text, problem):
    path = tmp_path / "tokens.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=problem):
        load_tokens({"SPINML_API_TOKENS_FILE": str(path)})


def test_token_file_and_environment_together_and_short_tokens_warned(tmp_path, caplog):
    path = tmp_path / "tokens.json"
    path.write_text('{"0123456789abcdef0123": "tenant-a", "short": "tenant-b"}')
    tokens = load_tokens({"SPINML_API_TOKENS_FILE": str(path), "SPINML_API_TOKENS": "another-long-token-xyz:tenant-c"})
    assert tokens == {"0123456789abcdef0123": "tenant-a", "short": "tenant-b", "another-long-token-xyz": "tenant-c"}
    warned = [r.getMessage() for r in caplog.records if "shorter than" in r.getMessage()]
    assert len(warned) == 1 and "tenant-b" in warned[0] and "short" not in warned[0].replace("shorter", "")
