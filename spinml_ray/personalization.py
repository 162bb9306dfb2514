"""DreamBooth-LoRA personalization of the diffusion model on a user's released (L2) target crops.

Plain PyTorch + diffusers + peft, no Ray: `train_adapter` is the whole training (resume, checkpoints,
the adapter's files) as a function a unit test runs in one process; `ray_layer/personalize.py` runs it
inside Ray Train workers. The recipe follows DreamBooth's published practice,
as LoRA: an identifier token ("sks") before the class noun, LoRA on the UNet's attention projections
(optionally the text encoder's), the epsilon-prediction MSE loss, and a prior-preservation loss on
images of the plain class made by the base model, weighted by `prior_loss_weight`.

Input is only what the bundle released at L2: the target's pixels on black, cropped to its region.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from PIL import Image

from spinml_ray import storage
from spinml_ray.images import decode_png, encode_png
from spinml_ray.synthesis.engine import ADAPTER_CONFIG, FULL_UNET, LORA_WEIGHTS, adapter_kind  # noqa: F401
from spinml_ray.training import resume
from spinml_ray.training.loop import Workers, unwrapped

UNET_TARGETS = ["to_k", "to_q", "to_v", "to_out.0"]
TEXT_TARGETS = ["q_proj", "k_proj", "v_proj", "out_proj"]
STATE_FILE = "lora_state.pt"


def adapter_files(method: str) -> list[str]:
    """What a committed adapter folder holds: the LoRA weights, or (`full`) the whole UNet's folder."""
    return [FULL_UNET if method == "full" else LORA_WEIGHTS, ADAPTER_CONFIG]


def adapter_method(files: list[str]) -> str | None:
    """"lora" or "full" for a committed adapter's file list (its manifest's `files`), else None."""
    return "full" if FULL_UNET in files else "lora" if LORA_WEIGHTS in files else None


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
        self.full = settings.get("method", "lora") == "full"
        if self.full:  # DreamBooth as published: every UNet weight trains (the text encoder stays frozen)
            self.unet.requires_grad_(True)
        else:
            self.unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian",
                                             target_modules=UNET_TARGETS))
        if settings["train_text_encoder"] and not self.full:  # peft directly: transformers' own add_adapter wants peft >= 0.22
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
        modules = [self.unet] + ([self.text_encoder] if self.settings["train_text_encoder"] and not self.full else [])
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
        """What training changed: the LoRA weights, or (`full`) the whole UNet's state dict."""
        from peft.utils import get_peft_model_state_dict

        if self.full:
            return {"unet_full": {k: v.detach().clone() for k, v in self.unet.state_dict().items()}}
        state = {"unet": get_peft_model_state_dict(self.unet)}
        if self.settings["train_text_encoder"]:
            state["text_encoder"] = get_peft_model_state_dict(self.text_encoder)
        return state

    def load_lora_state(self, state: dict) -> None:
        from peft.utils import set_peft_model_state_dict

        if "unet_full" in state:
            self.unet.load_state_dict(state["unet_full"])
            return
        set_peft_model_state_dict(self.unet, state["unet"])
        if "text_encoder" in state:
            set_peft_model_state_dict(self.text_encoder, state["text_encoder"])

    def save_adapter(self, out_dir: str) -> None:
        """diffusers' `save_lora_weights` layout (or, `full`, the UNet's `save_pretrained` folder `unet/`),
        plus `adapter.json` (token, class noun, method, settings)."""
        if self.full:
            self.unet.save_pretrained(os.path.join(out_dir, FULL_UNET))
        else:
            self._save_lora(out_dir)
        with open(os.path.join(out_dir, ADAPTER_CONFIG), "w") as handle:
            json.dump({"token": self.settings["token"], "class_noun": self.settings["class_noun"],
                       "method": "full" if self.full else "lora", "steps": self.step, "settings": self.settings},
                      handle, indent=2, sort_keys=True)

    def _save_lora(self, out_dir: str) -> None:
        from diffusers import StableDiffusionPipeline
        from diffusers.utils import convert_state_dict_to_diffusers

        state = self.lora_state()
        StableDiffusionPipeline.save_lora_weights(
            out_dir,
            unet_lora_layers=convert_state_dict_to_diffusers(state["unet"]),
            text_encoder_lora_layers=convert_state_dict_to_diffusers(state["text_encoder"]) if "text_encoder" in state else None,
            safe_serialization=True,
        )


