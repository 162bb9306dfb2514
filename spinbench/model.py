"""The `spinbench` diffusion model: Stable Diffusion 1.x's components, small, trained on the public corpus.

`python -m spinbench.model build --out spinbench/weights` (or `make spinbench-model`) draws the public
corpus of `spinbench.world` and trains, from scratch and deterministically by seed, the same component
classes as Stable Diffusion 1.x, saved in diffusers' layout so that the service loads it through the
code path that loads a real checkpoint (`StableDiffusionPipeline.from_pretrained(dir)`,
`ControlNetModel.from_pretrained(dir/controlnet)`):

1. **VAE** (`AutoencoderKL`, 32/64 channels, 2 resolution levels: 64 px images <-> 32x32x4 latents,
   so `vae_scale_factor` is 2, where SD's is 8). Two earlier builds used 4x downsampling (16x16
   latents, 4 and then 8 channels): their decoders turned any small error in a latent into a flat
   4x4 block, and their samples were patchworks of such blocks. The 2x VAE reconstructs better after
   600 steps (MSE 0.006) than the 4x one after 1000 (0.011), and a perturbed latent decodes to grain,
   not blocks. Loss: L1 + MSE of the reconstruction plus a small KL term; the first 75% of its steps
   see 32 px crops (on the 2 px latent grid, 4 per image's cost), the rest whole 64 px images. Its
   `scaling_factor` is 1 / std of the corpus's latents, as SD sets it.
2. **Text encoder** (`CLIPTextModel`, hidden 64, 3 layers) with the real CLIP tokenizer, trained
   with the UNet on the corpus captions (it starts from random weights: freezing it would
   leave the UNet random, unrelated token features to read).
3. **UNet** (`UNet2DConditionModel`, 32/64/96/128 channels at 32/16/8/4 latent px, cross-attention
   to the caption at 8 and 4 px; the caption, pooled by attention, also joins the timestep embedding
   that every ResNet block reads: diffusers' `addition_embed_type="text"`, so the state word steers
   the whole image and not only the two coarsest levels). Epsilon prediction under SD's DDPM schedule (scaled-linear betas
   0.00085-0.012, 1000 steps), Min-SNR-5 loss weighting, EMA of the weights, 10% empty captions so that
   classifier-free guidance works. Captions are varied (appearance or room words dropped, or the
   service's view/lighting/setting words appended, as `spinml_ray.synthesis.prompts` writes them) so
   the model follows the short prompts the system sends.
4. **ControlNet** (`ControlNetModel.from_unet`, conditioning embedding 16/32: 2x down to the
   latents), trained *together with* the UNet and text encoder: every other step of their phase adds
   its residuals, conditioned on Canny edge maps as 3-channel images (per sample the dog's edges, the
   room's edges or both merged: the three L1 conditionings), with half the captions empty (as the
   ControlNet paper does) so that it learns to read the edges. The other steps train the UNet alone,
   which is what txt2img and img2img use. (A ControlNet trained afterwards against the frozen UNet
   had not begun to follow its edges after 900 steps, all an hour of this CPU left for it.)

The scheduler saved is SD 1.x's own (PNDM config, scaled-linear, `steps_offset=1`,
`set_alpha_to_one=False`); the service makes DPM-Solver++ (and DDIM, Euler, ...) `from_config` of it.
Weights are stored in float16 (the folder stays under 30 MB) and load as float32: diffusers upcasts
when asked for float32, and the text encoder's config names float32 so transformers' "auto" dtype
upcasts it even when no dtype is given (e.g. the personalization trainer's `from_pretrained`).

Choices measured on the 2-core CPU this is built on:
- Self-attention over 16x16 latents (256 tokens) with 8-wide heads cost more than every convolution
  of an earlier, 16x16-latent UNet (SDPA on CPU), so attention lives at 8x8 and 4x4 only, and the top
  level has 32 channels. A UNet step (batch 32, 32x32 latents, with the text encoder) takes about 0.35 s
  alone and 0.55 s with the ControlNet at 2 threads. Fused AdamW saves ~80 ms a step over the default.
- The VAE's full-resolution decoder level dominates its cost (about 0.2 s per step of 8 images or 32
  crops), which is why its phase is short and mostly on crops.
- Training latents are encoded once after the VAE phase (posterior mean and std, sampled each step),
  so the UNet phase never runs the encoder. No flip augmentation: the world already
  draws each dog facing left or right.
- Corpus: 6000 images (a few seconds to draw with their edge maps). The UNet phase sees 192,000
  samples, so each image about 32 times.
- Defaults (600 VAE steps, 6000 UNet steps of which 3000 with the ControlNet) took 48.4 minutes with
  2 threads on that CPU (0.24 s per VAE step, 0.45 s per UNet step); the build prints its measured
  rate and ETA every `log_every` steps. (The third build, 2400 UNet steps, was timed at 1.12 s per step
  while other work shared the two cores; alone the same UNet runs at the rate above.)

A build is deterministic for a given seed, recipe, thread count and library versions (each phase
draws from its own generators, seeded from the build seed); `first_losses` replays the first steps.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

LATENT_CHANNELS = 4
TEXT_HIDDEN = 64
TEXT_POOL_HEADS = 4
MAX_TOKENS = 77
NUM_TRAIN_TIMESTEPS = 1000
BETA_START, BETA_END = 0.00085, 0.012
PHASES = ("vae", "unet")
# loss series: the VAE, the UNet alone (even steps of its phase), the UNet with the ControlNet (odd steps)
LOSSES = ("vae", "unet", "controlnet")
# CPU seconds per step on the build machine (batch sizes of `Recipe`), used only for the ETA of the phases
# not yet started: scaled by how fast the current phase runs against its own reference.
REFERENCE_SECONDS_PER_STEP = {"vae": 0.42, "unet": 0.88}


@dataclass
class Recipe:
    """Everything a build depends on besides the code: same recipe and seed, same weights."""

    seed: int = 0
    corpus_size: int = 6000
    vae_steps: int = 600
    unet_steps: int = 6000  # half of them with the ControlNet
    vae_batch_size: int = 8  # full images; the crop steps take 4x as many 32 px crops (same cost)
    vae_crop_fraction: float = 0.75  # the first 75% of VAE steps train on 32 px crops, the rest on 64 px
    batch_size: int = 32  # UNet (and ControlNet) phase
    vae_lr: float = 6e-4
    unet_lr: float = 4e-4
    kl_weight: float = 1e-3  # times the KL per latent element (reconstruction losses are per pixel means)
    vae_logvar_init: float = -6.0  # posterior log-variance the encoder starts from (std 0.05, not 1)
    vae_recolour_fraction: float = 0.5  # of the VAE's images, recoloured (hue, saturation, channel order)
    caption_dropout: float = 0.1
    controlnet_caption_dropout: float = 0.5  # ControlNet paper: half the prompts empty, so edges are read
    min_snr_gamma: float = 5.0
    ema_decay: float = 0.999
    warmup_steps: int = 100
    grad_clip: float = 1.0
    log_every: int = 50


# ------------------------------------------------------------------------------------------------
# components


def make_vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=(32, 64),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        layers_per_block=1,
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=16,
        sample_size=64,
    )


def make_text_encoder():
    from transformers import CLIPTextConfig, CLIPTextModel

    from spinml_ray.models.tokenizer import VOCAB_SIZE

    config = CLIPTextConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=4 * TEXT_HIDDEN,
        num_hidden_layers=3,
        num_attention_heads=4,
        max_position_embeddings=MAX_TOKENS,
        projection_dim=TEXT_HIDDEN,
        bos_token_id=49406,
        eos_token_id=49407,
        pad_token_id=49407,
    )
    return CLIPTextModel(config)


def make_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        sample_size=32,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        block_out_channels=(32, 64, 96, 128),
        layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_HIDDEN,
        attention_head_dim=(1, 2, 3, 4),  # diffusers reads this as the number of heads: 32 wide each
        norm_num_groups=8,
        # the caption, pooled, also joins the timestep embedding that every ResNet block reads
        addition_embed_type="text",
        addition_embed_type_num_heads=TEXT_POOL_HEADS,
    )


def make_controlnet(unet):
    from diffusers import ControlNetModel

    copied = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
    # `from_unet` leaves the caption pooling's head count at its default (64): rebuild it with the UNet's,
    # the same weights split into other heads (`from_config` drops that key, so the constructor is called)
    config = {k: v for k, v in copied.config.items() if not k.startswith("_")}
    controlnet = ControlNetModel(**{**config, "addition_embed_type_num_heads": TEXT_POOL_HEADS})
    controlnet.load_state_dict(copied.state_dict())
    return controlnet


def make_scheduler():
    from diffusers import PNDMScheduler

    return PNDMScheduler(
        beta_start=BETA_START,
        beta_end=BETA_END,
        beta_schedule="scaled_linear",
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        skip_prk_steps=True,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def load_tokenizer(directory: str):
    from transformers import CLIPTokenizer

    from spinml_ray.models.tokenizer import write_clip_tokenizer

    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(directory, max_length=MAX_TOKENS))
    if len(tokenizer) <= 2:
        raise RuntimeError(f"{directory}: CLIP tokenizer loaded without its vocabulary")
    return tokenizer


def n_params(module) -> int:
    return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------------------------------
# data


@dataclass
class Corpus:
    images: np.ndarray  # N x 64 x 64 x 3 uint8
    target_edges: np.ndarray  # N x 64 x 64 uint8 0/255
    background_edges: np.ndarray  # N x 64 x 64 uint8 0/255
    captions: list[tuple[str, ...]]  # per sample: full, without room, without appearance, bare

    def __len__(self) -> int:
        return len(self.images)


def make_corpus(n: int, seed: int) -> Corpus:
    from spinbench.world import STATE_PHRASES, SUBJECT, prompt_for, public_corpus

    samples = public_corpus(n, seed=seed)
    captions = []
    for s in samples:
        phrase = STATE_PHRASES[s.state]
        captions.append((
            s.caption,
            f"a photo of a {s.appearance.words} {SUBJECT} {phrase}",
            f"a photo of a {SUBJECT} {phrase} in a {s.room.words} room",
            prompt_for(s.state),
        ))
    return Corpus(
        images=np.stack([s.image for s in samples]),
        target_edges=np.stack([s.target_edges for s in samples]),
        background_edges=np.stack([s.background_edges for s in samples]),
        captions=captions,
    )


class Captions:
    """Draws a training caption per sample: empty with p = dropout, else a variant of its caption, a
    third of the time followed by the service's view/lighting(/setting) words."""

    VARIANT_WEIGHTS = np.array([0.55, 0.15, 0.15, 0.15])

    def __init__(self, corpus: Corpus, tokenizer):
        from spinml_ray.synthesis import prompts

        self.corpus, self.tokenizer, self._ids = corpus, tokenizer, {}
        self.views, self.lighting, self.settings = prompts.VIEWS, prompts.LIGHTING, prompts.SETTINGS

    def draw(self, index: int, dropout: float, rng: np.random.Generator) -> str:
        if rng.random() < dropout:
            return ""
        caption = self.corpus.captions[index][int(rng.choice(4, p=self.VARIANT_WEIGHTS))]
        if rng.random() < 1 / 3:
            extra = [self.views[rng.integers(len(self.views))], self.lighting[rng.integers(len(self.lighting))]]
            if rng.random() < 0.5:
                extra.append(self.settings[rng.integers(len(self.settings))])
            caption = ", ".join([caption, *extra]) + "."
        return caption

    def ids(self, captions: list[str]) -> torch.Tensor:
        rows = []
        for caption in captions:
            if caption not in self._ids:
                self._ids[caption] = self.tokenizer(
                    caption, padding="max_length", max_length=MAX_TOKENS, truncation=True, return_tensors="pt"
                ).input_ids[0]
            rows.append(self._ids[caption])
        return torch.stack(rows)


