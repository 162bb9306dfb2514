"""DreamBooth-LoRA pieces without Ray: inputs, augmentation, training, the saved adapter."""

import json
import os

import numpy as np
import pytest
import torch

from spinml_ray.examples import make_scene
from spinml_ray.images import decode_png
from spinml_ray.models.source import resolve
from spinml_ray.personalization import ADAPTER_CONFIG, LORA_WEIGHTS, LoraTrainer, augment, target_crops
from spinml_ray.sanitizer import sanitize_image
from spinml_ray.synthesis.engine import DiffusionEngine
from spinml_ray.synthesis.workitems import WorkItem

SETTINGS = dict(rank=4, train_text_encoder=False, resolution=32, seed=0, token="sks", class_noun="rubber duck",
                batch_size=2, prior_preservation=True, prior_loss_weight=1.0, steps=30, learning_rate=1e-3)


@pytest.fixture(scope="module")
def rows():
    out = []
    for i in range(3):
        image, mask = make_scene("resting", i)
        out += sanitize_image(f"ref-{i}", image, mask, "L2", "L1")
    return out


def test_only_released_l2_target_pixels_are_used(rows):
    crops = target_crops(rows)
    assert len(crops) == 3
    for crop, row in zip(crops, [r for r in rows if r["object"] == "target"]):
        region = decode_png(row["region"]) > 0
        ys, xs = np.nonzero(region)
        assert decode_png(crop).shape == (ys.max() - ys.min() + 1, xs.max() - xs.min() + 1, 3)
    assert target_crops([r for r in rows if r["object"] == "background"]) == []  # L1 edges are never used
    at_l1 = [dict(r, level="L1") if r["object"] == "target" else r for r in rows]
    assert target_crops(at_l1) == []


def test_augmentation_is_seeded_and_varies(rows):
    crop = target_crops(rows)[0]
    a = [augment(crop, 32, np.random.default_rng(0)) for _ in range(2)]
    assert a[0].shape == (3, 32, 32) and float(a[0].min()) >= -1.0 and float(a[0].max()) <= 1.0
    assert torch.equal(a[0], a[1])
    rng = np.random.default_rng(1)
    variants = [augment(crop, 32, rng) for _ in range(6)]
    assert any(not torch.equal(variants[0], v) for v in variants[1:])


@pytest.fixture(scope="module")
def trained(rows, tmp_path_factory):
    crops = target_crops(rows)
    trainer = LoraTrainer(resolve("tiny"), SETTINGS, crops, crops[:1])
    optimizer = torch.optim.AdamW(trainer.trainable(), lr=SETTINGS["learning_rate"])
    before = trainer.fixed_loss()
    losses = [trainer.train_step(optimizer) for _ in range(SETTINGS["steps"])]
    out = str(tmp_path_factory.mktemp("adapter"))
    trainer.save_adapter(out)
    return trainer, before, losses, out


def test_loss_falls_on_a_fixed_subject(trained):
    trainer, before, losses, _ = trained
    assert trainer.step == 30 and all(np.isfinite(losses))
    assert trainer.fixed_loss() < before  # same images, noise and timesteps as before training


def test_lora_state_round_trip_restores_the_model(rows, trained):
    trainer, _, _, _ = trained
    fresh = LoraTrainer(resolve("tiny"), SETTINGS, target_crops(rows), [])
    assert fresh.fixed_loss() != trainer.fixed_loss()
    fresh.load_lora_state(trainer.lora_state())
    assert fresh.fixed_loss() == pytest.approx(trainer.fixed_loss(), rel=1e-6)


def test_saved_adapter_loads_into_the_engine_and_changes_its_output(trained):
    _, _, _, out = trained
    assert sorted(os.listdir(out)) == sorted([ADAPTER_CONFIG, LORA_WEIGHTS])
    config = json.load(open(os.path.join(out, ADAPTER_CONFIG)))
    assert config["token"] == "sks" and config["steps"] == 30 and config["settings"]["rank"] == 4
    engine = DiffusionEngine("tiny")
    item = dict(request_id="r", tenant="t", label="a", pool="p", prompt="A photo of a sks rubber duck", seed=3,
                resolution=32, steps=4, guidance=5.0)
    plain = engine.generate([WorkItem(image_id="p", **item)])[0].image
    personal = engine.generate([WorkItem(image_id="a", adapter=out, **item)])[0].image
    assert personal != plain
    assert decode_png(personal).shape == (32, 32, 3)


def test_text_encoder_lora_is_saved_when_asked(rows, tmp_path):
    from safetensors.torch import load_file

    crops = target_crops(rows)
    trainer = LoraTrainer(resolve("tiny"), {**SETTINGS, "train_text_encoder": True}, crops, [])
    optimizer = torch.optim.AdamW(trainer.trainable(), lr=1e-3)
    trainer.train_step(optimizer)
    trainer.save_adapter(str(tmp_path))
    keys = load_file(str(tmp_path / LORA_WEIGHTS)).keys()
    assert any(k.startswith("text_encoder.") for k in keys) and any(k.startswith("unet.") for k in keys)


