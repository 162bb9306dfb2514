"""Delivery to the device: the trained classifier as ONNX and TorchScript, beside its checkpoint.

Both take one NCHW float batch normalised with ImageNet's mean and std (as in training), of any
batch size, at the training `image_size`, and return logits over the request's labels.
"""

from __future__ import annotations

import io
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


def to_torchscript(model: torch.nn.Module, image_size: int) -> bytes:
    traced = torch.jit.trace(model.eval(), torch.zeros(1, 3, image_size, image_size))
    buffer = io.BytesIO()
    torch.jit.save(traced, buffer)
    return buffer.getvalue()


def onnx_logits(onnx_bytes: bytes, batch: np.ndarray) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return session.run(None, {"image": batch.astype(np.float32)})[0]
