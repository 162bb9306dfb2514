"""The privacy and utility report of one request: `spinml report REQUEST --storage ROOT`.

Runs where the user is (no Ray), reads the request's outputs from storage and writes
`{request}/report/report.json` (the numbers) and `{request}/report/index.html` (self-contained:
every image embedded, readable offline). What it shows:

- the references as released (the preview) and the MI of each object with its own release;
- replication: how close each synthetic image comes to a released payload (and, with the raw
  references, to a reference), with the closest pairs as images;
- with the raw references (`--references-from DIR`, the folder of the user's copy of the request):
  SIM per object (synthetic segments against reference segments), dSIM against the request's
  L0_L0 images when it has some, and cross-object MI (what the target's release tells about the
  background). Raw references never leave the machine the report runs on; without them these
  sections say what they need;
- membership inference against the specialized model (a loss-threshold attack: its synthetic
  training images against its held-out validation split; LiRA with `--shadow-models K`) and, given held-out images of the same
  subject (`--held-out DIR`), against the personalization adapter (its training crops' diffusion
  loss, calibrated by the base model's);
- synthetic samples per label, accuracy, per-class accuracy and the confusion matrix from
  `model/metrics.json`, and the request's settings.

Nothing in it is new to the user: it is written to the request's own storage prefix, and the parts
a server could compute (MI, replication against payloads, metrics) never read raw references.
"""

from __future__ import annotations

import base64
import html
import io
import json
import tempfile

import numpy as np
import torch

from spinml_ray import evaluation, storage
from spinml_ray.bundle import reference_items
from spinml_ray.images import decode_mask, decode_png, decode_rgb, encode_png
from spinml_ray.preview import write_preview
from spinml_ray.spec import RequestSpec
from spinml_ray.training import classifier, pretrained
from spinml_ray.training.job import TrainingJob

OBJECTS = ("target", "background")
SAMPLES_PER_LABEL = 6


# ------------------------------------------------------------------------------------------------
# segments


def _crop(image: np.ndarray, box) -> np.ndarray | None:
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    x0, y0 = max(0, x0), max(0, y0)
    x1, y1 = min(image.shape[1], x1), min(image.shape[0], y1)
    return image[y0:y1, x0:x1] if x1 > x0 and y1 > y0 else None


def synthetic_segments(image: np.ndarray, box) -> dict[str, np.ndarray | None]:
    """A synthetic image's target (its box: where the conditioning placed it, else where the
    auto-labeller found it) and background (the rest, the box blacked out); without a box the target
    is unknown (None) and the background is the image."""
    if box is None:
        return {"target": None, "background": image}
    background = image.copy()
    x0, y0, x1, y1 = (int(round(v)) for v in box)
    background[max(0, y0):max(0, y1), max(0, x0):max(0, x1)] = 0
    return {"target": _crop(image, box), "background": background}


def reference_segments(image: np.ndarray, mask: np.ndarray) -> dict[str, np.ndarray | None]:
    """A reference's target (its mask's pixels, cropped to the mask's box) and background (the mask blacked out)."""
    ys, xs = np.nonzero(mask)
    target = None
    if len(ys):
        pixels = np.where(mask[..., None], image, 0).astype(np.uint8)
        target = pixels[ys.min():ys.max() + 1, xs.min():xs.max() + 1]
    return {"target": target, "background": np.where(mask[..., None], 0, image).astype(np.uint8)}


def locate_targets(synthetic: list[dict], model: str) -> dict:
    """Fill in the box of synthetic images whose conditioning placed no target, from the auto-labeller
    (the model source's SAM, prompted by where the model drew the subject), so their target segment is
    known too; returns how many boxes came from where."""
    from spinml_ray.autolabel import trusted_boxes
    from spinml_ray.models.source import sam_loader
    from spinml_ray.segmentation import LazySegmenter

    placed = sum(s["box"] is not None for s in synthetic)
    counts = {"from_conditioning": placed, "from_autolabeller": 0, "unknown": len(synthetic) - placed}
    if placed == len(synthetic):
        return counts
    segmenter = LazySegmenter(sam_loader(model))
    if not segmenter.available:
        return {**counts, "why_unknown": f"the model source {model!r} has no SAM"}
    boxes, _ = trusted_boxes([{k: s.get(k) for k in ("image_id", "box", "image", "attention")} for s in synthetic],
                             segmenter)
    for s in synthetic:
        if s["box"] is None and s["image_id"] in boxes:
            s["box"] = boxes[s["image_id"]]
            counts["from_autolabeller"] += 1
            counts["unknown"] -= 1
    return counts


