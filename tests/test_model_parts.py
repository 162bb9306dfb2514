"""Model parts resolved alone (spinml_ray/models/source.py): a source's `sam/`, `classifiers/` or
`detectors/` folder is found without fetching the diffusion weights beside it, and the modules that
build and load SAM import each other in one direction only."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from spinml_ray import storage
from spinml_ray.models import source
from spinml_ray.models.tiny import TINY_VERSION, write_tiny_sam
from spinml_ray.segmentation import load_sam
from spinml_ray.training import pretrained

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
UNET = "diffusion_pytorch_model.safetensors"
MODULES = ("spinml_ray.models.source", "spinml_ray.models.tiny", "spinml_ray.segmentation")


def files_under(path) -> list[str]:
    return sorted(os.path.relpath(os.path.join(d, f), path) for d, _, names in os.walk(path) for f in names)


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    path = tmp_path / "cache"
    monkeypatch.setenv("SPINML_CACHE", str(path))
    return path


def fake_model(path, sam=True, classifiers=True) -> str:
    """A model folder: diffusion weights (a big dummy UNet file), and optionally `sam/` and `classifiers/`."""
    os.makedirs(os.path.join(path, "unet"))
    with open(os.path.join(path, "model_index.json"), "w") as handle:
        json.dump({"_class_name": "StableDiffusionPipeline"}, handle)
    with open(os.path.join(path, "unet", UNET), "wb") as handle:
        handle.write(os.urandom(4 << 20))
    if sam:
        write_tiny_sam(os.path.join(path, "sam"), seed=1)
    if classifiers:
        os.makedirs(os.path.join(path, "classifiers"))
        torch.save({"fc.weight": torch.ones(2, 3)}, os.path.join(path, "classifiers", "resnet18.pth"))
    return str(path)


@pytest.fixture
def s3_model(s3_server, tmp_path):
    """A fake model on S3 (its own prefix per test) with `sam/` and `classifiers/`, no `detectors/`."""
    _, bucket = s3_server
    uri = f"s3://{bucket}/models/{uuid.uuid4().hex}"
    storage.upload_dir(fake_model(tmp_path / "upload"), uri)
    return uri


# ---------------------------------------------------------------- s3:// sources


def test_s3_parts_are_copied_alone(s3_model, fresh_cache):
    sam_dir = source.resolve_sam(s3_model)
    assert files_under(sam_dir) == [".complete", "sam.json", "sam_tiny.pth"]
    assert load_sam(sam_dir, device="cpu").image_encoder.img_size == 128
    classifiers = source.resolve_part(s3_model, "classifiers")
    assert files_under(classifiers) == [".complete", "resnet18.pth"]
    cached = files_under(fresh_cache)
    assert not any(UNET in f or "model_index.json" in f for f in cached)  # no diffusion weights were fetched
    assert not any(".tmp-" in f for f in cached)
    assert source.resolve_sam(s3_model) == sam_dir  # copied once, then reused


def test_a_missing_s3_part_is_none_and_leaves_nothing_behind(s3_model, fresh_cache):
    assert source.resolve_part(s3_model, "detectors") is None
    assert source.resolve_part(s3_model, "clas") is None  # a prefix of `classifiers/` is not the part
    assert not fresh_cache.exists() or files_under(fresh_cache) == []


def test_the_whole_s3_model_still_resolves_and_then_serves_its_parts(s3_model, fresh_cache):
    whole = source.resolve(s3_model)
    assert os.path.isfile(os.path.join(whole, "unet", UNET)) and os.path.isfile(os.path.join(whole, "model_index.json"))
    assert source.resolve_sam(s3_model) == os.path.join(whole, "sam")  # on this node already: no second copy
    assert source.resolve_part(s3_model, "detectors") is None


def test_concurrent_workers_share_one_complete_copy(s3_model, fresh_cache):
    with ThreadPoolExecutor(4) as pool:
        paths = list(pool.map(lambda _: source.resolve_sam(s3_model), range(4)))
    assert len(set(paths)) == 1 and files_under(paths[0]) == [".complete", "sam.json", "sam_tiny.pth"]
    assert os.listdir(fresh_cache) == [os.path.basename(paths[0])]  # no half copies left


def test_pretrained_finds_shipped_classifier_weights_through_the_part(s3_model, fresh_cache, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path, said = pretrained.resolve("auto", s3_model, "resnet18")
    assert said == "model source classifiers/resnet18.pth"
    assert path == os.path.join(source.resolve_part(s3_model, "classifiers"), "resnet18.pth")
    assert torch.equal(pretrained.load_state_dict(path)["fc.weight"], torch.ones(2, 3))
    assert pretrained.resolve("auto", s3_model, "resnet18", task="detection") == (None, "none (offline)")
    assert not any(UNET in f for f in files_under(fresh_cache))


# ---------------------------------------------------------------- other sources


def test_local_directory_parts(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = fake_model(tmp_path / "model", sam=False)
    assert source.resolve_sam(model) is None
    assert source.resolve_part(model, "classifiers") == os.path.join(model, "classifiers")
    assert pretrained.resolve("auto", model, "resnet18") == (
        os.path.join(model, "classifiers", "resnet18.pth"), "model source classifiers/resnet18.pth")
    assert pretrained.resolve("auto", model, "mobilenet_v2") == (None, "none (offline)")


def test_tiny_sam_resolves_without_building_the_diffusion_model(fresh_cache):
    sam_dir = source.resolve_sam("tiny")
    assert load_sam(sam_dir, device="cpu").image_encoder.img_size == 128
    assert os.listdir(fresh_cache) == [f"{TINY_VERSION}-sam"]
    assert source.resolve_part("tiny", "classifiers") is None and source.resolve_part("tiny", "detectors") is None
    assert os.listdir(fresh_cache) == [f"{TINY_VERSION}-sam"]


def test_hub_ids_have_no_parts_of_ours_and_bad_sources_are_refused():
    assert source.resolve_sam("org/model") is None
    assert source.resolve_part("org/model", "classifiers") is None
    with pytest.raises(ValueError, match="model source"):
        source.resolve_sam("./no/such/dir")


def test_spinbench_parts_are_its_shipped_folders(tmp_path, monkeypatch):
    (tmp_path / "classifiers").mkdir()
    monkeypatch.setattr(source, "spinbench_weights_dir", lambda: str(tmp_path))
    assert source.resolve_part("spinbench", "classifiers") == str(tmp_path / "classifiers")
    assert source.resolve_sam("spinbench") is None


def test_sam_loader_is_a_picklable_deferred_resolve_sam(tmp_path):
    import pickle

    sam_dir = write_tiny_sam(str(tmp_path / "sam"))
    loader = pickle.loads(pickle.dumps(source.sam_loader("org/model", sam_dir)))
    assert loader() == os.path.abspath(sam_dir)
    assert pickle.loads(pickle.dumps(source.sam_loader("org/model")))() is None


# ---------------------------------------------------------------- imports in one direction


def test_sam_modules_import_in_any_order_without_a_cycle():
    """In a fresh interpreter, each order of importing the three modules works; segmentation alone
    pulls in no model source."""
    script = f"""
import itertools, sys
modules = {MODULES!r}
for order in itertools.permutations(modules):
    for name in [m for m in sys.modules if m.startswith("spinml_ray")]:
        del sys.modules[name]
    for name in order:
        __import__(name)
for name in [m for m in sys.modules if m.startswith("spinml_ray")]:
    del sys.modules[name]
import spinml_ray.segmentation
assert not [m for m in sys.modules if m.startswith("spinml_ray.models")], sorted(sys.modules)
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr


def test_segmentation_source_does_not_import_model_sources():
    with open(os.path.join(REPO, "spinml_ray", "segmentation.py")) as handle:
        tree = ast.parse(handle.read())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module or "" for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)]
    assert not [name for name in imported if name.startswith("spinml_ray.models")], imported