def _pixels(images: np.ndarray, flip: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 -> float N x 3 x H x W in [-1, 1], horizontally flipped where `flip`."""
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    if flip.any():
        x[torch.from_numpy(flip)] = x[torch.from_numpy(flip)].flip(-1)
    return x.contiguous()


def recolour(images: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Each image with its hue turned at random, its saturation raised up to 3x and its channels
    shuffled: colours the public corpus never shows (uint8 N x H x W x 3 in, same out)."""
    from skimage.color import hsv2rgb, rgb2hsv

    hsv = rgb2hsv(images)
    hsv[..., 0] = (hsv[..., 0] + rng.random((len(images), 1, 1))) % 1.0
    hsv[..., 1] = np.clip(hsv[..., 1] * rng.uniform(1.0, 3.0, (len(images), 1, 1)), 0.0, 1.0)
    out = (hsv2rgb(hsv) * 255 + 0.5).astype(np.uint8)
    return np.stack([image[..., rng.permutation(3)] for image in out])


def _edges(corpus: Corpus, index: np.ndarray, kind: np.ndarray) -> torch.Tensor:
    """The conditioning image per sample: 0 dog edges, 1 room edges, 2 both; 3 channels in [0, 1]."""
    target, background = corpus.target_edges[index], corpus.background_edges[index]
    edges = np.where((kind == 0)[:, None, None], target,
                     np.where((kind == 1)[:, None, None], background, np.maximum(target, background)))
    x = torch.from_numpy(edges).float().div(255.0)
    return x[:, None].expand(-1, 3, -1, -1).contiguous()


# ------------------------------------------------------------------------------------------------
# training helpers


def _lr_lambda(steps: int, warmup: int):
    warmup = max(1, min(warmup, steps // 10))

    def factor(step: int) -> float:  # linear warm-up, then cosine to 10%
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


class Ema:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float):
        self.params, self.decay = params, decay
        self.shadow = [p.detach().clone() for p in params]
        self.updates = 0

    @torch.no_grad()
    def update(self) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        torch._foreach_lerp_(self.shadow, [p.detach() for p in self.params], 1.0 - decay)

    @torch.no_grad()
    def copy_to_params(self) -> None:
        for shadow, p in zip(self.shadow, self.params):
            p.copy_(shadow)


class Progress:
    def __init__(self, phase: str, steps: int, later: dict[str, int], log_every: int, quiet: bool):
        self.phase, self.steps, self.later, self.log_every, self.quiet = phase, steps, later, log_every, quiet
        self.start, self.cpu_start = time.time(), time.process_time()
        self.window: list[float] = []

    def step(self, step: int, loss: float) -> None:
        self.window.append(loss)
        done = step + 1
        if self.quiet or (done % self.log_every and done != self.steps):
            return
        elapsed = time.time() - self.start
        rate = elapsed / done
        left = rate * (self.steps - done)
        speed = rate / REFERENCE_SECONDS_PER_STEP[self.phase]
        later = sum(n * REFERENCE_SECONDS_PER_STEP[p] * speed for p, n in self.later.items())
        cpu = (time.process_time() - self.cpu_start) / done
        print(f"[{self.phase}] step {done}/{self.steps} loss {np.mean(self.window):.4f} "
              f"({rate:.2f} s/step, {cpu:.2f} CPU s/step; phase ETA {left / 60:.1f} min, "
              f"build ETA {(left + later) / 60:.1f} min)", flush=True)
        self.window = []


def _final(losses: list[float], last: int = 50) -> float | None:
    return float(np.mean(losses[-last:])) if losses else None


class Trainer:
    """The two training phases of a build, in order; every random draw comes from `recipe.seed`."""

    def __init__(self, recipe: Recipe, corpus: Corpus, tokenizer, quiet: bool = False, stop_after: int | None = None,
                 device: str = "cpu"):
        from diffusers import DDPMScheduler

        self.recipe, self.corpus, self.tokenizer, self.quiet = recipe, corpus, tokenizer, quiet
        # Every random draw is made on the CPU, from the phase's generators, and then moved: the same seed
        # draws the same batches and noise on any device (the arithmetic still differs between devices).
        self.device = torch.device(device)
        self.stop_after = stop_after  # steps per phase, to replay a build's first steps
        self.captions = Captions(corpus, tokenizer)
        self.noise_scheduler = DDPMScheduler(beta_start=BETA_START, beta_end=BETA_END,
                                             beta_schedule="scaled_linear", num_train_timesteps=NUM_TRAIN_TIMESTEPS)
        alphas = self.noise_scheduler.alphas_cumprod
        self.snr = alphas / (1.0 - alphas)
        self.losses: dict[str, list[float]] = {p: [] for p in LOSSES}
        self.seconds: dict[str, float] = {}
        self.latent_stats: dict[str, float] = {}

    # phase seeds: independent streams per phase, all from the build seed
    def _streams(self, phase: int) -> tuple[np.random.Generator, torch.Generator]:
        seed = self.recipe.seed * 1000 + phase
        torch.manual_seed(seed)  # module initialisation
        return np.random.default_rng([self.recipe.seed, phase]), torch.Generator("cpu").manual_seed(seed)

    def _later(self, phase: str) -> dict[str, int]:
        r = self.recipe
        steps = {"vae": r.vae_steps, "unet": r.unet_steps}
        return {p: steps[p] for p in PHASES[PHASES.index(phase) + 1:]}

    def _optimizer(self, groups, lr: float, steps: int):
        # fused: on this CPU a tenth of the for-each implementation's time (~80 ms a UNet step)
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8, fused=True)
        return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(steps, self.recipe.warmup_steps))

    def _apply(self, loss: torch.Tensor, optimizer, schedule, params) -> None:
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, self.recipe.grad_clip)
        optimizer.step()
        schedule.step()

    def _steps(self, steps: int) -> range:
        return range(steps if self.stop_after is None else min(steps, self.stop_after))

    # -- phase 1 ----------------------------------------------------------------------------------
    def train_vae(self):
        r, start = self.recipe, time.time()
        rng, gen = self._streams(1)
        vae = make_vae().to(self.device)
        with torch.no_grad():  # start nearly deterministic: a std-1 posterior would drown the signal
            vae.quant_conv.bias[LATENT_CHANNELS:].fill_(r.vae_logvar_init)
        vae.train()
        params = list(vae.parameters())
        optimizer, schedule = self._optimizer(params, r.vae_lr, r.vae_steps)
        progress = Progress("vae", r.vae_steps, self._later("vae"), r.log_every, self.quiet)
        crop_steps = int(round(r.vae_steps * r.vae_crop_fraction))
        for step in self._steps(r.vae_steps):
            crop = step < crop_steps
            index = rng.integers(0, len(self.corpus), r.vae_batch_size * (4 if crop else 1))
            images = self.corpus.images[index]
            turned = rng.random(len(index)) < r.vae_recolour_fraction
            if turned.any():
                images = images.copy()
                images[turned] = recolour(images[turned], rng)
            x = _pixels(images, rng.random(len(index)) < 0.5)
            if crop:  # a 32 px window per image, on the 2 px latent grid
                y0, x0 = (rng.integers(0, 17, len(index)) * 2 for _ in range(2))
                x = torch.stack([img[:, a:a + 32, b:b + 32] for img, a, b in zip(x, y0, x0)])
            x = x.to(self.device)
            posterior = vae.encode(x).latent_dist
            reconstruction = vae.decode(posterior.sample(generator=gen)).sample
            kl = posterior.kl().mean() / posterior.mean[0].numel()
            loss = F.l1_loss(reconstruction, x) + F.mse_loss(reconstruction, x) + r.kl_weight * kl
            self._apply(loss, optimizer, schedule, params)
            self.losses["vae"].append(loss.item())
            progress.step(step, loss.item())
        vae.eval().requires_grad_(False)
        self.vae = vae
        self.seconds["vae"] = time.time() - start
        start = time.time()
        self._encode_corpus(gen)
        self.seconds["encode"] = time.time() - start
        return vae

    @torch.no_grad()
    def _encode_corpus(self, gen: torch.Generator, chunk: int = 64) -> None:
        """Posterior mean and std of every corpus image, [index, 4, 16, 16]. No flipped copies: the world
        already draws each dog facing left or right."""
        means, stds = [], []
        for i in range(0, len(self.corpus), chunk):
            images = self.corpus.images[i:i + chunk]
            posterior = self.vae.encode(_pixels(images, np.zeros(len(images), bool)).to(self.device)).latent_dist
            means.append(posterior.mean.cpu())
            stds.append(posterior.std.cpu())
        self.latent_mean, self.latent_std = torch.cat(means), torch.cat(stds)
        sample = self.latent_mean + self.latent_std * torch.randn(self.latent_mean.shape, generator=gen)
        std = float(sample.std())
        self.scaling_factor = 1.0 / std
        self.vae.register_to_config(scaling_factor=self.scaling_factor)
        self.latent_stats = {"mean": float(sample.mean()), "std": std, "scaling_factor": self.scaling_factor,
                             "posterior_std_mean": float(self.latent_std.mean())}

    def _latents(self, index: np.ndarray, gen: torch.Generator) -> torch.Tensor:
        i = torch.from_numpy(index)
        mean, std = self.latent_mean[i], self.latent_std[i]
        return (mean + std * torch.randn(mean.shape, generator=gen)) * self.scaling_factor

    def _noised(self, latents: torch.Tensor, gen: torch.Generator):
        noise = torch.randn(latents.shape, generator=gen)
        timesteps = torch.randint(0, NUM_TRAIN_TIMESTEPS, (latents.shape[0],), generator=gen)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        return noisy.to(self.device), noise.to(self.device), timesteps.to(self.device)

    def _loss(self, prediction: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """Epsilon MSE per sample, weighted by min(SNR, gamma) / SNR (Min-SNR weighting)."""
        snr = self.snr.to(timesteps.device)[timesteps]
        weight = torch.clamp(snr, max=self.recipe.min_snr_gamma) / snr
        per_sample = F.mse_loss(prediction.float(), noise.float(), reduction="none").mean(dim=(1, 2, 3))
        return (weight * per_sample).mean()

    # -- phase 2 ----------------------------------------------------------------------------------
    def train_unet(self):
        """The text encoder, UNet and ControlNet together. Every other step sends the batch through the
        ControlNet too (edges of the dog, the room or both), so the UNet learns to denoise alone (L0)
        and to use edge residuals (L1) from the start; a ControlNet trained afterwards against a frozen
        UNet had not begun to follow its edges after 900 steps."""
        r, start = self.recipe, time.time()
        rng, gen = self._streams(2)
        text_encoder, unet = make_text_encoder().to(self.device), make_unet().to(self.device)
        controlnet = make_controlnet(unet).to(self.device)
        for module in (text_encoder, unet, controlnet):
            module.train()
        groups = [{"params": list(unet.parameters()) + list(controlnet.parameters()), "weight_decay": 1e-2},
                  {"params": list(text_encoder.parameters()), "weight_decay": 0.0}]
        params = groups[0]["params"] + groups[1]["params"]
        optimizer, schedule = self._optimizer(groups, r.unet_lr, r.unet_steps)
        ema = Ema(params, r.ema_decay)
        progress = Progress("unet", r.unet_steps, self._later("unet"), r.log_every, self.quiet)
        for step in self._steps(r.unet_steps):
            with_edges = step % 2 == 1
            index = rng.integers(0, len(self.corpus), r.batch_size)
            dropout = r.controlnet_caption_dropout if with_edges else r.caption_dropout
            ids = self.captions.ids([self.captions.draw(int(i), dropout, rng) for i in index]).to(self.device)
            noisy, noise, timesteps = self._noised(self._latents(index, gen), gen)
            context = text_encoder(ids)[0]
            residuals = {}
            if with_edges:
                kind = rng.integers(0, 3, len(index))
                down, mid = controlnet(noisy, timesteps, encoder_hidden_states=context,
                                       controlnet_cond=_edges(self.corpus, index, kind).to(self.device),
                                       return_dict=False)
                residuals = {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}
            prediction = unet(noisy, timesteps, encoder_hidden_states=context, **residuals).sample
            loss = self._loss(prediction, noise, timesteps)
            self._apply(loss, optimizer, schedule, params)
            ema.update()
            self.losses["controlnet" if with_edges else "unet"].append(loss.item())
            progress.step(step, loss.item())
        ema.copy_to_params()
        for module in (text_encoder, unet, controlnet):
            module.eval().requires_grad_(False)
        self.text_encoder, self.unet, self.controlnet = text_encoder, unet, controlnet
        self.seconds["unet"] = time.time() - start
        return text_encoder, unet, controlnet

    def run(self) -> None:
        self.train_vae()
        self.train_unet()


# ------------------------------------------------------------------------------------------------
# build, save, reproduce


def _versions() -> dict[str, str]:
    import diffusers
    import transformers

    return {"python": sys.version.split()[0], "torch": torch.__version__, "diffusers": diffusers.__version__,
            "transformers": transformers.__version__, "numpy": np.__version__}


def _folder_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(root, f)) for root, _, files in os.walk(path) for f in files)


