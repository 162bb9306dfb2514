"""The spinbench model source: a reproducible build that the service loads like a real checkpoint."""

import json
import os

import numpy as np
import pytest
import torch

from spinml_ray.images import decode_png, encode_png
from spinml_ray.models import source
from spinml_ray.synthesis.workitems import WorkItem


@pytest.fixture(autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_first_training_steps_are_reproducible_from_the_seed():
    from spinbench.model import LOSSES, Recipe, first_losses

    def replay(seed):
        return first_losses(Recipe(seed=seed, corpus_size=8, vae_batch_size=2, batch_size=2), steps=4)

    first = replay(0)
    # the UNet phase alternates: even steps the UNet alone, odd steps with the ControlNet's residuals
    assert {p: len(first[p]) for p in LOSSES} == {"vae": 4, "unet": 2, "controlnet": 2}
    assert all(np.isfinite(first[p]).all() for p in LOSSES)
    again = replay(0)
    for series in LOSSES:
        np.testing.assert_allclose(again[series], first[series], rtol=0, atol=1e-6)
    other = replay(1)
    for series in LOSSES:
        assert not np.allclose(other[series], first[series], rtol=0, atol=1e-6)


def test_recolour_turns_public_colours_into_any_colour_deterministically():
    """The VAE also trains on recoloured public images, so it can encode a user's coat and room in
    colours no public image has (a VAE of public colours alone turned a green dog tan)."""
    from spinbench.model import recolour

    brown = np.zeros((24, 8, 8, 3), np.uint8)
    brown[...] = (120, 80, 40)
    first = recolour(brown, np.random.default_rng(0))
    assert first.shape == brown.shape and first.dtype == np.uint8
    np.testing.assert_array_equal(first, recolour(brown, np.random.default_rng(0)))
    assert not np.array_equal(first, recolour(brown, np.random.default_rng(1)))
    dominant = {int(np.argmax(image[0, 0])) for image in first}
    assert dominant == {0, 1, 2}  # reds, greens and blues out of one brown
    saturation = (first.max(-1).astype(int) - first.min(-1)) / np.maximum(first.max(-1), 1)
    assert saturation.max() > (120 - 40) / 120 + 0.1  # and more saturated than any public coat


def test_the_unet_and_controlnet_read_the_pooled_caption_with_the_same_weights():
    from spinbench.model import TEXT_POOL_HEADS, make_controlnet, make_unet

    unet = make_unet()
    controlnet = make_controlnet(unet)
    assert unet.config.addition_embed_type == controlnet.config.addition_embed_type == "text"
    assert unet.add_embedding.pool.num_heads == controlnet.add_embedding.pool.num_heads == TEXT_POOL_HEADS
    for name, value in unet.add_embedding.state_dict().items():
        torch.testing.assert_close(controlnet.add_embedding.state_dict()[name], value)
    context = torch.randn(2, 77, unet.config.cross_attention_dim)
    latents, timesteps = torch.randn(2, 4, 32, 32), torch.tensor([10, 500])
    with torch.no_grad():
        pooled = unet(latents, timesteps, encoder_hidden_states=context).sample
        hook = unet.add_embedding.register_forward_hook(lambda module, args, out: torch.zeros_like(out))
        try:
            without = unet(latents, timesteps, encoder_hidden_states=context).sample
        finally:
            hook.remove()
    assert not torch.allclose(pooled, without)  # the pooled caption reaches the prediction


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    from spinbench.model import build

    threads = torch.get_num_threads()
    out = str(tmp_path_factory.mktemp("spinbench") / "weights")
    try:
        report = build(out, seed=0, vae_steps=2, unet_steps=2, batch_size=2, vae_batch_size=2,
                       corpus_size=8, threads=1, quiet=True)
    finally:
        torch.set_num_threads(threads)
    return out, report


def test_a_short_build_writes_a_diffusers_folder_with_its_report(built):
    out, report = built
    index = json.load(open(os.path.join(out, "model_index.json")))
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"] and index["vae"] == ["diffusers", "AutoencoderKL"]
    assert index["text_encoder"][1] == "CLIPTextModel" and index["tokenizer"][1] == "CLIPTokenizer"
    assert os.path.exists(os.path.join(out, "controlnet", "config.json"))
    on_disk = json.load(open(os.path.join(out, "spinbench.json")))
    assert on_disk["seed"] == 0 and on_disk["corpus_size"] == 8
    assert on_disk["steps"] == {"vae": 2, "unet": 2}
    assert set(on_disk["final_losses"]) == {"vae", "unet", "controlnet"}
    assert on_disk["params"]["unet"] > 1_000_000 and "torch" in on_disk["versions"]
    assert on_disk["weights_bytes"] < 30_000_000
    vae = json.load(open(os.path.join(out, "vae", "config.json")))
    assert vae["scaling_factor"] == pytest.approx(report["latents"]["scaling_factor"])


def test_a_build_replays_its_recorded_first_steps_from_its_recipe(built):
    """A build's report records its recipe and first losses: replaying the recipe from scratch gives
    them again (up to float summation order, so that other thread counts and CPUs agree)."""
    from spinbench.model import LOSSES, Recipe, first_losses

    _, report = built
    replay = first_losses(Recipe(**report["recipe"]), steps=2)
    for series in LOSSES:
        np.testing.assert_allclose(replay[series], report["first_losses"][series], rtol=1e-4)


def test_service_engine_loads_the_build_and_generates_txt2img_and_controlnet(built):
    from spinml_ray.synthesis.engine import DiffusionEngine

    out, _ = built
    engine = DiffusionEngine(out, device="cpu")
    base = engine.pipes["txt2img"]
    assert len(base.tokenizer) > 2 and base.vae_scale_factor == 2
    assert base.unet.dtype == torch.float32 and base.text_encoder.dtype == torch.float32  # fp16 on disk, upcast
    assert "controlnet" in engine.kinds
    edges = np.zeros((64, 64), np.uint8)
    edges[16:48, 20] = edges[16:48, 44] = edges[16, 20:45] = 255  # a 0/255 single-channel map, as L1 releases
    common = dict(request_id="r", tenant="t", label="sitting", pool="L1_L0", prompt="a photo of a dog sitting",
                  seed=5, resolution=64, steps=3, guidance=5.0)
    items = [WorkItem(image_id="txt", **{**common, "pool": "L0_L0"}),
             WorkItem(image_id="cn", control_image=encode_png(edges), **common),
             WorkItem(image_id="ddim", scheduler="ddim", **{**common, "pool": "L0_L0"})]
    assert items[0].scheduler == items[1].scheduler == "dpmsolver++"  # the service's default
    images = engine.generate(items)
    assert [g.kind for g in images] == ["txt2img", "controlnet", "txt2img"]
    for generated in images:
        pixels = decode_png(generated.image)
        assert pixels.shape == (64, 64, 3)


def test_spinbench_source_refuses_missing_weights_by_name(tmp_path, monkeypatch):
    monkeypatch.setattr(source, "spinbench_weights_dir", lambda: str(tmp_path / "weights"))
    with pytest.raises(ValueError, match="make spinbench-model"):
        source.resolve("spinbench")
    (tmp_path / "weights").mkdir()  # a folder without model_index.json is not a model either
    with pytest.raises(ValueError, match="make spinbench-model"):
        source.resolve("spinbench")


def test_spinbench_source_resolves_to_the_shipped_folder(built, monkeypatch):
    out, _ = built
    assert source.spinbench_weights_dir().endswith(os.path.join("spinbench", "weights"))
    monkeypatch.setattr(source, "spinbench_weights_dir", lambda: out)
    assert source.resolve("spinbench") == out
    assert source.resolve_controlnet("spinbench") == os.path.join(out, "controlnet")


def test_state_fidelity_scores_txt2img_and_controlnet_samples_with_a_public_judge(built):
    from spinbench.fidelity import fidelity, markdown
    from spinbench.world import STATES

    out, _ = built
    result = fidelity(out, per_state=1, steps=2, judge_images=8, judge_epochs=1)
    for name in ("public held-out (the judge)", "txt2img", "controlnet (dog edges)"):
        row = result[name]
        assert 0.0 <= row["accuracy"] <= 1.0 and set(row["per_state"]) == set(STATES)
        # one image per state: each state's accuracy is 0 or 1, and the overall is their mean
        assert all(v in (0.0, 1.0) for v in row["per_state"].values())
        assert row["accuracy"] == pytest.approx(sum(row["per_state"].values()) / len(STATES))
    table = markdown(result)
    assert table.count("\n|") == 4 and "controlnet (dog edges)" in table and "Chance: 0.25" in table
