"""Cross-attention maps of the subject (synthesis) and the auto-labeller that prompts SAM with them."""

from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention, AttnProcessor2_0
from standins import DiscSam, SubjectSam, box_iou

from spinml_ray.autolabel import attention_prompt, trusted_boxes
from spinml_ray.examples import make_scene
from spinml_ray.images import box_of_mask, decode_png, encode_png
from spinml_ray.models.source import sam_loader
from spinml_ray.segmentation import MIN_PREDICTED_IOU, LazySegmenter
from spinml_ray.synthesis.attention import CrossAttentionRecorder, encode_map, recording, token_positions
from spinml_ray.synthesis.engine import DiffusionEngine
from spinml_ray.synthesis.workitems import WorkItem

# ---------------------------------------------------------------- tokens


@pytest.fixture(scope="module")
def engine():
    return DiffusionEngine("tiny")


def test_token_positions_find_the_subject_as_the_text_encoder_sees_it(engine):
    tokenizer = engine.pipes["txt2img"].tokenizer
    assert token_positions(tokenizer, "A photo of a duck floating, close-up.", "duck") == [5]
    assert token_positions(tokenizer, "A photo of a sks rubber duck resting.", "rubber duck") == [6, 7]
    assert token_positions(tokenizer, "A photo of a cat.", "duck") == []
    cut = "A photo of " + "a very " * 60 + "duck."  # the subject falls beyond the encoder's 77 tokens
    assert token_positions(tokenizer, cut, "duck") == []


# ---------------------------------------------------------------- the recorder


def _layer(heads: int = 1) -> Attention:
    """A cross-attention layer whose query and key projections are the identity (times 8): with two
    heads, head 0 sees features 0-1 and head 1 features 2-3."""
    layer = Attention(query_dim=4, cross_attention_dim=4, heads=heads, dim_head=4 // heads,
                      processor=AttnProcessor2_0())
    with torch.no_grad():
        for projection in (layer.to_q, layer.to_k):
            projection.weight.copy_(torch.eye(4) * 8)
    return layer


def _features(where: np.ndarray) -> torch.Tensor:
    """(1, H*W, 4): feature 0 where `where` is set, feature 1 elsewhere (row-major, as the UNet flattens)."""
    flat = torch.as_tensor(where.reshape(-1))
    return torch.stack([flat.float(), (~flat).float(), torch.zeros(flat.shape), torch.zeros(flat.shape)], -1)[None]


@pytest.mark.parametrize("heads, outside", [(1, 0.0), (2, 1 / 3)])
def test_recorder_maps_attention_to_the_right_pixels_and_keeps_the_conditional_half(heads, outside):
    # With two heads, head 1 sees only zeros and attends evenly (1/2 to the token everywhere), so the
    # head mean is 3/4 in the region and 1/4 outside: 1/3 after scaling to the peak.
    layer = _layer(heads)
    tokens = torch.tensor([[[0.0, 1, 0, 0], [1.0, 0, 0, 0]]])  # token 1 matches feature 0
    cond = np.zeros((4, 4), bool)
    cond[0:2, 2:4] = True  # top right
    uncond = np.zeros((4, 4), bool)
    uncond[2:4, 0:2] = True  # bottom left, in the unconditional half of a guided batch
    states = torch.cat([_features(uncond), _features(cond)])
    recorder = CrossAttentionRecorder([[1]], grid=4)
    plain = layer(states, encoder_hidden_states=tokens.expand(2, -1, -1))
    with recording(_Holder(layer), recorder):
        recorded = layer(states, encoder_hidden_states=tokens.expand(2, -1, -1))
        layer(states, encoder_hidden_states=None)  # self-attention is not recorded
    torch.testing.assert_close(recorded, plain)  # recording does not change the layer's output
    (heat,) = recorder.maps()
    assert heat.shape == (4, 4) and heat.max() == pytest.approx(1.0)
    assert heat[cond].min() > 0.99 and np.allclose(heat[~cond], outside, atol=0.01)
    assert type(layer.processor) is AttnProcessor2_0  # restored afterwards


def test_recorder_upsamples_to_the_grid_and_skips_items_that_ask_for_nothing():
    layer = _layer()
    where = np.zeros((4, 4), bool)
    where[0:2, 0:2] = True
    recorder = CrossAttentionRecorder([[1], []], grid=8)
    tokens = torch.tensor([[[0.0, 1, 0, 0], [1.0, 0, 0, 0]]]).expand(2, -1, -1)
    with recording(_Holder(layer), recorder):
        layer(torch.cat([_features(where)] * 2), encoder_hidden_states=tokens)
    heat, nothing = recorder.maps()
    assert nothing is None and heat.shape == (8, 8)
    # the top-left quarter of the 4x4 grid is the top-left quarter of the 8x8 one, up to bilinear edges
    assert heat[:3, :3].min() > 0.99 and heat[5:].max() < 0.01 and heat[:, 5:].max() < 0.01


