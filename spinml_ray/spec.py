"""The request spec: what one user asks SpinML for, validated into typed objects.

A request is a YAML or JSON document. `load_request` reads it from any storage URI and returns a
`RequestSpec`, or raises `SpecError` whose message names every invalid field and its value.
Every URI a request names is confined to the folder that holds the request document (relative ones
resolve against it): a request can never make the server read another tenant's files or its own.
"""

from __future__ import annotations

import json
from enum import Enum
from importlib import resources
from typing import Annotated, Literal

import yaml
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from spinml_ray import storage


def _identifier(value: str) -> str:
    if not storage.IDENTIFIER.fullmatch(value):
        raise ValueError(f"must be {storage.IDENTIFIER_RULE}")
    return value


# A name that becomes a path segment (tenant, request id, label, image id): never a path.
Identifier = Annotated[str, AfterValidator(_identifier)]


class SpecError(ValueError):
    """A request document that cannot be used; the message names each bad field and value."""


class Level(str, Enum):
    """Sanitization level of one object (docs/DESIGN.md, "Levels"): what of it leaves the trust boundary."""

    L0 = "L0"  # nothing: text prompt only
    L1 = "L1"  # Canny edge map of the object's region
    L2 = "L2"  # the object's own pixels, everything else blanked


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, use_enum_values=False, allow_inf_nan=False)


class LabelSpec(_Strict):
    name: Identifier = Field(max_length=64)
    phrase: str = Field(min_length=1, max_length=200, description="prompt phrase, e.g. 'sleeping'")


class ReferenceSpec(_Strict):
    """One reference image. The target is found from, in order: `mask_uri` (the user's own mask,
    nonzero = target), else SAM prompted with `box` and/or `points`, else SAM's automatic masks."""

    uri: str = Field(min_length=1)
    label: str | None = None
    mask_uri: str | None = None
    box: tuple[int, int, int, int] | None = Field(default=None, description="x0, y0, x1, y1 in pixels")
    points: list[tuple[int, int]] | None = Field(default=None, min_length=1, description="(x, y) on the target")

    @field_validator("box")
    @classmethod
    def _box_ordered(cls, box):
        if box is not None:
            x0, y0, x1, y1 = box
            if x0 < 0 or y0 < 0 or x1 <= x0 or y1 <= y0:
                raise ValueError("box must be x0,y0,x1,y1 with 0 <= x0 < x1 and 0 <= y0 < y1")
        return box


class PrivacySpec(_Strict):
    target: Level = Level.L0
    background: Level = Level.L0
    alpha: float = Field(default=0.0, ge=0.0, le=1.0, description="fraction of images from L0_L0")

    @property
    def config(self) -> str:
        """The paper's name for the configuration, e.g. 'L2_L0'."""
        return f"{self.target.value}_{self.background.value}"


class SanitizationSpec(_Strict):
    canny_low: int = Field(default=100, ge=0, le=1000)
    canny_high: int = Field(default=200, ge=1, le=1000)
    blur_faces: bool = Field(default=True, description="blur faces inside released L2 pixels")
    allow_box_as_mask: bool = Field(default=False, description="without a mask or a segmenter, release a "
                                    "reference's whole box as its target (the background inside the box leaves too)")

    @model_validator(mode="after")
    def _thresholds_ordered(self):
        if self.canny_high <= self.canny_low:
            raise ValueError(f"canny_high ({self.canny_high}) must be above canny_low ({self.canny_low})")
        return self


