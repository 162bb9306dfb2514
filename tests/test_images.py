"""Tests for image decoding/encoding (spinml_ray/images.py)."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, PngImagePlugin

from spinml_ray import images
from spinml_ray.examples import GPS_IFD, ORIENTATION, _save_with_exif, make_scene
from spinml_ray.images import ImageError, decode_mask, decode_png, decode_rgb, encode_png

METADATA_CHUNKS = {b"tEXt", b"iTXt", b"zTXt", b"eXIf", b"iCCP", b"tIME", b"pHYs", b"gAMA", b"sRGB", b"cHRM"}


def save(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def png_chunks(data: bytes) -> list[bytes]:
    """Chunk types of a PNG, parsed from the bytes (CRC checked)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    chunks, offset = [], 8
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind = data[offset + 4 : offset + 8]
        body = data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert zlib.crc32(kind + body) == crc
        chunks.append(kind)
        offset += 12 + length
    assert offset == len(data)
    return chunks


def gradient(height=24, width=40) -> np.ndarray:
    yy, xx = np.mgrid[0:height, 0:width]
    return np.stack([xx * 255 // (width - 1), yy * 255 // (height - 1), (xx + yy) % 256], axis=-1).astype(np.uint8)


# ---------------------------------------------------------------- decode_rgb


def test_rgb_png_decodes_exactly():
    array = gradient()
    decoded = decode_rgb(save(Image.fromarray(array)))
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, array)


def test_16_bit_grayscale_png_is_scaled_to_8_bits():
    values = np.linspace(0, 65535, 20 * 30).reshape(20, 30).astype(np.uint16)
    source = Image.fromarray(values)
    data = save(source)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")
    decoded = decode_rgb(data)
    assert decoded.shape == (20, 30, 3) and decoded.dtype == np.uint8
    assert np.array_equal(decoded[..., 0], decoded[..., 1]) and np.array_equal(decoded[..., 0], decoded[..., 2])
    assert np.abs(decoded[..., 0].astype(float) - values / 257.0).max() <= 1.0
    assert decoded.min() == 0 and decoded.max() == 255


def test_palette_png_decodes_to_its_colours():
    palette_colours = np.array([[255, 0, 0], [0, 255, 0], [0, 0, 255], [12, 34, 56]], dtype=np.uint8)
    indices = (np.arange(16 * 12).reshape(16, 12) % 4).astype(np.uint8)
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette_colours.flatten().tolist())
    data = save(image)
    assert Image.open(io.BytesIO(data)).mode == "P"
    assert np.array_equal(decode_rgb(data), palette_colours[indices])


def test_palette_png_with_transparency_is_composited_on_black():
    palette_colours = np.array([[200, 100, 50], [10, 220, 30]], dtype=np.uint8)
    indices = np.zeros((8, 8), np.uint8)
    indices[:, 4:] = 1
    image = Image.fromarray(indices, mode="P")
    image.putpalette(palette_colours.flatten().tolist())
    data = save(image, transparency=1)
    decoded = decode_rgb(data)
    assert np.array_equal(decoded[:, :4], np.broadcast_to(palette_colours[0], (8, 4, 3)))
    assert not decoded[:, 4:].any()


def test_rgba_is_composited_on_black():
    rgb = np.full((10, 12, 3), (200, 120, 40), np.uint8)
    alpha = np.zeros((10, 12), np.uint8)
    alpha[:, 4:8] = 128
    alpha[:, 8:] = 255
    decoded = decode_rgb(save(Image.fromarray(np.dstack([rgb, alpha]), mode="RGBA")))
    assert decoded.shape == (10, 12, 3)
    assert not decoded[:, :4].any()  # fully transparent -> black, not the hidden colour
    assert np.abs(decoded[:, 4:8].astype(int) - np.array([100, 60, 20])).max() <= 1
    assert np.array_equal(decoded[:, 8:], rgb[:, 8:])


def test_grayscale_la_is_composited_on_black():
    la = np.dstack([np.full((6, 6), 180, np.uint8), np.where(np.eye(6, dtype=bool), 255, 0).astype(np.uint8)])
    decoded = decode_rgb(save(Image.fromarray(la, mode="LA")))
    assert np.array_equal(decoded[np.eye(6, dtype=bool)], np.full((6, 3), 180))
    assert not decoded[~np.eye(6, dtype=bool)].any()