def load_references(spec: RequestSpec) -> tuple[list[dict], list[str]]:
    """The raw references with masks, as {ref_id, label, image, mask}; and why any were left out."""
    loaded, skipped = [], []
    for item in reference_items(spec):
        if not item.get("mask_uri"):
            skipped.append(f"{item['ref_id']}: no mask (its target is found by SAM on the server side)")
            continue
        try:
            image = decode_rgb(storage.read_bytes(item["uri"]), what=item["uri"])
            mask = decode_mask(storage.read_bytes(item["mask_uri"]), image.shape[:2], what=item["mask_uri"])
        except (OSError, ValueError) as exc:
            skipped.append(f"{item['ref_id']}: {exc}")
            continue
        loaded.append({"ref_id": item["ref_id"], "label": item.get("label"), "image": image, "mask": mask})
    return loaded, skipped


# ------------------------------------------------------------------------------------------------
# measures


def own_mi(rows: list[dict]) -> dict[str, float | None]:
    """Mean MI of each object with its own release, over the bundle's references."""
    out = {}
    for obj in OBJECTS:
        values = [r["mi"] for r in rows if r["object"] == obj and r.get("mi") is not None]
        out[obj] = float(np.mean(values)) if values else None
    return out


def cross_object_mi(references: list[dict], target_level: str, canny: tuple[int, int]) -> float | None:
    """Mean over references of what the target's release tells about the background."""
    values = []
    for ref in references:
        image, mask = ref["image"], ref["mask"]
        target = np.where(mask[..., None], image, 0).astype(np.uint8)
        background = np.where(mask[..., None], 0, image).astype(np.uint8)
        values.append(evaluation.cross_object_leakage(target, background, image, target_level, *canny))
    return float(np.mean(values)) if values else None


def similarity(encoder, synthetic: list[dict], references: list[dict]) -> dict:
    """SIM per object for the request's own pool, and dSIM against its L0_L0 pool when it has one."""
    if not references:
        return {"skipped": "no reference with a mask was readable"}
    ref_segments = [reference_segments(r["image"], r["mask"]) for r in references]
    pools = sorted({s["pool"] for s in synthetic})
    own = next((p for p in pools if p != "L0_L0"), "L0_L0")
    result: dict = {"pool": own, "objects": {}}
    for obj in OBJECTS:
        refs = [s[obj] for s in ref_segments if s[obj] is not None and s[obj].size]
        embedded_refs = encoder.embed(refs) if refs else None  # once, for every pool
        by_pool = {}
        for pool in pools:
            segments = [synthetic_segments(s["array"], s["box"])[obj] for s in synthetic if s["pool"] == pool]
            segments = [x for x in segments if x is not None and x.size]
            if segments and refs:
                by_pool[pool] = evaluation.sim(encoder.embed(segments), embedded_refs)
        entry = {"sim": by_pool.get(own), "segments": sum(s["pool"] == own for s in synthetic)}
        if own != "L0_L0" and "L0_L0" in by_pool and own in by_pool:
            entry["dsim"] = evaluation.dsim(by_pool[own], by_pool["L0_L0"])
            entry["sim_l0_l0"] = by_pool["L0_L0"]
        result["objects"][obj] = entry
    return result


def replication(encoder, synthetic: list[dict], against: list[np.ndarray], what: str) -> dict | None:
    """Each synthetic image's closest `against` image (same encoder), the share above 0.95, the 95th
    percentile and the five closest pairs."""
    if not synthetic or not against:
        return None
    found = evaluation.replication(encoder.embed([s["array"] for s in synthetic]), encoder.embed(against))
    return {"against": what, "compared": len(against), "threshold": found.threshold,
            "above_threshold": found.above_threshold, "p95": found.p95,
            "closest": [{"synthetic": synthetic[i]["image_id"], "index": j, "similarity": v} for i, j, v in found.closest]}