def test_adapter_losses_are_fixed_draws_under_the_base_model_and_the_adapter(rows, trained):
    from spinml_ray.personalization import adapter_losses

    _, _, _, out = trained
    members = target_crops(rows)
    others = []
    for i in range(2):
        image, mask = make_scene("floating", 400 + i)
        others += target_crops(sanitize_image(f"held-{i}", image, mask, "L2", "L1"))
    base, adapted = adapter_losses(resolve("tiny"), out, members + others, draws=4)
    assert base.shape == adapted.shape == (len(members) + len(others),)
    assert np.isfinite(base).all() and np.isfinite(adapted).all() and not np.allclose(base, adapted)
    again_base, again_adapted = adapter_losses(resolve("tiny"), out, members + others, draws=4)
    assert np.allclose(base, again_base) and np.allclose(adapted, again_adapted)  # the same draws each time
    # the adapter was trained on `members`: it lowers their loss (same images, noise and timesteps)
    assert (adapted[: len(members)] < base[: len(members)]).all()


@pytest.fixture(scope="module")
def full_model(rows, tmp_path_factory):
    """`method: full`: the whole tiny UNet fine-tuned a few steps (a large rate, so it visibly moves)."""
    settings = {**SETTINGS, "method": "full", "steps": 4, "learning_rate": 1e-3, "prior_preservation": False}
    trainer = LoraTrainer(resolve("tiny"), settings, target_crops(rows), [])
    optimizer = torch.optim.AdamW(trainer.trainable(), lr=settings["learning_rate"])
    for _ in range(settings["steps"]):
        trainer.train_step(optimizer)
    out = str(tmp_path_factory.mktemp("full"))
    trainer.save_adapter(out)
    return trainer, out


def test_full_dreambooth_trains_every_unet_weight_and_saves_the_unet(rows, full_model):
    from spinml_ray.personalization import FULL_UNET, adapter_files, adapter_method

    trainer, out = full_model
    assert {id(p) for p in trainer.trainable()} == {id(p) for p in trainer.unet.parameters()}
    assert not any(p.requires_grad for p in trainer.text_encoder.parameters())
    assert sorted(os.listdir(out)) == sorted(adapter_files("full")) and adapter_method(os.listdir(out)) == "full"
    assert os.path.exists(os.path.join(out, FULL_UNET, "config.json"))
    assert json.load(open(os.path.join(out, ADAPTER_CONFIG)))["method"] == "full"
    fresh = LoraTrainer(resolve("tiny"), {**SETTINGS, "method": "full"}, target_crops(rows), [])
    assert fresh.fixed_loss() != pytest.approx(trainer.fixed_loss(), rel=1e-6)
    fresh.load_lora_state(trainer.lora_state())  # the resume state round-trips too
    assert fresh.fixed_loss() == pytest.approx(trainer.fixed_loss(), rel=1e-6)


def test_the_engine_serves_a_fine_tuned_unet_per_request_beside_lora_adapters(trained, full_model):
    _, _, _, lora = trained
    _, full = full_model
    engine = DiffusionEngine("tiny", max_adapters=2)
    item = dict(request_id="r", tenant="t", label="a", pool="p", prompt="a photo of sks rubber duck", seed=3,
                resolution=32, steps=4, guidance=5.0)
    alone = {name: engine.generate([WorkItem(image_id=name, adapter=adapter, **item)])[0].image
             for name, adapter in (("base", None), ("full", full), ("lora", lora))}
    assert len(set(alone.values())) == 3  # each request's model draws its own image
    mixed = engine.generate([WorkItem(image_id=name, adapter=adapter, **item)
                             for name, adapter in (("full", full), ("base", None), ("lora", lora))])
    assert [m.image for m in mixed] == [alone["full"], alone["base"], alone["lora"]]  # no model touches another's
    assert set(engine.unets) == {full} and engine.pipes["img2img"].unet is engine.pipes["txt2img"].unet
    engine.unload_adapter(full)
    assert not engine.unets and engine.generate([WorkItem(image_id="base", **item)])[0].image == alone["base"]


def test_a_text_encoder_lora_never_acts_on_a_fine_tuned_unets_items(rows, full_model, tmp_path):
    """A LoRA in the shared text encoder stays off while another request's own UNet draws."""
    _, full = full_model
    trainer = LoraTrainer(resolve("tiny"), {**SETTINGS, "train_text_encoder": True, "learning_rate": 1e-2},
                          target_crops(rows), [])
    with torch.no_grad():
        for name, param in trainer.text_encoder.named_parameters():
            if "lora_B" in name:  # make the text encoder's LoRA act, whatever a few steps would do
                param.normal_(std=0.5)
    trainer.save_adapter(str(tmp_path / "te"))
    engine = DiffusionEngine("tiny")
    item = dict(request_id="r", tenant="t", label="a", pool="p", prompt="a photo of sks rubber duck", seed=5,
                resolution=32, steps=3, guidance=5.0)
    alone = engine.generate([WorkItem(image_id="f", adapter=full, **item)])[0].image
    after_lora = engine.generate([WorkItem(image_id="l", adapter=str(tmp_path / "te"), **item),
                                  WorkItem(image_id="f", adapter=full, **item)])
    assert after_lora[1].image == alone and after_lora[0].image != alone


def test_a_fine_tuned_unet_of_another_architecture_is_refused(tmp_path):
    from diffusers import UNet2DConditionModel

    from spinml_ray.synthesis.engine import ADAPTER_CONFIG, FULL_UNET, EngineError

    UNet2DConditionModel(sample_size=8, block_out_channels=(8, 16), layers_per_block=1, cross_attention_dim=32,
                         down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                         norm_num_groups=8).save_pretrained(str(tmp_path / FULL_UNET))
    (tmp_path / ADAPTER_CONFIG).write_text(json.dumps({"method": "full", "token": "sks", "class_noun": "duck"}))
    with pytest.raises(EngineError, match="not the served model's architecture"):
        DiffusionEngine("tiny").load_adapter(str(tmp_path))
