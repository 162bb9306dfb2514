"""The `spinbench` source's image encoder (`encoders/`), trained on the public corpus only.

SIM and replication (`spinml report`, `spinml sweep`) compare images through an encoder that the
model source ships; a real source would ship a CLIP or DINOv2 vision tower. SpinBench ships its own,
small and trained from scratch on public images, so that it knows the world's dogs, poses and rooms
and nothing of any user: a ResNet in transformers' layout (`ResNetModel`, 4 stages of 32-256
channels, about 1.2 M parameters), trained to tell the four states apart on 4,000 public images (10 epochs)
(random flips) and saved without its classification head, with a `ViTImageProcessor` that resizes to
64 px. Its embedding is the pooled last stage (256 numbers).

`python -m spinbench.encoder build --out spinbench/weights/encoders` (under a minute on a 2-core
CPU); deterministic for a seed, thread count and library versions; `encoder.json` beside the weights
records the accuracy on held-out public images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

from spinbench.world import STATES, public_corpus

TRAIN_SEED, HELD_OUT_SEED = 50_000, 60_000  # public corpus seeds nothing else draws
SIZE = 64
MEAN, STD = [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]


def make_encoder():
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[1, 1, 1, 1],
                          layer_type="basic", num_labels=len(STATES))
    return ResNetForImageClassification(config)


def _pixels(images: list[np.ndarray]) -> torch.Tensor:
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).float() / 255.0
    return (x - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@torch.no_grad()
def accuracy(model, images: list[np.ndarray], labels: list[int]) -> float:
    model.eval()
    predicted = torch.cat([model(pixel_values=_pixels(images[i:i + 128])).logits.argmax(1)
                           for i in range(0, len(images), 128)])
    return float((predicted == torch.tensor(labels)).float().mean())


def build(out_dir: str, seed: int = 0, images: int = 4000, epochs: int = 10, batch_size: int = 64,
          quiet: bool = False) -> dict:
    """Train the encoder and save it (transformers' layout) to `out_dir`, replaced when it exists."""
    from transformers import ViTImageProcessor

    from spinbench.model import load_as_float32, replaced_atomically

    started = time.time()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = public_corpus(images, seed=TRAIN_SEED + seed)
    held_out = public_corpus(400, seed=HELD_OUT_SEED + seed)
    x = _pixels([s.image for s in train])
    y = torch.tensor([STATES.index(s.state) for s in train])
    model = make_encoder()
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=generator)
        for i in range(0, len(order), batch_size):
            batch = x[order[i:i + batch_size]]
            flip = torch.rand(len(batch), generator=generator) < 0.5
            batch = torch.where(flip.view(-1, 1, 1, 1), batch.flip(-1), batch)
            loss = torch.nn.functional.cross_entropy(model(pixel_values=batch).logits, y[order[i:i + batch_size]])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        if not quiet:
            print(f"[encoder] epoch {epoch + 1}/{epochs} loss {loss.item():.3f}", flush=True)
    report = {"seed": seed, "images": images, "epochs": epochs, "seconds": round(time.time() - started, 1),
              "held_out_accuracy": accuracy(model, [s.image for s in held_out], [STATES.index(s.state) for s in held_out]),
              "params": sum(p.numel() for p in model.resnet.parameters()), "torch": torch.__version__}
    with replaced_atomically(out_dir) as tmp:
        model.resnet.half().save_pretrained(tmp)  # the backbone alone: its pooled output is the embedding
        load_as_float32(os.path.join(tmp, "config.json"))
        ViTImageProcessor(size={"height": SIZE, "width": SIZE}, image_mean=MEAN, image_std=STD).save_pretrained(tmp)
        with open(os.path.join(tmp, "encoder.json"), "w") as handle:
            json.dump(report, handle, indent=2, sort_keys=True)
    if not quiet:
        print(f"spinbench encoder saved to {out_dir}: held-out state accuracy {report['held_out_accuracy']:.3f} "
              f"({report['seconds']:.0f} s)", flush=True)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spinbench.encoder", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="train the encoder and save it in transformers' layout")
    b.add_argument("--out", default="spinbench/weights/encoders")
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--images", type=int, default=4000)
    b.add_argument("--epochs", type=int, default=10)
    args = parser.parse_args(argv)
    build(args.out, seed=args.seed, images=args.images, epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
