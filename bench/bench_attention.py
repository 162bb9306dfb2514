"""What recording the subject's cross-attention maps costs the synthesis engine (detection requests).

Builds Stable Diffusion 1.5's real architecture with random weights (as `bench_gpu_sd15.py` does, so
the compute equals the real model's), loads it through `DiffusionEngine`, and generates the same
items twice in one run: plain, and with `attend` set (every image records its map, the worst case;
a request records maps only for its images without conditioning geometry). Checks the images are
identical and prints images/s for both and the ratio.

    python bench/bench_attention.py                           # GPU: 512 px, 20 steps, batch 8
    python bench/bench_attention.py --resolution 256 --steps 4 --batch 2 --images 4   # what a CPU manages
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_gpu_sd15 import build_sd15  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--resolution", type=int, default=512)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--tiny", action="store_true", help="the tiny preset instead of SD 1.5 (smoke test)")
    args = parser.parse_args()
    from spinml_ray.synthesis.engine import DiffusionEngine
    from spinml_ray.synthesis.workitems import WorkItem

    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = "tiny" if args.tiny else build_sd15(tempfile.mkdtemp(prefix="sd15-random-"))
    engine = DiffusionEngine(model, device=device)

    def work(attend: str | None):
        return [WorkItem(image_id=f"i{i}", request_id="b", tenant="b", label="a", pool="L0_L0",
                         prompt="A photo of a yellow rubber duck floating, close-up", seed=i, resolution=args.resolution,
                         steps=args.steps, guidance=7.5, attend=attend) for i in range(args.images)]

    def run(items):
        engine.generate(items[: args.batch])  # warm-up at this shape
        if device == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        out = [g for s in range(0, len(items), args.batch) for g in engine.generate(items[s : s + args.batch])]
        if device == "cuda":
            torch.cuda.synchronize()
        return out, len(items) / (time.perf_counter() - started)

    plain, plain_rate = run(work(None))
    mapped, mapped_rate = run(work("rubber duck"))
    assert [g.image for g in plain] == [g.image for g in mapped], "recording changed an image"
    assert all(g.attention for g in mapped)
    card = torch.cuda.get_device_name() if device == "cuda" else f"CPU ({os.cpu_count()} cores)"
    print(f"\n{card}, {'tiny preset' if args.tiny else 'SD 1.5 architecture'}, {engine.pipes['txt2img'].unet.dtype}, "
          f"{args.resolution}x{args.resolution}, {args.steps} steps, batch {args.batch}, {args.images} images")
    print("\n| generation | images/s | vs plain |\n|---|---:|---:|")
    print(f"| plain | {plain_rate:.3f} | 1.00x |")
    print(f"| every image records its subject map | {mapped_rate:.3f} | {mapped_rate / plain_rate:.2f}x |")
    print("\nimages identical with and without recording: yes")


if __name__ == "__main__":
    main()
