"""Tests for the device side of the command line (spinml_ray/cli.py): `spinml sanitize --local` writes
exactly what would leave, refuses bad input with one line, and `--preview` releases nothing."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from conftest import EXAMPLE_REQUEST, REPO
from PIL import Image

from spinml_ray import storage
from spinml_ray.bundle import reference_items, sanitize_all
from spinml_ray.cli import main
from spinml_ray.examples import make_scene
from spinml_ray.images import decode_png
from spinml_ray.spec import load_request

OUTPUTS = {"bundle.parquet", "rejections.parquet", "preview.png", "preview.html"}


@pytest.fixture
def no_sam_model(tmp_path):
    """A model source without a `sam/` folder: the box is then used as the mask (no random tiny SAM)."""
    path = tmp_path / "model-without-sam"
    path.mkdir()
    (path / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return str(path)


@pytest.fixture
def scene_files(tmp_path):
    image, mask = make_scene("floating", 31)
    img = tmp_path / "photo.png"
    msk = tmp_path / "photo-mask.png"
    Image.fromarray(image).save(img)
    Image.fromarray(mask.astype(np.uint8) * 255).save(msk)
    return image, mask, str(img), str(msk)


def local(image_path, out, model, *extra, target="L2", background="L1"):
    return ["sanitize", "--local", "--image", image_path, "--target", target, "--background", background,
            "--out", str(out), "--model", model, *extra]


def read_bundle(out):
    return {r["object"]: r for r in storage.read_table(os.path.join(str(out), "bundle.parquet")).to_pylist()}


def assert_refused(capsys, code, out):
    captured = capsys.readouterr()
    assert code != 0
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("spinml: error:")
    assert "Traceback" not in captured.err and "Traceback" not in captured.out
    assert not os.path.exists(os.path.join(str(out), "bundle.parquet"))
    return lines[0]


# ---------------------------------------------------------------- success


def test_local_with_a_mask_writes_bundle_and_preview(tmp_path, scene_files, no_sam_model, capsys):
    image, mask, img, msk = scene_files
    out = tmp_path / "out"
    code = main(local(img, out, no_sam_model, "--mask", msk))
    assert code == 0
    assert OUTPUTS <= set(os.listdir(out))
    summary = json.loads(capsys.readouterr().out)
    assert summary["bundle"] == os.path.join(str(out), "bundle.parquet")
    assert summary["rejected"] == [] and summary["released_rows"] == 2

    rows = read_bundle(out)
    assert sorted(rows) == ["background", "target"]
    assert rows["target"]["level"] == "L2" and rows["background"]["level"] == "L1"
    assert {r["ref_id"] for r in rows.values()} == {"ref-0000"}
    assert all((r["width"], r["height"]) == (128, 96) for r in rows.values())
    # the target's released pixels are the image inside the mask, black elsewhere
    assert np.array_equal(decode_png(rows["target"]["payload"]), np.where(mask[..., None], image, 0))
    edges = decode_png(rows["background"]["payload"])
    assert edges.shape == mask.shape and not edges[mask].any()
    assert storage.read_table(os.path.join(str(out), "rejections.parquet")).num_rows == 0

    page = (out / "preview.html").read_text()
    for row in rows.values():
        assert base64.b64encode(row["payload"]).decode() in page
    with Image.open(out / "preview.png") as sheet:
        assert sheet.format == "PNG" and sheet.width > 0 and sheet.height > 0


def test_local_l0_object_leaves_nothing_in_the_preview(tmp_path, scene_files, no_sam_model):
    image, mask, img, msk = scene_files
    out = tmp_path / "out"
    assert main(local(img, out, no_sam_model, "--mask", msk, target="L2", background="L0")) == 0
    rows = read_bundle(out)
    assert rows["background"]["payload"] is None and rows["background"]["region"] is None
    page = (out / "preview.html").read_text()
    assert base64.b64encode(rows["target"]["payload"]).decode() in page
    assert page.count("data:image/png;base64,") == 1


def test_local_with_a_box_and_no_sam_is_refused_unless_allowed(tmp_path, scene_files, no_sam_model, capsys):
    image, _, img, _ = scene_files
    out = tmp_path / "out"
    assert main(local(img, out, no_sam_model, "--box", "20,10,90,70", background="L2")) != 0
    assert "allow_box_as_mask" in capsys.readouterr().err and not (out / "bundle.parquet").exists()
    assert main(local(img, out, no_sam_model, "--box", "20,10,90,70", "--allow-box-as-mask", background="L2")) == 0
    page = (out / "preview.html").read_text()
    assert page.count('class="box-as-mask" style="color:red"') == 2  # both released objects warned
    rows = read_bundle(out)
    box = np.zeros(image.shape[:2], bool)
    box[10:70, 20:90] = True
    assert np.array_equal(decode_png(rows["target"]["region"]) > 0, box)
    assert np.array_equal(decode_png(rows["background"]["region"]) > 0, ~box)
    assert np.array_equal(decode_png(rows["target"]["payload"]), np.where(box[..., None], image, 0))


def test_local_canny_thresholds_are_used(tmp_path, scene_files, no_sam_model):
    _, mask, img, msk = scene_files
    low, high = tmp_path / "low", tmp_path / "high"
    assert main(local(img, low, no_sam_model, "--mask", msk, "--canny", "10,20", target="L0")) == 0
    assert main(local(img, high, no_sam_model, "--mask", msk, "--canny", "400,800", target="L0")) == 0
    many = (decode_png(read_bundle(low)["background"]["payload"]) > 0).sum()
    few = (decode_png(read_bundle(high)["background"]["payload"]) > 0).sum()
    assert many > few


def test_local_no_blur_faces_keeps_the_face(tmp_path, no_sam_model):
    from skimage import data

    from spinml_ray.faces import detect_faces

    photo = data.astronaut()
    img = tmp_path / "astronaut.png"
    Image.fromarray(photo).save(img)
    x, y, w, h = detect_faces(photo)[0]
    box = f"{x - w // 2},{y - h // 2},{x + w + w // 2},{y + h + h // 2}"
    blurred, kept = tmp_path / "blurred", tmp_path / "kept"
    allow = "--allow-box-as-mask"
    assert main(local(str(img), blurred, no_sam_model, "--box", box, allow, background="L0")) == 0
    assert main(local(str(img), kept, no_sam_model, "--box", box, "--no-blur-faces", allow, background="L0")) == 0
    b, k = read_bundle(blurred)["target"], read_bundle(kept)["target"]
    assert b["faces_blurred"] >= 1 and k["faces_blurred"] == 0
    face = (slice(y, y + h), slice(x, x + w))
    assert np.array_equal(decode_png(k["payload"])[face], photo[face])
    assert not np.array_equal(decode_png(b["payload"])[face], photo[face])


# ---------------------------------------------------------------- refused input


def test_corrupt_image_is_refused(tmp_path, scene_files, no_sam_model, capsys):
    _, _, _, msk = scene_files
    bad = tmp_path / "corrupt.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(str(bad), out, no_sam_model, "--mask", msk)), out)
    assert "corrupt.png" in line


def test_missing_image_is_refused(tmp_path, scene_files, no_sam_model, capsys):
    _, _, _, msk = scene_files
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(str(tmp_path / "nope.png"), out, no_sam_model, "--mask", msk)), out)
    assert "nope.png" in line and "not found" in line


def test_wrong_size_mask_is_refused(tmp_path, scene_files, no_sam_model, capsys):
    _, mask, img, _ = scene_files
    small = tmp_path / "small-mask.png"
    Image.fromarray(mask[:50, :60].astype(np.uint8) * 255).save(small)
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(img, out, no_sam_model, "--mask", str(small))), out)
    assert "does not match" in line


def test_empty_mask_is_refused(tmp_path, scene_files, no_sam_model, capsys):
    _, mask, img, _ = scene_files
    empty = tmp_path / "empty-mask.png"
    Image.fromarray(np.zeros(mask.shape, np.uint8)).save(empty)
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(img, out, no_sam_model, "--mask", str(empty))), out)
    assert "empty" in line


def test_missing_mask_file_is_refused(tmp_path, scene_files, no_sam_model, capsys):
    _, _, img, _ = scene_files
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(img, out, no_sam_model, "--mask", str(tmp_path / "gone.png"))), out)
    assert "gone.png" in line


def test_box_outside_the_image_is_refused(tmp_path, scene_files, no_sam_model, capsys):
    _, _, img, _ = scene_files
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(img, out, no_sam_model, "--box", "500,500,600,600")), out)
    assert "outside" in line


def test_bad_model_source_is_refused_when_sam_is_needed(tmp_path, scene_files, capsys):
    _, _, img, _ = scene_files
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(img, out, str(tmp_path / "no-such-model"), "--box", "20,10,90,70")), out)
    assert "no-such-model" in line


def test_inverted_canny_thresholds_are_refused_in_one_line(tmp_path, scene_files, no_sam_model, capsys):
    _, _, img, msk = scene_files
    out = tmp_path / "out"
    line = assert_refused(capsys, main(local(img, out, no_sam_model, "--mask", msk, "--canny", "200,100")), out)
    assert "canny" in line


def test_refusal_in_a_real_process_is_one_line(tmp_path, scene_files, no_sam_model):
    """Outside pytest's capture: logging or warnings must not add lines to the refusal."""
    _, _, _, msk = scene_files
    bad = tmp_path / "notes.txt"
    bad.write_text("not an image\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "spinml_ray.cli", *local(str(bad), out, no_sam_model, "--mask", msk)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spinml: error:"), proc.stderr
    assert "notes.txt" in lines[0]
    assert not (out / "bundle.parquet").exists()


