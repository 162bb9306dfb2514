"""`spinml report`: the numbers it writes, what it reads (raw references only when asked), and the page
in a real headless browser."""

import json
import os
import shutil

import numpy as np
import pyarrow as pa
import pytest

from spinml_ray import report, storage
from spinml_ray.bundle import reference_items, sanitize_all
from spinml_ray.examples import make_scene, write_example
from spinml_ray.images import encode_png
from spinml_ray.spec import SanitizationSpec, load_request
from spinml_ray.synthesis.workitems import SYNTHETIC_SCHEMA
from spinml_ray.training.delivery import deliver
from spinml_ray.training.loop import fit


def _synthetic(spec, paths, per_label=6):
    """A committed synthetic table as the synthesize stage writes it: scenes of each label, with the
    box the conditioning placed the subject in, in the request's pool and in L0_L0."""
    rows, n = [], 0
    for index, label in enumerate(spec.label_names):
        for k in range(per_label):
            image, mask = make_scene(label, 9000 + index * 100 + k)
            ys, xs = np.nonzero(mask)
            rows.append({name: None for name in SYNTHETIC_SCHEMA.names} | {
                "image_id": f"img-{n:04d}", "label": label, "label_index": index, "kind": "img2img", "seed": n,
                "pool": "L0_L0" if k % 3 == 0 else "L2_L0", "image": encode_png(image),
                "box": [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]})
            n += 1
    storage.write_table(storage.join(paths.synthetic, "part-0.parquet"),
                        pa.Table.from_pylist(rows, schema=SYNTHETIC_SCHEMA))
    storage.commit(paths.synthetic, ["part-0.parquet"], images=len(rows))


@pytest.fixture(scope="module")
def ran(tmp_path_factory):
    """The example request at L2_L0 with every stage's output in storage, made without a cluster."""
    import yaml

    from spinml_ray.ray_layer.train import training_job

    folder = tmp_path_factory.mktemp("request")
    uri = write_example(str(folder))
    document = yaml.safe_load(open(uri))
    document["privacy"] = {"target": "L2", "background": "L0", "alpha": 0.25}
    document["training"] = {"architecture": "resnet18", "epochs": 1, "batch_size": 8, "image_size": 32,
                            "pretrained": "none"}
    with open(uri, "w") as handle:
        yaml.safe_dump(document, handle)
    spec = load_request(uri)
    root = str(tmp_path_factory.mktemp("storage"))
    paths = storage.RequestPaths(root, spec.tenant, spec.request_id)
    rows, _ = sanitize_all(reference_items(spec), "L2", "L0", SanitizationSpec())
    storage.write_table(storage.join(paths.sanitized, "part-0.parquet"), pa.Table.from_pylist(rows))
    storage.commit(paths.sanitized, ["part-0.parquet"])
    _synthetic(spec, paths)
    job = training_job(spec, paths, "tiny")
    fit(job)
    deliver(spec, paths, job, {}, False)
    return uri, root, spec, paths, rows


def test_the_report_measures_what_left_and_what_was_made(ran):
    uri, root, spec, paths, rows = ran
    references, skipped = report.load_references(spec)
    assert len(references) == len(spec.references) and skipped == []
    found, pictures = report.build(spec, root, "tiny", references)
    targets = [r["mi"] for r in rows if r["object"] == "target"]
    assert found["mi"]["own"]["target"] == pytest.approx(np.mean(targets)) and found["mi"]["own"]["background"] == 0
    assert 0 < found["mi"]["target_about_background"] < found["mi"]["own"]["target"]
    sim = found["sim"]
    assert sim["pool"] == "L2_L0" and set(sim["objects"]) == {"target", "background"}
    for entry in sim["objects"].values():
        assert -1 <= entry["sim"] <= 1 and entry["dsim"] == pytest.approx(entry["sim"] - entry["sim_l0_l0"])
    payloads = found["replication"]["payloads"]
    assert payloads["compared"] == len(targets) and 0 <= payloads["above_threshold"] <= 1
    closest = found["replication"]["references"]["closest"]
    assert len(closest) == 5 and [c["similarity"] for c in closest] == sorted((c["similarity"] for c in closest), reverse=True)
    inference = found["membership_inference"]["model"]
    assert 0 <= inference["auc"] <= 1 and inference["members"] + inference["non_members"] == 6 * len(spec.labels)
    assert "lira" not in inference  # shadow models are opt-in: a training each
    assert found["metrics"]["accuracy"] is not None and len(found["metrics"]["confusion"]) == len(spec.labels)
    assert found["synthetic"]["per_label"] == {label: 6 for label in spec.label_names}
    assert set(pictures) == {"released", "samples", "closest", "confusion"}


