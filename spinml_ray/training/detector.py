"""The specialized detector: model, boxes and data preparation, one epoch of training, mAP.

Plain PyTorch, no Ray; the detection task module (`training/tasks.py`). Detectors are
torchvision's; they take a list of 3xHxW float images in [0, 1] (they normalise and resize inside)
and, in training, targets `{"boxes": Nx4 xyxy pixels, "labels": N}` with labels 1..K (0 is the
background class). A request's label `i` is detector class `i + 1`.
"""

from __future__ import annotations

import json

import numpy as np
import torch
import torchvision
from PIL import Image

from spinml_ray import storage
from spinml_ray.images import decode_rgb
from spinml_ray.training.classifier import channels_last, labelled_files, split_train_val
from spinml_ray.training.export import detector_to_onnx, detector_to_torchscript, exporting
from spinml_ray.training.pretrained import load_state_dict

BOXES_FILE = "boxes.json"


def build_detector(architecture: str, num_labels: int, pretrained: str | None = None) -> torch.nn.Module:
    """A torchvision detector for `num_labels` classes (plus background).

    `pretrained`: a state dict (local path or URI) of the same architecture (e.g. COCO weights); every tensor whose
    shape fits is loaded, so a checkpoint with another number of classes gives its backbone and the
    box regressors, and the class-specific layers start fresh."""
    if architecture not in ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn"):
        raise ValueError(f"architecture {architecture!r} is not a supported detector")
    build = getattr(torchvision.models.detection, architecture)
    model = build(weights=None, weights_backbone=None, num_classes=num_labels + 1)
    if pretrained:
        own = model.state_dict()
        state = load_state_dict(pretrained)
        fitting = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
        if len(fitting) < len(own) // 2:
            raise ValueError(f"{pretrained}: not a torchvision {architecture} state dict")
        model.load_state_dict(fitting, strict=False)
    return channels_last(model)


def prepare(images: list[bytes], boxes: list[list[list[float]]], labels: list[list[int]], size: int):
    """(N x 3 x size x size uint8 tensor, targets) with each image's boxes scaled to size x size.

    `labels` are the request's label indices; targets carry them as detector classes (+1)."""
    arrays, targets = [], []
    for data, image_boxes, image_labels in zip(images, boxes, labels):
        rgb = decode_rgb(data)
        height, width = rgb.shape[:2]
        arrays.append(np.asarray(Image.fromarray(rgb).resize((size, size), Image.BILINEAR)))
        scale = torch.tensor([size / width, size / height, size / width, size / height])
        box_tensor = torch.tensor(image_boxes, dtype=torch.float32).reshape(-1, 4) * scale
        targets.append({"boxes": box_tensor, "labels": torch.tensor(image_labels, dtype=torch.int64).reshape(-1) + 1})
    if not arrays:
        return torch.empty((0, 3, size, size), dtype=torch.uint8), []
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous(), targets


def as_inputs(batch: torch.Tensor, device) -> list[torch.Tensor]:
    return [image.to(device).float() / 255.0 for image in batch]


def collate(batch):
    images, targets = zip(*batch)
    return torch.stack(images), list(targets)


class DetectionData(torch.utils.data.Dataset):
    def __init__(self, images: torch.Tensor, targets: list[dict]):
        self.images, self.targets = images, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        return self.images[index], self.targets[index]


