"""The diffusion engine: one base model, loaded once, serving every pipeline kind in batches.

All pipeline kinds share the same UNet, VAE, text encoder and (when present) ControlNet, so adding a
kind costs no memory. `generate` groups work items by `WorkItem.batch_key` and runs each group as one
batched pipeline call, with one seeded generator per image so each image can be regenerated alone.
"""

from __future__ import annotations

import io
import logging
from collections import defaultdict

import numpy as np
import torch
from PIL import Image

from spinml_ray.images import digest, encode_png
from spinml_ray.models import source as model_source
from spinml_ray.synthesis.workitems import GeneratedImage, WorkItem

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A work item this engine cannot serve (e.g. L1 conditioning without ControlNet weights)."""


def _pil(data: bytes, mode: str) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert(mode)


class DiffusionEngine:
    def __init__(self, model: str = "tiny", controlnet: str | None = None, device: str | None = None):
        from diffusers import (
            ControlNetModel,
            DPMSolverMultistepScheduler,
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionControlNetInpaintPipeline,
            StableDiffusionControlNetPipeline,
            StableDiffusionImg2ImgPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.float16 if self.device.startswith("cuda") else torch.float32
        path = model_source.resolve(model)
        base = StableDiffusionPipeline.from_pretrained(
            path, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
        base.scheduler = DPMSolverMultistepScheduler.from_config(base.scheduler.config, algorithm_type="dpmsolver++")
        base.set_progress_bar_config(disable=True)
        components = {k: v for k, v in base.components.items()}
        self.pipes = {
            "txt2img": base,
            "img2img": StableDiffusionImg2ImgPipeline(**components, requires_safety_checker=False),
            "inpaint": StableDiffusionInpaintPipeline(**components, requires_safety_checker=False),
        }
        controlnet_path = model_source.resolve_controlnet(model, controlnet)
        if controlnet_path:
            net = ControlNetModel.from_pretrained(controlnet_path, dtype=dtype)
            self.pipes["controlnet"] = StableDiffusionControlNetPipeline(**components, controlnet=net, requires_safety_checker=False)
            self.pipes["controlnet_img2img"] = StableDiffusionControlNetImg2ImgPipeline(**components, controlnet=net, requires_safety_checker=False)
            self.pipes["controlnet_inpaint"] = StableDiffusionControlNetInpaintPipeline(**components, controlnet=net, requires_safety_checker=False)
        for pipe in self.pipes.values():
            pipe.set_progress_bar_config(disable=True)
        base.to(self.device)
        if controlnet_path:
            net.to(self.device)
        self.model = model

    @property
    def kinds(self) -> list[str]:
        return sorted(self.pipes)

    def generate(self, items: list[WorkItem]) -> list[GeneratedImage]:
        """Generate every item; the result list is in the order of `items`."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, item in enumerate(items):
            if item.kind not in self.pipes:
                raise EngineError(f"{item.image_id}: pipeline '{item.kind}' needs ControlNet weights this model lacks")
            groups[item.batch_key()].append(position)
        results: list[GeneratedImage | None] = [None] * len(items)
        for positions in groups.values():
            group = [items[p] for p in positions]
            for position, image in zip(positions, self._run(group)):
                results[position] = image
        return results  # type: ignore[return-value]

    @torch.inference_mode()
    def _run(self, group: list[WorkItem]) -> list[GeneratedImage]:
        first = group[0]
        kind = first.kind
        kwargs: dict = dict(
            prompt=[i.prompt for i in group],
            negative_prompt=[i.negative_prompt for i in group],
            num_inference_steps=first.steps,
            guidance_scale=first.guidance,
            generator=[torch.Generator("cpu").manual_seed(i.seed) for i in group],
            height=first.resolution,
            width=first.resolution,
            output_type="np",
        )
        if first.init_image is not None:
            kwargs["image"] = [_pil(i.init_image, "RGB") for i in group]
            kwargs["strength"] = first.strength
            if kind.endswith("img2img"):
                kwargs.pop("height"), kwargs.pop("width")
        if first.mask_image is not None:
            kwargs["mask_image"] = [_pil(i.mask_image, "L") for i in group]
        if first.control_image is not None:
            key = "control_image" if first.init_image is not None else "image"
            kwargs[key] = [_pil(i.control_image, "RGB") for i in group]
        images = self.pipes[kind](**kwargs).images
        out = []
        for item, array in zip(group, images):
            pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            received = b"".join(x for x in (item.control_image, item.init_image, item.mask_image) if x is not None)
            out.append(
                GeneratedImage(
                    image_id=item.image_id,
                    kind=kind,
                    image=encode_png(pixels),
                    received_sha256=digest(received) if received else "",
                )
            )
        return out