class SynthesisSpec(_Strict):
    images_per_label: int = Field(default=8, ge=1, le=100_000)
    resolution: int = Field(default=512, ge=16, le=2048)
    steps: int = Field(default=50, ge=1, le=1000)
    guidance: float = Field(default=7.5, ge=0.0, le=50.0)
    seed: int = Field(default=0, ge=0, le=2**31 - 1)
    strength: float = Field(default=0.75, gt=0.0, le=1.0, description="image guidance strength at L2")
    scheduler: Literal["dpmsolver++", "ddim", "euler", "pndm", "unipc"] = "dpmsolver++"
    negative_prompt: str = "blurry, low quality, distorted, watermark, text"
    prompt_decorations: bool = Field(
        default=True, description="add a seeded view, lighting and (with an L0 background) setting to each prompt "
                                  "for diversity; false gives the SpinML paper's 'A photo of a {subject} {phrase}.'")
    l2_target: Literal["image_guided", "kept", "personalized_text"] = Field(
        default="kept", description="how a target released at L2 is drawn: kept (the default) keeps its released "
        "pixels as they are and paints the rest of the image around them (inpainting: from noise, where strength "
        "does not apply, or from the released room at strength where the background is at L2 too); image_guided "
        "starts from those pixels (img2img, with the adapter where there is one); "
        "personalized_text draws it from the prompt with the personalized model's identifier, as the SpinML paper "
        "does, and needs personalization")
    placement: Literal["as_released", "varied"] = Field(
        default="as_released", description="where an image puts a target whose edges (L1) or pixels (L2) condition "
        "it, with an L0 background: as_released keeps the reference's place; varied gives each image a seeded "
        "place along the same floor line, mirrored half the time (nothing more is released)")

    @property
    def target_pixels(self) -> bool:
        """Whether an L2 target's released pixels condition its images (not only through the adapter)."""
        return self.l2_target != "personalized_text"

    @field_validator("resolution")
    @classmethod
    def _multiple_of_8(cls, value):
        if value % 8:
            raise ValueError("resolution must be a multiple of 8")
        return value


FULL_DREAMBOOTH_LEARNING_RATE = 5e-6  # DreamBooth's published rate for the whole UNet (the SpinML artifact's)


class PersonalizationSpec(_Strict):
    """DreamBooth on the released L2 target (runs only when the target is at L2).

    `method: lora` (the default) trains a LoRA adapter: one base model serves every user, an adapter is
    a few MB. `method: full` fine-tunes the whole UNet, as DreamBooth was published (GPU-sized: on SD 1.5
    860 M parameters with Adam's state, and the service holds a whole UNet per request it serves).
    Defaults follow DreamBooth practice: identifier 'sks', rank 4, lr 1e-4 for LoRA and 5e-6 for the
    whole UNet, 400 steps, prior preservation with weight 1.0 on class images made by the base model."""

    enabled: bool = True
    method: Literal["lora", "full"] = "lora"
    token: str = Field(default="sks", pattern=r"^[a-z]{2,12}$")
    class_noun: str | None = Field(default=None, description="default: the request's subject")
    steps: int = Field(default=400, ge=1, le=100_000)
    learning_rate: float = Field(default=1e-4, gt=0.0, le=1.0)
    rank: int = Field(default=4, ge=1, le=256)
    batch_size: int = Field(default=1, ge=1, le=64)
    train_text_encoder: bool = False
    prior_preservation: bool = True
    prior_loss_weight: float = Field(default=1.0, ge=0.0, le=100.0)
    class_images: int = Field(default=50, ge=1, le=10_000)
    resolution: int | None = Field(default=None, ge=16, le=2048, multiple_of=8, description="default: synthesis resolution")
    checkpoint_every: int = Field(default=50, ge=1)
    num_workers: int = Field(default=1, ge=1, le=1024)
    gpu_fraction: float = Field(default=0.5, gt=0.0, le=1.0, description="GPU share per worker on GPU clusters")
    seed: int = Field(default=0, ge=0)

    @model_validator(mode="before")
    @classmethod
    def _full_rate(cls, data):
        """The whole UNet takes DreamBooth's own rate unless the request names one."""
        if isinstance(data, dict) and data.get("method") == "full" and "learning_rate" not in data:
            return {**data, "learning_rate": FULL_DREAMBOOTH_LEARNING_RATE}
        return data


CLASSIFIERS = ("mobilenet_v2", "resnet18")
DETECTORS = ("ssdlite320_mobilenet_v3_large", "fasterrcnn_mobilenet_v3_large_320_fpn")
DEFAULT_ARCHITECTURE = {"classification": "mobilenet_v2", "detection": "ssdlite320_mobilenet_v3_large"}


