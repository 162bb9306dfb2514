"""What travels between the synthesis job and the diffusion deployment (by handle or over HTTP)."""

from __future__ import annotations

from typing import Literal

import pyarrow as pa
from pydantic import BaseModel, ConfigDict, Field

from spinml_ray.spec import Identifier

Scheduler = Literal["dpmsolver++", "ddim", "euler", "pndm", "unipc"]
PipelineKind = Literal["txt2img", "controlnet", "img2img", "inpaint", "controlnet_img2img", "controlnet_inpaint"]


class WorkItem(BaseModel):
    """One synthetic image to generate. Conditioning images are PNG bytes (base64 in JSON)."""

    model_config = ConfigDict(extra="forbid", ser_json_bytes="base64", val_json_bytes="base64", allow_inf_nan=False)

    image_id: Identifier
    request_id: Identifier
    tenant: Identifier
    label: Identifier
    pool: str = Field(description="privacy configuration of this image's pool, e.g. 'L0_L0' or 'L1_L0'")
    prompt: str = Field(min_length=1, max_length=2000)
    negative_prompt: str = ""
    seed: int = Field(ge=0, le=2**32 - 1)
    resolution: int = Field(ge=16, le=2048, multiple_of=8)
    steps: int = Field(ge=1, le=1000)
    guidance: float = Field(ge=0.0, le=50.0)
    strength: float = Field(default=0.75, gt=0.0, le=1.0)
    scheduler: Scheduler = "dpmsolver++"
    adapter: str | None = Field(default=None, description="URI of this request's LoRA adapter folder")
    source_ref: str | None = None
    box: list[float] | None = Field(default=None, min_length=4, max_length=4,
                                    description="x0, y0, x1, y1 where the conditioning puts the target in the image "
                                    "(recorded with it); None where nothing places it")
    attend: str | None = Field(default=None, max_length=200,
                               description="words of the prompt whose cross-attention map to return (the subject)")
    control_image: bytes | None = None
    init_image: bytes | None = None
    mask_image: bytes | None = None

    @property
    def kind(self) -> PipelineKind:
        """Which diffusers pipeline this item needs, derived from the conditioning it carries."""
        image = "inpaint" if self.mask_image is not None else "img2img"
        if self.mask_image is not None and self.init_image is None:
            raise ValueError(f"{self.image_id}: mask_image given without init_image")
        if self.control_image is not None:
            return f"controlnet_{image}" if self.init_image is not None else "controlnet"  # type: ignore[return-value]
        return image if self.init_image is not None else "txt2img"  # type: ignore[return-value]

    def batch_key(self) -> tuple:
        """Items with equal keys can be generated in one pipeline call."""
        strength = self.strength if self.init_image is not None else None
        return (self.kind, self.resolution, self.steps, self.guidance, strength, self.scheduler, self.adapter)


class GeneratedImage(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")

    image_id: str
    kind: str
    image: bytes = Field(description="PNG bytes")
    received_sha256: str = Field(description="digest of the conditioning the deployment received ('' for none)")
    attention: bytes | None = Field(default=None, description="PNG map of the cross-attention to `attend`")


class GenerateRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    items: list[WorkItem] = Field(min_length=1, max_length=256)


class GenerateResponse(BaseModel):
    images: list[GeneratedImage]


# The synthetic table (`synthetic/part-*.parquet`): one row per stored image, what training reads.
SYNTHETIC_SCHEMA = pa.schema(
    [
        ("image_id", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int32()),
        ("pool", pa.string()),
        ("kind", pa.string()),
        ("prompt", pa.string()),
        ("negative_prompt", pa.string()),
        ("seed", pa.int64()),
        ("resolution", pa.int32()),
        ("steps", pa.int32()),
        ("guidance", pa.float64()),
        ("strength", pa.float64()),
        ("source_ref", pa.string()),
        ("condition_sha256", pa.string()),
        ("received_sha256", pa.string()),
        ("box", pa.list_(pa.float64(), 4)),
        ("attention", pa.binary()),
        ("image", pa.binary()),
    ]
)