class _Holder:
    """The two things `recording` uses of a UNet, for one bare attention layer."""

    def __init__(self, layer):
        self.layer = layer

    @property
    def attn_processors(self):
        return {"block.attn2.processor": self.layer.processor}

    def set_attn_processor(self, processors):
        self.layer.set_processor(processors["block.attn2.processor"])


# ---------------------------------------------------------------- the engine


def _item(image_id, **extra):
    return WorkItem(image_id=image_id, request_id="r", tenant="t", label="a", pool="L0_L0",
                    prompt="A photo of a duck floating", seed=3, resolution=32, steps=2, guidance=5.0, **extra)


def test_engine_returns_maps_only_when_asked_and_the_same_images(engine):
    plain, duck, photo = engine.generate([_item("p"), _item("d", attend="duck"), _item("f", attend="photo")])
    assert plain.attention is None
    assert plain.image == duck.image == photo.image  # recording changes no pixel
    maps = [decode_png(g.attention) for g in (duck, photo)]
    grid = 32 // engine.pipes["txt2img"].vae_scale_factor
    assert all(m.shape == (grid, grid) and m.dtype == np.uint8 and m.max() == 255 for m in maps)
    assert not np.array_equal(*maps)  # each item's map follows its own words
    assert {type(p) for p in engine.pipes["txt2img"].unet.attn_processors.values()} == {AttnProcessor2_0}
    absent = engine.generate([_item("x", attend="zebra")])[0]  # not in the prompt: no map, still an image
    assert absent.attention is None and absent.image == plain.image


# ---------------------------------------------------------------- the auto-labeller


def _blob(centre, size=16, sigma=2.0):
    ys, xs = np.mgrid[0:size, 0:size]
    return np.exp(-((xs - centre[0]) ** 2 + (ys - centre[1]) ** 2) / (2 * sigma**2))


def test_attention_prompt_is_the_peak_and_the_box_around_it():
    heat = _blob((4, 10)) + 0.9 * _blob((13, 2), sigma=1.0)  # a second, separate hot spot
    point, box = attention_prompt(heat, (64, 64))  # 16 -> 64: four pixels per cell
    assert point[0] == pytest.approx(4 * 4 + 1.5, abs=2) and point[1] == pytest.approx(4 * 10 + 1.5, abs=2)
    x0, y0, x1, y1 = box
    assert x0 < point[0] < x1 and y0 < point[1] < y1 and x1 < 40  # the other spot is not in the box
    assert attention_prompt(np.zeros((16, 16)), (64, 64)) is None


def test_attention_prompts_sam_and_its_gate_keeps_only_confident_masks_on_the_peak():
    image = encode_png(np.zeros((64, 64, 3), np.uint8))
    row = {"image_id": "a", "box": None, "image": image, "attention": encode_map(_blob((8, 8)))}
    sam = DiscSam(score=0.95)
    boxes, counts = trusted_boxes([row], sam)
    assert counts == {"geometry": 0, "autolabel": 1, "left_out": 0}
    (box, points), = sam.prompts
    x, y = points[0]
    assert 30 <= x <= 36 and 30 <= y <= 36 and box[0] < x < box[2]  # the map's peak, upsampled
    assert boxes["a"] == pytest.approx([x - 8, y - 8, x + 9, y + 9])  # the box of SAM's mask

    for refused, why in ((DiscSam(score=0.5), "SAM is unsure"), (DiscSam(score=0.95, offset=20), "misses the peak"),
                         (DiscSam(score=0.95, radius=1), "a speck")):
        assert trusted_boxes([row], refused) == ({}, {"geometry": 0, "autolabel": 0, "left_out": 1}), why
        assert refused.prompts == sam.prompts, why  # SAM was asked, with the same prompt; the gate refused it
    flat = {**row, "attention": encode_map(np.zeros((8, 8)))}
    unasked = DiscSam(score=0.95)
    assert trusted_boxes([flat], unasked) == ({}, {"geometry": 0, "autolabel": 0, "left_out": 1})
    assert unasked.prompts == []  # the subject was not drawn: nothing to prompt SAM with


def _drawn(seed: int, label: str = "floating"):
    """(image, true mask, attention map): a 64x64 scene and an 8x8 map (the tiny UNet's grid) that is
    highest where the subject is, as a diffusion model's attention to the subject's words is."""
    image, mask = make_scene(label, seed, size=(64, 64))
    return image, mask, encode_map(cv2.resize(mask.astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA))