def test_grayscale_l_is_replicated_to_three_channels():
    gray = (np.arange(15 * 17).reshape(15, 17) % 256).astype(np.uint8)
    decoded = decode_rgb(save(Image.fromarray(gray, mode="L")))
    assert decoded.shape == (15, 17, 3)
    for channel in range(3):
        assert np.array_equal(decoded[..., channel], gray)


def test_cmyk_jpeg_decodes_to_rgb():
    blocks = np.array([[[220, 30, 30], [30, 200, 40]], [[40, 40, 210], [240, 240, 240]]], np.uint8)
    rgb = np.kron(blocks, np.ones((16, 16, 1), np.uint8))
    data = save(Image.fromarray(rgb).convert("CMYK"), "JPEG", quality=98)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_rgb(data)
    assert decoded.shape == rgb.shape and decoded.dtype == np.uint8
    # compare the centre of each flat block (JPEG is lossy at block edges)
    for by in range(2):
        for bx in range(2):
            centre = decoded[by * 16 + 4 : by * 16 + 12, bx * 16 + 4 : bx * 16 + 12].reshape(-1, 3).mean(axis=0)
            assert np.abs(centre - blocks[by, bx]).max() < 12, (by, bx, centre)


def test_exif_orientation_6_is_applied(tmp_path):
    image, _ = make_scene("resting", 4)
    path = tmp_path / "rotated.jpg"
    _save_with_exif(image, str(path))
    data = path.read_bytes()
    stored = Image.open(io.BytesIO(data))
    assert stored.getexif()[ORIENTATION] == 6
    assert (stored.height, stored.width) == (image.shape[1], image.shape[0])  # stored sideways
    decoded = decode_rgb(data)
    assert decoded.shape == image.shape  # transposed back to upright
    error = np.abs(decoded.astype(float) - image).mean()
    assert error < 6  # and rotated the right way: turning the other way would give the image upside down
    assert np.abs(decoded.astype(float) - image[::-1, ::-1]).mean() > 2 * error


def test_exif_orientation_6_hand_made():
    stored = np.zeros((8, 16, 3), np.uint8)  # 8 rows, 16 columns, marker in the top-left corner
    stored[:4, :4] = 255
    exif = Image.Exif()
    exif[ORIENTATION] = 6
    data = save(Image.fromarray(stored), "JPEG", quality=100, exif=exif)
    decoded = decode_rgb(data)
    assert decoded.shape == (16, 8, 3)
    # orientation 6: rotate 90 degrees clockwise to display, so the top-left marker goes top-right
    assert decoded[:4, -4:].mean() > 200 and decoded[-4:, :4].mean() < 50


@pytest.mark.parametrize(
    "data, expected",
    [
        (b"", "empty"),
        (np.random.default_rng(0).integers(0, 256, 4000, dtype=np.uint8).tobytes(), "not a readable image"),
        (b"GIF89a but not really", "not a readable image"),
    ],
    ids=["empty", "random", "fake-header"],
)
def test_unreadable_bytes_raise_image_error(data, expected):
    with pytest.raises(ImageError) as info:
        decode_rgb(data, what="upload.png")
    assert str(info.value).startswith("upload.png")
    assert expected in str(info.value)


