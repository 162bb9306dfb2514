"""Model sources and the tiny preset: the same from_pretrained path as a real checkpoint."""

import json
import os
import shutil

import numpy as np
import pytest

from spinml_ray.models.source import resolve, resolve_controlnet
from spinml_ray.models.tokenizer import VOCAB_SIZE, write_clip_tokenizer
from spinml_ray.synthesis.engine import DiffusionEngine, EngineError
from spinml_ray.synthesis.workitems import WorkItem
from spinml_ray.images import decode_png, encode_png


def test_clip_tokenizer_is_the_real_vocabulary(tmp_path):
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(str(tmp_path)))
    assert len(tokenizer) == VOCAB_SIZE
    ids = tokenizer("a photo of a dog").input_ids
    assert ids[0] == tokenizer.bos_token_id == 49406 and ids[-1] == tokenizer.eos_token_id == 49407
    assert len(ids) == 7  # every word is one token in CLIP's vocabulary, none falls back to bytes
    assert tokenizer.decode(ids, skip_special_tokens=True).strip() == "a photo of a dog"


def test_tiny_preset_is_saved_in_diffusers_layout_and_cached():
    path = resolve("tiny")
    index = json.load(open(os.path.join(path, "model_index.json")))
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert index["text_encoder"][1] == "CLIPTextModel" and index["tokenizer"][1] == "CLIPTokenizer"
    assert resolve_controlnet("tiny") == os.path.join(path, "controlnet")
    assert resolve("tiny") == path  # built once, reused


def test_local_directory_loads_through_the_same_path(tmp_path):
    copy = shutil.copytree(resolve("tiny"), tmp_path / "model")
    assert resolve(str(copy)) == str(copy)
    engine = DiffusionEngine(str(copy))
    assert "controlnet" in engine.kinds and engine.pipes["txt2img"].tokenizer.vocab_size == VOCAB_SIZE


@pytest.mark.parametrize("bad", ["./no/such/dir", "not-a-hub-id", "a/b/c"])
def test_bad_model_sources_are_refused_by_name(bad):
    with pytest.raises(ValueError, match="model source"):
        resolve(bad)


def test_directory_without_model_index_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a diffusers model directory"):
        resolve(str(tmp_path))


@pytest.fixture(scope="module")
def engine():
    return DiffusionEngine("tiny")


def _item(image_id, **extra):
    base = dict(request_id="r", tenant="t", label="a", pool="p", prompt="A photo of a duck", seed=3,
                resolution=32, steps=2, guidance=5.0)
    return WorkItem(image_id=image_id, **{**base, **extra})


def test_every_pipeline_kind_generates_deterministically(engine):
    rng = np.random.default_rng(0)
    rgb = encode_png(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8))
    edges = encode_png(np.where(rng.random((32, 32, 3)) > 0.9, 255, 0).astype(np.uint8))
    mask = encode_png(np.pad(np.ones((16, 16), bool), 8))
    items = [
        _item("txt"), _item("cn", control_image=edges), _item("i2i", init_image=rgb),
        _item("inp", init_image=rgb, mask_image=mask), _item("cn-i2i", init_image=rgb, control_image=edges),
        _item("cn-inp", init_image=rgb, mask_image=mask, control_image=edges),
    ]
    first = engine.generate(items)
    assert [g.kind for g in first] == ["txt2img", "controlnet", "img2img", "inpaint", "controlnet_img2img",
                                       "controlnet_inpaint"]
    assert all(decode_png(g.image).shape == (32, 32, 3) for g in first)
    again = engine.generate(list(reversed(items)))  # other order, other batches: same images
    assert [g.image for g in reversed(again)] == [g.image for g in first]
    assert engine.generate([_item("txt", seed=4)])[0].image != first[0].image


@pytest.mark.parametrize("with_edges", [False, True])
def test_inpainting_keeps_the_unmasked_pixels_exactly(engine, with_edges):
    rng = np.random.default_rng(1)
    init = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    hole = np.zeros((32, 32), bool)
    hole[rng.integers(0, 16):, rng.integers(0, 16):] = True  # white: painted; black: kept
    extra = {"control_image": encode_png(np.full((32, 32, 3), 255, np.uint8))} if with_edges else {}
    (out,) = engine.generate([_item("inp", init_image=encode_png(init), mask_image=encode_png(hole), **extra)])
    image = decode_png(out.image)
    assert np.array_equal(image[~hole], init[~hole])  # the latents alone would only approximate them
    assert not np.array_equal(image[hole], init[hole])


def test_conditioning_changes_the_image(engine):
    edges_a = encode_png(np.zeros((32, 32, 3), np.uint8))
    edges_b = encode_png(np.full((32, 32, 3), 255, np.uint8))
    a, b = engine.generate([_item("a", control_image=edges_a), _item("b", control_image=edges_b)])
    assert a.image != b.image and a.received_sha256 != b.received_sha256


def test_controlnet_item_without_controlnet_weights_is_refused(tmp_path):
    copy = shutil.copytree(resolve("tiny"), tmp_path / "model", ignore=shutil.ignore_patterns("controlnet"))
    engine = DiffusionEngine(str(copy))
    assert "controlnet" not in engine.kinds
    with pytest.raises(EngineError, match="ControlNet"):
        engine.generate([_item("x", control_image=encode_png(np.zeros((32, 32, 3), np.uint8)))])


def test_an_adapter_never_touches_other_items_of_its_batch(engine, lora_adapter):
    baseline = engine.generate([_item("plain")])[0].image
    with_adapter, without = engine.generate([_item("lora", adapter=lora_adapter), _item("plain")])
    assert with_adapter.image != baseline  # the adapter acts ...
    assert without.image == baseline  # ... on its own item only, though both shared one call
    assert engine.generate([_item("plain")])[0].image == baseline
    engine.unload_adapter(lora_adapter)
    assert engine.adapters == {} and engine.generate([_item("lora", adapter=lora_adapter)])[0].image == with_adapter.image


def test_adapters_are_evicted_least_recently_used(tmp_path, lora_adapter):
    engine = DiffusionEngine("tiny", max_adapters=2)
    copies = [shutil.copytree(lora_adapter, tmp_path / f"a{i}") for i in range(3)]
    for path in copies:
        engine.load_adapter(str(path))
    assert list(engine.adapters) == [str(copies[1]), str(copies[2])]
    with pytest.raises(EngineError, match="pytorch_lora_weights"):
        engine.load_adapter(str(tmp_path))


@pytest.mark.parametrize("scheduler", ["ddim", "euler", "pndm", "unipc"])
def test_schedulers_are_selectable_per_item(engine, scheduler):
    default, other = engine.generate([_item("d", steps=5), _item("o", steps=5, scheduler=scheduler)])  # 2 steps: UniPC = DPM++
    assert other.image != default.image and decode_png(other.image).shape == (32, 32, 3)
