"""Resolve a *model source* to something diffusers' `from_pretrained` loads.

A source is one of:
- `tiny`: the built-in preset (random weights, built in code; see `tiny.py`), cached on local disk;
- a local directory in diffusers' layout (`model_index.json` at its top);
- an `s3://bucket/prefix` holding such a directory, copied once into the local cache;
- a model-hub id such as `runwayml/stable-diffusion-v1-5` (only on machines with internet access);
- `spinbench`: the SpinBench model shipped in `spinbench/weights/` (built by `make spinbench-model`).

ControlNet weights are looked up in the source's `controlnet/` subfolder unless a separate
ControlNet source is given (e.g. `lllyasviel/sd-controlnet-canny` beside a hub base model).
The other parts (`sam/`, `encoders/`, `classifiers/`, `detectors/`) are resolved alone: for an `s3://` source only
the part's prefix is copied (into a cache entry of its own), never the diffusion weights beside it.
The cache lives in `$SPINML_CACHE` (default `~/.cache/spinml`); entries are built in a temporary
folder and renamed into place, so concurrent workers never see a half-built model.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import shutil
import uuid

import pyarrow.fs as pafs

from spinml_ray import storage
from spinml_ray.models.tiny import TINY_VERSION, build_tiny_pipeline, write_tiny_encoder, write_tiny_sam

TINY = "tiny"
SPINBENCH = "spinbench"


def cache_dir() -> str:
    return os.path.abspath(os.path.expanduser(os.environ.get("SPINML_CACHE", "~/.cache/spinml")))


def _build_once(final: str, build) -> str:
    if os.path.exists(os.path.join(final, ".complete")):
        return final
    tmp = f"{final}.tmp-{uuid.uuid4().hex}"
    try:
        build(tmp)
        open(os.path.join(tmp, ".complete"), "w").close()
        try:
            os.rename(tmp, final)
        except OSError:  # another process finished first: keep its copy
            if not os.path.exists(os.path.join(final, ".complete")):
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def _s3_entry(prefix: str) -> str:
    """The cache entry of an s3:// prefix: the same prefix always lands in the same entry."""
    key = hashlib.sha256(prefix.rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(cache_dir(), f"s3-{key}")


def _copy_s3(prefix: str) -> str:
    return _build_once(_s3_entry(prefix), lambda tmp: storage.download_dir(prefix, tmp))


def spinbench_weights_dir() -> str:
    """`weights/` of the spinbench package (installed with this project), found without importing it."""
    package = importlib.util.find_spec("spinbench").submodule_search_locations[0]
    return os.path.join(os.path.abspath(package), "weights")


def resolve(source: str) -> str:
    """A local directory (or, for a hub id, the id itself) for `from_pretrained`."""
    if source == TINY:
        return _build_once(os.path.join(cache_dir(), TINY_VERSION), build_tiny_pipeline)
    if source == SPINBENCH:  # before the directory case: a checkout's root has a `spinbench/` folder
        path = spinbench_weights_dir()
        if not os.path.exists(os.path.join(path, "model_index.json")):
            raise ValueError(f"{path}: the spinbench model is not built (no model_index.json); "
                             "run `make spinbench-model`")
        return path
    if storage.is_s3(source):
        return _copy_s3(source)
    if os.path.isdir(source):
        if not os.path.exists(os.path.join(source, "model_index.json")) and not os.path.exists(
            os.path.join(source, "config.json")
        ):
            raise ValueError(f"{source}: not a diffusers model directory (no model_index.json or config.json)")
        return os.path.abspath(source)
    if source.startswith((".", "/", "~")) or source.count("/") != 1:
        raise ValueError(f"{source}: model source is neither 'tiny', a directory, an s3:// prefix nor a hub id")
    return source


def resolve_component(source: str) -> str:
    """A component folder (SAM, ControlNet): local, or copied from s3:// into the cache."""
    if storage.is_s3(source):
        return resolve(source)
    if not os.path.isdir(source):
        raise ValueError(f"{source}: component source is not a directory or s3:// prefix")
    return os.path.abspath(source)


def _folder(path: str) -> str | None:
    return path if os.path.isdir(path) else None


def _s3_part(base: str, name: str) -> str | None:
    whole = _s3_entry(base)
    if os.path.exists(os.path.join(whole, ".complete")):  # the whole model is on this node already
        return _folder(os.path.join(whole, name))
    prefix = storage.join(base, name)
    fs, path = storage.filesystem(prefix)
    if fs.get_file_info(path).type != pafs.FileType.Directory:
        return None
    return _copy_s3(prefix)


def _part(base: str, name: str) -> str | None:
    """The base source's `{name}/` folder, fetched alone (never the diffusion weights), or None."""
    if base == TINY:  # its SAM and encoder are built alone, without the diffusion model; no other part
        writers = {"sam": write_tiny_sam, "encoders": write_tiny_encoder}
        if name not in writers:
            return None
        return _build_once(os.path.join(cache_dir(), f"{TINY_VERSION}-{name}"), writers[name])
    if base == SPINBENCH:
        return _folder(os.path.join(spinbench_weights_dir(), name))
    if storage.is_s3(base):
        return _s3_part(base, name)
    if os.path.isdir(base):
        return _folder(os.path.join(resolve(base), name))
    resolve(base)  # a hub id (no parts of ours), or refused by name
    return None


def resolve_part(base: str, name: str, override: str | None = None) -> str | None:
    """A model part (`controlnet`, `sam`, `encoders`, `classifiers`, `detectors`): `override` when given (a ControlNet
    may also be a hub id), else the base source's `{name}/` folder, else None (the part is missing).
    Only a ControlNet resolves the whole base model (its pipelines load it anyway)."""
    if override:
        return resolve(override) if name == "controlnet" else resolve_component(override)
    if name == "controlnet":
        return _folder(os.path.join(resolve(base), name))
    return _part(base, name)


def resolve_sam(base: str, sam: str | None = None) -> str | None:
    """The folder holding SAM's `sam.json` and checkpoint, or None."""
    return resolve_part(base, "sam", sam)


def sam_loader(base: str, sam: str | None = None) -> functools.partial:
    """A picklable zero-argument callable resolving the SAM folder (or None) when called, on the node
    that calls it: what `segmentation.LazySegmenter` takes."""
    return functools.partial(resolve_sam, base, sam)


def resolve_controlnet(base: str, controlnet: str | None = None) -> str | None:
    """Where the ControlNet weights live, or None when there are none (L1 items are then refused)."""
    return resolve_part(base, "controlnet", controlnet)
