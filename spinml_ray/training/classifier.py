"""The classification task: model, data preparation, one epoch of training, evaluation, delivery.

Plain PyTorch, no Ray. Exposes the functions every task module has (`training/tasks.py`: `build`,
`dataset`, `data`, `collate`, `train_epoch`, `validate`, `test_set`, `export`), which the training
loop (`training/loop.py`) and delivery (`training/delivery.py`) call without knowing the task.
"""

from __future__ import annotations

import io

import numpy as np
import torch
import torchvision
from PIL import Image

from spinml_ray import storage
from spinml_ray.images import decode_rgb
from spinml_ray.training.export import exporting, to_onnx, to_torchscript
from spinml_ray.training.pretrained import load_state_dict

IMAGENET_MEAN = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
IMAGENET_STD = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")


HEADS = {"mobilenet_v2": "classifier.1.", "resnet18": "fc."}


def build_model(architecture: str, num_classes: int, pretrained: str | None = None) -> torch.nn.Module:
    """A torchvision classifier with a fresh `num_classes`-way head.

    `pretrained`: a torchvision state dict (local path or URI, e.g. ImageNet weights) whose backbone is
    loaded; its classification head is dropped. Without it the whole model starts from random weights."""
    if architecture == "mobilenet_v2":
        model = torchvision.models.mobilenet_v2(weights=None, num_classes=num_classes)
    elif architecture == "resnet18":
        model = torchvision.models.resnet18(weights=None, num_classes=num_classes)
    else:
        raise ValueError(f"architecture {architecture!r} is not supported (mobilenet_v2, resnet18)")
    if pretrained:
        state = load_state_dict(pretrained)
        backbone = {k: v for k, v in state.items() if not k.startswith(HEADS[architecture])}
        missing, unexpected = model.load_state_dict(backbone, strict=False)
        if unexpected or any(not k.startswith(HEADS[architecture]) for k in missing):
            raise ValueError(f"{pretrained}: not a torchvision {architecture} state dict")
    return channels_last(model)


def channels_last(model: torch.nn.Module) -> torch.nn.Module:
    """The model with its convolution weights laid out NHWC, so activations follow: oneDNN on CPU (1.7x
    for MobileNetV2 and SSDlite training here, 1.2x for ResNet-18) and cuDNN's tensor cores prefer it.
    Weights, outputs, state dicts and exports are the same; only the memory layout changes."""
    return model.to(memory_format=torch.channels_last)


def images_to_uint8(images: list[bytes], size: int) -> torch.Tensor:
    """N x 3 x size x size uint8 tensor from encoded images (kept as uint8 to bound memory)."""
    arrays = [np.asarray(Image.fromarray(decode_rgb(b)).resize((size, size), Image.BILINEAR)) for b in images]
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.uint8)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def normalize(batch: torch.Tensor) -> torch.Tensor:
    return (batch.float() / 255.0 - IMAGENET_MEAN.to(batch.device)) / IMAGENET_STD.to(batch.device)


