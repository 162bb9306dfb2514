"""State fidelity of a spinbench model: does it draw the state it was asked for?

A judge (the benchmark's classifier, trained on public images only, never on generated ones) labels
- **txt2img** samples asked for each state with the prompt the system writes ("a photo of a dog
  sitting"): what an L0 target gets;
- **ControlNet** samples conditioned on the dog's Canny edges of held-out public images, with the same
  prompts: what an L1 target gets (the edges carry the pose);
- and, for reference, held-out public images themselves: how good the judge is.

Accuracy overall and per state, beside chance (0.25). `python -m spinbench.fidelity --model DIR`
prints the table and, with `--out FILE`, writes it as JSON; it samples with the benchmark's synthesis
settings (DPM-Solver++, 20 steps, guidance 3) unless told otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace

import torch

from spinbench.baselines import Training, fit, score
from spinbench.world import STATES, prompt_for, public_corpus

JUDGE_SEED, HELD_OUT_SEED = 30_000, 40_000  # public corpus seeds the model's build (seed 0..) never draws


def judge(images: int = 2000, epochs: int = 8, seed: int = 0) -> torch.nn.Module:
    """The benchmark's classifier trained on `images` public images (random crops and flips)."""
    samples = public_corpus(images, seed=JUDGE_SEED + seed)
    training = replace(Training(), epochs=epochs, batch_size=64)
    return fit([s.image for s in samples], [STATES.index(s.state) for s in samples], seed, training, augment=True)


def _summary(result: dict) -> dict:
    return {"accuracy": result["accuracy"], "per_state": dict(zip(STATES, result["per_class_accuracy"]))}


def fidelity(model_dir: str, per_state: int = 16, steps: int = 20, guidance: float = 3.0, seed: int = 0,
             judge_images: int = 2000, judge_epochs: int = 8) -> dict:
    from PIL import Image

    from spinbench.model import pipelines, to_uint8

    started = time.time()
    classifier = judge(judge_images, judge_epochs, seed)
    held_out = public_corpus(per_state * len(STATES), seed=HELD_OUT_SEED + seed)  # balanced: states round-robin
    labels = [STATES.index(s.state) for s in held_out]
    out = {"settings": {"per_state": per_state, "steps": steps, "guidance": guidance, "seed": seed,
                        "judge_images": judge_images, "judge_epochs": judge_epochs, "scheduler": "dpmsolver++"},
           "public held-out (the judge)": _summary(score(classifier, [s.image for s in held_out], labels))}
    pipe, control = pipelines(model_dir)
    kwargs = dict(num_inference_steps=steps, guidance_scale=guidance, height=64, width=64, output_type="np")
    images, asked = [], []
    for k, state in enumerate(STATES):
        generators = [torch.Generator("cpu").manual_seed(seed * 10_000 + k * 1000 + j) for j in range(per_state)]
        images += to_uint8(pipe([prompt_for(state)] * per_state, generator=generators, **kwargs).images)
        asked += [k] * per_state
    out["txt2img"] = _summary(score(classifier, images, asked))
    if control is not None:
        images = []
        for j, s in enumerate(held_out):
            edges = Image.fromarray(s.target_edges).convert("RGB")
            generator = torch.Generator("cpu").manual_seed(seed * 10_000 + j)
            images += to_uint8(control(prompt_for(s.state), image=edges, generator=generator, **kwargs).images)
        out["controlnet (dog edges)"] = _summary(score(classifier, images, labels))
    out["seconds"] = round(time.time() - started, 1)
    return out


def markdown(result: dict) -> str:
    lines = ["| images | accuracy | " + " | ".join(STATES) + " |", "|---|---|" + "---|" * len(STATES)]
    for name, row in result.items():
        if isinstance(row, dict) and "accuracy" in row:
            states = " | ".join("-" if row["per_state"][s] is None else f"{row['per_state'][s]:.2f}" for s in STATES)
            lines.append(f"| {name} | {row['accuracy']:.3f} | {states} |")
    return "\n".join(lines) + f"\n\nChance: {1 / len(STATES):.2f}.\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spinbench.fidelity", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="spinbench/weights")
    parser.add_argument("--per-state", type=int, default=16)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--judge-images", type=int, default=2000)
    parser.add_argument("--judge-epochs", type=int, default=8)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", default=None, help="write the result as JSON")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = fidelity(args.model, args.per_state, args.steps, args.guidance, args.seed, args.judge_images,
                      args.judge_epochs)
    print(markdown(result))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