def model_membership(spec: RequestSpec, paths: storage.RequestPaths, table, shadows: int = 0,
                     model_source: str = "tiny") -> dict:
    """Membership inference against the specialized model: its training split of the synthetic images
    (members) against its validation split (held out, same distribution). A loss-threshold attack, and
    with `shadows` > 0 LiRA: that many shadow models trained like it on random halves of the synthetic
    images calibrate each image's confidence (costly: a training each)."""
    if spec.task != "classification":
        return {"skipped": "membership inference is measured for classification models"}
    if storage.read_manifest(paths.model) is None:
        return {"skipped": "no trained model yet"}
    training = spec.training
    model = classifier.build_model(training.architecture, len(spec.labels))
    model.load_state_dict(torch.load(io.BytesIO(storage.read_bytes(storage.join(paths.model, "model.pt"))),
                                     map_location="cpu"))
    images = classifier.images_to_uint8(table.column("image").to_pylist(), training.image_size)
    targets = torch.tensor(table.column("label_index").to_pylist(), dtype=torch.long)
    train_idx, val_idx = classifier.split_train_val(len(targets), TrainingJob.val_fraction, spec.synthesis.seed)
    if len(val_idx) == 0:
        return {"skipped": "too few synthetic images to hold any out"}
    logits = classifier.logits(model, images)
    losses = torch.nn.functional.cross_entropy(logits, targets, reduction="none").numpy()
    attack = evaluation.loss_threshold_attack(losses[train_idx], losses[val_idx])
    result = {"attack": "loss threshold", "auc": attack.auc, "tpr_at_1_fpr": attack.tpr_at_1_fpr,
              "members": attack.members, "non_members": attack.non_members}
    if shadows:
        inside = np.random.default_rng(spec.synthesis.seed).random((shadows, len(targets))) < 0.5
        confidences = []
        start, _ = pretrained.resolve(training.pretrained, model_source, training.architecture, spec.task)
        for k in range(shadows):  # each trained as the attacked model was: same start, settings and epochs
            chosen = torch.from_numpy(np.nonzero(inside[k])[0])
            shadow = classifier.fit_plain(images[chosen], targets[chosen], training.architecture, len(spec.labels),
                                          training.epochs, training.batch_size, training.learning_rate, seed=k,
                                          pretrained=start)
            confidences.append(evaluation.logit_confidence(classifier.logits(shadow, images).numpy(), targets.numpy()))
        scores = evaluation.lira_scores(evaluation.logit_confidence(logits.numpy(), targets.numpy()),
                                        np.stack(confidences), inside)
        lira = evaluation.membership_inference(scores[train_idx], scores[val_idx])
        result["lira"] = {"shadow_models": shadows, "auc": lira.auc, "tpr_at_1_fpr": lira.tpr_at_1_fpr}
    return result


def adapter_membership(paths: storage.RequestPaths, model: str, rows: list[dict], held_out: list[bytes] | None) -> dict:
    """Membership inference against the request's personalization adapter: its training crops (the
    released L2 target crops) against held-out images of the same subject, scored by how much of
    their diffusion loss the adapter removes (calibrated by the base model), and by the plain loss."""
    from spinml_ray.models.source import resolve
    from spinml_ray.personalization import adapter_losses, adapter_method, target_crops

    manifest = storage.read_manifest(paths.adapters)
    if manifest is None or adapter_method(manifest.get("files", [])) is None:
        return {"skipped": "the request has no personalization adapter"}
    if not held_out:
        return {"skipped": "needs held-out images of the same subject (--held-out DIR)"}
    members = target_crops(rows)
    with tempfile.TemporaryDirectory() as tmp:
        storage.download_dir(paths.adapters, tmp)
        base, adapted = adapter_losses(resolve(model), tmp, members + list(held_out))
    n = len(members)
    gain = base - adapted  # larger where the adapter learned the image
    calibrated = evaluation.membership_inference(gain[:n], gain[n:])
    plain = evaluation.loss_threshold_attack(adapted[:n], adapted[n:])
    return {"attack": "diffusion loss, calibrated by the base model", "auc": calibrated.auc,
            "tpr_at_1_fpr": calibrated.tpr_at_1_fpr, "members": n, "non_members": len(held_out),
            "loss_threshold": {"auc": plain.auc, "tpr_at_1_fpr": plain.tpr_at_1_fpr}}


