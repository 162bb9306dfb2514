"""The built-in `tiny` preset: Stable Diffusion 1.x's architecture, shrunk, with random weights.

Same classes and layout as the real model (UNet2DConditionModel, AutoencoderKL with an 8x latent
downsampling, CLIPTextModel with the real 49,408-token CLIP tokenizer, a ControlNet cut from the UNet,
a scaled-linear scheduler) and a tiny SAM in `sam/`, saved in diffusers' own directory layout so that it is loaded by exactly
the code path that loads a real checkpoint. It runs in milliseconds per step on a CPU; its images are
noise-like, which is all tests, CI and the offline demo need.
"""

from __future__ import annotations

import json
import os

import torch

from spinml_ray.models.tokenizer import write_clip_tokenizer
from spinml_ray.segmentation import SAM_CONFIG, build_tiny_sam

TINY_VERSION = "tiny-sd1-v3"


def write_tiny_sam(out_dir: str, seed: int = 0) -> str:
    """The preset's SAM (`segmentation.build_tiny_sam`, random weights from `seed`) as a SAM folder in `out_dir`."""
    torch.manual_seed(seed)
    os.makedirs(out_dir, exist_ok=True)
    torch.save(build_tiny_sam().state_dict(), os.path.join(out_dir, "sam_tiny.pth"))
    with open(os.path.join(out_dir, SAM_CONFIG), "w") as handle:
        json.dump({"arch": "tiny", "checkpoint": "sam_tiny.pth"}, handle)
    return out_dir


def write_tiny_encoder(out_dir: str, seed: int = 0) -> str:
    """The preset's image encoder: a CLIP vision tower with a projection (random weights from `seed`)
    and its image processor, in transformers' layout, as a model source's `encoders/` folder."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                              num_attention_heads=4, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(out_dir)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(out_dir)
    return out_dir


def build_tiny_pipeline(out_dir: str, seed: int = 0) -> str:
    """Build the tiny preset and save it to `out_dir` (diffusers layout, ControlNet in `controlnet/`)."""
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=8,
        norm_num_groups=16,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(16, 16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=8,
        sample_size=64,
    )
    text_config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        projection_dim=32,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    text_encoder = CLIPTextModel(text_config)
    tokenizer_dir = write_clip_tokenizer(os.path.join(out_dir, "tokenizer"))
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    if len(tokenizer) <= 2:
        raise RuntimeError(f"{tokenizer_dir}: tokenizer loaded without its vocabulary")
    scheduler = PNDMScheduler(
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        num_train_timesteps=1000,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(out_dir)
    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 16, 16, 32))
    # A trained ControlNet starts from zero convolutions and learns them; random ones make the
    # conditioning visibly steer the tiny model's output, which is what tests need to observe.
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            torch.nn.init.normal_(conv.weight, std=0.2)
    controlnet.save_pretrained(os.path.join(out_dir, "controlnet"))
    write_tiny_sam(os.path.join(out_dir, "sam"), seed=seed)
    return out_dir