def test_truncated_png_raises_image_error():
    noise = np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = save(Image.fromarray(noise))
    with pytest.raises(ImageError, match="not a readable image") as info:
        decode_rgb(data[: len(data) // 2], what="cut.png")
    assert "cut.png" in str(info.value)


def test_image_over_the_pixel_cap_is_refused(monkeypatch):
    data = save(Image.fromarray(gradient(30, 40)))
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    with pytest.raises(ImageError) as info:
        decode_rgb(data, what="big.png")
    message = str(info.value)
    assert "40x30" in message and "1000" in message and "cap" in message
    monkeypatch.setattr(images, "MAX_PIXELS", 1200)
    assert decode_rgb(data).shape == (30, 40, 3)  # exactly at the cap is fine


def test_mask_over_the_pixel_cap_is_refused(monkeypatch):
    data = save(Image.fromarray(np.zeros((30, 40), np.uint8)))
    monkeypatch.setattr(images, "MAX_PIXELS", 100)
    with pytest.raises(ImageError, match="cap"):
        decode_mask(data, (30, 40))


# ---------------------------------------------------------------- decode_mask


def test_decode_mask_nonzero_is_target():
    values = np.zeros((12, 20), np.uint8)
    values[2:5, 3:9] = 1
    mask = decode_mask(save(Image.fromarray(values)), (12, 20))
    assert mask.dtype == bool and np.array_equal(mask, values > 0)


def test_decode_mask_refuses_non_binary_masks():
    values = np.zeros((12, 20), np.uint8)
    values[2:5, 3:9] = 255
    values[7, 7] = 1  # e.g. an anti-aliased or JPEG-compressed mask
    with pytest.raises(ImageError, match=r"not a binary mask \(values 0, 1, 255\)"):
        decode_mask(save(Image.fromarray(values)), (12, 20), what="m.png")
    values[:] = 7
    values[0, 0] = 9  # two values, neither of them 0
    with pytest.raises(ImageError, match="not a binary mask"):
        decode_mask(save(Image.fromarray(values)), (12, 20))


def test_decode_mask_from_rgb_and_bilevel():
    values = np.zeros((10, 10), bool)
    values[3:6, 2:9] = True
    assert np.array_equal(decode_mask(save(Image.fromarray(values)), (10, 10)), values)  # mode "1"
    rgb = np.zeros((10, 10, 3), np.uint8)
    rgb[values] = (0, 0, 200)
    assert np.array_equal(decode_mask(save(Image.fromarray(rgb)), (10, 10)), values)


def test_decode_mask_wrong_size_names_both_sizes():
    data = save(Image.fromarray(np.zeros((10, 20), np.uint8)))
    with pytest.raises(ImageError) as info:
        decode_mask(data, (12, 30), what="mask.png")
    message = str(info.value)
    assert "mask.png" in message and "20x10" in message and "30x12" in message


def test_decode_mask_of_garbage_raises():
    with pytest.raises(ImageError, match="m.png"):
        decode_mask(b"nope", (4, 4), what="m.png")


# ---------------------------------------------------------------- encode_png


@pytest.mark.parametrize(
    "array",
    [
        gradient(),
        (np.arange(7 * 9).reshape(7, 9) * 3 % 256).astype(np.uint8),
        np.random.default_rng(2).integers(0, 256, (33, 17, 3), dtype=np.uint8),
    ],
    ids=["rgb-gradient", "gray", "rgb-noise"],
)
def test_encode_png_round_trips_exactly(array):
    data = encode_png(array)
    assert png_chunks(data)[0] == b"IHDR" and png_chunks(data)[-1] == b"IEND"
    decoded = decode_png(data)
    assert decoded.dtype == np.uint8 and np.array_equal(decoded, array)


def test_encode_png_of_bool_is_0_and_255():
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    decoded = decode_png(encode_png(mask))
    assert np.array_equal(decoded, mask.astype(np.uint8) * 255)


def test_encode_png_of_non_contiguous_view():
    array = gradient(20, 30)[::2, ::-1]
    assert np.array_equal(decode_png(encode_png(array)), array)


def test_metadata_never_survives_decode_and_encode(tmp_path):
    image, _ = make_scene("floating", 9)
    path = tmp_path / "gps.jpg"
    _save_with_exif(image, str(path))
    source = path.read_bytes()
    exif = Image.open(io.BytesIO(source)).getexif()
    assert exif.get_ifd(GPS_IFD)  # the source really carries a GPS position
    data = encode_png(decode_rgb(source))
    chunks = png_chunks(data)
    assert set(chunks) <= {b"IHDR", b"IDAT", b"IEND"}, chunks
    assert not METADATA_CHUNKS & set(chunks)
    assert b"Exif" not in data and b"GPS" not in data
    reopened = Image.open(io.BytesIO(data))
    assert not reopened.getexif() and not reopened.info.get("exif")


def test_png_text_and_exif_chunks_are_dropped():
    array = gradient()
    info = PngImagePlugin.PngInfo()
    info.add_text("Author", "secret person")
    info.add_itxt("Location", "home, sweet home")
    exif = Image.Exif()
    exif[ORIENTATION] = 1
    exif.get_ifd(GPS_IFD).update({1: "N", 2: (1.0, 2.0, 3.0)})
    source = save(Image.fromarray(array), pnginfo=info, exif=exif)
    assert {b"tEXt", b"iTXt", b"eXIf"} <= set(png_chunks(source))
    decoded = decode_rgb(source)
    assert np.array_equal(decoded, array)
    data = encode_png(decoded)
    assert set(png_chunks(data)) <= {b"IHDR", b"IDAT", b"IEND"}
    assert b"secret person" not in data and b"sweet home" not in data
    assert np.array_equal(decode_png(data), array)


def test_digest_is_sha256():
    import hashlib

    assert images.digest(b"abc") == hashlib.sha256(b"abc").hexdigest()