# ------------------------------------------------------------------------------------------------
# the report


def build(spec: RequestSpec, storage_root: str, model: str = "tiny", references: list[dict] | None = None,
          skipped_references: list[str] = (), held_out: list[bytes] | None = None,
          shadows: int = 0) -> tuple[dict, dict[str, bytes]]:
    """(report.json's content, PNG images by name) for one request. `references`: the raw references
    (`load_references`), or None when they are not at hand; `held_out`: images of the same subject
    that the adapter never saw (encoded), for membership inference against it; `shadows`: shadow models
    for LiRA against the specialized model (0: the loss-threshold attack only)."""
    from spinml_ray.encoders import load_encoder

    paths = storage.RequestPaths(storage_root, spec.tenant, spec.request_id)
    report: dict = {"request_id": spec.request_id, "tenant": spec.tenant, "task": spec.task,
                    "privacy": f"{spec.privacy.target.value}_{spec.privacy.background.value}",
                    "alpha": spec.privacy.alpha, "settings": spec.model_dump(mode="json", exclude={"references"}),
                    "skipped_references": list(skipped_references)}
    pictures: dict[str, bytes] = {}
    rows = storage.read_committed_table(paths.sanitized).to_pylist()
    with tempfile.TemporaryDirectory() as tmp:
        png, _ = write_preview(rows, tmp)
        with open(png, "rb") as handle:
            pictures["released"] = handle.read()
    report["mi"] = {"own": own_mi(rows)}
    canny = (spec.sanitization.canny_low, spec.sanitization.canny_high)
    report["mi"]["target_about_background"] = (
        cross_object_mi(references, spec.privacy.target.value, canny) if references is not None
        else "needs the raw references (--references-from)")

    synthetic, table = [], None
    if storage.read_manifest(paths.synthetic) is not None:
        table = storage.read_committed_table(paths.synthetic)
        columns = [c for c in ("image_id", "label", "pool", "box", "image", "attention") if c in table.column_names]
        for row in table.select(columns).to_pylist():
            synthetic.append({**row, "array": decode_rgb(row["image"])})
        report["segments"] = locate_targets(synthetic, model)
    report["synthetic"] = {"images": len(synthetic),
                           "per_label": {label: sum(s["label"] == label for s in synthetic) for label in spec.label_names},
                           "pools": sorted({s["pool"] for s in synthetic})}
    if synthetic:
        pictures["samples"] = _sample_grid(synthetic, spec.label_names)

    encoder = load_encoder(model)
    payloads = [decode_png(r["payload"]) for r in rows if r["level"] == "L2" and r["payload"] is not None]
    if encoder is None:
        report["replication"] = report["sim"] = f"the model source {model!r} has no image encoder (encoders/)"
    else:
        report["encoder"] = type(encoder.model).__name__
        report["replication"] = {"payloads": replication(encoder, synthetic, payloads, "released L2 payloads")}
        if references is None:
            report["sim"] = "needs the raw references (--references-from)"
        else:
            report["sim"] = similarity(encoder, synthetic, references)
            found = replication(encoder, synthetic, [r["image"] for r in references], "raw references")
            report["replication"]["references"] = found
            if found:
                by_id = {s["image_id"]: s["array"] for s in synthetic}
                pictures["closest"] = _pairs([(by_id[c["synthetic"]], references[c["index"]]["image"], c["similarity"])
                                              for c in found["closest"]])

    report["membership_inference"] = {"model": model_membership(spec, paths, table, shadows, model) if table is not None
                                      else {"skipped": "no synthetic images yet"},
                                      "adapter": adapter_membership(paths, model, rows, held_out)}
    metrics_uri = storage.join(paths.model, "metrics.json")
    if storage.read_manifest(paths.model) is not None:
        metrics = storage.read_json(metrics_uri)
        report["metrics"] = {k: metrics.get(k) for k in ("evaluated_on", "accuracy", "per_class_accuracy", "confusion",
                                                         "map", "map_50", "map_75", "per_label_map", "n", "labels")}
        if metrics.get("confusion"):
            pictures["confusion"] = _confusion_plot(metrics["confusion"], spec.label_names)
    return report, pictures


