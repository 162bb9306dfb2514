"""Turn a request and its sanitized bundle into work items for the diffusion deployment.

The level of each object decides the conditioning (see docs/DESIGN.md, "From levels to pipelines"):
- L1 objects contribute their edge maps to one ControlNet (Canny) image;
- an L2 target's released pixels stay as they are and the rest is inpainted around them
  (`l2_target: kept`, the default); with `image_guided` they start the image instead (img2img); with
  `personalized_text` they guide nothing: the personalized model draws it from the prompt's identifier;
- an L2 background alone is kept and the target's region is inpainted on it;
- both at L2: a kept target stays as released and the room is redrawn from its released pixels
  (inpainting at `strength`); otherwise the two released parts guide the image together (img2img).
With `placement: varied` and an L0 background, each image puts the target's edges or pixels at its own
seeded place along the floor line, mirrored half the time (`choose_placement`): the room is painted
anyway, and nothing more is released. A fraction `alpha` of each label's images comes from the L0_L0
pool (text only). Only the sanitized rows are read here: the raw references are never opened after
sanitization.
"""

from __future__ import annotations

import hashlib
import math

import cv2
import numpy as np
from PIL import Image

from spinml_ray.images import box_of_mask, decode_png, encode_png
from spinml_ray.spec import LabelSpec, Level, PrivacySpec, RequestSpec, SynthesisSpec
from spinml_ray.synthesis.prompts import build_prompt
from spinml_ray.synthesis.workitems import WorkItem

L0_L0 = "L0_L0"


def image_seed(base_seed: int, label: str, index: int) -> int:
    """A recorded per-image seed: the same request regenerates the same image."""
    digest = hashlib.sha256(f"{base_seed}:{label}:{index}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def _resize_edges(edges: np.ndarray, size: int) -> np.ndarray:
    small = cv2.resize(edges.astype(np.float32), (size, size), interpolation=cv2.INTER_AREA)
    return np.where(small > 0, 255, 0).astype(np.uint8)


def _resize_rgb(pixels: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(pixels).resize((size, size), Image.LANCZOS))


def _resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((size, size), Image.NEAREST)) > 0


# Where one image puts its target: a horizontal shift in pixels, applied after an optional mirror.
Placement = tuple[int, bool]


def choose_placement(seed: int, box: list[float], size: int) -> Placement:
    """A seeded mirror and shift that keep the whole `box` (x0, y0, x1, y1) inside a size-wide frame."""
    rng = np.random.default_rng(seed)
    mirror = bool(rng.random() < 0.5)
    x0, x1 = (size - box[2], size - box[0]) if mirror else (box[0], box[2])
    return int(rng.integers(-math.floor(x0), size - math.ceil(x1) + 1)), mirror


def _place(image: np.ndarray, placement: Placement | None) -> np.ndarray:
    """`image` (H x W [x C]) mirrored and shifted; what wraps round is what lies outside the box."""
    if placement is None:
        return image
    shift, mirror = placement
    return np.roll(image[:, ::-1] if mirror else image, shift, axis=1)


def placed_box(box: list[float] | None, placement: Placement | None, size: int) -> list[float] | None:
    """`box` where `_place` moves it in a size-wide frame."""
    if box is None or placement is None:
        return box
    shift, mirror = placement
    x0, y0, x1, y1 = box
    if mirror:
        x0, x1 = size - x1, size - x0
    return [x0 + shift, y0, x1 + shift, y1]


def conditioning(target: dict, background: dict, size: int, target_pixels: bool = True,
                 kept: bool = False, placement: Placement | None = None) -> dict[str, bytes | None]:
    """control/init/mask images (PNG bytes or None) for one reference's two sanitized rows. Without
    `target_pixels` an L2 target's pixels guide nothing (`SynthesisSpec.target_pixels`); with `kept`
    (`kept_target`) they stay as released and everything around them is painted. `placement` moves
    the whole frame (`choose_placement`; only where the background guides nothing: `movable_target`)."""
    rows = {"target": target, "background": background}
    edges = [decode_png(r["payload"]) for r in rows.values() if r["level"] == Level.L1.value]
    released = {name: r for name, r in rows.items()
                if r["level"] == Level.L2.value and (name == "background" or target_pixels)}
    out: dict[str, bytes | None] = {"control_image": None, "init_image": None, "mask_image": None}
    if edges:
        combined = _place(_resize_edges(np.maximum.reduce(edges), size), placement)
        out["control_image"] = encode_png(np.stack([combined] * 3, axis=-1))
    if released:
        pixels = sum(decode_png(r["payload"]).astype(np.uint16) for r in released.values())
        out["init_image"] = encode_png(_place(_resize_rgb(np.clip(pixels, 0, 255).astype(np.uint8), size), placement))
        if set(released) == {"background"}:
            hole = ~(decode_png(released["background"]["region"]) > 0)
            out["mask_image"] = encode_png(_resize_mask(hole, size))
        elif kept:  # everything but the target is painted
            region = _place(_resize_mask(decode_png(released["target"]["region"]) > 0, size), placement)
            out["mask_image"] = encode_png(~region)
    return out


def kept_target(privacy: PrivacySpec, synth: SynthesisSpec) -> bool:
    """An L2 target kept as released, the rest inpainted (from noise, or from the released room where
    the background is at L2 too)."""
    return synth.l2_target == "kept" and privacy.target == Level.L2


