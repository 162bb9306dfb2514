"""Where the diffusion model drew a word: cross-attention maps of the subject, for the auto-labeller.

While a batch is generated, every cross-attention layer of the UNet (`attn2`) records how much each
image position attends to the subject's tokens in that image's prompt (the conditional half of a
classifier-free-guided batch). Each layer's map is averaged over heads and upsampled to the latent
grid (resolution / vae scale factor); maps are summed over layers and denoising steps, then scaled
to [0, 1]. This is the aggregation of DAAM (Tang et al., 2023) and prompt-to-prompt.

Recording wraps each layer's own processor and only reads its inputs, so the images are exactly the
ones generated without it. Only items that ask for a map (`WorkItem.attend`) pay for it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import numpy as np
import torch
import torch.nn.functional as F

from spinml_ray.images import encode_png


def token_positions(tokenizer, prompt: str, words: str) -> list[int]:
    """Positions of `words`' tokens in `prompt` as the text encoder sees it ([] if absent or cut off)."""
    ids = tokenizer(prompt, truncation=True, max_length=tokenizer.model_max_length).input_ids
    wanted = tokenizer(words, add_special_tokens=False).input_ids
    if not wanted:
        return []
    for start in range(len(ids) - len(wanted) + 1):
        if ids[start : start + len(wanted)] == wanted:
            return list(range(start, start + len(wanted)))
    return []


class CrossAttentionRecorder:
    """Sums, per image of one batch, the cross-attention paid to that image's chosen token positions."""

    def __init__(self, positions: list[list[int]], grid: int):
        self.positions = positions
        self.grid = grid
        self._sums: list[torch.Tensor | None] = [None] * len(positions)

    @torch.no_grad()
    def add(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor) -> None:
        n = len(self.positions)
        batch, length = hidden_states.shape[0], hidden_states.shape[1]
        side = math.isqrt(length)
        if hidden_states.ndim != 3 or batch not in (n, 2 * n) or side * side != length:
            return
        # With classifier-free guidance the batch is [unconditional..., conditional...]: keep the latter.
        states, context = hidden_states[batch - n :], encoder_hidden_states[batch - n :]
        if attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        query = attn.head_to_batch_dim(attn.to_q(states))
        key = attn.head_to_batch_dim(attn.to_k(context))
        probs = attn.get_attention_scores(query, key).view(n, attn.heads, length, -1).mean(dim=1)
        for i, positions in enumerate(self.positions):
            if not positions:
                continue
            layer = probs[i, :, positions].sum(dim=-1).float().view(1, 1, side, side)
            layer = F.interpolate(layer, size=(self.grid, self.grid), mode="bilinear", align_corners=False)[0, 0]
            self._sums[i] = layer if self._sums[i] is None else self._sums[i] + layer

    def maps(self) -> list[np.ndarray | None]:
        """Per image, its map scaled to [0, 1] (grid x grid float32), or None if it asked for none."""
        out: list[np.ndarray | None] = []
        for total in self._sums:
            if total is None or not torch.isfinite(total).all() or float(total.max()) <= 0:
                out.append(None)
                continue
            total = total.cpu().numpy()
            out.append((total / total.max()).astype(np.float32))
        return out


class _RecordingProcessor:
    """A layer's own attention processor, with the recorder reading its cross-attention inputs."""

    def __init__(self, recorder: CrossAttentionRecorder, inner):
        self.recorder, self.inner = recorder, inner

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if encoder_hidden_states is not None:
            self.recorder.add(attn, hidden_states, encoder_hidden_states)
        return self.inner(attn, hidden_states, encoder_hidden_states, attention_mask=attention_mask, temb=temb,
                          **kwargs)


@contextmanager
def recording(unet, recorder: CrossAttentionRecorder | None):
    """Record `unet`'s cross-attention layers into `recorder` for the duration (nothing if None)."""
    if recorder is None:
        yield
        return
    original = unet.attn_processors
    wrapped = {name: _RecordingProcessor(recorder, processor) if name.endswith("attn2.processor") else processor
               for name, processor in original.items()}
    unet.set_attn_processor(wrapped)
    try:
        yield
    finally:
        unet.set_attn_processor(dict(original))


def encode_map(heat: np.ndarray) -> bytes:
    """A [0, 1] map as 8-bit grayscale PNG bytes (what `synthetic/` stores in `attention`)."""
    return encode_png((np.clip(heat, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8))
