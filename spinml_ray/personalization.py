"""DreamBooth-LoRA personalization of the diffusion model on a user's released (L2) target crops.

Plain PyTorch + diffusers + peft, no Ray: `stages/personalize.py` runs `LoraTrainer` inside Ray Train
workers; the benchmark runs it in one process. The recipe follows DreamBooth's published practice,
as LoRA: an identifier token ("sks") before the class noun, LoRA on the UNet's attention projections
(optionally the text encoder's), the epsilon-prediction MSE loss, and a prior-preservation loss on
images of the plain class made by the base model, weighted by `prior_loss_weight`.

Input is only what the bundle released at L2: the target's pixels on black, cropped to its region.
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import torch
from PIL import Image

from spinml_ray.images import decode_png, encode_png

ADAPTER_CONFIG = "adapter.json"
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]


def target_crops(rows: list[dict]) -> list[bytes]:
    """PNG crops of every released L2 target: its pixels on black, cut to its region's bounding box."""
    crops = []
    for row in rows:
        if row["object"] != "target" or row["level"] != "L2" or row["payload"] is None:
            continue
        pixels, region = decode_png(row["payload"]), decode_png(row["region"]) > 0
        ys, xs = np.nonzero(region)
        crops.append(encode_png(pixels[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]))
    return crops


def augment(crop: bytes, size: int, rng: np.random.Generator) -> torch.Tensor:
    """3 x size x size in [-1, 1]: random scale (0.8-1.0 of the padded square), position and flip."""
    image = Image.open(io.BytesIO(crop)).convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    scale = rng.uniform(0.8, 1.0)
    window = max(1, int(side * scale))
    x0, y0 = (int(rng.integers(0, side - window + 1)) for _ in range(2))
    image = square.crop((x0, y0, x0 + window, y0 + window)).resize((size, size), Image.BICUBIC)
    if rng.random() < 0.5:
        image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    array = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0)
    return array.permute(2, 0, 1)


class LoraTrainer:
    """LoRA on a Stable Diffusion pipeline's UNet (and optionally text encoder), one step at a time."""

    def __init__(self, model_dir: str, settings: dict, instance: list[bytes], class_images: list[bytes],
                 device: str = "cpu"):
        from diffusers import DDPMScheduler, StableDiffusionPipeline
        from peft import LoraConfig

        self.settings, self.device = settings, device
        pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
        self.unet, self.vae, self.text_encoder, self.tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
        self.noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for module in (self.unet, self.vae, self.text_encoder):
            module.requires_grad_(False)
            module.to(device)
        rank = settings["rank"]
        self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=UNET_TARGETS))
        if settings["train_text_encoder"]:  # peft directly: transformers' own add_adapter wants peft >= 0.22
            from peft import inject_adapter_in_model

            self.text_encoder = inject_adapter_in_model(
                LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=TEXT_TARGETS),
                self.text_encoder,
            )
        self.instance, self.class_images = instance, class_images
        self.size = settings["resolution"]
        self.rng = np.random.default_rng(settings["seed"])
        self.generator = torch.Generator("cpu").manual_seed(settings["seed"])
        self.instance_ids = self._ids(f"a photo of {settings['token']} {settings['class_noun']}")
        self.class_ids = self._ids(f"a photo of {settings['class_noun']}")
        self.step = 0

    def _ids(self, prompt: str) -> torch.Tensor:
        return self.tokenizer(prompt, padding="max_length", max_length=self.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids.to(self.device)

    def trainable(self) -> list[torch.nn.Parameter]:
        modules = [self.unet] + ([self.text_encoder] if self.settings["train_text_encoder"] else [])
        return [p for m in modules for p in m.parameters() if p.requires_grad]

    def _batch(self, images: list[bytes], n: int) -> torch.Tensor:
        picks = self.rng.integers(0, len(images), n)
        return torch.stack([augment(images[i], self.size, self.rng) for i in picks]).to(self.device)

    def loss(self, pixels: torch.Tensor, ids: torch.Tensor, noise: torch.Tensor | None = None,
             timesteps: torch.Tensor | None = None) -> torch.Tensor:
        """Epsilon-prediction MSE of the UNet on `pixels` with prompt `ids` (noise/timesteps drawn if not given)."""
        latents = self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor
        if noise is None:
            noise = torch.randn(latents.shape, generator=self.generator).to(self.device)
        if timesteps is None:
            high = self.noise_scheduler.config.num_train_timesteps
            timesteps = torch.randint(0, high, (latents.shape[0],), generator=self.generator).to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        context = self.text_encoder(ids.expand(latents.shape[0], -1))[0]
        prediction = self.unet(noisy, timesteps, encoder_hidden_states=context).sample
        return torch.nn.functional.mse_loss(prediction.float(), noise.float())

    def train_step(self, optimizer) -> float:
        self.unet.train()
        batch = self.settings["batch_size"]
        loss = self.loss(self._batch(self.instance, batch), self.instance_ids)
        if self.settings["prior_preservation"] and self.class_images:
            loss = loss + self.settings["prior_loss_weight"] * self.loss(self._batch(self.class_images, batch), self.class_ids)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        self.step += 1
        return loss.item()

    @torch.no_grad()
    def fixed_loss(self, seed: int = 1234) -> float:
        """Loss on the un-augmented instance crops with fixed noise and timesteps: comparable across steps."""
        self.unet.eval()
        rng = np.random.default_rng(seed)
        pixels = torch.stack([augment(c, self.size, rng) for c in self.instance]).to(self.device)
        generator = torch.Generator("cpu").manual_seed(seed)
        shape = self.vae.encode(pixels).latent_dist.mean.shape
        noise = torch.randn(shape, generator=generator).to(self.device)
        timesteps = torch.linspace(100, 900, len(pixels)).long().to(self.device)
        return self.loss(pixels, self.instance_ids, noise, timesteps).item()

    def lora_state(self) -> dict:
        from peft.utils import get_peft_model_state_dict

        state = {"unet": get_peft_model_state_dict(self.unet)}
        if self.settings["train_text_encoder"]:
            state["text_encoder"] = get_peft_model_state_dict(self.text_encoder)
        return state

    def load_lora_state(self, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        set_peft_model_state_dict(self.unet, state["unet"])
        if "text_encoder" in state:
            set_peft_model_state_dict(self.text_encoder, state["text_encoder"])

    def save_adapter(self, out_dir: str) -> None:
        """diffusers' `save_lora_weights` layout, plus `adapter.json` (token, class noun, settings)."""
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        state = self.lora_state()
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(state["unet"]),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(state["text_encoder"]) if "text_encoder" in state else None,
            safe_serialization=True,
        )
        with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as handle:
            json.dump({"token": self.settings["token"], "class_noun": self.settings["class_noun"],
                       "steps": self.step, "settings": self.settings}, handle, indent=2, sort_keys=True)