def movable_target(privacy: PrivacySpec, synth: SynthesisSpec) -> bool:
    """Whether each image places the target anew (`placement: varied`) wherever its release places it:
    the background guides nothing (L0), so only the target's edges (L1) or pixels (L2, where they
    guide) fix where it is, and those are exactly what gives it a `geometry_box`."""
    return synth.placement == "varied" and privacy.background == Level.L0


def _bounding_box(mask: np.ndarray, size: int) -> list[float] | None:
    """`mask`'s box scaled to a size x size frame (as the conditioning is)."""
    box = box_of_mask(mask)
    height, width = mask.shape[:2]
    return None if box is None else [v * size / (width if i % 2 == 0 else height) for i, v in enumerate(box)]


def geometry_box(target: dict, background: dict, size: int, target_pixels: bool = True) -> list[float] | None:
    """Where the conditioning put the target in a size x size image, or None where it did not fix it.

    The target's released region (L2, where its pixels guide: `target_pixels`) or edge map (L1) places
    it; with only the background released at L2, the target is what gets inpainted, in the hole. An L1
    background alone leaves the target's place open, and L0_L0 images have no geometry at all: those
    need the auto-labeller."""
    if target["level"] == Level.L2.value and target_pixels:
        return _bounding_box(decode_png(target["region"]) > 0, size)
    if target["level"] == Level.L1.value:
        return _bounding_box(decode_png(target["payload"]) > 0, size)
    if background["level"] == Level.L2.value:
        return _bounding_box(~(decode_png(background["region"]) > 0), size)
    return None


def index_bundle(sanitized: list[dict]) -> dict[str, dict[str, dict]]:
    """{ref_id: {"target": row, "background": row}} for references with both rows."""
    by_ref: dict[str, dict[str, dict]] = {}
    for row in sanitized:
        by_ref.setdefault(row["ref_id"], {})[row["object"]] = row
    return {ref: objs for ref, objs in sorted(by_ref.items()) if {"target", "background"} <= set(objs)}


def plan_label(request_id: str, tenant: str, subject: str, label: LabelSpec, privacy: PrivacySpec,
               synth: SynthesisSpec, by_ref: dict[str, dict[str, dict]], adapter: str | None = None,
               token: str | None = None) -> list[WorkItem]:
    """The `synth.images_per_label` work items of one label (the job and the HTTP API share this)."""
    config = privacy.config
    n = synth.images_per_label
    n_l0 = n if config == L0_L0 else math.floor(privacy.alpha * n + 0.5)  # half rounds up
    refs = list(by_ref)
    if n_l0 < n and not refs:
        raise ValueError(f"privacy {config} needs sanitized references, and none were accepted")
    own = [r for r in refs if by_ref[r]["target"].get("label") in (None, label.name)] or refs
    kept, movable = kept_target(privacy, synth), movable_target(privacy, synth)
    conditions: dict[tuple, dict] = {}
    boxes = {ref: geometry_box(rows["target"], rows["background"], synth.resolution, synth.target_pixels)
             for ref, rows in by_ref.items()}
    items = []
    for index in range(n):
        seed = image_seed(synth.seed, label.name, index)
        common = dict(
            image_id=f"{label.name}-{index:05d}", request_id=request_id, tenant=tenant, label=label.name,
            negative_prompt=synth.negative_prompt, seed=seed, resolution=synth.resolution, steps=synth.steps,
            guidance=synth.guidance, strength=synth.strength, scheduler=synth.scheduler,
        )
        if index < n_l0:
            prompt = build_prompt(subject, label.phrase, seed, decorate=synth.prompt_decorations)
            items.append(WorkItem(pool=L0_L0, prompt=prompt, **common))
            continue
        ref = own[index % len(own)]
        rows = by_ref[ref]
        placement = choose_placement(seed, boxes[ref], synth.resolution) if movable and boxes[ref] else None
        if (ref, placement) not in conditions:
            conditions[ref, placement] = conditioning(rows["target"], rows["background"], synth.resolution,
                                                      synth.target_pixels, kept, placement)
        personalised = adapter is not None and privacy.target == Level.L2
        prompt = build_prompt(subject, label.phrase, seed, token=token if personalised else None,
                              describe_setting=privacy.background == Level.L0, decorate=synth.prompt_decorations)
        if kept and privacy.background != Level.L2:  # the painted part starts from noise: no image guides it
            common["strength"] = 1.0
        items.append(WorkItem(pool=config, prompt=prompt, source_ref=ref, adapter=adapter if personalised else None,
                              box=placed_box(boxes[ref], placement, synth.resolution), **conditions[ref, placement],
                              **common))
    return items


def plan_work_items(spec: RequestSpec, by_ref: dict[str, dict[str, dict]], adapter: str | None = None,
                    token: str | None = None) -> list[WorkItem]:
    """Every synthetic image the request needs, with its prompt, seed and conditioning, from the
    sanitized bundle indexed by reference (`index_bundle`)."""
    return [
        item
        for label in spec.labels
        for item in plan_label(spec.request_id, spec.tenant, spec.subject, label, spec.privacy, spec.synthesis,
                               by_ref, adapter, token)
    ]