class TrainingSpec(_Strict):
    architecture: Literal["mobilenet_v2", "resnet18", "ssdlite320_mobilenet_v3_large",
                          "fasterrcnn_mobilenet_v3_large_320_fpn"] = Field(
        default="mobilenet_v2", description="default: mobilenet_v2 (classification), ssdlite320_mobilenet_v3_large (detection)")
    epochs: int = Field(default=5, ge=1, le=1000)
    batch_size: int = Field(default=128, ge=1, le=8192)
    learning_rate: float = Field(default=1e-3, gt=0.0, le=10.0)
    image_size: int = Field(default=224, ge=16, le=1024)
    num_workers: int = Field(default=1, ge=1, le=1024)
    gpu_fraction: float = Field(default=0.25, gt=0.0, le=1.0, description="GPU share per worker on GPU clusters")
    pretrained: str = Field(
        default="auto", min_length=1, max_length=storage.MAX_URI_LENGTH,
        description="starting weights. auto: the model source's classifiers/ (detectors/) file, else torchvision's "
                    "ImageNet (COCO) weights from the node's cache or download, else random with a warning; "
                    "none: random; or the URI of a torchvision state dict in the request's folder")


RECIPES = tuple(sorted(f.name.removesuffix(".yaml") for f in resources.files("spinml_ray.recipes").iterdir()
                      if f.name.endswith(".yaml")))


def recipe_settings(name: str) -> dict:
    """The settings a named recipe gives (`spinml_ray/recipes/{name}.yaml`), by section."""
    if name not in RECIPES:
        raise ValueError(f"recipe: no such recipe; the recipes are {list(RECIPES)}")
    return yaml.safe_load(resources.files("spinml_ray.recipes").joinpath(f"{name}.yaml").read_text())


def _with_recipe(document: dict) -> dict:
    """A request document with its recipe's settings filled in under its own: the request's values win."""
    name = document.get("recipe")
    if name is None:
        return document
    if not isinstance(name, str):
        raise ValueError(f"recipe: must be a name, one of {list(RECIPES)}")
    merged = dict(document)
    for section, settings in recipe_settings(name).items():
        own = document.get(section)
        if own is not None and not isinstance(own, dict):
            continue  # the section's own validation names the problem
        merged[section] = {**settings, **(own or {})}
    return merged


class RequestSpec(_Strict):
    request_id: Identifier
    tenant: Identifier
    task: Literal["classification", "detection"] = "classification"
    subject: str = Field(min_length=1, max_length=200, description="the subject noun, e.g. 'husky dog'")
    labels: list[LabelSpec] = Field(min_length=1, description="classes: at least 2 to classify, 1 or more to detect")
    references: list[ReferenceSpec] = Field(default_factory=list)
    bundle: str | None = Field(default=None, description="URI of a sanitized bundle made on the device")
    privacy: PrivacySpec = PrivacySpec()
    sanitization: SanitizationSpec = SanitizationSpec()
    synthesis: SynthesisSpec = SynthesisSpec()
    personalization: PersonalizationSpec = PersonalizationSpec()
    training: TrainingSpec = TrainingSpec()
    test_set: str | None = Field(default=None, description="URI of a folder with one subfolder per label (and, to "
                                 "detect, a boxes.json: {'label/file.png': [[x0, y0, x1, y1], ...]})")
    min_references: int = Field(default=1, ge=1)
    recipe: str | None = Field(default=None, description=f"named settings filled in under the request's own: one of {list(RECIPES)}")

    @model_validator(mode="before")
    @classmethod
    def _defaults(cls, document):
        """The recipe's settings, then the architecture's default by task (a detector for detection)."""
        if isinstance(document, dict):
            document = _with_recipe(document)
        if isinstance(document, dict) and document.get("task") in DEFAULT_ARCHITECTURE:
            training = document.get("training")
            if training is None or (isinstance(training, dict) and "architecture" not in training):
                training = {**(training or {}), "architecture": DEFAULT_ARCHITECTURE[document["task"]]}
                document = {**document, "training": training}
        return document

    @model_validator(mode="after")
    def _consistent(self):
        allowed = CLASSIFIERS if self.task == "classification" else DETECTORS
        if self.training.architecture not in allowed:
            raise ValueError(f"training.architecture: {self.training.architecture!r} cannot do {self.task}; "
                             f"use one of {list(allowed)}")
        if self.task == "classification" and len(self.labels) < 2:
            raise ValueError(f"labels: classification needs at least 2 labels, got {[x.name for x in self.labels]}")
        names = [label.name for label in self.labels]
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise ValueError(f"labels: duplicate label names {duplicates}")
        if (self.privacy.target == Level.L2 and self.synthesis.l2_target == "personalized_text"
                and not self.personalization.enabled):
            raise ValueError("synthesis.l2_target: personalized_text draws the L2 target with the personalized model; "
                             "it needs personalization.enabled (or l2_target: image_guided)")
        for i, ref in enumerate(self.references):
            if ref.label is not None and ref.label not in names:
                raise ValueError(f"references[{i}].label: {ref.label!r} is not one of the labels {names}")
        if bool(self.references) == bool(self.bundle):
            raise ValueError("give either references (raw images to sanitize) or bundle (already sanitized), not both or neither")
        if self.bundle is None and self.min_references > len(self.references):
            raise ValueError(
                f"min_references: {self.min_references} is more than the {len(self.references)} references given"
            )
        return self

    @property
    def label_names(self) -> list[str]:
        return [label.name for label in self.labels]

    @property
    def unpersonalized(self) -> str | None:
        """Why the request gets no adapter (personalization only trains on a target released at L2),
        or None when it gets one."""
        if not self.personalization.enabled:
            return "personalization off"
        if self.privacy.target != Level.L2:
            return f"target released at {self.privacy.target.value}, not L2"
        return None


