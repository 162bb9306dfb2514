"""Image bytes in and out: decoding with orientation applied, encoding to PNG with no metadata."""

from __future__ import annotations

import hashlib
import io
import warnings

import numpy as np
from PIL import Image, ImageOps

MAX_PIXELS = 64_000_000  # decompression-bomb cap: larger images are refused, not decoded


class ImageError(ValueError):
    """An image (or mask) that cannot be used; the message says why."""


def _open(data: bytes, what: str, formats: tuple[str, ...] | None = None) -> Image.Image:
    if not data:
        raise ImageError(f"{what}: empty file")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=formats)
            if image.width * image.height > MAX_PIXELS:
                raise ImageError(f"{what}: {image.width}x{image.height} exceeds the {MAX_PIXELS}-pixel cap")
            image.load()
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise ImageError(f"{what}: refused as a decompression bomb ({exc})") from None
    except Exception as exc:  # PIL raises many types for corrupt/truncated/non-image input
        raise ImageError(f"{what}: not a readable image ({type(exc).__name__}: {exc})") from None
    return image


def decode_rgb(data: bytes, what: str = "image") -> np.ndarray:
    """HxWx3 uint8 RGB, with EXIF orientation applied; all metadata is dropped with the container."""
    image = _open(data, what)
    image = ImageOps.exif_transpose(image)
    if image.mode.startswith("I;16") or image.mode == "I":
        # 16-bit samples scale by 257 (65535 -> 255); 32-bit "I" images holding 8-bit data are kept.
        array = np.asarray(image, dtype=np.float64)
        top = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        image = Image.fromarray(np.clip(array / top * 255.0 + 0.5, 0, 255).astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (0, 0, 0, 255))
        image = Image.alpha_composite(canvas, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def decode_mask(data: bytes, size: tuple[int, int], what: str = "mask") -> np.ndarray:
    """HxW bool (nonzero = target); `size` is the (height, width) it must have."""
    image = ImageOps.exif_transpose(_open(data, what))
    array = np.asarray(image.convert("L"))
    if array.shape != tuple(size):
        raise ImageError(f"{what}: size {array.shape[1]}x{array.shape[0]} does not match the image's {size[1]}x{size[0]}")
    values = np.unique(array)
    if len(values) > 2 or (len(values) == 2 and values[0] != 0):
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise ImageError(f"{what}: not a binary mask (values {shown}); use 0 for background, one nonzero value for the target")
    return array > 0


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of an HxW or HxWx3 uint8/bool array, with no metadata chunks."""
    if array.dtype == bool:
        array = array.astype(np.uint8) * 255
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()


def decode_png(data: bytes) -> np.ndarray:
    """Decode PNG bytes this project wrote itself (trusted)."""
    return np.asarray(Image.open(io.BytesIO(data), formats=["PNG"]))


def decode_untrusted_png(data: bytes, what: str) -> np.ndarray:
    """Decode PNG bytes from outside (an uploaded bundle): PNG only, under the pixel cap."""
    return np.asarray(_open(data, what, formats=("PNG",)))


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def box_of_mask(mask: np.ndarray) -> list[float] | None:
    """x0, y0, x1, y1 (pixel edges) of a mask's nonzero pixels; None for an empty mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None
    return [float(xs.min()), float(ys.min()), float(xs.max() + 1), float(ys.max() + 1)]
