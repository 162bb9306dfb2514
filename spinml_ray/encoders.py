"""Image encoders for the measures that compare images by meaning (SIM, replication).

A model source may ship one in `encoders/`: a vision model in transformers' layout (a CLIP vision
tower, DINOv2, BLIP-2's vision model, ...) with its image processor, loaded by `from_pretrained`
like any checkpoint. The `tiny` preset ships a random CLIP vision tower for tests; a source without
an encoder gives None, and the measures that need one say so instead of guessing.
"""

from __future__ import annotations

import numpy as np
import torch


class Encoder:
    """Embeds RGB images (uint8 H x W x 3 arrays, any size) as rows of a float array, in batches."""

    def __init__(self, folder: str, device: str = "cpu"):
        import transformers

        self.folder, self.device = folder, device
        self.processor = transformers.AutoImageProcessor.from_pretrained(folder)
        # the class the folder was saved from (AutoModel would drop a CLIP tower's projection)
        architectures = transformers.AutoConfig.from_pretrained(folder).architectures or []
        model_class = getattr(transformers, architectures[0], None) if architectures else None
        self.model = (model_class or transformers.AutoModel).from_pretrained(folder).to(device).eval()

    @torch.no_grad()
    def embed(self, images: list[np.ndarray], batch_size: int = 64) -> np.ndarray:
        """One row per image: the model's image embedding (a projection when it has one, else its
        pooled output, else the mean of its last hidden states)."""
        rows = []
        for start in range(0, len(images), batch_size):
            batch = self.processor(images=[np.asarray(i) for i in images[start:start + batch_size]], return_tensors="pt")
            out = self.model(pixel_values=batch["pixel_values"].to(self.device))
            for name in ("image_embeds", "pooler_output"):
                value = getattr(out, name, None)
                if value is not None:
                    break
            else:
                value = out.last_hidden_state.mean(dim=1)
            rows.append(value.flatten(1).float().cpu().numpy())  # a CNN's pooled output is N x C x 1 x 1
        return np.concatenate(rows) if rows else np.empty((0, 0), dtype=np.float32)


def load_encoder(model: str, device: str = "cpu") -> Encoder | None:
    """The model source's encoder (its `encoders/` folder, fetched alone), or None when it has none."""
    from spinml_ray.models.source import resolve_part

    folder = resolve_part(model, "encoders")
    return Encoder(folder, device) if folder else None