# ---------------------------------------------------------------- usage errors


def test_missing_target_is_a_usage_error(tmp_path, scene_files, no_sam_model, capsys):
    _, _, img, msk = scene_files
    argv = ["sanitize", "--local", "--image", img, "--mask", msk, "--background", "L1", "--out", str(tmp_path / "o"),
            "--model", no_sam_model]
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--target" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("box", ["1,2,3", "1,2,3,4,5", "a,b,c,d"])
def test_malformed_box_is_a_usage_error(box, tmp_path, scene_files, no_sam_model, capsys):
    _, _, img, _ = scene_files
    with pytest.raises(SystemExit) as info:
        main(local(img, tmp_path / "o", no_sam_model, "--box", box))
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--box" in err and "Traceback" not in err


def test_mask_and_box_together_is_a_usage_error(tmp_path, scene_files, no_sam_model, capsys):
    _, _, img, msk = scene_files
    with pytest.raises(SystemExit) as info:
        main(local(img, tmp_path / "o", no_sam_model, "--mask", msk, "--box", "1,2,30,40"))
    assert info.value.code == 2


def test_unknown_level_is_a_usage_error(tmp_path, scene_files, no_sam_model, capsys):
    _, _, img, msk = scene_files
    with pytest.raises(SystemExit) as info:
        main(local(img, tmp_path / "o", no_sam_model, "--mask", msk, target="L3"))
    assert info.value.code == 2
    assert "L3" in capsys.readouterr().err


