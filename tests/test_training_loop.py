"""The training loops as plain functions, run in this process without a cluster: the specialized
model's `fit` (resume, best epoch, checkpoints, delivery) and the adapter's `train_adapter`."""

import dataclasses
import os

import numpy as np
import pyarrow as pa
import pytest

from spinml_ray import storage
from spinml_ray.images import encode_png
from spinml_ray.synthesis.workitems import SYNTHETIC_SCHEMA
from spinml_ray.training.job import RunOptions, TrainingJob
from spinml_ray.training.loop import STATE_FILE, Workers, fit


def synthetic_table(directory: str, n: int = 24) -> str:
    """A committed synthetic table of two labels a classifier can tell apart (dark vs bright squares)."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        label = i % 2
        image = rng.integers(0, 60, (32, 32, 3), dtype=np.uint8) + (150 if label else 0)
        rows.append({name: None for name in SYNTHETIC_SCHEMA.names} | {
            "image_id": f"img-{i:03d}", "label": ["dark", "bright"][label], "label_index": label, "pool": "L0_L0",
            "kind": "txt2img", "seed": i, "image": encode_png(image.astype(np.uint8))})
    storage.write_table(storage.join(directory, "part-0.parquet"), pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA))
    storage.commit(directory, ["part-0.parquet"])
    return directory


def job(tmp_path, epochs=2, **changes) -> TrainingJob:
    base = TrainingJob(task="classification", synthetic=synthetic_table(str(tmp_path / "synthetic")), model="tiny",
                       architecture="resnet18", pretrained="none", num_classes=2, image_size=32, batch_size=8,
                       learning_rate=1e-3, epochs=epochs, seed=0,
                       run=RunOptions(state_uri=str(tmp_path / "resume" / STATE_FILE),
                                      best_uri=str(tmp_path / "resume" / "best.pt")))
    return dataclasses.replace(base, **changes)


def test_the_identity_is_every_field_but_the_run_options(tmp_path):
    training = job(tmp_path)
    identity = training.identity()
    assert set(identity) == {f.name for f in dataclasses.fields(TrainingJob)} - {"run"}
    assert not set(identity) & {f.name for f in dataclasses.fields(RunOptions)}
    other_run = dataclasses.replace(training, run=dataclasses.replace(training.run, threads=2, progress=print))
    assert other_run.identity() == identity  # a run's options never change which state it resumes
    assert dataclasses.replace(training, learning_rate=5e-4).identity() != identity


def test_fit_trains_reports_and_keeps_the_best_epoch_without_a_cluster(tmp_path):
    seen, reports = [], []
    training = job(tmp_path, epochs=3)
    training = dataclasses.replace(training, run=dataclasses.replace(
        training.run, report_checkpoints=True, progress=lambda done, total: seen.append((done, total))))
    summary = fit(training, Workers(report=lambda metrics, files: reports.append((metrics, files))))
    assert seen == [(1, 3), (2, 3), (3, 3)]
    assert [m["epoch"] for m, _ in reports] == [0, 1, 2] and all(set(f) == {STATE_FILE} for _, f in reports)
    assert summary["resumed_from_epoch"] == 0 and summary["pretrained"] == "none"
    assert summary["best_val_score"] == max(m["val_score"] for m, _ in reports)
    assert storage.read_json(training.run.best_uri + ".json") == summary
    assert os.path.getsize(training.run.best_uri) > 0


def test_fit_resumes_its_own_state_only(tmp_path):
    first = job(tmp_path, epochs=2)
    fit(first)
    epochs = []
    counting = dataclasses.replace(first, run=dataclasses.replace(first.run, threads=2,
                                                                  progress=lambda done, _: epochs.append(done)))
    assert fit(counting)["resumed_from_epoch"] == 2 and epochs == []  # run options differ: still resumed
    longer = dataclasses.replace(counting, epochs=3)  # another identity: its own training from epoch 0
    assert fit(longer)["resumed_from_epoch"] == 0 and epochs == [1, 2, 3]


def test_a_runtime_checkpoint_wins_over_the_stored_state(tmp_path):
    """After a restart the runtime hands back its checkpoint; it is used before the copy in storage."""
    reports = []
    training = job(tmp_path, epochs=2)
    training = dataclasses.replace(training, run=dataclasses.replace(training.run, report_checkpoints=True))
    fit(training, Workers(report=lambda metrics, files: reports.append(files)))
    after_first_epoch = reports[0][STATE_FILE]
    assert fit(training)["resumed_from_epoch"] == 2  # the stored state is the last epoch's
    assert fit(training, Workers(checkpoint=after_first_epoch))["resumed_from_epoch"] == 1


def test_delivery_evaluates_exports_commits_and_clears_the_state(tmp_path):
    from spinml_ray.examples import write_example
    from spinml_ray.spec import load_request
    from spinml_ray.training.delivery import MODEL_FILE, deliver

    spec = load_request(write_example(str(tmp_path / "request")))
    paths = storage.RequestPaths(str(tmp_path / "out"), spec.tenant, spec.request_id)
    training = job(tmp_path, epochs=1)
    fit(training)
    metrics = deliver(spec.model_copy(update={"test_set": None}), paths, training, {"train_seconds": 1.0}, False)
    assert metrics["evaluated_on"] == "synthetic validation split" and metrics["train_seconds"] == 1.0
    assert metrics["best_epoch"] == 0 and metrics["n"] >= 1
    assert storage.read_manifest(paths.model)["files"] == sorted(
        [MODEL_FILE, "model.onnx", "model.torchscript.pt", "metrics.json", "settings.json"])
    assert not any(storage.exists(u) for u in (training.run.state_uri, training.run.best_uri))


@pytest.mark.parametrize("method", ["lora", "full"])
def test_the_adapter_trains_and_resumes_without_a_cluster(tmp_path, method):
    from spinml_ray.examples import make_scene
    from spinml_ray.personalization import AdapterJob, adapter_files, target_crops, train_adapter
    from spinml_ray.sanitizer import sanitize_image
    from spinml_ray.synthesis.engine import is_adapter

    rows = []
    for i in range(2):
        image, mask = make_scene("resting", i)
        rows += sanitize_image(f"ref-{i}", image, mask, "L2", "L1")
    settings = dict(rank=4, train_text_encoder=False, resolution=32, seed=0, token="sks", class_noun="rubber duck",
                    batch_size=2, prior_preservation=False, prior_loss_weight=1.0, steps=3, learning_rate=1e-3,
                    checkpoint_every=2, method=method)
    steps, reports = [], []
    adapter = AdapterJob(model="tiny", settings=settings, instance=target_crops(rows), class_images=[],
                         out=str(tmp_path / "adapter"), state_uri=str(tmp_path / "lora_state.pt"),
                         progress=lambda done, total: steps.append(done))
    last = train_adapter(adapter, Workers(report=lambda metrics, files: reports.append(metrics)))
    assert steps == [1, 2, 3] and [m["step"] for m in reports] == [2, 3]
    assert last["step"] == 3 and "final_loss" in last and last["resumed_from"] == 0
    assert sorted(os.listdir(tmp_path / "adapter")) == sorted(adapter_files(method))
    assert is_adapter(str(tmp_path / "adapter")) and not is_adapter(str(tmp_path))
    assert train_adapter(adapter) == {} and steps == [1, 2, 3]  # its stored state is complete: no step again
    longer = dataclasses.replace(adapter, settings={**settings, "steps": 4})  # another identity: from step 0
    assert train_adapter(longer)["resumed_from"] == 0 and steps == [1, 2, 3, 1, 2, 3, 4]