def test_without_raw_references_the_report_never_reads_them(ran, monkeypatch):
    uri, root, spec, paths, _ = ran
    raw = {item["uri"] for item in reference_items(spec)} | {item["mask_uri"] for item in reference_items(spec)}
    original = storage.read_bytes

    def guarded(u, *args, **kwargs):
        assert u not in raw, f"the report read a raw reference: {u}"
        return original(u, *args, **kwargs)

    monkeypatch.setattr(storage, "read_bytes", guarded)
    found, pictures = report.build(spec, root, "tiny")
    assert "--references-from" in found["sim"] and "--references-from" in found["mi"]["target_about_background"]
    assert found["replication"]["references"] is None if "references" in found["replication"] else True
    assert "closest" not in pictures and found["replication"]["payloads"]["compared"] > 0


def test_a_source_without_an_encoder_says_so(ran, tmp_path):
    _, root, spec, _, _ = ran
    bare = tmp_path / "model"
    bare.mkdir()
    (bare / "model_index.json").write_text("{}")
    found, _ = report.build(spec, root, str(bare))
    assert "no image encoder" in found["sim"] and "no image encoder" in found["replication"]


def test_spinml_report_writes_the_page_and_reads_references_from_the_users_copy(ran, tmp_path, capsys):
    from spinml_ray.cli import main

    uri, root, spec, paths, _ = ran
    copy = tmp_path / "copy"
    shutil.copytree(os.path.dirname(uri), copy)
    out = str(tmp_path / "local-report")
    assert main(["report", uri, "--storage", root, "--references-from", str(copy), "--out", out]) == 0
    assert not storage.exists(storage.join(paths.base, "report", "report.json"))  # raw-derived: local only
    data = json.loads(storage.read_bytes(storage.join(out, "report.json")))
    assert isinstance(data["sim"], dict) and isinstance(data["mi"]["target_about_background"], float)
    page = storage.read_bytes(storage.join(out, "index.html")).decode()
    assert page.count("data:image/png;base64,") == 4 and "http" not in page.replace("charset", "")
    assert main(["report", uri, "--storage", str(tmp_path / "empty")]) == 2  # nothing ran there
    assert "no committed output" in capsys.readouterr().err


def test_the_page_loads_in_a_headless_browser(ran, tmp_path):
    """Chromium (Debian's, which `make test` installs where it can) opens the page from disk: no console
    error, every image decodes, the confusion plot is there; the screenshot is kept in test-artifacts/."""
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        pytest.skip("no Chromium on this machine (`make test` installs Debian's with apt-get when run as root)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is a test dependency")
    uri, root, spec, paths, _ = ran
    out = report.write(spec, root, "tiny", *report.load_references(spec))
    errors = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium, args=["--no-sandbox"])
        page = browser.new_page()
        page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: errors.append(str(e)))
        page.goto(f"file://{os.path.abspath(out)}/index.html")
        images = page.eval_on_selector_all("img", "els => els.map(e => [e.id, e.complete, e.naturalWidth])")
        artifacts = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "test-artifacts")
        os.makedirs(artifacts, exist_ok=True)
        page.screenshot(path=os.path.join(artifacts, "report.png"), full_page=True)
        browser.close()
    assert errors == []
    assert {i for i, _, _ in images} == {"released", "samples", "closest", "confusion"}
    assert all(complete and width > 0 for _, complete, width in images), images


def test_the_tiny_source_ships_an_encoder_built_alone(tmp_path, monkeypatch):
    from spinml_ray.encoders import load_encoder

    monkeypatch.setenv("SPINML_CACHE", str(tmp_path))
    encoder = load_encoder("tiny")
    assert type(encoder.model).__name__ == "CLIPVisionModelWithProjection"  # its projection is kept
    assert not any(p.name.startswith("tiny-sd1") and not p.name.endswith("-encoders") for p in tmp_path.iterdir())
    images = [make_scene("floating", k)[0] for k in range(3)]
    first, again = encoder.embed(images, batch_size=2), encoder.embed(images)
    assert first.shape == (3, encoder.model.config.projection_dim) and np.allclose(first, again, atol=1e-5)
    assert not np.allclose(first[0], first[1])


