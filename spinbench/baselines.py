"""The baselines a skeptic tries before believing that synthetic data helped, on the same test set.

Each trains the same classifier the system trains (`spinml_ray.training.classifier`: architecture,
image size, Adam, epochs, batch size) on a different training set, with no Ray and no diffusion:

- `public`: the public corpus alone (what a model trained on public data knows);
- `few-shot`: the user's own references, augmented (random crops and flips);
- `copy-paste`: each reference's L2 target release (the dog's pixels, exactly what L2 sends) pasted
  onto public rooms at random places and facing: the cheapest use of what L2 shares;
- `oracle`: many images of the user's own world (the dog in their room): the ceiling.

The system's own trainer keeps the best epoch on a validation split of the synthetic data; these
train for the fixed number of epochs (there is no held-out data of the user's to select on without
peeking at the test set).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from spinbench.world import DEFAULT_TRAINING, STATES, User, public_corpus, public_room, render_room, user_samples
from spinml_ray.sanitizer import release
from spinml_ray.spec import Level
from spinml_ray.training import classifier

BASELINES = ("public", "few-shot", "copy-paste", "oracle")


@dataclass(frozen=True)
class Training:
    """The classifier settings (the benchmark's requests use the same)."""

    architecture: str = DEFAULT_TRAINING["architecture"]
    image_size: int = DEFAULT_TRAINING["image_size"]
    epochs: int = DEFAULT_TRAINING["epochs"]
    batch_size: int = DEFAULT_TRAINING["batch_size"]
    learning_rate: float = DEFAULT_TRAINING["learning_rate"]


def _tensor(images: list[np.ndarray], size: int) -> torch.Tensor:
    batch = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()
    if batch.shape[-1] != size:
        batch = torch.nn.functional.interpolate(batch.float(), size=(size, size), mode="bilinear",
                                                antialias=True).round().clamp(0, 255).to(torch.uint8)
    return batch


def _augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crops (75-100% of the side, resized back) and horizontal flips, per image."""
    n, _, size, _ = images.shape
    out = torch.empty_like(images)
    for i in range(n):
        side = int(size * (0.75 + 0.25 * torch.rand(1, generator=generator).item()))
        y, x = (int(torch.randint(0, size - side + 1, (1,), generator=generator)) for _ in range(2))
        crop = images[i : i + 1, :, y : y + side, x : x + side].float()
        crop = torch.nn.functional.interpolate(crop, size=(size, size), mode="bilinear", antialias=True)
        if torch.rand(1, generator=generator).item() < 0.5:
            crop = crop.flip(-1)
        out[i] = crop[0].round().clamp(0, 255).to(torch.uint8)
    return out


def fit(train_images: list[np.ndarray], train_labels: list[int], seed: int, training: Training = Training(),
        augment: bool = False, repeats: int = 1) -> torch.nn.Module:
    """The system's classifier trained from `seed` on the given images. `augment` draws a fresh random
    crop and flip of every training image each epoch, `repeats` times."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    x = _tensor(train_images, training.image_size)
    y = torch.tensor(train_labels, dtype=torch.long)
    model = classifier.build_model(training.architecture, len(STATES))
    optimizer = torch.optim.Adam(model.parameters(), lr=training.learning_rate)
    for _ in range(training.epochs):
        xs = torch.cat([_augment(x, generator) for _ in range(repeats)]) if augment else x
        ys = y.repeat(repeats) if augment else y
        order = torch.randperm(len(xs), generator=generator)
        loader = [(xs[order[i : i + training.batch_size]], ys[order[i : i + training.batch_size]])
                  for i in range(0, len(xs), training.batch_size)]
        classifier.train_epoch(model, loader, optimizer, "cpu")
    return model


def score(model: torch.nn.Module, images: list[np.ndarray], labels: list[int], training: Training = Training()) -> dict:
    """Accuracy and per-class accuracy of `model` on the images."""
    result = classifier.evaluate(model, _tensor(images, training.image_size), torch.tensor(labels, dtype=torch.long),
                                 len(STATES))
    return {"accuracy": result["accuracy"], "per_class_accuracy": result["per_class_accuracy"]}


def fit_and_test(train_images: list[np.ndarray], train_labels: list[int], test_images: list[np.ndarray],
                 test_labels: list[int], seed: int, training: Training = Training(), augment: bool = False,
                 repeats: int = 1) -> dict:
    """Train the classifier from `seed` on the given images and score it on the test images."""
    model = fit(train_images, train_labels, seed, training, augment=augment, repeats=repeats)
    return score(model, test_images, test_labels, training)


def copy_paste(user: User, references_per_state: int, count: int, seed: int) -> tuple[list[np.ndarray], list[int]]:
    """`count` images: a reference's L2 target release pasted onto a public room, at a random
    horizontal shift (the floor line is kept), mirrored half the time. Labels are the references'."""
    rng = np.random.default_rng(seed)
    references = user_samples(user, references_per_state, "references")
    images, labels = [], []
    for i in range(count):
        ref = references[i % len(references)]
        pixels, region, _ = release(ref.image, ref.mask, Level.L2)
        room = render_room(public_room(np.random.default_rng([seed, i])), ref.image.shape[0])
        if rng.random() < 0.5:
            pixels, region = pixels[:, ::-1], region[:, ::-1]
        shift = int(rng.integers(-ref.image.shape[1] // 4, ref.image.shape[1] // 4 + 1))
        pixels, region = np.roll(pixels, shift, axis=1), np.roll(region, shift, axis=1)
        images.append(np.where(region[..., None], pixels, room))
        labels.append(STATES.index(ref.state))
    return images, labels


def training_set(name: str, user: User, references_per_state: int, count: int, seed: int):
    """(images, labels, augment) of one baseline."""
    if name == "public":
        samples = public_corpus(count, seed=10_000 + seed)
        return [s.image for s in samples], [STATES.index(s.state) for s in samples], False
    if name == "few-shot":
        samples = user_samples(user, references_per_state, "references")
        return [s.image for s in samples], [STATES.index(s.state) for s in samples], True
    if name == "copy-paste":
        return (*copy_paste(user, references_per_state, count, seed), False)
    if name == "oracle":
        samples = user_samples(user, max(references_per_state, count // len(STATES)), "references")
        return [s.image for s in samples], [STATES.index(s.state) for s in samples], False
    raise ValueError(f"baseline {name!r} is not one of {BASELINES}")


def run_baseline(name: str, user: User, test: list, references_per_state: int, count: int, seed: int,
                 training: Training = Training()) -> dict:
    """One baseline, one seed: accuracy on the user's test samples. Few-shot sees each reference
    `count / references` times per epoch, augmented, so every baseline takes about as many steps."""
    images, labels, augment = training_set(name, user, references_per_state, count, seed)
    repeats = max(1, count // len(images)) if augment else 1
    return fit_and_test(images, labels, [s.image for s in test], [STATES.index(s.state) for s in test], seed,
                        training, augment=augment, repeats=repeats)