def _describe(error: dict, document: dict) -> str:
    loc = ".".join(str(part) for part in error["loc"]) or "(request)"
    if error["type"] == "missing":
        return f"{loc}: required field is missing"
    value = document
    for part in error["loc"]:
        try:
            value = value[part]
        except (KeyError, IndexError, TypeError):
            value = error.get("input")
            break
    message = error["msg"].removeprefix("Value error, ")
    if error["loc"]:
        return f"{loc} = {value!r}: {message}"
    return message


def _confined(base_uri: str, uri: str | None, what: str, source: str) -> str | None:
    if uri is None:
        return None
    try:
        return storage.confine(base_uri, uri, what)
    except storage.OutsidePrefix as exc:
        raise SpecError(f"{source}: invalid request: {exc} (a request names only files in its own folder)") from None


def parse_request(document: dict, base_uri: str | None = None, source: str = "request") -> RequestSpec:
    """Validate a request document (already parsed). With `base_uri` (the folder holding the document),
    every URI it names (references, masks, test set, bundle, pretrained weights) must lie inside that folder: relative
    ones resolve against it, and one that leads anywhere else is refused with the field named."""
    if not isinstance(document, dict):
        raise SpecError(f"{source}: expected a mapping at the top level, got {type(document).__name__}")
    try:
        spec = RequestSpec.model_validate(document)
    except ValidationError as exc:
        problems = "; ".join(_describe(err, document) for err in exc.errors())
        raise SpecError(f"{source}: invalid request: {problems}") from None
    if base_uri is None:
        return spec
    refs = [
        ref.model_copy(
            update={
                "uri": _confined(base_uri, ref.uri, f"references.{i}.uri", source),
                "mask_uri": _confined(base_uri, ref.mask_uri, f"references.{i}.mask_uri", source),
            }
        )
        for i, ref in enumerate(spec.references)
    ]
    training = spec.training
    if training.pretrained not in ("auto", "none"):
        training = training.model_copy(
            update={"pretrained": _confined(base_uri, training.pretrained, "training.pretrained", source)})
    return spec.model_copy(update={"references": refs,
                                   "test_set": _confined(base_uri, spec.test_set, "test_set", source),
                                   "bundle": _confined(base_uri, spec.bundle, "bundle", source),
                                   "training": training})


def load_request(uri: str, base_uri: str | None = None) -> RequestSpec:
    """Read and validate a request document (YAML or JSON) from a local path or s3:// URI; the URIs it
    names resolve in its own folder, or in `base_uri` when given (another copy of that folder)."""
    try:
        text = storage.read_bytes(uri).decode("utf-8")
    except FileNotFoundError:
        raise SpecError(f"{uri}: request file not found") from None
    except UnicodeDecodeError:
        raise SpecError(f"{uri}: request file is not UTF-8 text") from None
    try:
        document = json.loads(text) if uri.endswith(".json") else yaml.safe_load(text)
    except (yaml.YAMLError, json.JSONDecodeError) as exc:
        raise SpecError(f"{uri}: not valid YAML/JSON: {exc}") from None
    return parse_request(document, base_uri=base_uri or storage.parent(uri), source=uri)