@torch.no_grad()
def adapter_losses(model_dir: str, adapter_dir: str, images: list[bytes], draws: int = 8, seed: int = 0,
                   device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(base, adapted): per image, the mean diffusion loss over `draws` fixed (noise, timestep) pairs,
    under the base model and with the adapter loaded, prompted with the adapter's "a photo of {token}
    {class}". Images are prepared as in training (the crop padded to a square, at the adapter's
    resolution). What a membership-inference attack on the adapter scores: its training crops should
    lose more of their loss to the adapter than held-out images of the same subject."""
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    with open(os.path.join(adapter_dir, ADAPTER_CONFIG)) as handle:
        config = json.load(handle)
    size = config["settings"]["resolution"]
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, safety_checker=None, requires_safety_checker=False)
    pipe.to(device)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    ids = pipe.tokenizer(f"a photo of {config['token']} {config['class_noun']}", padding="max_length",
                         max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt").input_ids
    pixels = torch.stack([augment(image, size, np.random.default_rng([seed, i])) for i, image in enumerate(images)])
    generator = torch.Generator("cpu").manual_seed(seed)
    latents = pipe.vae.encode(pixels.to(device)).latent_dist.mean * pipe.vae.config.scaling_factor
    noise = torch.randn((draws, *latents.shape), generator=generator).to(device)
    steps = torch.randint(0, scheduler.config.num_train_timesteps, (draws, len(images)), generator=generator).to(device)

    def mean_losses() -> np.ndarray:
        context = pipe.text_encoder(ids.to(device).expand(len(images), -1))[0]
        total = torch.zeros(len(images), device=device)
        for k in range(draws):
            noisy = scheduler.add_noise(latents, noise[k], steps[k])
            prediction = pipe.unet(noisy, steps[k], encoder_hidden_states=context).sample
            total += ((prediction.float() - noise[k].float()) ** 2).mean(dim=(1, 2, 3))
        return (total / draws).cpu().numpy()

    base = mean_losses()
    if adapter_kind(adapter_dir) == "full":  # the engine's rule, so both load the same model
        from diffusers import UNet2DConditionModel

        pipe.unet = UNet2DConditionModel.from_pretrained(os.path.join(adapter_dir, FULL_UNET)).to(device)
    else:
        pipe.load_lora_weights(adapter_dir)
    return base, mean_losses()


@dataclass(frozen=True)
class AdapterJob:
    """One request's adapter training. Its identity (what a stored state must match to be resumed) is
    `settings` and the inputs; the rest belongs to one run."""

    model: str  # the model source
    settings: dict  # `ray_layer.personalize.settings_for`: the request's personalization settings
    instance: list[bytes]  # the released L2 target crops
    class_images: list[bytes]  # prior-preservation images of the plain class
    out: str  # where the adapter's files go
    state_uri: str  # the newest training state, for resuming
    progress: Callable[[int, int], None] | None = None  # (done, total) steps, called on rank 0
    fault: resume.Fault | None = None  # fault injection for resilience tests

    def key(self) -> str:
        return resume.state_key(self.settings, *self.instance, *self.class_images)


def train_adapter(job: AdapterJob, workers: Workers = Workers()) -> dict:
    """LoRA steps from the job's stored state, a checkpoint every `checkpoint_every` steps (reported
    through `workers.report`, also kept at `job.state_uri`); rank 0 writes the adapter to `job.out` at the
    end. Reported metrics: step, loss, initial and (last) final loss, the step resumed from, steps/s;
returns the last of them."""
    from spinml_ray.models.source import resolve

    settings = job.settings
    trainer = LoraTrainer(resolve(job.model), {**settings, "seed": settings["seed"] + workers.rank},
                          job.instance, job.class_images, device=workers.device)
    if workers.world_size > 1:
        trainer.unet = workers.prepare_model(trainer.unet, move_to_device=False)
    optimizer = torch.optim.AdamW(trainer.trainable(), lr=settings["learning_rate"])
    initial_loss, resumed_from = None, 0
    state = resume.latest_state(job.state_uri, job.key(), workers.device, workers.checkpoint)
    if state:
        original, trainer.unet = trainer.unet, unwrapped(trainer.unet)
        trainer.load_lora_state(state["lora"])
        trainer.unet = original
        optimizer.load_state_dict(state["optimizer"])
        trainer.step = resumed_from = state["step"]
        trainer.rng.bit_generator.state = state["rng"]
        trainer.generator.set_state(state["generator"])
        initial_loss = state["initial_loss"]
    if initial_loss is None:
        initial_loss = trainer.fixed_loss()
    started, first_step, metrics = time.perf_counter(), trainer.step, {}
    while trainer.step < settings["steps"]:
        resume.die_if_armed(job.fault, trainer.step, workers.rank)
        loss = trainer.train_step(optimizer)
        last = trainer.step == settings["steps"]
        if workers.rank == 0 and job.progress is not None:
            job.progress(trainer.step, settings["steps"])
        if trainer.step % settings["checkpoint_every"] and not last:
            continue
        metrics = {"step": trainer.step, "loss": loss, "initial_loss": initial_loss, "resumed_from": resumed_from}
        saved = None
        if workers.rank == 0:
            plain_unet, trainer.unet = trainer.unet, unwrapped(trainer.unet)
            if last:
                metrics["steps_per_s"] = (trainer.step - first_step) / (time.perf_counter() - started)
                metrics["final_loss"] = trainer.fixed_loss()
                with tempfile.TemporaryDirectory() as tmp:
                    trainer.save_adapter(tmp)
                    storage.upload_dir(tmp, job.out)
            saved = resume.save_state({"lora": trainer.lora_state(), "optimizer": optimizer.state_dict(),
                                       "step": trainer.step, "rng": trainer.rng.bit_generator.state,
                                       "generator": trainer.generator.get_state(), "initial_loss": initial_loss},
                                      job.key(), job.state_uri)
            trainer.unet = plain_unet
        if workers.report is not None:
            workers.report(metrics, saved and {STATE_FILE: saved})
    return metrics
