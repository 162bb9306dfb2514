"""What would leave, shown before it leaves: a contact sheet (PNG) and a page (HTML) of a bundle.

One line per reference, one cell per object: exactly the released payload (edge map, pixels on
black) or an empty tile saying that nothing leaves, with the level, the MI leakage, the number of
faces blurred, and a red warning where a box stood in for the target's mask (allow_box_as_mask). The HTML embeds the payload PNGs byte for byte; the PNG sheet shows thumbnails.
"""

from __future__ import annotations

import base64
import html
import os

import numpy as np
from PIL import Image, ImageDraw

from spinml_ray.images import decode_png

TILE = 160
CAPTION = 28
BOX_WARNING = "box used as mask"


def _tile(row: dict) -> Image.Image:
    tile = Image.new("RGB", (TILE, TILE + CAPTION), (40, 40, 40))
    draw = ImageDraw.Draw(tile)
    if row["payload"] is None:
        draw.text((10, TILE // 2 - 6), "nothing leaves (L0)", fill=(200, 200, 200))
    else:
        payload = decode_png(row["payload"])
        image = Image.fromarray(payload if payload.ndim == 3 else np.stack([payload] * 3, axis=-1))
        image.thumbnail((TILE, TILE))
        tile.paste(image, ((TILE - image.width) // 2, (TILE - image.height) // 2))
    caption = f"{row['object']} {row['level']}  MI {row['mi']:.4f}"
    draw.text((4, TILE + 2), caption, fill=(255, 255, 255))
    if row.get("faces_blurred"):
        draw.text((4, TILE + 14), f"{row['faces_blurred']} face(s) blurred", fill=(255, 200, 120))
    if row.get("box_as_mask") and row["payload"] is not None:
        draw.text((4, 4), BOX_WARNING, fill=(255, 60, 60))
    return tile


def _by_reference(rows: list[dict]) -> list[tuple[str, list[dict]]]:
    refs: dict[str, dict[str, dict]] = {}
    for row in rows:
        refs.setdefault(row["ref_id"], {})[row["object"]] = row
    return [(ref, [objs[o] for o in ("target", "background") if o in objs]) for ref, objs in sorted(refs.items())]


def write_preview(rows: list[dict], out_dir: str, rejections: list[dict] = ()) -> tuple[str, str]:
    """Write `preview.png` and `preview.html` into out_dir; returns their paths."""
    os.makedirs(out_dir, exist_ok=True)
    refs = _by_reference(rows)
    sheet = Image.new("RGB", (2 * TILE + 120, max(1, len(refs)) * (TILE + CAPTION)), (20, 20, 20))
    draw = ImageDraw.Draw(sheet)
    cells = []
    for i, (ref, objects) in enumerate(refs):
        y = i * (TILE + CAPTION)
        draw.text((6, y + TILE // 2), ref, fill=(255, 255, 255))
        cell = []
        for j, row in enumerate(objects):
            sheet.paste(_tile(row), (120 + j * TILE, y))
            if row["payload"] is None:
                body = "<em>nothing leaves</em>"
            else:
                body = f'<img src="data:image/png;base64,{base64.b64encode(row["payload"]).decode()}" width="{TILE}">'
            faces = f"<br>{row['faces_blurred']} face(s) blurred" if row.get("faces_blurred") else ""
            if row.get("box_as_mask") and row["payload"] is not None:
                faces += (f'<br><strong class="box-as-mask" style="color:red">{BOX_WARNING}: the whole box leaves '
                          "as the target, background inside it included</strong>")
            cell.append(f"<td>{body}<br>{html.escape(row['object'])} {row['level']} &middot; MI {row['mi']:.4f}{faces}</td>")
        cells.append(f"<tr><th>{html.escape(ref)}</th>{''.join(cell)}</tr>")
    png_path = os.path.join(out_dir, "preview.png")
    sheet.save(png_path)
    rejected = "".join(f"<li>{html.escape(r['ref_id'])}: {html.escape(r['reason'])}</li>" for r in rejections)
    page = (
        "<!doctype html><meta charset=utf-8><title>spinml: what would leave</title>"
        "<h1>What would leave your device</h1><p>Exactly these payloads would be released; MI is the "
        "normalised mutual-information leakage per object (0 = nothing).</p>"
        f"<table border=1 cellpadding=4><tr><th>reference</th><th>target</th><th>background</th></tr>{''.join(cells)}</table>"
        + (f"<h2>Refused</h2><ul>{rejected}</ul>" if rejected else "")
    )
    html_path = os.path.join(out_dir, "preview.html")
    with open(html_path, "w", encoding="utf-8") as handle:
        handle.write(page)
    return png_path, html_path