def train_epoch(model, loader, optimizer, device) -> float:
    """One pass over `loader` (batches from `collate`); returns the mean summed detection loss."""
    model.train()
    total, count = 0.0, 0
    for images, targets in loader:
        targets = [{k: v.to(device) for k, v in t.items()} for t in targets]
        losses = model(as_inputs(images, device), targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        total += float(loss.detach()) * len(targets)
        count += len(targets)
    return total / max(count, 1)


@torch.no_grad()
def predict(model, images: torch.Tensor, batch_size: int = 16) -> list[dict]:
    model.eval()
    device = next(model.parameters()).device
    out = []
    for start in range(0, len(images), batch_size):
        out.extend({k: v.cpu() for k, v in p.items()} for p in model(as_inputs(images[start : start + batch_size], device)))
    return out


def mean_average_precision(predictions: list[dict], targets: list[dict], num_labels: int) -> dict:
    """COCO-style mAP50-95, mAP50, mAP75 (torchmetrics) and AP50-95 per label (None: label absent)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", class_metrics=True)
    metric.update(predictions, targets)
    result = metric.compute()
    per_label: list[float | None] = [None] * num_labels
    for cls, ap in zip(result["classes"].reshape(-1).tolist(), result["map_per_class"].reshape(-1).tolist()):
        if 1 <= cls <= num_labels and ap >= 0:
            per_label[cls - 1] = float(ap)
    scalar = {key: float(result[key]) for key in ("map", "map_50", "map_75")}
    return {**{k: (v if v >= 0 else None) for k, v in scalar.items()}, "per_label_map": per_label, "n": len(targets)}


def evaluate(model, images: torch.Tensor, targets: list[dict], num_labels: int) -> dict:
    return mean_average_precision(predict(model, images), targets, num_labels)


def load_test_set(uri: str, labels: list[str]) -> tuple[list[bytes], list[list[list[float]]], list[list[int]]]:
    """Images from `{uri}/{label}/*` and their boxes from `{uri}/boxes.json`.

    boxes.json maps each image's path under `uri` (e.g. "floating/0.png") to a list of x0, y0, x1, y1
    boxes in that image's pixels; each box is of the image's folder's label. Every image must be listed
    (an image with nothing to find has an empty list)."""
    boxes_uri = storage.join(uri, BOXES_FILE)
    try:
        listed = json.loads(storage.read_bytes(boxes_uri))
    except FileNotFoundError:
        raise FileNotFoundError(f"{boxes_uri}: a detection test set needs this file of boxes") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"{boxes_uri}: not valid JSON ({exc})") from None
    if not isinstance(listed, dict):
        raise ValueError(f"{boxes_uri}: expected a mapping of image path to boxes")
    images, boxes, classes = [], [], []
    for index, label, file in labelled_files(uri, labels):
        key = f"{label}/{file.rsplit('/', 1)[-1]}"
        if key not in listed:
            raise ValueError(f"{boxes_uri}: no entry for {key!r} (list [] for an image with no object)")
        image_boxes = listed[key]
        if not isinstance(image_boxes, list) or not all(_is_box(b) for b in image_boxes):
            raise ValueError(f"{boxes_uri}: {key!r} = {image_boxes!r}: expected a list of [x0, y0, x1, y1] with x0 < x1, y0 < y1")
        images.append(storage.read_bytes(file))
        boxes.append([[float(v) for v in b] for b in image_boxes])
        classes.append([index] * len(image_boxes))
    if not images:
        raise FileNotFoundError(f"{uri}: no test images in folders named after the labels {labels}")
    return images, boxes, classes


def _is_box(box) -> bool:
    return (isinstance(box, list) and len(box) == 4 and all(isinstance(v, (int, float)) for v in box)
            and box[0] < box[2] and box[1] < box[3])


# ------------------------------------------------------------------------------------------------
# the task interface (`training/tasks.py`)

build = build_detector


def dataset(table, job):
    """(train images, train targets, val images, val targets) of the synthetic images with a trusted
    box (`job.boxes`), split by the job's seed."""
    rows = [r for r in table.select(["image_id", "label_index", "image"]).to_pylist() if r["image_id"] in job.boxes]
    images, targets = prepare([r["image"] for r in rows], [[job.boxes[r["image_id"]]] for r in rows],
                              [[r["label_index"]] for r in rows], job.image_size)
    train_idx, val_idx = split_train_val(len(targets), job.val_fraction, job.seed)
    return images[train_idx], [targets[i] for i in train_idx], images[val_idx], [targets[i] for i in val_idx]


def data(images: torch.Tensor, targets: list[dict]) -> torch.utils.data.Dataset:
    return DetectionData(images, targets)


def validate(model, images, targets, num_classes: int) -> dict:
    """`evaluate`, with `score` (mAP50-95) for picking the best epoch."""
    result = evaluate(model, images, targets, num_classes)
    return {**result, "score": result["map"] or 0.0}


def test_set(uri: str, labels: list[str], size: int):
    """The request's real test set: images in folders named after the labels, boxes in boxes.json."""
    return prepare(*load_test_set(uri, labels), size)


def export(model: torch.nn.Module, image_size: int) -> tuple[bytes, bytes]:
    """(ONNX, TorchScript) of a trained detector."""
    with exporting():
        return detector_to_onnx(model, image_size), detector_to_torchscript(model)