# ---------------------------------------------------------------- --preview


def test_preview_of_the_example_request_releases_nothing(tmp_path, no_sam_model, capsys):
    out = tmp_path / "preview"
    store = tmp_path / "storage"
    before = sorted(os.listdir(os.path.dirname(EXAMPLE_REQUEST)))
    code = main(["sanitize", EXAMPLE_REQUEST, "--preview", "--out", str(out), "--storage", str(store),
                 "--model", no_sam_model])
    assert code == 0
    assert sorted(os.listdir(out)) == ["preview.html", "preview.png"]
    assert not store.exists()
    assert sorted(os.listdir(os.path.dirname(EXAMPLE_REQUEST))) == before
    summary = json.loads(capsys.readouterr().out)
    assert "bundle" not in summary
    # the page shows exactly what would leave: the payloads the request's references produce
    spec = load_request(EXAMPLE_REQUEST)
    rows, rejections = sanitize_all(reference_items(spec), spec.privacy.target.value, spec.privacy.background.value,
                                    spec.sanitization)
    assert rejections == [] and summary["released_rows"] == len(rows) == 2 * len(spec.references)
    page = (out / "preview.html").read_text()
    payloads = [r["payload"] for r in rows if r["payload"] is not None]
    assert payloads
    for payload in payloads:
        assert base64.b64encode(payload).decode() in page
    assert page.count("data:image/png;base64,") == len(payloads)


def test_preview_without_a_request_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["sanitize", "--preview", "--out", str(tmp_path / "o")])
    assert info.value.code == 2


def test_preview_of_a_missing_request_is_refused(tmp_path, capsys):
    out = tmp_path / "o"
    code = main(["sanitize", str(tmp_path / "missing.yaml"), "--preview", "--out", str(out)])
    line = assert_refused(capsys, code, out)
    assert "missing.yaml" in line
    assert not out.exists()


@pytest.mark.parametrize("share", ["-1", "lots", "9"])
def test_bad_gpu_share_for_the_synthesis_service_is_a_usage_error(share, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--gpus-per-replica", share])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "--gpus-per-replica" in err and share in err and "Traceback" not in err


@pytest.mark.parametrize("command", ["run", "sanitize", "personalize", "synthesize", "train"])
def test_every_stage_subcommand_passes_its_model_source_on(command, monkeypatch):
    """`spinml train --model X` trains with X's classifier weights like the other stages use X (it used
    to have no --model and silently used the default)."""
    import spinml_ray.ray_layer.cluster
    import spinml_ray.ray_layer.pipeline

    seen = {}
    monkeypatch.setattr(spinml_ray.ray_layer.cluster, "connect", lambda *a, **k: None)
    monkeypatch.setattr(spinml_ray.ray_layer.pipeline, "run_request",
                        lambda request, root, **kw: seen.update(kw) or {"output": root})
    assert main([command, EXAMPLE_REQUEST, "--storage", "unused", "--model", "some/model"]) == 0
    assert seen["model"] == "some/model"
    assert seen["stages"] == (spinml_ray.ray_layer.pipeline.STAGE_NAMES if command == "run" else (command,))
