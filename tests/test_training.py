"""The specialized classifier's plain-PyTorch parts (no Ray)."""

import copy
import logging
import os

import numpy as np
import pytest
import torch

from spinml_ray.images import encode_png
from spinml_ray.training.classifier import (
    build_model,
    evaluate,
    images_to_uint8,
    load_image_folder,
    split_train_val,
    train_epoch,
)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_models_have_the_requested_head(arch):
    model = build_model(arch, 3).eval()
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 3)


def test_unknown_architecture_is_refused():
    with pytest.raises(ValueError, match="vgg"):
        build_model("vgg", 2)


def test_split_is_seeded_disjoint_and_complete():
    train, val = split_train_val(20, 0.1, seed=1)
    assert len(val) == 2 and sorted(np.concatenate([train, val]).tolist()) == list(range(20))
    assert split_train_val(20, 0.1, seed=1)[1].tolist() == val.tolist()
    assert split_train_val(20, 0.1, seed=2)[1].tolist() != val.tolist()
    assert len(split_train_val(2, 0.1)[1]) == 1 and len(split_train_val(1, 0.1)[1]) == 0


def test_images_are_decoded_and_resized():
    batch = images_to_uint8([encode_png(np.full((10, 20, 3), 7, np.uint8))] * 2, 16)
    assert batch.shape == (2, 3, 16, 16) and batch.dtype == torch.uint8 and int(batch.max()) == 7


def test_training_learns_a_separable_task():
    torch.manual_seed(0)
    images = torch.cat([torch.full((16, 3, 16, 16), 20, dtype=torch.uint8),
                        torch.full((16, 3, 16, 16), 230, dtype=torch.uint8)])
    targets = torch.tensor([0] * 16 + [1] * 16)
    model = build_model("resnet18", 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, targets), batch_size=8, shuffle=True)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    losses = [train_epoch(model, loader, optimizer, "cpu") for _ in range(10)]
    assert losses[-1] < losses[0]
    metrics = evaluate(model, images, targets, 2)
    assert metrics["accuracy"] == 1.0 and metrics["confusion"] == [[16, 0], [0, 16]]


def test_evaluate_reports_per_class_and_confusion():
    class Constant(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x):
            return torch.tensor([[0.0, 1.0, 0.0]]).repeat(len(x), 1)

    metrics = evaluate(Constant(), torch.zeros(4, 3, 8, 8, dtype=torch.uint8), torch.tensor([0, 1, 1, 2]), 3)
    assert metrics["accuracy"] == 0.5 and metrics["per_class_accuracy"] == [0.0, 1.0, 0.0]
    assert metrics["confusion"] == [[0, 1, 0], [0, 2, 0], [0, 1, 0]]


def test_image_folder_reads_only_label_folders(tmp_path):
    for label, n in (("a", 2), ("b", 1), ("other", 3)):
        (tmp_path / label).mkdir()
        for i in range(n):
            (tmp_path / label / f"{i}.png").write_bytes(encode_png(np.zeros((4, 4, 3), np.uint8)))
    (tmp_path / "a" / "notes.txt").write_text("not an image")
    images, targets = load_image_folder(str(tmp_path), ["a", "b"])
    assert targets == [0, 0, 1] and len(images) == 3
    with pytest.raises(FileNotFoundError, match="no test images"):
        load_image_folder(str(tmp_path), ["x", "y"])


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_exported_models_match_pytorch(arch):
    import io
    import warnings

    from spinml_ray.training import classifier
    from spinml_ray.training.export import onnx_logits

    torch.manual_seed(0)
    model = build_model(arch, 3).eval()
    batch = torch.randn(4, 3, 64, 64)
    with torch.no_grad():
        expected = model(batch).numpy()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnx, torchscript = classifier.export(model, 64)
    assert not [w for w in caught if "torch.jit" in str(w.message)]  # no deprecation noise per model in the log
    assert np.allclose(onnx_logits(onnx, batch.numpy()), expected, atol=1e-4)  # any batch size
    scripted = torch.jit.load(io.BytesIO(torchscript))
    with torch.no_grad():
        assert np.allclose(scripted(batch).numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18"])
def test_pretrained_backbone_from_the_model_source(tmp_path, arch, monkeypatch):
    import shutil

    from spinml_ray.models.source import resolve
    from spinml_ray.training import pretrained
    from spinml_ray.training.classifier import HEADS

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))  # an empty hub cache
    torch.manual_seed(3)
    imagenet = build_model(arch, 1000)
    source = shutil.copytree(resolve("tiny"), tmp_path / "source")
    assert pretrained.resolve("auto", str(source), arch) == (None, "none (offline)")  # tiny ships none
    (source / "classifiers").mkdir()
    torch.save(imagenet.state_dict(), source / "classifiers" / f"{arch}.pth")
    path, said = pretrained.resolve("auto", str(source), arch)
    assert said == f"model source classifiers/{arch}.pth"
    model = build_model(arch, 4, path)
    for name, value in model.state_dict().items():
        if name.startswith(HEADS[arch]):
            assert value.shape[0] == 4  # a fresh 4-way head
        else:
            assert torch.equal(value, imagenet.state_dict()[name])
    assert pretrained.resolve("none", str(source), arch) == (None, "none")  # asked for: the source's file is not used
    torch.save({"unrelated.weight": torch.zeros(1)}, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="not a torchvision"):
        build_model(arch, 4, str(tmp_path / "bad.pth"))


