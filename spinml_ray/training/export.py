"""Delivery to the device: the trained model as ONNX and TorchScript, beside its checkpoint.

Classifiers take one NCHW float batch normalised with ImageNet's mean and std (as in training), of
any batch size, at the training `image_size`, and return logits over the request's labels.
Detectors take one 3 x image_size x image_size float image in [0, 1] (TorchScript: a list of them).
TorchScript and the Faster R-CNN ONNX return the final detections: boxes (x0, y0, x1, y1 pixels),
scores and labels (request label index + 1). The SSDlite ONNX returns every anchor's decoded box
(A x 4, input pixels) and class probabilities (A x (labels + 1), column 0 the background), and the
device applies its own score threshold and non-maximum suppression: torchvision's SSD
post-processing does not survive the ONNX exporter (its boxes come out detached from its scores).
"""

from __future__ import annotations

import contextlib
import io
import threading
import warnings

import numpy as np
import torch

ONNX_FILE = "model.onnx"
TORCHSCRIPT_FILE = "model.torchscript.pt"


def to_onnx(model: torch.nn.Module, image_size: int) -> bytes:
    model = model.eval()
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript-based exporter: no extra deps
        torch.onnx.export(model, torch.zeros(1, 3, image_size, image_size), buffer, dynamo=False,
                          input_names=["image"], output_names=["logits"],
                          dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}})
    return buffer.getvalue()


class SSDAnchors(torch.nn.Module):
    """An SSD up to its per-anchor boxes (input pixels) and class probabilities, before NMS."""

    def __init__(self, ssd: torch.nn.Module):
        super().__init__()
        self.ssd = ssd

    def forward(self, image: torch.Tensor):  # exported at a fixed image size: the scales are constants
        height, width = int(image.shape[-2]), int(image.shape[-1])
        images, _ = self.ssd.transform([image])
        features = list(self.ssd.backbone(images.tensors).values())
        head = self.ssd.head(features)
        anchors = self.ssd.anchor_generator(images, features)
        boxes = self.ssd.box_coder.decode_single(head["bbox_regression"][0], anchors[0])
        resized_h, resized_w = (int(v) for v in images.image_sizes[0])
        scale = torch.tensor([width / resized_w, height / resized_h] * 2)
        bounds = torch.tensor([resized_w, resized_h] * 2, dtype=boxes.dtype)
        boxes = torch.minimum(boxes.clamp(min=0), bounds) * scale
        return boxes, torch.softmax(head["cls_logits"][0], dim=-1)


def detector_to_onnx(model: torch.nn.Module, image_size: int) -> bytes:
    from torchvision.models.detection.ssd import SSD

    model = model.eval()
    is_ssd = isinstance(model, SSD)
    wrapped, example = (SSDAnchors(model).eval(), (torch.rand(3, image_size, image_size),)) if is_ssd else \
        (model, ([torch.rand(3, image_size, image_size)],))
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # tracing warnings from torchvision's detection code
        torch.onnx.export(wrapped, example, buffer, dynamo=False, opset_version=17, input_names=["image"],
                          output_names=["boxes", "scores"] if is_ssd else ["boxes", "labels", "scores"])
    return buffer.getvalue()


def detector_to_torchscript(model: torch.nn.Module) -> bytes:
    buffer = io.BytesIO()
    torch.jit.save(torch.jit.script(model.eval()), buffer)
    return buffer.getvalue()


# The TorchScript tracer and the ONNX exporter keep global state: two exports at once in one process
# (a batch job's request threads) corrupt each other's graphs ("Graphs differed across invocations").
_EXPORTING = threading.Lock()


@contextlib.contextmanager
def exporting():
    """One export at a time per process (see `_EXPORTING`).

    torch 2.14 marks TorchScript deprecated and warns on every trace, script and save; it is still
    what on-device PyTorch runtimes load, so the batch job's log is spared the three warnings per model."""
    with _EXPORTING, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r"`torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def to_torchscript(model: torch.nn.Module, image_size: int) -> bytes:
    # check_trace would run the model twice more; the parity tests check the traced outputs instead
    traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, image_size, image_size), check_trace=False)
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def onnx_logits(onnx_bytes: bytes, batch: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": batch.astype(np.float32)})[0]


def onnx_detections(onnx_bytes: bytes, image: np.ndarray) -> dict[str, np.ndarray]:
    """The outputs (by name) of an exported detector for one 3xHxW float image in [0, 1]."""
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    names = [output.name for output in session.get_outputs()]
    return dict(zip(names, session.run(None, {"image": image.astype(np.float32)})))
