"""Tests for the sanitized bundle (spinml_ray/bundle.py): bad references are rejected one by one with
a reason, unusual-but-valid images are accepted, no metadata leaves, and uploaded bundles are checked."""

from __future__ import annotations

import hashlib
import io
import struct
import zlib

import numpy as np
import pyarrow as pa
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from spinml_ray import images, storage
from spinml_ray.bundle import (
    SANITIZED_SCHEMA,
    BadReference,
    reference_items,
    sanitize_all,
    sanitize_reference,
    validate_uploaded,
    write_bundle,
)
from spinml_ray.examples import make_scene
from spinml_ray.images import decode_png, encode_png
from spinml_ray.spec import SanitizationSpec, parse_request

SETTINGS = SanitizationSpec()
METADATA_CHUNKS = {b"eXIf", b"tEXt", b"iTXt", b"zTXt", b"iCCP", b"tIME"}
GPS_IFD = 0x8825
ORIENTATION = 0x0112


# ---------------------------------------------------------------- helpers


def png_chunks(data: bytes) -> list[bytes]:
    """Chunk types of a PNG file, in order (checks the signature and that the file ends at IEND)."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    pos, kinds = 8, []
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        kinds.append(kind)
        pos += 12 + length
    assert kinds[-1] == b"IEND"
    return kinds


def png_bytes(array: np.ndarray, **save) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", **save)
    return buf.getvalue()


def mask_png(mask: np.ndarray) -> bytes:
    return png_bytes(mask.astype(np.uint8) * 255)


def write(path, data: bytes) -> str:
    path.write_bytes(data)
    return str(path)


def item(i: int, uri: str, mask_uri: str | None = None, box=None, points=None, label=None) -> dict:
    return {"ref_id": f"ref-{i:04d}", "uri": uri, "label": label, "mask_uri": mask_uri, "box": box, "points": points}


def scene_item(tmp_path, i: int, label: str = "floating", seed: int | None = None) -> tuple[dict, np.ndarray, np.ndarray]:
    image, mask = make_scene(label, 100 + i if seed is None else seed)
    uri = write(tmp_path / f"img-{i}.png", png_bytes(image))
    muri = write(tmp_path / f"mask-{i}.png", mask_png(mask))
    return item(i, uri, muri), image, mask


def by_ref(rows: list[dict]) -> dict[str, dict[str, dict]]:
    out: dict[str, dict[str, dict]] = {}
    for row in rows:
        out.setdefault(row["ref_id"], {})[row["object"]] = row
    return out


def jpeg_with_metadata(image: np.ndarray, orientation: int | None = None) -> bytes:
    """A JPEG carrying EXIF (GPS position, camera make, optionally an orientation), an ICC profile and
    a comment; with orientation 6 the pixels are stored rotated so that the tag turns them upright."""
    stored = Image.fromarray(image)
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"  # Make
    if orientation == 6:
        stored = stored.transpose(Image.Transpose.ROTATE_90)
        exif[ORIENTATION] = 6
    gps = exif.get_ifd(GPS_IFD)
    gps.update({1: "N", 2: (37.0, 46.0, 29.7), 3: "W", 4: (122.0, 25.0, 9.9)})
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", quality=95, subsampling=0, exif=exif.tobytes(), icc_profile=icc, comment=b"home address")
    data = buf.getvalue()
    # the fixture really carries what we claim it does
    reopened = Image.open(io.BytesIO(data))
    assert reopened.getexif().get_ifd(GPS_IFD), "fixture JPEG lacks GPS"
    assert reopened.info.get("icc_profile")
    return data


# ---------------------------------------------------------------- reference_items


def test_reference_items_numbers_references_in_order():
    spec = parse_request(
        {
            "request_id": "r", "tenant": "t", "subject": "duck",
            "labels": [{"name": "a", "phrase": "x"}, {"name": "b", "phrase": "y"}],
            "references": [
                {"uri": "one.png", "label": "a", "mask_uri": "m.png"},
                {"uri": "two.png", "box": [1, 2, 30, 40]},
                {"uri": "three.png", "points": [[5, 6]]},
            ],
        }
    )
    items = reference_items(spec)
    assert [i["ref_id"] for i in items] == ["ref-0000", "ref-0001", "ref-0002"]
    assert [i["uri"] for i in items] == ["one.png", "two.png", "three.png"]
    assert items[0]["label"] == "a" and items[0]["mask_uri"] == "m.png" and items[0]["box"] is None
    assert list(items[1]["box"]) == [1, 2, 30, 40]
    assert [list(p) for p in items[2]["points"]] == [[5, 6]]


# ---------------------------------------------------------------- bad references, one at a time


def _bad_reference(kind: str, tmp_path, monkeypatch) -> tuple[dict, tuple[str, ...], str, str]:
    """(item, substrings its reason must contain, target level, background level)."""
    image, mask = make_scene("resting", 11)
    good_png = png_bytes(image)
    good_mask = mask_png(mask)
    img = tmp_path / "bad.png"
    msk = tmp_path / "bad-mask.png"
    if kind == "corrupt bytes":
        rng = np.random.default_rng(0)
        uri = write(img, b"\x89PNG\r\n\x1a\n" + rng.integers(0, 256, 4000, dtype=np.uint8).tobytes())
        return item(1, uri, write(msk, good_mask)), ("not a readable image", uri), "L2", "L1"
    if kind == "truncated png":
        uri = write(img, good_png[: len(good_png) // 2])
        return item(1, uri, write(msk, good_mask)), ("not a readable image", uri), "L2", "L1"
    if kind == "text file":
        uri = write(tmp_path / "notes.png", b"this is not an image, just some text\n" * 10)
        return item(1, uri, write(msk, good_mask)), ("not a readable image", uri), "L2", "L1"
    if kind == "empty file":
        uri = write(img, b"")
        return item(1, uri, write(msk, good_mask)), ("empty", uri), "L2", "L1"
    if kind == "decompression bomb":
        monkeypatch.setattr(images, "MAX_PIXELS", 20_000)  # the good 96x128 scenes (12288 px) still fit
        big = np.zeros((200, 300, 3), np.uint8)
        uri = write(img, png_bytes(big))
        return item(1, uri, write(msk, mask_png(np.zeros((200, 300), bool)))), ("300x200", "cap"), "L2", "L1"
    if kind == "missing file":
        uri = str(tmp_path / "nowhere.png")
        return item(1, uri, write(msk, good_mask)), ("not found", uri), "L2", "L1"
    if kind == "missing mask file":
        uri = write(img, good_png)
        return item(1, uri, str(tmp_path / "no-mask.png")), ("not found", "no-mask.png"), "L2", "L1"
    if kind == "mask of the wrong size":
        uri = write(img, good_png)
        return item(1, uri, write(msk, mask_png(mask[:-10, :-10]))), ("does not match", "118x86"), "L2", "L1"
    if kind == "empty mask":
        uri = write(img, good_png)
        return item(1, uri, write(msk, mask_png(np.zeros_like(mask)))), ("empty",), "L2", "L1"
    if kind == "mask covering the whole image":
        uri = write(img, good_png)
        return item(1, uri, write(msk, mask_png(np.ones_like(mask)))), ("whole image",), "L2", "L1"
    if kind == "non-binary mask":
        values = np.where(mask, 255, 0).astype(np.uint8)
        values[:5, :5] = 1
        uri = write(img, good_png)
        return item(1, uri, write(msk, png_bytes(values))), ("not a binary mask",), "L2", "L1"
    if kind == "no mask, box or points without SAM":
        uri = write(img, good_png)
        return item(1, uri), ("needs a mask, a box or points",), "L1", "L0"
    raise AssertionError(kind)


BAD_KINDS = [
    "corrupt bytes", "truncated png", "text file", "empty file", "decompression bomb", "missing file",
    "missing mask file", "mask of the wrong size", "empty mask", "mask covering the whole image",
    "non-binary mask", "no mask, box or points without SAM",
]


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_bad_reference_is_rejected_alone_with_its_reason(kind, tmp_path, monkeypatch):
    bad, needles, target, background = _bad_reference(kind, tmp_path, monkeypatch)
    good0, _, _ = scene_item(tmp_path, 0)
    good2, _, _ = scene_item(tmp_path, 2, "resting")
    rows, rejections = sanitize_all([good0, bad, good2], target, background, SETTINGS, segment=None)
    assert len(rejections) == 1, rejections
    rejection = rejections[0]
    assert rejection["ref_id"] == "ref-0001" and rejection["uri"] == bad["uri"]
    for needle in needles:
        assert needle in rejection["reason"], (needle, rejection["reason"])
    assert "\n" not in rejection["reason"]
    refs = by_ref(rows)
    assert sorted(refs) == ["ref-0000", "ref-0002"]
    for objects in refs.values():
        assert sorted(objects) == ["background", "target"]
        assert objects["target"]["level"] == target and objects["background"]["level"] == background


@pytest.mark.parametrize("kind", ["text file", "empty mask", "no mask, box or points without SAM"])
def test_sanitize_reference_raises_bad_reference(kind, tmp_path, monkeypatch):
    bad, needles, target, background = _bad_reference(kind, tmp_path, monkeypatch)
    with pytest.raises(BadReference) as info:
        sanitize_reference(bad, target, background, SETTINGS)
    assert needles[0] in str(info.value)


@pytest.mark.parametrize("width, height, refusal", [
    (9_000, 8_000, "9000x8000 exceeds the 64000000-pixel cap"),  # 72 Mpixel: over our cap, under Pillow's
    (10_000, 10_000, "refused as a decompression bomb"),  # 100 Mpixel: Pillow's own limit (89.5 M) is met first
])
def test_header_claiming_a_huge_image_is_refused_without_decoding(tmp_path, width, height, refusal):
    """A PNG whose header claims more pixels than the default 64 Mpixel cap."""
    data = bytearray(png_bytes(np.zeros((1, 1, 3), np.uint8)))
    ihdr = 8 + 8  # signature, then length+type of IHDR
    data[ihdr : ihdr + 8] = struct.pack(">II", width, height)
    crc = zlib.crc32(bytes(data[ihdr - 4 : ihdr + 13]))
    data[ihdr + 13 : ihdr + 17] = struct.pack(">I", crc)
    uri = write(tmp_path / "huge.png", bytes(data))
    mask = write(tmp_path / "huge-mask.png", mask_png(np.ones((1, 1), bool)))
    rows, rejections = sanitize_all([item(0, uri, mask)], "L2", "L0", SETTINGS)
    assert rows == []
    assert len(rejections) == 1
    assert rejections[0]["reason"].startswith(f"{uri}: {refusal}"), rejections[0]["reason"]


def test_no_mask_at_l0_l0_needs_nothing(tmp_path):
    """At L0_L0 nothing about the reference leaves, so no mask (nor SAM) is needed."""
    image, _ = make_scene("floating", 5)
    uri = write(tmp_path / "a.png", png_bytes(image))
    rows, rejections = sanitize_all([item(0, uri)], "L0", "L0", SETTINGS)
    assert rejections == []
    assert [(r["object"], r["level"], r["payload"], r["region"], r["mi"]) for r in rows] == [
        ("target", "L0", None, None, 0.0),
        ("background", "L0", None, None, 0.0),
    ]


@pytest.mark.parametrize("levels", [("L2", "L0"), ("L1", "L0"), ("L0", "L1"), ("L0", "L2"), ("L2", "L2")])
def test_a_box_alone_is_refused_without_a_segmenter(tmp_path, levels):
    """Without SAM the whole box would leave as the target, background inside it included."""
    image, _ = make_scene("floating", 6)
    uri = write(tmp_path / "a.png", png_bytes(image))
    with pytest.raises(BadReference, match="allow_box_as_mask"):
        sanitize_reference(item(0, uri, box=[20, 10, 70, 60]), *levels, SETTINGS, segment=None)
    rows = sanitize_reference(item(0, uri, box=[20, 10, 70, 60]), "L0", "L0", SETTINGS, segment=None)
    assert all(row["payload"] is None for row in rows)  # L0_L0 needs no region at all


def test_box_is_the_mask_when_no_sam_and_the_request_opts_in(tmp_path):
    image, _ = make_scene("floating", 6)
    uri = write(tmp_path / "a.png", png_bytes(image))
    settings = SETTINGS.model_copy(update={"allow_box_as_mask": True})
    rows = sanitize_reference(item(0, uri, box=[20, 10, 70, 60]), "L2", "L0", settings, segment=None)
    assert all(row["box_as_mask"] for row in rows)
    assert "box_as_mask" not in SANITIZED_SCHEMA.names  # the flag is for the preview; it never leaves
    target = rows[0]
    region = decode_png(target["region"]) > 0
    expected = np.zeros(image.shape[:2], bool)
    expected[10:60, 20:70] = True
    assert np.array_equal(region, expected)
    assert np.array_equal(decode_png(target["payload"]), np.where(expected[..., None], image, 0))


# ---------------------------------------------------------------- unusual but valid references


def _valid_variant(kind: str, image: np.ndarray, tmp_path) -> tuple[bytes, np.ndarray]:
    """(file bytes, the RGB pixels the sanitizer should see, displayed orientation)."""
    if kind == "16-bit grayscale png":
        gray16 = (image.astype(np.uint32).sum(axis=2) * 65535 // (3 * 255)).astype(np.uint16)
        pil = Image.fromarray(gray16)
        assert pil.mode.startswith("I;16")
        buf = io.BytesIO()
        pil.save(buf, format="PNG")
        as8 = np.round(gray16 / 257.0).astype(np.uint8)
        return buf.getvalue(), np.stack([as8] * 3, axis=-1)
    if kind == "cmyk jpeg":
        buf = io.BytesIO()
        Image.fromarray(image).convert("CMYK").save(buf, format="JPEG", quality=95)
        assert Image.open(io.BytesIO(buf.getvalue())).mode == "CMYK"
        return buf.getvalue(), image
    if kind == "palette png":
        pal = Image.fromarray(image).quantize(64)
        buf = io.BytesIO()
        pal.save(buf, format="PNG")
        assert Image.open(io.BytesIO(buf.getvalue())).mode == "P"
        return buf.getvalue(), np.asarray(pal.convert("RGB"))
    if kind == "rgba png":
        alpha = np.full(image.shape[:2], 255, np.uint8)
        alpha[:, : image.shape[1] // 2] = 0  # left half fully transparent
        rgba = np.dstack([image, alpha])
        # transparent pixels composite onto black
        return png_bytes(rgba), np.where(alpha[..., None] > 0, image, 0).astype(np.uint8)
    if kind == "grayscale png":
        gray = np.asarray(Image.fromarray(image).convert("L"))
        return png_bytes(gray), np.stack([gray] * 3, axis=-1)
    if kind == "exif-rotated jpeg":
        return jpeg_with_metadata(image, orientation=6), image
    raise AssertionError(kind)


VALID_KINDS = ["16-bit grayscale png", "cmyk jpeg", "palette png", "rgba png", "grayscale png", "exif-rotated jpeg"]
LOSSY = {"cmyk jpeg", "exif-rotated jpeg"}


@pytest.mark.parametrize("kind", VALID_KINDS)
def test_unusual_but_valid_reference_is_accepted(kind, tmp_path):
    image, mask = make_scene("floating", 21)  # 96 high, 128 wide
    data, expected = _valid_variant(kind, image, tmp_path)
    uri = write(tmp_path / f"ref.{'jpg' if 'jpeg' in kind else 'png'}", data)
    muri = write(tmp_path / "mask.png", mask_png(mask))
    rows, rejections = sanitize_all([item(0, uri, muri)], "L2", "L1", SETTINGS)
    assert rejections == []
    assert len(rows) == 2
    for row in rows:
        assert (row["width"], row["height"]) == (128, 96)
    target = by_ref(rows)["ref-0000"]["target"]
    payload = decode_png(target["payload"])
    assert payload.shape == (96, 128, 3)
    assert np.array_equal(decode_png(target["region"]) > 0, mask)
    assert not payload[~mask].any()
    diff = np.abs(payload.astype(int) - expected.astype(int))[mask]
    if kind in LOSSY:
        assert diff.mean() < 6, diff.mean()  # JPEG noise only
        if kind == "exif-rotated jpeg":  # and the right way up (orientation 6 vs 8 both keep the shape)
            flipped = np.abs(payload[::-1, ::-1].astype(int) - expected.astype(int))[mask[::-1, ::-1] & mask]
            assert flipped.mean() > 5 * diff.mean()
    else:
        assert diff.max() <= 1, diff.max()


def test_exif_rotation_turns_the_stored_pixels(tmp_path):
    image, mask = make_scene("resting", 22)
    data = jpeg_with_metadata(image, orientation=6)
    stored = Image.open(io.BytesIO(data))
    assert stored.size == (96, 128)  # stored sideways: width 96, height 128
    uri = write(tmp_path / "ref.jpg", data)
    muri = write(tmp_path / "mask.png", mask_png(mask))
    rows, rejections = sanitize_all([item(0, uri, muri)], "L2", "L2", SETTINGS)
    assert rejections == []
    for row in rows:
        assert (row["width"], row["height"]) == (128, 96)
        assert decode_png(row["payload"]).shape[:2] == (96, 128)


# ---------------------------------------------------------------- no metadata leaves


@pytest.mark.parametrize("levels", [("L2", "L2"), ("L1", "L2"), ("L2", "L1")])
def test_no_metadata_survives_in_released_pngs(levels, tmp_path):
    image, mask = make_scene("floating", 23)
    data = jpeg_with_metadata(image)
    uri = write(tmp_path / "gps.jpg", data)
    muri = write(tmp_path / "mask.png", mask_png(mask))
    rows, rejections = sanitize_all([item(0, uri, muri)], *levels, SETTINGS)
    assert rejections == [] and len(rows) == 2
    released = [r[k] for r in rows for k in ("payload", "region") if r[k] is not None]
    assert len(released) == sum(2 if lvl == "L2" else 1 for lvl in levels)
    for blob in released:
        kinds = set(png_chunks(blob))
        assert not kinds & METADATA_CHUNKS, kinds
        assert b"SecretCam" not in blob and b"home address" not in blob
        opened = Image.open(io.BytesIO(blob))
        assert len(opened.getexif()) == 0
        assert "exif" not in opened.info and "icc_profile" not in opened.info and "comment" not in opened.info
    for row in rows:
        assert row["payload_sha256"] == hashlib.sha256(row["payload"]).hexdigest()


# ---------------------------------------------------------------- write_bundle


def test_write_bundle_round_trips(tmp_path):
    good, _, _ = scene_item(tmp_path, 0)
    also, _, _ = scene_item(tmp_path, 1, "resting")
    bad = item(2, str(tmp_path / "missing.png"), good["mask_uri"])
    rows, rejections = sanitize_all([good, bad, also], "L2", "L0", SETTINGS)
    assert len(rows) == 4 and len(rejections) == 1
    out = tmp_path / "out"
    uri = write_bundle(rows, rejections, str(out))
    assert uri == storage.join(str(out), "bundle.parquet")
    table = storage.read_table(uri)
    assert table.schema.equals(SANITIZED_SCHEMA, check_metadata=False)
    assert table.to_pylist() == rows
    back = storage.read_table(storage.join(str(out), "rejections.parquet"))
    assert back.to_pylist() == rejections
    assert sorted(p.name for p in out.iterdir()) == ["bundle.parquet", "rejections.parquet"]


def test_write_bundle_with_no_rejections_writes_an_empty_table(tmp_path):
    good, _, _ = scene_item(tmp_path, 0)
    rows, rejections = sanitize_all([good], "L1", "L1", SETTINGS)
    uri = write_bundle(rows, rejections, str(tmp_path / "out"))
    assert storage.read_table(uri).num_rows == 2
    empty = storage.read_table(storage.join(str(tmp_path / "out"), "rejections.parquet"))
    assert empty.num_rows == 0 and set(empty.column_names) == {"ref_id", "uri", "reason"}


# ---------------------------------------------------------------- validate_uploaded


def bundle_spec(target: str, background: str):
    return parse_request(
        {
            "request_id": "r1", "tenant": "t", "subject": "yellow rubber duck",
            "labels": [{"name": "floating", "phrase": "floating"}, {"name": "resting", "phrase": "resting"}],
            "bundle": "x.parquet",
            "privacy": {"target": target, "background": background},
        }
    )


@pytest.fixture
def honest(tmp_path):
    """Rows of an honest L2_L1 bundle with two references, made by sanitize_all."""
    items = [scene_item(tmp_path, i, label)[0] for i, label in enumerate(("floating", "resting"))]
    rows, rejections = sanitize_all(items, "L2", "L1", SETTINGS)
    assert rejections == [] and len(rows) == 4
    return rows


def table_of(rows):
    return pa.Table.from_pylist(rows, schema=SANITIZED_SCHEMA)


def tamper(rows, ref_id, obj, **changes):
    out = []
    for row in rows:
        row = dict(row)
        if row["ref_id"] == ref_id and row["object"] == obj:
            row.update(changes)
        out.append(row)
    return out


def test_honest_bundle_is_accepted_unchanged(honest):
    accepted, rejections = validate_uploaded(table_of(honest), bundle_spec("L2", "L1"), "up.parquet")
    assert rejections == []
    assert len(accepted) == 4
    original = {(r["ref_id"], r["object"]): r for r in honest}
    for row in accepted:
        src = original[(row["ref_id"], row["object"])]
        for key in ("label", "level", "width", "height", "faces_blurred", "mi"):
            assert row[key] == src[key], key
        assert np.array_equal(decode_png(row["payload"]), decode_png(src["payload"]))
        if src["region"] is None:
            assert row["region"] is None
        else:
            assert np.array_equal(decode_png(row["region"]) > 0, decode_png(src["region"]) > 0)
        assert row["payload_sha256"] == hashlib.sha256(row["payload"]).hexdigest()


def _l2_outside_region(row):
    pixels = decode_png(row["payload"]).copy()
    region = decode_png(row["region"]) > 0
    ys, xs = np.nonzero(~region)
    pixels[ys[0], xs[0]] = (255, 0, 0)
    return {"payload": encode_png(pixels)}


def _non_binary_l1(row):
    edges = decode_png(row["payload"]).copy()
    edges[0, :] = 128
    return {"payload": encode_png(edges)}


TAMPERINGS = {
    # name: (object, change(row) -> dict of new values, reason substring)
    "level differs": ("target", lambda r: {"level": "L1"}, "differs from the request's"),
    "background level differs": ("background", lambda r: {"level": "L2"}, "differs from the request's"),
    "L2 pixels outside the region": ("target", _l2_outside_region, "outside the released region"),
    "region smaller than the pixels": (
        "target",
        lambda r: {"region": encode_png(np.zeros((r["height"], r["width"]), bool))},
        "outside the released region",
    ),
    "region of another size": ("target", lambda r: {"region": encode_png(np.ones((10, 10), bool))}, "outside the released region"),
    "non-binary L1 payload": ("background", _non_binary_l1, "0/255 edge map"),
    "RGB L1 payload": ("background", lambda r: {"payload": encode_png(np.zeros((r["height"], r["width"], 3), np.uint8))}, "edge map"),
    "gray L2 payload": ("target", lambda r: {"payload": encode_png(np.zeros((r["height"], r["width"]), np.uint8))}, "RGB"),
    "missing region on L2": ("target", lambda r: {"region": None}, "region"),
    "missing payload on L2": ("target", lambda r: {"payload": None}, "without a payload"),
    "missing payload on L1": ("background", lambda r: {"payload": None}, "without a payload"),
    "payload not an image": ("target", lambda r: {"payload": b"GIF? no: plain text pretending"}, "not a PNG"),
    "truncated payload": ("background", lambda r: {"payload": r["payload"][: len(r["payload"]) // 2]}, "not a PNG"),
}


@pytest.mark.parametrize("name", list(TAMPERINGS))
def test_tampered_reference_is_rejected_alone(name, honest):
    obj, change, needle = TAMPERINGS[name]
    victim = next(r for r in honest if r["ref_id"] == "ref-0001" and r["object"] == obj)
    rows = tamper(honest, "ref-0001", obj, **change(victim))
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L1"), "up.parquet")
    assert [r["ref_id"] for r in rejections] == ["ref-0001"]
    assert needle in rejections[0]["reason"], rejections[0]["reason"]
    assert rejections[0]["uri"] == "up.parquet"
    assert sorted((r["ref_id"], r["object"]) for r in accepted) == [("ref-0000", "background"), ("ref-0000", "target")]


def test_l0_row_carrying_image_data_is_rejected(tmp_path):
    items = [scene_item(tmp_path, i)[0] for i in range(2)]
    rows, _ = sanitize_all(items, "L2", "L0", SETTINGS)
    spec = bundle_spec("L2", "L0")
    accepted, rejections = validate_uploaded(table_of(rows), spec, "up.parquet")
    assert rejections == [] and len(accepted) == 4
    leaked = next(r for r in rows if r["ref_id"] == "ref-0000" and r["object"] == "target")["payload"]
    for change in ({"payload": leaked}, {"region": encode_png(np.ones((96, 128), bool))}):
        bad = tamper(rows, "ref-0001", "background", **change)
        accepted, rejections = validate_uploaded(table_of(bad), spec, "up.parquet")
        assert [r["ref_id"] for r in rejections] == ["ref-0001"]
        assert "L0" in rejections[0]["reason"]
        assert {r["ref_id"] for r in accepted} == {"ref-0000"}


def test_l0_row_is_normalised_to_nothing(tmp_path):
    items = [scene_item(tmp_path, 0)[0]]
    rows, _ = sanitize_all(items, "L2", "L0", SETTINGS)
    rows = tamper(rows, "ref-0000", "background", mi=0.7, payload_sha256="f" * 64)
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L0"), "up.parquet")
    assert rejections == []
    background = next(r for r in accepted if r["object"] == "background")
    assert background["payload"] is None and background["region"] is None
    assert background["payload_sha256"] is None and background["mi"] == 0.0


def test_l1_row_region_is_not_passed_on(honest):
    """An L1 object releases edges only; a region mask uploaded with it must not reach the server's rows."""
    rows = tamper(honest, "ref-0000", "background", region=encode_png(np.ones((96, 128), bool)))
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L1"), "up.parquet")
    assert rejections == []
    assert all(r["region"] is None for r in accepted if r["object"] == "background")