class _NotATensor:
    pass


def test_pretrained_auto_uses_torchvisions_cache_and_says_why_it_trains_from_scratch(tmp_path, monkeypatch, caplog):
    """`auto` without weights in the model source: torchvision's ImageNet file from torch's hub cache; offline
    and without it, random weights with a warning and the reason for metrics.json. A URI loads tensors only."""
    import torchvision

    from spinml_ray.models.source import resolve
    from spinml_ray.training import pretrained

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with caplog.at_level(logging.WARNING, logger="spinml_ray.training.pretrained"):
        assert pretrained.resolve("auto", resolve("tiny"), "resnet18") == (None, "none (offline)")
    assert "random weights" in caplog.text and "offline" in caplog.text
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    cache = tmp_path / "torch-home" / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.manual_seed(5)
    imagenet = build_model("resnet18", 1000)
    torch.save(imagenet.state_dict(), cache / os.path.basename(weights.url))
    path, said = pretrained.resolve("auto", resolve("tiny"), "resnet18")
    assert said == f"torchvision resnet18 {weights.name}"
    model = build_model("resnet18", 4, path)
    assert torch.equal(model.state_dict()["conv1.weight"], imagenet.state_dict()["conv1.weight"])
    assert pretrained.resolve(str(cache / "x.pth"), "tiny", "resnet18") == (str(cache / "x.pth"),) * 2
    torch.save({"w": _NotATensor()}, tmp_path / "code.pth")  # a pickle that would build an object
    with pytest.raises(Exception, match="(?i)weights_only|unpickl"):
        build_model("resnet18", 4, str(tmp_path / "code.pth"))


