"""GPU throughput of the synthesis engine on Stable Diffusion 1.5's real architecture.

Builds SD 1.5's UNet, VAE and CLIP text encoder (and a ControlNet cut from the UNet) with random
weights, so the compute equals the real model's, saves them in diffusers' layout and loads them
through the engine's own path (`DiffusionEngine`). Reports images/s at 512x512 for batch sizes
1..32, fp16 vs fp32, with and without ControlNet, next to a naive baseline (a plain diffusers
`StableDiffusionPipeline` call per image, fp32, batch 1) and the FLOP bound of the card (FLOPs per
image counted with torch's FlopCounterMode, divided into the card's dense fp16 peak).

    python bench/bench_gpu_sd15.py                 # on a GPU machine
    python bench/bench_gpu_sd15.py --tiny          # smoke test of this script on CPU (tiny preset)
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

PEAK_FP16_TFLOPS = {"H200": 989.0, "H100": 989.0, "A100": 312.0, "L40S": 362.0, "A10G": 125.0, "L4": 121.0}


def build_sd15(out_dir: str) -> str:
    from diffusers import AutoencoderKL, ControlNetModel, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from spinml_ray.models.tokenizer import write_clip_tokenizer

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the defaults are SD 1.x's
    vae = AutoencoderKL(
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4, sample_size=512,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
    ))
    tokenizer = CLIPTokenizer.from_pretrained(write_clip_tokenizer(os.path.join(out_dir, "tokenizer")))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                              set_alpha_to_one=False, steps_offset=1)
    StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet, scheduler=scheduler,
                            safety_checker=None, feature_extractor=None, requires_safety_checker=False).save_pretrained(out_dir)
    ControlNetModel.from_unet(unet).save_pretrained(os.path.join(out_dir, "controlnet"))
    return out_dir


def flops_per_image(engine, resolution: int, steps: int) -> float:
    """UNet FLOPs (both classifier-free-guidance halves) x steps + one VAE decode + text encoding."""
    from torch.utils.flop_counter import FlopCounterMode

    pipe = engine.pipes["txt2img"]
    latent = resolution // pipe.vae_scale_factor
    dtype, device = pipe.unet.dtype, pipe.unet.device
    sample = torch.zeros(2, 4, latent, latent, dtype=dtype, device=device)
    context = torch.zeros(2, 77, pipe.text_encoder.config.hidden_size, dtype=dtype, device=device)
    with torch.inference_mode():
        with FlopCounterMode(display=False) as unet_count:
            pipe.unet(sample, 10, encoder_hidden_states=context)
        with FlopCounterMode(display=False) as vae_count:
            pipe.vae.decode(sample[:1])
        with FlopCounterMode(display=False) as text_count:
            pipe.text_encoder(torch.zeros(2, 77, dtype=torch.long, device=device))
    return steps * unet_count.get_total_flops() + vae_count.get_total_flops() + text_count.get_total_flops() / 2


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true", help="smoke test on CPU with the tiny preset")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--batches", default="1,2,4,8,16,32")
    parser.add_argument("--images", type=int, default=32, help="images per measurement (at least the batch)")
    args = parser.parse_args()
    from spinml_ray.synthesis.engine import DiffusionEngine
    from spinml_ray.synthesis.workitems import WorkItem
    from spinml_ray.images import encode_png
    import numpy as np

    if args.tiny:
        model, device, dtypes, batches = "tiny", "cpu", ("float32",), (1, 2)
        args.resolution, args.steps, args.images = 64, 2, 4
    else:
        if not torch.cuda.is_available():
            raise SystemExit("bench_gpu_sd15.py: no CUDA device (use --tiny for a CPU smoke test)")
        model = build_sd15(tempfile.mkdtemp(prefix="sd15-random-"))
        device, dtypes, batches = "cuda", ("float32", "float16"), tuple(int(b) for b in args.batches.split(","))
    card = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    peak = next((v for k, v in PEAK_FP16_TFLOPS.items() if k in card), None)
    edges = encode_png(np.where(np.random.default_rng(0).random((args.resolution, args.resolution, 3)) > 0.9, 255, 0).astype(np.uint8))

    def work(n, control):
        return [WorkItem(image_id=f"i{i}", request_id="b", tenant="b", label="a", pool="p", prompt="A photo of a dog",
                         seed=i, resolution=args.resolution, steps=args.steps, guidance=7.5,
                         control_image=edges if control else None) for i in range(n)]

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    rows = []
    # Naive baseline: plain diffusers, fp32, one image per call.
    from diffusers import StableDiffusionPipeline

    from spinml_ray.models.source import resolve
    naive = StableDiffusionPipeline.from_pretrained(resolve(model), safety_checker=None, requires_safety_checker=False).to(device)
    naive.set_progress_bar_config(disable=True)
    naive("warm-up", num_inference_steps=2, height=args.resolution, width=args.resolution)
    sync()
    started = time.perf_counter()
    for i in range(min(args.images, 8)):
        naive("A photo of a dog", num_inference_steps=args.steps, height=args.resolution, width=args.resolution,
              generator=torch.Generator("cpu").manual_seed(i))
    sync()
    naive_rate = min(args.images, 8) / (time.perf_counter() - started)
    rows.append(("naive diffusers loop", "float32", "no", 1, naive_rate))
    del naive
    flops = None
    for dtype in dtypes:
        engine = DiffusionEngine(model, device=device, dtype=dtype)
        if dtype == dtypes[-1]:
            flops = flops_per_image(engine, args.resolution, args.steps)
        for control in (False, True):
            for batch in batches:
                items = work(max(batch, args.images if batch > 1 else min(args.images, 8)), control)
                engine.generate(items[:batch])  # warm-up at this shape
                sync()
                started = time.perf_counter()
                for start in range(0, len(items), batch):
                    engine.generate(items[start : start + batch])
                sync()
                rows.append(("engine", dtype, "yes" if control else "no", batch, len(items) / (time.perf_counter() - started)))
        del engine
        if device == "cuda":
            torch.cuda.empty_cache()
    bound = peak * 1e12 / flops if (peak and flops) else None
    print(f"\n{card}, {args.resolution}x{args.resolution}, {args.steps} steps, guidance 7.5 (CFG), torch {torch.__version__}")
    if flops:
        print(f"FLOPs per image (no ControlNet): {flops / 1e12:.2f} TFLOP; "
              + (f"fp16 peak {peak:.0f} TFLOP/s -> FLOP bound {bound:.2f} images/s" if bound else "peak unknown for this card"))
    print("\n| path | dtype | ControlNet | batch | images/s | vs naive | of FLOP bound |")
    print("|---|---|---|---:|---:|---:|---:|")
    for path, dtype, control, batch, rate in rows:
        share = f"{rate / bound:.0%}" if bound and control == "no" else "-"
        print(f"| {path} | {dtype} | {control} | {batch} | {rate:.2f} | {rate / naive_rate:.2f}x | {share} |")
    best = max(rate for path, _, control, _, rate in rows if path == "engine" and control == "no")
    print(f"\nbest engine setting: {best / naive_rate:.2f}x the naive loop (goal 3x)"
          + (f", {best / bound:.0%} of the FLOP bound (goal 50%)" if bound else ""))


if __name__ == "__main__":
    main()