def test_lying_width_and_height_are_replaced_by_the_payload_size(honest):
    rows = tamper(honest, "ref-0000", "target", width=9999, height=1)
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L1"), "up.parquet")
    assert rejections == []
    target = next(r for r in accepted if r["ref_id"] == "ref-0000" and r["object"] == "target")
    assert (target["width"], target["height"]) == (128, 96)


@pytest.mark.parametrize("keep", ["target", "background"])
def test_reference_with_one_object_row_is_rejected(keep, honest):
    drop = "background" if keep == "target" else "target"
    rows = [r for r in honest if not (r["ref_id"] == "ref-0000" and r["object"] == drop)]
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L1"), "up.parquet")
    assert [r["ref_id"] for r in rejections] == ["ref-0000"]
    assert "one target and one background" in rejections[0]["reason"]
    assert {r["ref_id"] for r in accepted} == {"ref-0001"}


def test_reference_with_duplicate_rows_is_rejected(honest):
    extra = next(r for r in honest if r["ref_id"] == "ref-0001" and r["object"] == "target")
    accepted, rejections = validate_uploaded(table_of(honest + [dict(extra)]), bundle_spec("L2", "L1"), "up.parquet")
    assert [r["ref_id"] for r in rejections] == ["ref-0001"]
    assert {r["ref_id"] for r in accepted} == {"ref-0000"}