def load_as_float32(config_path: str) -> None:
    """Make a transformers model saved in float16 load as float32: its default dtype ("auto") follows
    the config, so naming float32 there makes it upcast the weights."""
    with open(config_path) as handle:
        config = json.load(handle)
    config["dtype"] = "float32"
    config.pop("torch_dtype", None)
    with open(config_path, "w") as handle:
        json.dump(config, handle, indent=2, sort_keys=True)


@contextlib.contextmanager
def replaced_atomically(out_dir: str):
    """A temporary folder beside `out_dir` to write into; on success it replaces `out_dir` (removed if it
    exists), so a reader never sees half a build; on failure it is removed and `out_dir` is untouched."""
    tmp = f"{os.path.abspath(out_dir)}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        yield tmp
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.rename(tmp, out_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save(trainer: Trainer, out_dir: str, report: dict) -> None:
    """diffusers' layout, weights stored as float16 (loaded as float32 unless asked otherwise)."""
    import copy

    from diffusers import StableDiffusionPipeline

    vae, text_encoder, unet, controlnet = (copy.deepcopy(m).cpu().half() for m in
                                           (trainer.vae, trainer.text_encoder, trainer.unet, trainer.controlnet))
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=trainer.tokenizer, unet=unet,
                                   scheduler=make_scheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(out_dir)
    # the fast tokenizer's own serialization (3.6 MB): CLIPTokenizer rebuilds it from vocab.json and merges.txt
    os.remove(os.path.join(out_dir, "tokenizer", "tokenizer.json"))
    controlnet.save_pretrained(os.path.join(out_dir, "controlnet"))
    load_as_float32(os.path.join(out_dir, "text_encoder", "config.json"))
    report["weights_bytes"] = _folder_bytes(out_dir)
    with open(os.path.join(out_dir, "spinbench.json"), "w") as handle:
        json.dump(report, handle, indent=2, sort_keys=True)


def build(out_dir: str, seed: int = 0, vae_steps: int | None = None, unet_steps: int | None = None,
          batch_size: int | None = None, vae_batch_size: int | None = None,
          corpus_size: int | None = None, threads: int | None = None, log_every: int | None = None,
          quiet: bool = False, device: str = "auto") -> dict:
    """Train the spinbench model from `seed` and save it to `out_dir` (replaced when it exists), on
    `device` ("auto": the first CUDA GPU when there is one, else the CPU).

    Returns the report also written to `out_dir/spinbench.json`."""
    device = ("cuda" if torch.cuda.is_available() else "cpu") if device == "auto" else device
    if threads:
        torch.set_num_threads(threads)
    recipe = Recipe(seed=seed)
    for name, value in dict(vae_steps=vae_steps, unet_steps=unet_steps,
                            batch_size=batch_size, vae_batch_size=vae_batch_size, corpus_size=corpus_size,
                            log_every=log_every).items():
        if value is not None:
            setattr(recipe, name, value)
    start = time.time()
    out_dir = os.path.abspath(out_dir)
    with replaced_atomically(out_dir) as tmp:
        tokenizer = load_tokenizer(os.path.join(tmp, "tokenizer"))
        if not quiet:
            print(f"spinbench model: drawing {recipe.corpus_size} public images (seed {seed}); "
                  f"training on {device}, {torch.get_num_threads()} CPU threads", flush=True)
        corpus = make_corpus(recipe.corpus_size, seed)
        corpus_seconds = time.time() - start
        trainer = Trainer(recipe, corpus, tokenizer, quiet=quiet, device=device)
        trainer.run()
        modules = {"vae": trainer.vae, "text_encoder": trainer.text_encoder, "unet": trainer.unet,
                   "controlnet": trainer.controlnet}
        report = {
            "recipe": asdict(recipe),
            "seed": seed,
            "corpus_size": len(corpus),
            "steps": {"vae": recipe.vae_steps, "unet": recipe.unet_steps},
            "final_losses": {p: _final(trainer.losses[p]) for p in LOSSES},
            "first_losses": {p: trainer.losses[p][:5] for p in LOSSES},
            "params": {name: n_params(m) for name, m in modules.items()},
            "latents": trainer.latent_stats,
            "threads": torch.get_num_threads(),
            "device": torch.cuda.get_device_name(device) if device.startswith("cuda") else device,
            "seconds": {"corpus": corpus_seconds, **trainer.seconds},
            "versions": _versions(),
        }
        report["wall_seconds"] = time.time() - start
        save(trainer, tmp, report)
        # the source's image encoder for SIM and replication, also from the public corpus (spinbench/encoder.py)
        from spinbench.encoder import build as build_encoder

        build_encoder(os.path.join(tmp, "encoders"), seed=seed, quiet=quiet)
    if not quiet:
        print(f"spinbench model saved to {out_dir} ({report['weights_bytes'] / 1e6:.1f} MB, "
              f"{report['wall_seconds'] / 60:.1f} min)", flush=True)
    return report


def first_losses(recipe: Recipe, steps: int = 5) -> dict[str, list[float]]:
    """The first `steps` training losses of every phase under `recipe`, with the learning-rate schedule
    of the recipe's full length, so that a build's recorded `first_losses` replay (nothing saved)."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = load_tokenizer(os.path.join(tmp, "tokenizer"))
    trainer = Trainer(recipe, make_corpus(recipe.corpus_size, recipe.seed), tokenizer, quiet=True, stop_after=steps)
    trainer.run()
    return trainer.losses


# ------------------------------------------------------------------------------------------------
# sample grids


def _grid(rows: list[list[np.ndarray]], scale: int = 2) -> np.ndarray:
    from PIL import Image

    grid = np.concatenate([np.concatenate(row, axis=1) for row in rows], axis=0)
    image = Image.fromarray(grid)
    return np.asarray(image.resize((image.width * scale, image.height * scale), Image.NEAREST))


def pipelines(model_dir: str):
    """(txt2img pipeline, ControlNet pipeline or None) of a saved model, each with DPM-Solver++ made
    `from_config` of the saved scheduler, as the service makes its default."""
    from diffusers import (
        ControlNetModel,
        DPMSolverMultistepScheduler,
        StableDiffusionControlNetPipeline,
        StableDiffusionPipeline,
    )

    pipe = StableDiffusionPipeline.from_pretrained(model_dir, dtype=torch.float32, safety_checker=None,
                                                   requires_safety_checker=False)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)
    control = None
    controlnet_dir = os.path.join(model_dir, "controlnet")
    if os.path.isdir(controlnet_dir):
        net = ControlNetModel.from_pretrained(controlnet_dir, dtype=torch.float32)
        control = StableDiffusionControlNetPipeline(**pipe.components, controlnet=net, requires_safety_checker=False)
        control.set_progress_bar_config(disable=True)
    return pipe, control


def to_uint8(images) -> list[np.ndarray]:
    """A pipeline's float images in [0, 1] ('np' output) as uint8 arrays."""
    return [(np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8) for a in images]


def sample(model_dir: str, out: str, seed: int = 0, per_state: int = 6, steps: int = 20, guidance: float = 5.0,
           references: int = 4) -> list[str]:
    """txt2img grid (a row per state) and ControlNet grid (per held-out image: dog / room / both edges,
    each followed by its image), DPM-Solver++; returns the PNG paths."""
    from PIL import Image

    from spinbench.world import STATES, prompt_for, public_corpus

    pipe, control = pipelines(model_dir)
    rows = []
    for k, state in enumerate(STATES):
        generators = [torch.Generator("cpu").manual_seed(seed * 1000 + k * 100 + j) for j in range(per_state)]
        result = pipe([prompt_for(state)] * per_state, num_inference_steps=steps, guidance_scale=guidance,
                      generator=generators, height=64, width=64, output_type="np")
        rows.append(to_uint8(result.images))
    os.makedirs(os.path.dirname(os.path.abspath(out)) or ".", exist_ok=True)
    Image.fromarray(_grid(rows)).save(out)
    paths = [out]

    if control is not None:
        held_out = public_corpus(references, seed=seed + 7919)  # a seed the build's corpus does not use
        rows = []
        for j, s in enumerate(held_out):
            conditions = [s.target_edges, s.background_edges, np.maximum(s.target_edges, s.background_edges)]
            images = [Image.fromarray(c).convert("RGB") for c in conditions]
            result = control([prompt_for(s.state)] * 3, image=images, num_inference_steps=steps,
                             guidance_scale=guidance, output_type="np", height=64, width=64,
                             generator=[torch.Generator("cpu").manual_seed(seed * 1000 + j) for _ in range(3)])
            row = [s.image]
            for condition, generated in zip(conditions, to_uint8(result.images)):
                row += [np.repeat(condition[..., None], 3, axis=2), generated]
            rows.append(row)
        root, ext = os.path.splitext(out)
        path = f"{root}-controlnet{ext or '.png'}"
        Image.fromarray(_grid(rows)).save(path)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spinbench.model", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the model and save it in diffusers' layout")
    b.add_argument("--out", required=True)
    b.add_argument("--seed", type=int, default=0)
    defaults = Recipe()
    b.add_argument("--corpus-size", type=int, default=defaults.corpus_size)
    b.add_argument("--vae-steps", type=int, default=defaults.vae_steps)
    b.add_argument("--unet-steps", type=int, default=defaults.unet_steps)
    b.add_argument("--batch-size", type=int, default=defaults.batch_size, help="UNet (and ControlNet) phase")
    b.add_argument("--vae-batch-size", type=int, default=defaults.vae_batch_size,
                   help="64 px images per VAE step (crop steps take 4x as many 32 px crops)")
    b.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    b.add_argument("--device", default="auto", help="auto (a CUDA GPU when there is one, else cpu), cpu, cuda, cuda:N")
    b.add_argument("--log-every", type=int, default=defaults.log_every, help="steps between progress lines")
    s = sub.add_parser("sample", help="write txt2img and ControlNet sample grids of a saved model")
    s.add_argument("--model", default="spinbench/weights")
    s.add_argument("--out", default="spinbench-samples.png")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--steps", type=int, default=20)
    s.add_argument("--guidance", type=float, default=5.0)
    s.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.command == "build":
        build(args.out, seed=args.seed, vae_steps=args.vae_steps, unet_steps=args.unet_steps,
              batch_size=args.batch_size,
              vae_batch_size=args.vae_batch_size, corpus_size=args.corpus_size, threads=args.threads,
              log_every=args.log_every, device=args.device)
    else:
        if args.threads:
            torch.set_num_threads(args.threads)
        for path in sample(args.model, args.out, seed=args.seed, steps=args.steps, guidance=args.guidance):
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