def test_attention_prompted_sam_boxes_the_subject_where_the_model_drew_it():
    drawn = [_drawn(40 + i, ("floating", "resting")[i % 2]) for i in range(4)]
    rows = [{"image_id": str(i), "box": None, "image": encode_png(image), "attention": heat}
            for i, (image, _, heat) in enumerate(drawn[:3])]
    elsewhere = np.zeros((8, 8))
    elsewhere[7, 0] = 1.0  # the map's peak in a corner, on the background: SAM's subject does not cover it
    rows.append({"image_id": "elsewhere", "box": None, "image": encode_png(drawn[3][0]), "attention": encode_map(elsewhere)})
    sam = SubjectSam([(image, mask) for image, mask, _ in drawn])
    boxes, counts = trusted_boxes(rows, sam)
    assert len(sam.prompts) == 4 and sam.unprompted == 0  # every map prompted SAM; nothing went unprompted
    assert counts == {"geometry": 0, "autolabel": 3, "left_out": 1} and set(boxes) == {"0", "1", "2"}
    for i, (_, mask, _) in enumerate(drawn[:3]):
        truth = box_of_mask(mask)
        (prompt_box, (point,)) = sam.prompts[i]
        assert mask[int(point[1]), int(point[0])]  # the attention peak lies on the subject ...
        assert box_iou(prompt_box, truth) > 0.7  # ... and the box around it is roughly the subject's
        assert boxes[str(i)] == truth  # the box is SAM's mask's: the subject's own

    unsure = SubjectSam([(image, mask) for image, mask, _ in drawn], score=MIN_PREDICTED_IOU - 0.01)
    assert trusted_boxes(rows, unsure) == ({}, {"geometry": 0, "autolabel": 0, "left_out": 4})
    assert len(unsure.prompts) == 4


class _CountingSegmenter(LazySegmenter):
    """The model source's own SAM, recording the score of each prompted answer."""

    def __init__(self, loader):
        super().__init__(loader)
        self.scores = []

    def prompted(self, image, box=None, points=None):
        mask, score = super().prompted(image, box=box, points=points)
        self.scores.append(score)
        return mask, score


def test_tiny_sam_answers_an_attention_prompt_below_the_gate(model_cache):
    """The preset's SAM has seeded random weights: it answers a prompt with an image-sized mask, and its
    own score of that mask is far below the gate, so the labeller leaves the image out."""
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
    mask, score = LazySegmenter(sam_loader("tiny")).prompted(image, box=[8.0, 8.0, 40.0, 40.0], points=[[20.0, 20.0]])
    assert mask.shape == (64, 64) and mask.dtype == bool and 0.0 <= score < MIN_PREDICTED_IOU
    row = {"image_id": "a", "box": None, "image": encode_png(image), "attention": encode_map(_blob((5, 5)))}
    sam = _CountingSegmenter(sam_loader("tiny"))
    boxes, counts = trusted_boxes([row], sam)
    assert len(sam.scores) == 1 and sam.scores[0] < MIN_PREDICTED_IOU  # SAM was prompted, and unsure
    assert boxes == {} and counts == {"geometry": 0, "autolabel": 0, "left_out": 1}


def test_training_stage_hands_the_stored_maps_to_the_labeller(tmp_path, monkeypatch):
    """`label_synthetic` (the Ray task's function, called here in this process) reads the committed
    table and gives the model source's SAM each stored map as its prompt."""
    import pyarrow as pa

    from spinml_ray import segmentation, storage
    from spinml_ray.ray_layer.train import label_synthetic

    image, mask, heat = _drawn(41)
    rows = [{"image_id": "geo", "box": [1.0, 2.0, 3.0, 4.0], "attention": None, "image": encode_png(image)},
            {"image_id": "drawn", "box": None, "attention": heat, "image": encode_png(image)}]
    truth = {"geo": [1.0, 2.0, 3.0, 4.0], "drawn": box_of_mask(mask)}

    def label(name, sam, drop=()):
        directory = str(tmp_path / name)
        part = storage.part_uri(directory)
        storage.write_table(part, pa.Table.from_pylist(rows).drop(list(drop)))
        storage.commit(directory, [part])
        monkeypatch.setattr(segmentation, "LazySegmenter", lambda loader: sam)
        return label_synthetic(directory, "tiny")

    sam = SubjectSam([(image, mask)])
    assert label("new", sam) == (truth, {"geometry": 1, "autolabel": 1, "left_out": 0})
    assert len(sam.prompts) == 1 and sam.unprompted == 0  # the stored map became SAM's prompt

    sam = SubjectSam([(image, mask)])  # a table from before maps: SAM unprompted
    assert label("old", sam, drop=("attention",)) == (truth, {"geometry": 1, "autolabel": 1, "left_out": 0})
    assert sam.unprompted == 1 and sam.prompts == []

    sam = SubjectSam([(image, mask)])
    sam.available = False  # a model source without SAM: the image without a box is left out
    assert label("no-sam", sam) == ({"geo": truth["geo"]}, {"geometry": 1, "autolabel": 0, "left_out": 1})
    assert sam.unprompted == 0 and sam.prompts == []