def test_targets_the_conditioning_did_not_place_are_found_by_the_autolabeller(monkeypatch):
    """Synthetic images without a box get their target segment from the auto-labeller (SAM unprompted,
    here a stand-in that finds the drawn subject), so SIM's target covers them too."""
    from standins import SubjectSam, box_iou

    from spinml_ray import segmentation

    scenes = [make_scene("floating", 500 + k) for k in range(3)]
    sam = SubjectSam(scenes)
    monkeypatch.setattr(segmentation, "LazySegmenter", lambda loader: sam)
    synthetic = [{"image_id": f"i{k}", "box": None if k else [1.0, 2.0, 30.0, 40.0], "image": encode_png(image),
                  "array": image, "attention": None} for k, (image, _) in enumerate(scenes)]
    counts = report.locate_targets(synthetic, "tiny")
    assert counts == {"from_conditioning": 1, "from_autolabeller": 2, "unknown": 0} and sam.unprompted == 2
    assert synthetic[0]["box"] == [1.0, 2.0, 30.0, 40.0]  # the conditioning's box is kept
    for s, (_, mask) in zip(synthetic[1:], scenes[1:]):
        ys, xs = np.nonzero(mask)
        assert box_iou(s["box"], [xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) > 0.95
        assert report.synthetic_segments(s["array"], s["box"])["target"] is not None


def test_without_a_sam_unplaced_targets_stay_unknown_and_the_report_says_why(tmp_path):
    bare = tmp_path / "model"
    bare.mkdir()
    (bare / "model_index.json").write_text("{}")
    image, _ = make_scene("floating", 1)
    synthetic = [{"image_id": "i0", "box": None, "image": encode_png(image), "array": image, "attention": None}]
    counts = report.locate_targets(synthetic, str(bare))
    assert counts["unknown"] == 1 and "no SAM" in counts["why_unknown"] and synthetic[0]["box"] is None


def test_membership_inference_against_the_adapter_needs_held_out_images(ran, tmp_path):
    from spinml_ray.personalization import ADAPTER_CONFIG, LORA_WEIGHTS, AdapterJob, target_crops, train_adapter
    from spinml_ray.sanitizer import sanitize_image

    _, root, spec, _, rows = ran
    copy = str(tmp_path / "storage")
    shutil.copytree(root, copy)
    paths = storage.RequestPaths(copy, spec.tenant, spec.request_id)
    settings = dict(rank=4, train_text_encoder=False, resolution=32, seed=0, token="sks", class_noun="rubber duck",
                    batch_size=2, prior_preservation=False, prior_loss_weight=1.0, steps=6, learning_rate=1e-3,
                    checkpoint_every=6)
    train_adapter(AdapterJob(model="tiny", settings=settings, instance=target_crops(rows), class_images=[],
                             out=paths.adapters, state_uri=str(tmp_path / "state.pt")))
    storage.commit(paths.adapters, [LORA_WEIGHTS, ADAPTER_CONFIG], token="sks")
    assert "--held-out" in report.adapter_membership(paths, "tiny", rows, None)["skipped"]
    held_out = []  # the same duck in scenes personalization never saw, cropped as an L2 target is released
    for k in range(3):
        image, mask = make_scene("floating", 700 + k)
        held_out += target_crops(sanitize_image(f"held-{k}", image, mask, "L2", "L0"))
    found = report.adapter_membership(paths, "tiny", rows, held_out)
    assert found["members"] == len(target_crops(rows)) and found["non_members"] == 3
    assert 0 <= found["auc"] <= 1 and 0 <= found["loss_threshold"]["auc"] <= 1


def test_lira_against_the_trained_model_with_shadow_models(ran):
    _, root, spec, paths, _ = ran
    table = storage.read_committed_table(paths.synthetic)
    found = report.model_membership(spec, paths, table, shadows=4)
    assert found["lira"]["shadow_models"] == 4 and 0 <= found["lira"]["auc"] <= 1
    assert found["auc"] == report.model_membership(spec, paths, table)["auc"]  # the loss attack is unchanged


@pytest.mark.parametrize("family", ["dinov2", "blip2", "clip"])
def test_any_vision_model_in_transformers_layout_serves_as_encoder(tmp_path, family):
    """An `encoders/` folder may hold a DINOv2, BLIP-2 or CLIP vision model (made tiny here, random)."""
    import transformers

    from spinml_ray.encoders import Encoder

    model = {
        "dinov2": lambda: transformers.Dinov2Model(transformers.Dinov2Config(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
        "blip2": lambda: transformers.Blip2VisionModel(transformers.Blip2VisionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
        "clip": lambda: transformers.CLIPVisionModel(transformers.CLIPVisionConfig(
            image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)),
    }[family]()
    model.save_pretrained(tmp_path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    encoder = Encoder(str(tmp_path))
    assert type(encoder.model) is type(model)
    embedded = encoder.embed([make_scene("floating", k)[0] for k in range(3)])
    assert embedded.shape == (3, 32) and np.isfinite(embedded).all()
    if family != "blip2":  # BLIP-2's pooled class token ignores the image at random init (one layer)
        assert not np.allclose(embedded[0], embedded[1])
