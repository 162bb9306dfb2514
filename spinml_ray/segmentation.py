"""Finding the target in a reference: SAM (segment-anything) prompted by a box, points, or nothing.

A SAM checkpoint lives in a folder with `sam.json` ({"arch": "vit_b"|"vit_l"|"vit_h"|"tiny",
"checkpoint": FILE}); model sources keep it in their `sam/` subfolder (the `tiny` preset writes one
from `build_tiny_sam`: segment-anything's own classes, shrunk, random weights). The real and the tiny
model load through the same `load_sam`. This module knows nothing of model sources: `LazySegmenter`
is handed a loader that finds the SAM folder (`models.source.sam_loader`).

Rules:
- box prompt: SAM's single best mask for the box, clipped to the box (the box says where the target is);
- point prompts: SAM's highest-scoring of its three masks for the points (all positive);
- no prompt: SAM's automatic masks, then `pick_automatic_mask`: the largest mask that covers the
  image centre and is not background-sized (at most 90% of the image); if none covers the centre,
  the mask with the highest predicted IoU.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from functools import partial

import numpy as np

SAM_CONFIG = "sam.json"
MAX_AUTOMATIC_FRACTION = 0.9
MIN_PREDICTED_IOU = 0.88  # SAM's own score of a mask; its automatic mask generator's default
TINY_SAM = dict(image_size=128, patch_size=16, embed_dim=32, depth=2, num_heads=2, prompt_dim=32, window_size=4)


class SegmentationError(ValueError):
    """SAM could not produce a usable target mask for a reference."""


def build_tiny_sam(checkpoint: str | None = None):
    """The tiny SAM architecture (segment-anything's own classes, shrunk), with `checkpoint`'s weights if given."""
    import torch
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    c = TINY_SAM
    grid = c["image_size"] // c["patch_size"]
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=c["image_size"], patch_size=c["patch_size"], embed_dim=c["embed_dim"], depth=c["depth"],
            num_heads=c["num_heads"], mlp_ratio=2, out_chans=c["prompt_dim"], qkv_bias=True,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=True, global_attn_indexes=(1,),
            window_size=c["window_size"],
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=c["prompt_dim"], image_embedding_size=(grid, grid),
            input_image_size=(c["image_size"], c["image_size"]), mask_in_chans=8,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=3,
            transformer=TwoWayTransformer(depth=1, embedding_dim=c["prompt_dim"], mlp_dim=64, num_heads=2),
            transformer_dim=c["prompt_dim"], iou_head_depth=2, iou_head_hidden_dim=32,
        ),
        pixel_mean=[123.675, 116.28, 103.53],
        pixel_std=[58.395, 57.12, 57.375],
    )
    sam.eval()
    if checkpoint is not None:
        sam.load_state_dict(torch.load(checkpoint, map_location="cpu"))
    return sam


def load_sam(sam_dir: str, device: str | None = None):
    """The SAM model described by `{sam_dir}/sam.json`, on `device` (GPU when available)."""
    import torch
    from segment_anything import sam_model_registry

    config_path = os.path.join(sam_dir, SAM_CONFIG)
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"{sam_dir}: no {SAM_CONFIG} (a SAM folder names its arch and checkpoint)")
    with open(config_path) as handle:
        config = json.load(handle)
    arch, checkpoint = config.get("arch"), os.path.join(sam_dir, config.get("checkpoint", ""))
    if arch == "tiny":
        sam = build_tiny_sam(checkpoint)
    elif arch in ("vit_b", "vit_l", "vit_h"):
        sam = sam_model_registry[arch](checkpoint=checkpoint)
    else:
        raise ValueError(f"{config_path}: arch {arch!r} is not one of vit_b, vit_l, vit_h, tiny")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return sam.to(device).eval()


def pick_automatic_mask(masks: list[np.ndarray], predicted_iou: list[float]) -> np.ndarray | None:
    """The documented rule for prompt-less segmentation (see the module docstring)."""
    if not masks:
        return None
    height, width = masks[0].shape
    cy, cx = height // 2, width // 2
    limit = MAX_AUTOMATIC_FRACTION * height * width
    central = [m for m in masks if m[cy, cx] and m.sum() <= limit]
    if central:
        return max(central, key=lambda m: int(m.sum()))
    candidates = [(iou, i) for i, (m, iou) in enumerate(zip(masks, predicted_iou)) if m.sum() <= limit]
    return masks[max(candidates)[1]] if candidates else None


class Segmenter:
    """One loaded SAM (per Ray Data actor, or per device process)."""

    def __init__(self, sam_dir: str, device: str | None = None, points_per_side: int = 16,
                 pred_iou_thresh: float = MIN_PREDICTED_IOU, stability_score_thresh: float = 0.92):
        from segment_anything import SamAutomaticMaskGenerator, SamPredictor

        self.sam = load_sam(sam_dir, device)
        self.predictor = SamPredictor(self.sam)
        self.automatic = SamAutomaticMaskGenerator(
            self.sam, points_per_side=points_per_side, pred_iou_thresh=pred_iou_thresh,
            stability_score_thresh=stability_score_thresh,
        )

    def segment(self, image: np.ndarray, box=None, points=None) -> np.ndarray:
        """HxW bool target mask; raises SegmentationError when SAM finds nothing usable."""
        import torch

        with torch.inference_mode():
            return self._segment(image, box, points)

    def _segment(self, image: np.ndarray, box, points) -> np.ndarray:
        if box is None and not points:
            records = self.automatic.generate(image)
            mask = pick_automatic_mask([r["segmentation"] for r in records], [r["predicted_iou"] for r in records])
            if mask is None:
                raise SegmentationError("SAM found no target mask (no prompt given; add a box, points or a mask)")
            return mask.astype(bool)
        mask, _ = self._prompted(image, box, points)
        if box is not None:
            x0, y0, x1, y1 = box
            inside = np.zeros_like(mask)
            inside[y0:y1, x0:x1] = True
            mask &= inside
        return mask

    def prompted(self, image: np.ndarray, box=None, points=None) -> tuple[np.ndarray, float]:
        """SAM's best mask for a box and/or positive points, unclipped, with its predicted IoU."""
        import torch

        with torch.inference_mode():
            return self._prompted(image, box, points)

    def _prompted(self, image: np.ndarray, box, points) -> tuple[np.ndarray, float]:
        self.predictor.set_image(image)
        coords = np.asarray(points, dtype=np.float32) if points else None
        labels = np.ones(len(points), dtype=np.int64) if points else None
        masks, scores, _ = self.predictor.predict(
            point_coords=coords, point_labels=labels, box=np.asarray(box, dtype=np.float32) if box is not None else None,
            multimask_output=box is None,
        )
        best = int(np.argmax(scores))
        return masks[best].astype(bool), float(scores[best])


class LazySegmenter:
    """A SAM found and loaded on first need: `loader` is a zero-argument callable returning the SAM
    folder or None (`models.source.sam_loader(model, sam)` makes a picklable one).

    `available` is False when the loader finds no SAM folder; callers then fall back to boxes. Nothing is
    resolved (or built, for `tiny`) until a reference without a mask asks for it."""

    _UNRESOLVED = object()

    def __init__(self, loader: Callable[[], str | None]):
        if not callable(loader):
            raise TypeError(f"LazySegmenter takes a loader (a callable returning the SAM folder), not {loader!r}")
        self.loader = loader
        self._sam_dir = self._UNRESOLVED
        self._segmenter: Segmenter | None = None

    @property
    def sam_dir(self) -> str | None:
        if self._sam_dir is self._UNRESOLVED:
            self._sam_dir = self.loader()
        return self._sam_dir

    @property
    def available(self) -> bool:
        return self.sam_dir is not None

    @property
    def loaded(self) -> Segmenter:
        if self._segmenter is None:
            self._segmenter = Segmenter(self.sam_dir)
        return self._segmenter

    def __call__(self, image: np.ndarray, box=None, points=None) -> np.ndarray:
        return self.loaded.segment(image, box=box, points=points)

    def prompted(self, image: np.ndarray, box=None, points=None) -> tuple[np.ndarray, float]:
        return self.loaded.prompted(image, box=box, points=points)