def write(spec: RequestSpec, storage_root: str, model: str = "tiny", references: list[dict] | None = None,
          skipped_references: list[str] = (), held_out: list[bytes] | None = None, shadows: int = 0,
          out: str | None = None) -> str:
    """Build the report and write `report.json` and `index.html` into `out`, by default the request's
    `report/` in storage; returns the folder. With raw references the caller names a local `out`: what
    comes from them (thumbnails, SIM, numbers about L0 objects) must not land in a platform's bucket."""
    report, pictures = build(spec, storage_root, model, references, skipped_references, held_out, shadows)
    out = out or storage.join(storage.RequestPaths(storage_root, spec.tenant, spec.request_id).base, "report")
    storage.write_json(storage.join(out, "report.json"), report)
    storage.write_bytes(storage.join(out, "index.html"), render(report, pictures).encode("utf-8"))
    return out


# ------------------------------------------------------------------------------------------------
# pictures and the page


def _png(array: np.ndarray) -> bytes:
    return encode_png(np.ascontiguousarray(array, dtype=np.uint8))


def _fit(image: np.ndarray, size: int = 96) -> np.ndarray:
    from PIL import Image

    canvas = Image.new("RGB", (size, size))
    picture = Image.fromarray(image)
    picture.thumbnail((size, size))
    canvas.paste(picture, ((size - picture.width) // 2, (size - picture.height) // 2))
    return np.asarray(canvas)


def _sample_grid(synthetic: list[dict], labels: list[str]) -> bytes:
    """A row per label: up to `SAMPLES_PER_LABEL` of its synthetic images (black where it has fewer)."""
    rows = []
    for label in labels:
        tiles = [_fit(s["array"]) for s in synthetic if s["label"] == label][:SAMPLES_PER_LABEL]
        tiles += [np.zeros((96, 96, 3), np.uint8)] * (SAMPLES_PER_LABEL - len(tiles))
        rows.append(np.concatenate(tiles, axis=1))
    return _png(np.concatenate(rows, axis=0))


def _pairs(pairs: list[tuple[np.ndarray, np.ndarray, float]]) -> bytes:
    """The closest (synthetic, reference) pairs, one row each."""
    return _png(np.concatenate([np.concatenate([_fit(a), _fit(b)], axis=1) for a, b, _ in pairs], axis=0))


def _confusion_plot(confusion: list[list[int]], labels: list[str]) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(1.2 + 0.7 * len(labels), 1.0 + 0.7 * len(labels)), dpi=100)
    matrix = np.asarray(confusion)
    axes.imshow(matrix, cmap="Blues")
    for (i, j), value in np.ndenumerate(matrix):
        axes.text(j, i, str(value), ha="center", va="center", fontsize=8)
    axes.set_xticks(range(len(labels)), labels, rotation=45, ha="right", fontsize=8)
    axes.set_yticks(range(len(labels)), labels, fontsize=8)
    axes.set_xlabel("predicted")
    axes.set_ylabel("true")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def _img(pictures: dict[str, bytes], name: str, alt: str) -> str:
    if name not in pictures:
        return ""
    data = base64.b64encode(pictures[name]).decode()
    return f'<img id="{name}" alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _value(value) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return html.escape("-" if value is None else str(value))


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_value(v)}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _said(value, render_found) -> str:
    """A section's table, or the reason it has none (a string in report.json)."""
    return f"<p><em>{html.escape(value)}</em></p>" if isinstance(value, str) else render_found(value)