def test_out_of_memory_errors_are_recognised_through_wrapping():
    from spinml_ray.training.resume import IMPOSSIBLE_BYTES, is_out_of_memory

    with pytest.raises(RuntimeError) as info:
        torch.empty(IMPOSSIBLE_BYTES, dtype=torch.uint8)  # what the injected fault does in a worker
    assert is_out_of_memory(info.value)
    assert is_out_of_memory(RuntimeError(f"Training failed due to worker errors:\n{info.value}"))
    assert is_out_of_memory(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"))
    assert not is_out_of_memory(ValueError("resolution must be a multiple of 8"))


def test_training_failures_name_the_request_and_for_memory_the_settings_to_lower():
    from spinml_ray.errors import StageError
    from spinml_ray.training.resume import training_failure

    wrapped = RuntimeError("Training failed due to worker errors:\n  ...\nRuntimeError: CUDA out of memory. "
                           "Tried to allocate 2.00 GiB")
    error = training_failure("r1", "personalization", wrapped, "personalization.batch_size")
    assert isinstance(error, StageError)
    assert str(error) == ("request r1: personalization ran out of memory; lower personalization.batch_size, or give "
                          "its workers more memory (RuntimeError: CUDA out of memory. Tried to allocate 2.00 GiB)")
    assert str(training_failure("r2", "training", ValueError("bad"), "x")) == "request r2: training failed: bad"


@pytest.mark.parametrize("fails", [False, True])
def test_batch_expects_training_during_synthesis_and_logs_progress(tmp_path, monkeypatch, caplog, fails):
    from spinml_ray.examples import write_example
    from spinml_ray.ray_layer import batch

    events = []

    class Fleet:
        def fits(self, num_workers, gpu_fraction):
            return True

        def expect(self, job):
            events.append(("expect", job))

        def forget(self, job):
            events.append(("forget", job))

    def run_request(uri, root, stages, **kwargs):
        events.append(stages[0])
        if fails and stages[0] == "synthesize":
            raise RuntimeError("the deployment fell over")
        return {stages[0]: {}}  # the stage's summary, as run_request returns it

    monkeypatch.setattr(batch, "run_request", run_request)
    run = batch.BatchRun(str(tmp_path / "out"), "tiny", 0, fleet=Fleet(), total=3)
    with caplog.at_level(logging.INFO, logger="spinml_ray.ray_layer.batch"):
        run.run_one(write_example(str(tmp_path / "request")))
    progress = [r.getMessage() for r in caplog.records]
    assert progress[0].startswith("[0/3 done, 0 failed] ") and progress[0].endswith(" running")
    assert progress[-1].startswith("[0/3 done, 1 failed] " if fails else "[1/3 done, 0 failed] ")
    job = "demo/example-duck"  # the example needs no personalization (its target is not at L2)
    started = ["sanitize", ("expect", job), "synthesize", ("forget", job)]
    assert events == (started if fails else started + ["train"])
    row = run.rows[next(iter(run.rows))]
    assert row["state"] == ("failed" if fails else "done")
    assert row["stages"]["personalize"]["state"] == "skipped (target released at L1, not L2)"


def test_batch_makes_room_in_the_fleet_while_a_request_personalizes(tmp_path, monkeypatch):
    import contextlib

    import yaml

    from spinml_ray.examples import write_example
    from spinml_ray.ray_layer import batch

    events = []

    class Fleet:
        def fits(self, num_workers, gpu_fraction):
            return True

        def expect(self, job):
            events.append("expect")

        def forget(self, job):
            events.append("forget")

        @contextlib.contextmanager
        def making_room(self):
            events.append("room wanted")
            yield
            events.append("room given back")

    uri = write_example(str(tmp_path / "request"))
    document = yaml.safe_load(open(uri))
    document["privacy"]["target"] = "L2"  # personalization on (the default)
    with open(uri, "w") as handle:
        yaml.safe_dump(document, handle)
    monkeypatch.setattr(batch, "run_request", lambda uri, root, stages, **kwargs: events.append(stages[0]) or {})
    batch.BatchRun(str(tmp_path / "out"), "tiny", 0, fleet=Fleet(), total=1).run_one(uri)
    assert events == ["sanitize", "room wanted", "personalize", "room given back", "expect", "synthesize", "forget",
                      "train"]


@pytest.mark.parametrize("gpus, synthesis, slots", [(0, 0.0, None), (1, 0.5, 2), (2, 1.0, 4), (8, 1.0, 8)])
def test_gpu_shares_leave_room_beside_the_synthesis_replica(monkeypatch, tmp_path, gpus, synthesis, slots):
    """On a one-GPU machine the synthesis replica takes half the card, so the training fleet (and
    personalization, 0.5 of a GPU) still fit beside it; slots never ask for more than is left."""
    import types

    from spinml_ray.ray_layer import batch
    from spinml_ray.resources import ResourcePlan, synthesis_gpu_share
    from spinml_ray.spec import PersonalizationSpec, TrainingSpec

    assert synthesis_gpu_share(gpus) == synthesis
    no_ray = types.SimpleNamespace(remote=lambda: None)  # no Ray here: the board is never called
    monkeypatch.setattr("spinml_ray.ray_layer.fleet.JobBoard", types.SimpleNamespace(options=lambda **_: no_ray))
    monkeypatch.setattr("spinml_ray.ray_layer.fleet.on_this_node", lambda: None)
    plan = ResourcePlan.plan(16, gpus, concurrent=8)
    fleet = batch.training_fleet(plan.fleet, storage_root=str(tmp_path))
    if not gpus:
        assert not fleet.use_gpu
        return
    share = TrainingSpec().gpu_fraction
    assert fleet.use_gpu and fleet.gpu_fraction == share and fleet.max_slots == slots
    assert synthesis + fleet.max_slots * share <= gpus
    assert synthesis + PersonalizationSpec().gpu_fraction <= gpus


def test_batch_says_why_a_stage_is_skipped(tmp_path):
    from spinml_ray import storage
    from spinml_ray.examples import write_example
    from spinml_ray.ray_layer.pipeline import request_paths, skipped, stage_named
    from spinml_ray.spec import load_request, parse_request

    spec = load_request(write_example(str(tmp_path / "request")))
    paths = request_paths(spec, str(tmp_path / "out"))
    l2 = parse_request({**spec.model_dump(mode="json"), "privacy": {"target": "L2", "background": "L0"}})
    off = parse_request({**l2.model_dump(mode="json"), "personalization": {"enabled": False}})
    assert skipped(stage_named("personalize"), spec, paths, resume=True) == "skipped (target released at L1, not L2)"
    assert skipped(stage_named("personalize"), off, paths, resume=True) == "skipped (personalization off)"
    assert skipped(stage_named("personalize"), l2, paths, resume=True) is None
    assert skipped(stage_named("sanitize"), spec, paths, resume=True) is None
    storage.commit(paths.sanitized, [])
    assert skipped(stage_named("sanitize"), spec, paths, resume=True) == "done (already complete)"
    assert skipped(stage_named("sanitize"), spec, paths, resume=False) is None  # `spinml run` repeats it


@pytest.mark.parametrize("arch", ["mobilenet_v2", "resnet18", "ssdlite320_mobilenet_v3_large"])
def test_models_are_built_channels_last_with_the_same_outputs(arch):
    from spinml_ray.training.detector import build_detector

    torch.manual_seed(0)
    model = (build_detector(arch, 2) if arch.startswith("ssd") else build_model(arch, 2)).eval()
    convs = [p for p in model.parameters() if p.ndim == 4]
    assert convs and all(p.is_contiguous(memory_format=torch.channels_last) for p in convs)
    plain = copy.deepcopy(model).to(memory_format=torch.contiguous_format)
    assert all(p.is_contiguous() for p in plain.parameters())
    with torch.no_grad():
        batch = torch.rand(2, 3, 64, 64)
        if arch.startswith("ssd"):  # the backbone's feature maps: the detection heads' inputs
            model, plain = model.backbone, plain.backbone
        torch.testing.assert_close(model(batch), plain(batch), atol=1e-4, rtol=1e-4)