def split_train_val(n: int, val_fraction: float = 0.1, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Seeded index split; at least one validation example when n >= 2."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = min(n - 1, max(1, round(n * val_fraction))) if n >= 2 else 0
    return order[n_val:], order[:n_val]


def train_epoch(model, loader, optimizer, device) -> float:
    model.train()
    loss_fn = torch.nn.CrossEntropyLoss()
    total, count = 0.0, 0
    for images, targets in loader:
        images, targets = normalize(images.to(device)), targets.to(device)
        optimizer.zero_grad()
        loss = loss_fn(model(images), targets)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(targets)
        count += len(targets)
    return total / max(count, 1)


@torch.no_grad()
def evaluate(model, images: torch.Tensor, targets: torch.Tensor, num_classes: int, batch_size: int = 64) -> dict:
    """top-1 accuracy, per-class accuracy and the confusion matrix (rows: true, columns: predicted)."""
    model.eval()
    device = next(model.parameters()).device
    predictions = []
    for start in range(0, len(images), batch_size):
        logits = model(normalize(images[start : start + batch_size].to(device)))
        predictions.append(logits.argmax(dim=1).cpu())
    predicted = torch.cat(predictions) if predictions else torch.empty(0, dtype=torch.long)
    confusion = torch.zeros((num_classes, num_classes), dtype=torch.long)
    for t, p in zip(targets.tolist(), predicted.tolist()):
        confusion[t, p] += 1
    per_class = [
        float(confusion[c, c] / confusion[c].sum()) if confusion[c].sum() else None for c in range(num_classes)
    ]
    accuracy = float((predicted == targets).float().mean()) if len(targets) else None
    return {"accuracy": accuracy, "per_class_accuracy": per_class, "confusion": confusion.tolist(), "n": len(targets)}


@torch.no_grad()
def logits(model, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
    """The model's logits for uint8 images (N x C, on the CPU)."""
    model.eval()
    device = next(model.parameters()).device
    out = [model(normalize(images[i:i + batch_size].to(device))).cpu() for i in range(0, len(images), batch_size)]
    return torch.cat(out) if out else torch.empty((0, 0))


def fit_plain(images: torch.Tensor, targets: torch.Tensor, architecture: str, num_classes: int, epochs: int,
              batch_size: int, learning_rate: float, seed: int, pretrained: str | None = None) -> torch.nn.Module:
    """A classifier trained in this process from `pretrained` (else random) weights (Adam, shuffled
    batches): for shadow models."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = build_model(architecture, num_classes, pretrained)
    optimizer = torch.optim.Adam(model.parameters(), lr=learning_rate)
    for _ in range(epochs):
        order = torch.randperm(len(targets), generator=generator)
        train_epoch(model, [(images[order[i:i + batch_size]], targets[order[i:i + batch_size]])
                            for i in range(0, len(order), batch_size)], optimizer, "cpu")
    return model


def labelled_files(uri: str, labels: list[str]):
    """(label index, label, file URI) for every image in `{uri}/{label}/`, for the labels given (other
    folders and non-image files are ignored)."""
    for index, label in enumerate(labels):
        for file in storage.list_files(storage.join(uri, label)):
            if file.lower().endswith(IMAGE_EXTENSIONS):
                yield index, label, file


def load_image_folder(uri: str, labels: list[str]) -> tuple[list[bytes], list[int]]:
    """Images from `{uri}/{label}/*.png|jpg|...`, for the labels given (other folders are ignored)."""
    images, targets = [], []
    for index, _, file in labelled_files(uri, labels):
        images.append(storage.read_bytes(file))
        targets.append(index)
    if not images:
        raise FileNotFoundError(f"{uri}: no test images in folders named after the labels {labels}")
    return images, targets


def state_dict_bytes(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getvalue()


# ------------------------------------------------------------------------------------------------
# the task interface (`training/tasks.py`)

build = build_model
collate = None  # the default collation: (images, class indices)


def dataset(table, job):
    """(train images, train labels, val images, val labels) from a synthetic table, split by the job's seed."""
    images = images_to_uint8(table.column("image").to_pylist(), job.image_size)
    targets = torch.tensor(table.column("label_index").to_pylist(), dtype=torch.long)
    train_idx, val_idx = split_train_val(len(targets), job.val_fraction, job.seed)
    return images[train_idx], targets[train_idx], images[val_idx], targets[val_idx]


def data(images: torch.Tensor, targets: torch.Tensor) -> torch.utils.data.Dataset:
    return torch.utils.data.TensorDataset(images, targets)


def validate(model, images, targets, num_classes: int) -> dict:
    """`evaluate`, with `score` (accuracy) for picking the best epoch."""
    result = evaluate(model, images, targets, num_classes)
    return {**result, "score": result["accuracy"] or 0.0}


def test_set(uri: str, labels: list[str], size: int):
    """The request's real test set: images in folders named after the labels."""
    images, targets = load_image_folder(uri, labels)
    return images_to_uint8(images, size), torch.tensor(targets)


def export(model: torch.nn.Module, image_size: int) -> tuple[bytes, bytes]:
    """(ONNX, TorchScript) of a trained classifier."""
    with exporting():
        return to_onnx(model, image_size), to_torchscript(model, image_size)
