"""The diffusion engine: one base model, loaded once, serving every pipeline kind in batches.

All pipeline kinds share the same UNet, VAE, text encoder and (when present) ControlNet, so adding a
kind costs no memory. `generate` groups work items by `WorkItem.batch_key` (pipeline kind, shape,
scheduler, adapter) and runs each group as one batched pipeline call, with one seeded generator per
image so each image can be regenerated alone.

Per-request LoRA adapters are loaded into the shared UNet/text encoder under their own names, and
fine-tuned UNets (`personalization.method: full`) beside it, at most `max_adapters` at a time (least
recently used evicted). A group runs with exactly its own adapter
active, or with every adapter disabled, so one request's adapter never touches another's images.
A lock serialises generation and adapter loading/unloading on the replica.

An item with `attend` also gets the map of the UNet's cross-attention to those words
(`synthesis/attention.py`): where the model drew the subject, for the detection auto-labeller.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import threading
import uuid
from collections import OrderedDict, defaultdict

import numpy as np
import torch
from PIL import Image

from spinml_ray import storage
from spinml_ray.images import digest, encode_png
from spinml_ray.models import source as model_source
from spinml_ray.synthesis.attention import CrossAttentionRecorder, encode_map, recording, token_positions
from spinml_ray.synthesis.workitems import GeneratedImage, WorkItem

log = logging.getLogger(__name__)


class EngineError(ValueError):
    """A work item this engine cannot serve (e.g. L1 conditioning without ControlNet weights)."""


def _pil(data: bytes, mode: str) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert(mode)


def _keep_unmasked(processor, pixels: np.ndarray, init_image: bytes, mask_image: bytes) -> np.ndarray:
    """The generated `pixels` with the init image pasted back where the mask is black (kept): inpainting
    works on latents, and a decoded latent only approximates the pixels it was meant to keep."""
    size = (pixels.shape[1], pixels.shape[0])
    mask, init = _pil(mask_image, "L").resize(size, Image.NEAREST), _pil(init_image, "RGB").resize(size, Image.LANCZOS)
    return np.asarray(processor.apply_overlay(mask, init, Image.fromarray(pixels)))


SCHEDULERS = {
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "pndm": ("PNDMScheduler", {"skip_prk_steps": True}),
    "unipc": ("UniPCMultistepScheduler", {}),
}
LORA_WEIGHTS = "pytorch_lora_weights.safetensors"
FULL_UNET = "unet"  # a fully fine-tuned request model (`personalization.method: full`): its UNet's folder


ADAPTER_CONFIG = "adapter.json"
# what makes a fine-tuned UNet the served model's architecture
UNET_IDENTITY = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
                 "down_block_types", "up_block_types", "attention_head_dim", "sample_size")


def adapter_kind(folder: str) -> str | None:
    """"full" or "lora" for a request's personalization folder, by its `adapter.json` (`method`) when it
    has one, else by its files; None when it holds neither."""
    import json

    try:
        method = json.loads(storage.read_bytes(storage.join(folder, ADAPTER_CONFIG))).get("method")
    except (FileNotFoundError, ValueError, AttributeError):
        method = None
    if method in ("full", "lora"):
        return method
    if storage.is_file(storage.join(folder, LORA_WEIGHTS)):
        return "lora"
    return "full" if storage.is_file(storage.join(folder, FULL_UNET, "config.json")) else None


def is_adapter(uri: str) -> bool:
    """Whether `uri` holds a request's personalization: LoRA weights, or a fine-tuned UNet's folder."""
    return adapter_kind(uri) is not None


class DiffusionEngine:
    def __init__(self, model: str = "tiny", controlnet: str | None = None, device: str | None = None,
                 max_adapters: int = 8, dtype: str | None = None):
        import diffusers
        from diffusers import (
            ControlNetModel,
            StableDiffusionControlNetImg2ImgPipeline,
            StableDiffusionControlNetInpaintPipeline,
            StableDiffusionControlNetPipeline,
            StableDiffusionImg2ImgPipeline,
            StableDiffusionInpaintPipeline,
            StableDiffusionPipeline,
        )

        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        # fp16 on GPU (attention runs through PyTorch SDPA, diffusers' default), fp32 on CPU.
        dtype = getattr(torch, dtype) if dtype else (torch.float16 if self.device.startswith("cuda") else torch.float32)
        path = model_source.resolve(model)
        base = StableDiffusionPipeline.from_pretrained(
            path, dtype=dtype, safety_checker=None, requires_safety_checker=False
        )
        self.schedulers = {
            name: getattr(diffusers, cls).from_config(base.scheduler.config, **extra)
            for name, (cls, extra) in SCHEDULERS.items()
        }
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
        self.model, self.dtype = model, dtype
        self.max_adapters = max_adapters
        self.adapters: OrderedDict[str, str] = OrderedDict()  # adapter URI -> name in the pipeline
        self.base_unet = base.unet
        self.unets: dict[str, torch.nn.Module] = {}  # adapter URI -> its fine-tuned UNet (`method: full`)
        self._lock = threading.RLock()

    @property
    def kinds(self) -> list[str]:
        return sorted(self.pipes)

    @staticmethod
    def adapter_name(uri: str) -> str:
        return "a" + hashlib.sha256(uri.encode()).hexdigest()[:16]

    def load_adapter(self, uri: str) -> str:
        """Load the adapter folder at `uri` (local or s3://) unless loaded; returns its name. A LoRA
        adapter joins the shared UNet under that name; a fine-tuned UNet (`unet/`) is kept beside it,
        whole (a UNet's memory per request: see docs/DESIGN.md)."""
        with self._lock:
            if uri in self.adapters:
                self.adapters.move_to_end(uri)
                return self.adapters[uri]
            while len(self.adapters) >= self.max_adapters:
                self.unload_adapter(next(iter(self.adapters)))
            name = self.adapter_name(uri)
            local = uri
            if storage.is_s3(uri):  # a fresh folder each time: a retrained adapter never merges into an old copy
                local = storage.download_dir(uri, os.path.join(model_source.cache_dir(), "adapters",
                                                               f"{name}-{uuid.uuid4().hex[:8]}"))
            if adapter_kind(local) == "full":
                self.unets[uri] = self._load_unet(uri, os.path.join(local, FULL_UNET))
            elif os.path.exists(os.path.join(local, LORA_WEIGHTS)):
                self._use_unet(self.base_unet)  # LoRA joins the shared UNet, never a request's own
                self.pipes["txt2img"].load_lora_weights(local, weight_name=LORA_WEIGHTS, adapter_name=name)
            else:
                raise EngineError(f"{uri}: no {LORA_WEIGHTS} (a LoRA adapter saved by save_lora_weights) "
                                  f"nor {FULL_UNET}/ (a fine-tuned UNet)")
            self.adapters[uri] = name
            log.info("loaded adapter %s as %s", uri, name)
            return name

    def _load_unet(self, uri: str, folder: str):
        """A request's fine-tuned UNet: it must be the base UNet's architecture (its config says so) and
        stored as safetensors, so a folder a tenant wrote cannot make the replica build anything else."""
        from diffusers import UNet2DConditionModel

        config = UNet2DConditionModel.load_config(folder)
        different = [k for k in UNET_IDENTITY if config.get(k) != self.base_unet.config.get(k)]
        if different:
            raise EngineError(f"{uri}: its UNet is not the served model's architecture ({', '.join(different)} differ)")
        return UNet2DConditionModel.from_pretrained(folder, dtype=self.dtype, use_safetensors=True).to(self.device)

    def unload_adapter(self, uri: str) -> None:
        with self._lock:
            name = self.adapters.pop(uri, None)
            if uri in self.unets:
                self._use_unet(self.base_unet)
                del self.unets[uri]
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
            elif name is not None:
                self._use_unet(self.base_unet)
                self.pipes["txt2img"].delete_adapters([name])

    def _use_unet(self, unet) -> None:
        """Every pipeline runs `unet` (they share all their other components)."""
        for pipe in self.pipes.values():
            if pipe.unet is not unet:
                pipe.unet = unet

    def _activate(self, adapter: str | None) -> None:
        base = self.pipes["txt2img"]
        name = self.load_adapter(adapter) if adapter is not None else None
        self._use_unet(self.base_unet)
        if name is None or adapter in self.unets:
            if len(self.adapters) > len(self.unets):  # LoRA adapters are loaded (UNet or text encoder): none acts
                base.disable_lora()
            if adapter in self.unets:  # the request's own UNet, with the shared text encoder as it was trained
                self._use_unet(self.unets[adapter])
            return
        base.enable_lora()
        base.set_adapters([name])

    def generate(self, items: list[WorkItem]) -> list[GeneratedImage]:
        """Generate every item; the result list is in the order of `items`."""
        groups: dict[tuple, list[int]] = defaultdict(list)
        for position, item in enumerate(items):
            if item.kind not in self.pipes:
                raise EngineError(f"{item.image_id}: pipeline '{item.kind}' needs ControlNet weights this model lacks")
            groups[item.batch_key()].append(position)
        results: list[GeneratedImage | None] = [None] * len(items)
        with self._lock:
            for positions in groups.values():
                group = [items[p] for p in positions]
                self._activate(group[0].adapter)
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
        pipe = self.pipes[kind]
        pipe.scheduler = self.schedulers[first.scheduler]
        attend = [token_positions(pipe.tokenizer, i.prompt, i.attend) if i.attend else [] for i in group]
        recorder = CrossAttentionRecorder(attend, first.resolution // pipe.vae_scale_factor) if any(attend) else None
        with recording(pipe.unet, recorder):
            images = pipe(**kwargs).images
        maps = recorder.maps() if recorder else [None] * len(group)
        out = []
        for item, array, heat in zip(group, images, maps):
            pixels = (np.clip(array, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)
            if item.mask_image is not None:  # what the mask keeps is the released pixels, exactly
                pixels = _keep_unmasked(pipe.image_processor, pixels, item.init_image, item.mask_image)
            received = b"".join(x for x in (item.control_image, item.init_image, item.mask_image) if x is not None)
            out.append(
                GeneratedImage(
                    image_id=item.image_id,
                    kind=kind,
                    image=encode_png(pixels),
                    received_sha256=digest(received) if received else "",
                    attention=encode_map(heat) if heat is not None else None,
                )
            )
        return out