def _leakage(report: dict) -> str:
    mi, sim = report["mi"], report["sim"]
    rows = [[f"MI, {obj} with its own release", v] for obj, v in mi["own"].items()]
    cross = mi["target_about_background"]
    rows.append(["MI, the target's release about the background", cross if not isinstance(cross, str) else cross])
    if isinstance(sim, dict) and "objects" in sim:
        for obj, entry in sim["objects"].items():
            rows.append([f"SIM, {obj} ({sim['pool']} synthetic vs references)", entry["sim"]])
            if "dsim" in entry:
                rows.append([f"dSIM, {obj} (less L0_L0's {entry['sim_l0_l0']:.4f})", entry["dsim"]])
    else:
        rows.append(["SIM", sim if isinstance(sim, str) else sim.get("skipped")])
    return _table(["measure", "value"], rows)


def _replication(found: dict) -> str:
    rows = [[v["against"], v["compared"], v["above_threshold"], v["p95"]] for v in found.values() if v]
    return _table(["synthetic images against", "images", "share above 0.95", "95th percentile"], rows)


def _membership(found: dict) -> str:
    rows = [[what, v.get("auc"), v.get("tpr_at_1_fpr"), v.get("members"), v.get("non_members"), v.get("skipped")]
            for what, v in found.items()]
    rows += [[f"{what}, {key.replace('_', ' ')}", v[key]["auc"], v[key]["tpr_at_1_fpr"], v.get("members"),
              v.get("non_members"), None] for what, v in found.items() for key in ("lira", "loss_threshold") if key in v]
    return _table(["attacked", "AUC", "TPR at 1% FPR", "members", "non-members", "not measured because"], rows)


def _metrics(metrics: dict, labels: list[str]) -> str:
    head = _table(["evaluated on", "accuracy", "mAP50-95", "images"],
                  [[metrics.get("evaluated_on"), metrics.get("accuracy"), metrics.get("map"), metrics.get("n")]])
    per = metrics.get("per_class_accuracy") or metrics.get("per_label_map") or []
    return head + _table(["label", "per-label score"], [[label, v] for label, v in zip(labels, per)])


def render(report: dict, pictures: dict[str, bytes]) -> str:
    """The self-contained HTML page (no script, no outside reference)."""
    labels = report["settings"]["labels"]
    names = [label["name"] for label in labels]
    synthetic = report["synthetic"]
    sections = [
        f"<h1>Request {html.escape(report['request_id'])}</h1>",
        f"<p>Tenant {html.escape(report['tenant'])} &middot; {html.escape(report['task'])} &middot; "
        f"privacy {report['privacy']} &middot; alpha {report['alpha']}</p>",
        "<h2>What left, per reference</h2>", _img(pictures, "released", "the references as released"),
        "<h2>Leakage</h2>", _leakage(report),
        "<h2>Replication</h2>", _said(report["replication"], _replication),
        _img(pictures, "closest", "the closest synthetic (left) and reference (right) pairs"),
        "<h2>Membership inference</h2>", _membership(report["membership_inference"]),
        "<h2>Synthetic images, a row per label</h2>",
        _table(["label", "images"], [[n, synthetic["per_label"].get(n)] for n in names]),
        f"<p>pools: {html.escape(', '.join(synthetic['pools']))}</p>",
        _img(pictures, "samples", "synthetic samples per label"),
    ]
    if "metrics" in report:
        sections += ["<h2>The specialized model</h2>", _metrics(report["metrics"], names),
                     _img(pictures, "confusion", "confusion matrix")]
    if report["skipped_references"]:
        sections += ["<h2>References left out of the raw measures</h2><ul>",
                     *(f"<li>{html.escape(s)}</li>" for s in report["skipped_references"]), "</ul>"]
    settings = html.escape(json.dumps(report["settings"], indent=1, default=str))
    sections += [f"<h2>Settings</h2><details><summary>the request as run</summary><pre>{settings}</pre></details>"]
    style = ("body{font-family:sans-serif;max-width:60em;margin:2em auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:.2em .6em;text-align:left}img{display:block;margin:.5em 0}")
    return (f"<!doctype html><html lang=en><head><meta charset=utf-8><title>spinml report: "
            f"{html.escape(report['request_id'])}</title><style>{style}</style></head><body>"
            + "\n".join(s for s in sections if s) + "</body></html>")