@pytest.mark.parametrize("missing", ["mi", "payload", "level", "object", "ref_id"])
def test_table_without_required_columns_raises(missing, honest):
    table = table_of(honest)
    table = table.drop_columns([missing])
    with pytest.raises(BadReference) as info:
        validate_uploaded(table, bundle_spec("L2", "L1"), "up.parquet")
    assert missing in str(info.value) and "up.parquet" in str(info.value)


def test_payload_metadata_chunks_are_stripped(honest):
    victim = next(r for r in honest if r["ref_id"] == "ref-0000" and r["object"] == "target")
    pixels = decode_png(victim["payload"])
    info = PngImagePlugin.PngInfo()
    info.add_text("GPS", "37.7749 N, 122.4194 W")
    info.add_itxt("Author", "someone at home", zip=True)
    exif = Image.Exif()
    exif[0x010F] = "SecretCam"
    dirty = png_bytes(pixels, pnginfo=info, exif=exif.tobytes())
    assert {b"tEXt", b"eXIf"} <= set(png_chunks(dirty))
    rows = tamper(honest, "ref-0000", "target", payload=dirty, payload_sha256=hashlib.sha256(dirty).hexdigest())
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L1"), "up.parquet")
    assert rejections == []
    target = next(r for r in accepted if r["ref_id"] == "ref-0000" and r["object"] == "target")
    assert not set(png_chunks(target["payload"])) & METADATA_CHUNKS
    assert b"SecretCam" not in target["payload"] and b"37.7749" not in target["payload"]
    assert target["payload_sha256"] == hashlib.sha256(target["payload"]).hexdigest()
    assert target["payload_sha256"] != hashlib.sha256(dirty).hexdigest()
    assert np.array_equal(decode_png(target["payload"]), pixels)


def test_uploaded_payload_in_another_format_is_refused(honest):
    victim = next(r for r in honest if r["ref_id"] == "ref-0001" and r["object"] == "target")
    buf = io.BytesIO()
    Image.fromarray(decode_png(victim["payload"])).save(buf, format="BMP")  # same pixels, lossless, not a PNG
    rows = tamper(honest, "ref-0001", "target", payload=buf.getvalue())
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L1"), "up.parquet")
    assert [r["ref_id"] for r in rejections] == ["ref-0001"]
    assert "PNG" in rejections[0]["reason"]


def test_uploaded_payload_over_the_pixel_cap_is_refused(honest, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 20_000)  # the honest 96x128 payloads fit, a 200x200 one does not
    big = np.zeros((200, 200, 3), np.uint8)
    big[50:150, 50:150] = 200
    region = np.zeros((200, 200), bool)
    region[50:150, 50:150] = True
    rows = tamper(honest, "ref-0001", "target", payload=encode_png(big), region=encode_png(region))
    accepted, rejections = validate_uploaded(table_of(rows), bundle_spec("L2", "L1"), "up.parquet")
    assert [r["ref_id"] for r in rejections] == ["ref-0001"]
