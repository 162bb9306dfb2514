"""`spinml sweep`: one request under every level configuration, alpha and seed, and which to choose.

A sweep writes a variant of the request document per (configuration, alpha, seed) beside it (each
names only files in the request's own folder, as any request must), runs them all as one batch job
(one synthesis service, one training fleet), and then weighs, per (configuration, alpha), what left
(MI per object, and SIM where the raw references are at hand) against what it bought (accuracy on the
user's real test set, mean and spread over seeds). The recommendation is the least-leaking
configuration whose mean accuracy is within the target of the best one's: `target_accuracy`
(absolute) when given, else `within` (a fraction of the best mean accuracy).

Alpha mixes L0_L0 images into a configuration's pool, so L0_L0 itself runs once per seed, at alpha 0.
The seed of a variant is its synthesis seed, which also seeds its classifier.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import yaml

from spinml_ray import storage
from spinml_ray.spec import Level, RequestSpec, SpecError

CONFIGS = tuple(f"{t.value}_{b.value}" for t in Level for b in Level)


@dataclass(frozen=True)
class Variant:
    config: str
    alpha: float
    seed: int

    @property
    def name(self) -> str:  # the (configuration, alpha) it belongs to
        return f"{self.config}-a{self.alpha:g}"

    def request_id(self, base: str) -> str:
        return f"{base}-{self.name}-s{self.seed}"


def parse_configs(text: str) -> tuple[str, ...]:
    configs = tuple(dict.fromkeys(c.strip().upper() for c in text.split(",") if c.strip()))
    unknown = [c for c in configs if c not in CONFIGS]
    if not configs or unknown:
        raise ValueError(f"configurations must be some of {', '.join(CONFIGS)}, got {text!r}")
    return configs


def parse_alphas(text: str) -> tuple[float, ...]:
    try:
        alphas = tuple(dict.fromkeys(float(a) for a in text.split(",") if a.strip()))
    except ValueError:
        alphas = ()
    if not alphas or not all(0 <= a <= 1 for a in alphas):
        raise ValueError(f"alphas must be numbers from 0 to 1 separated by commas, got {text!r}")
    return alphas


def variants(configs: tuple[str, ...], alphas: tuple[float, ...], seeds: int) -> list[Variant]:
    """Every (configuration, alpha, seed); L0_L0 only at alpha 0 (mixing it with itself changes nothing)."""
    pairs = dict.fromkeys((c, 0.0 if c == "L0_L0" else a) for c in configs for a in alphas)
    return [Variant(c, a, s) for c, a in pairs for s in range(seeds)]


def write_variants(request_uri: str, spec: RequestSpec, runs: list[Variant]) -> str:
    """A request document per variant beside the request, and their manifest; returns the manifest's URI."""
    folder = storage.parent(request_uri)
    document = yaml.safe_load(storage.read_bytes(request_uri).decode("utf-8"))
    longest = max((run.request_id(spec.request_id) for run in runs), key=len)
    if not storage.IDENTIFIER.fullmatch(longest):
        raise ValueError(f"request_id {spec.request_id!r} is too long to name its sweep's variants ({longest!r} "
                         "is over 128 characters); shorten it")
    names = []
    for run in runs:
        target, background = run.config.split("_")
        variant = {**document, "request_id": run.request_id(spec.request_id),
                   "privacy": {**document.get("privacy", {}), "target": target, "background": background,
                               "alpha": run.alpha},
                   "synthesis": {**document.get("synthesis", {}), "seed": run.seed}}
        name = f"sweep-{run.request_id(spec.request_id)}.yaml"
        storage.write_bytes(storage.join(folder, name), yaml.safe_dump(variant, sort_keys=False).encode())
        names.append(name)
    manifest = storage.join(folder, f"sweep-{spec.request_id}.yaml")
    storage.write_bytes(manifest, yaml.safe_dump({"requests": names}).encode())
    return manifest


def mean_sd(values: list) -> dict:
    values = [v for v in values if v is not None]
    if not values:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values)}


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per (configuration, alpha): accuracy over seeds, MI per object and in all, the target's release
    about the background and SIM per object where measured, and the requests that failed. `rows`: one per variant, with `name`, `config`, `alpha`,
    `seed`, `request_id` and, when it trained, `accuracy`, `mi` ({object: value}) and maybe `sim`."""
    out = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        group = [r for r in rows if r["name"] == name]
        done = [r for r in group if r.get("accuracy") is not None]
        mi = {obj: mean_sd([r["mi"][obj] for r in done])["mean"] for obj in ("target", "background")}
        entry = {"config": group[0]["config"], "alpha": group[0]["alpha"],
                 "accuracy": mean_sd([r["accuracy"] for r in done]),
                 "accuracy_per_seed": {r["seed"]: r.get("accuracy") for r in group},
                 "mi": mi, "leakage": sum(v or 0.0 for v in mi.values()) if done else None,
                 "failed": [r["request_id"] for r in group if r.get("accuracy") is None]}
        if any("mi_cross" in r for r in done):
            entry["mi_target_about_background"] = mean_sd([r.get("mi_cross") for r in done])["mean"]
        sims = [r["sim"] for r in done if r.get("sim")]
        if sims:
            entry["sim"] = {obj: mean_sd([s.get(obj) for s in sims])["mean"] for obj in ("target", "background")}
        out[name] = entry
    base = out.get("L0_L0-a0", {}).get("sim")
    for entry in out.values():  # dSIM: how much closer to the user's images than sharing nothing came
        if base and entry.get("sim"):
            entry["dsim"] = {obj: None if entry["sim"][obj] is None or base[obj] is None else entry["sim"][obj] - base[obj]
                             for obj in ("target", "background")}
    return out


def pareto_front(summary: dict[str, dict]) -> list[str]:
    """The (configuration, alpha) names no other beats on both counts: no other leaks as little or less
    and is at least as accurate, with one of the two strictly better. Ordered by leakage."""
    points = {n: (e["leakage"], e["accuracy"]["mean"]) for n, e in summary.items() if e["accuracy"]["mean"] is not None}
    front = [n for n, (leak, acc) in points.items()
             if not any(l2 <= leak and a2 >= acc and (l2 < leak or a2 > acc) for m, (l2, a2) in points.items() if m != n)]
    return sorted(front, key=lambda n: (points[n][0], -points[n][1]))


def recommend(summary: dict[str, dict], target_accuracy: float | None = None, within: float = 0.95) -> dict | None:
    """The least-leaking (configuration, alpha) whose mean accuracy reaches the target: `target_accuracy`
    when given, else `within` times the best mean accuracy; ties go to the more accurate. None when no
    variant trained."""
    trained = {n: e for n, e in summary.items() if e["accuracy"]["mean"] is not None}
    if not trained:
        return None
    best = max(e["accuracy"]["mean"] for e in trained.values())
    bar = target_accuracy if target_accuracy is not None else within * best
    qualifying = {n: e for n, e in trained.items() if e["accuracy"]["mean"] >= bar - 1e-12}
    if not qualifying:
        return {"name": None, "bar": bar, "best_accuracy": best,
                "why": f"no configuration reaches the target accuracy {bar:.3f} (the best mean is {best:.3f})"}
    name = min(qualifying, key=lambda n: (qualifying[n]["leakage"], -qualifying[n]["accuracy"]["mean"]))
    chosen = qualifying[name]
    return {"name": name, "config": chosen["config"], "alpha": chosen["alpha"], "bar": bar, "best_accuracy": best,
            "accuracy": chosen["accuracy"]["mean"], "leakage": chosen["leakage"],
            "why": f"the least leakage (MI {chosen['leakage']:.4f}) among the configurations whose mean accuracy "
                   f"reaches {bar:.3f} (best {best:.3f})"}


def markdown(results: dict) -> str:
    """The sweep's table, front and recommendation."""
    lines = [f"# Sweep of request {results['request_id']}", "",
             f"Accuracy on the real test set over {results['seeds']} seed(s) (mean ± sd); MI per object from the "
             "sanitizer's meter; SIM per object where the raw references were at hand.", "",
             "| configuration | alpha | accuracy | MI target | MI background | MI target about background | "
             "SIM target | SIM background | on the front |",
             "|---|---|---|---|---|---|---|---|---|"]
    front = set(results["pareto_front"])

    def num(value, digits=4):
        return "-" if value is None else f"{value:.{digits}f}"

    for name, e in results["configurations"].items():
        acc = e["accuracy"]
        accuracy = "-" if acc["mean"] is None else f"{acc['mean']:.3f} ± {acc['sd']:.3f} (n={acc['n']})"
        sim = e.get("sim") or {}
        lines.append(f"| {e['config']} | {e['alpha']:g} | {accuracy} | {num(e['mi']['target'])} | "
                     f"{num(e['mi']['background'])} | {num(e.get('mi_target_about_background'))} | "
                     f"{num(sim.get('target'))} | {num(sim.get('background'))} | "
                     f"{'yes' if name in front else ''} |")
    advice = results["recommendation"]
    lines += ["", "**Recommendation:** " + (f"{advice['config']} at alpha {advice['alpha']:g}: {advice['why']}."
                                             if advice and advice.get("name") else (advice or {}).get("why", "none"))]
    failed = [rid for e in results["configurations"].values() for rid in e["failed"]]
    if failed:
        lines += ["", f"Failed requests (left out of the means): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def plot(results: dict) -> bytes:
    """Accuracy against MI released, a point per (configuration, alpha) with its sd, the front as a line."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configurations = results["configurations"]
    trained = {n: e for n, e in configurations.items() if e["accuracy"]["mean"] is not None}
    with_sim = any(e.get("sim") for e in trained.values())
    figure, panels = plt.subplots(1, 2 if with_sim else 1, figsize=(12 if with_sim else 7, 4.5), dpi=110, squeeze=False)
    axes = panels[0][0]
    for name, e in trained.items():
        axes.errorbar(e["leakage"], e["accuracy"]["mean"], yerr=e["accuracy"]["sd"], fmt="o", capsize=3)
        axes.annotate(name.removesuffix("-a0"), (e["leakage"], e["accuracy"]["mean"]), textcoords="offset points",
                      xytext=(5, 4), fontsize=8)
    front = results["pareto_front"]
    if front:
        axes.plot([configurations[n]["leakage"] for n in front], [configurations[n]["accuracy"]["mean"] for n in front],
                  "--", color="grey", linewidth=1, label="Pareto front")
        axes.legend(fontsize=8, loc="lower right")
    axes.set_xlabel("MI released (target + background)")
    if with_sim:  # the same points against how close the synthetic targets came to the user's (SIM)
        sim_axes = panels[0][1]
        for name, e in trained.items():
            if e.get("sim") and e["sim"].get("target") is not None:
                sim_axes.errorbar(e["sim"]["target"], e["accuracy"]["mean"], yerr=e["accuracy"]["sd"], fmt="o", capsize=3)
                sim_axes.annotate(name.removesuffix("-a0"), (e["sim"]["target"], e["accuracy"]["mean"]),
                                  textcoords="offset points", xytext=(5, 4), fontsize=8)
        sim_axes.set_xlabel("SIM, target (synthetic vs the user's references)")
        sim_axes.set_ylim(0, 1.02)
    axes.set_ylabel("accuracy on the real test set")
    axes.set_ylim(0, 1.02)
    figure.suptitle(f"Sweep of {results['request_id']}: accuracy against leakage")
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()


def page(results: dict, picture: bytes) -> str:
    """A self-contained HTML page: the plot, the table and the recommendation."""
    import base64
    import html

    table = html.escape(markdown(results))
    return ("<!doctype html><html lang=en><head><meta charset=utf-8><title>spinml sweep: "
            f"{html.escape(results['request_id'])}</title></head><body style='font-family:sans-serif'>"
            f"<h1>Sweep of {html.escape(results['request_id'])}</h1>"
            f"<img id=plot alt='accuracy against leakage' src='data:image/png;base64,{base64.b64encode(picture).decode()}'>"
            f"<pre>{table}</pre></body></html>")


def require_test_set(spec: RequestSpec, source: str) -> None:
    """A sweep compares configurations on the user's real images; a synthetic validation split differs
    from one configuration to the next."""
    if not spec.test_set:
        raise SpecError(f"{source}: a sweep compares configurations on the user's real images: the request "
                        "needs a test_set (a synthetic validation split differs from one configuration to the next)")


def cross_object_mi(spec: RequestSpec, configs: tuple[str, ...], references: list[dict]) -> dict[str, float | None]:
    """Per target level of `configs`, what the target's release tells about the background (the
    artifact's cross-object MI), from the raw references: it depends on the level alone, not on the
    variant, so it is measured once per level."""
    from spinml_ray import report

    canny = (spec.sanitization.canny_low, spec.sanitization.canny_high)
    return {level: report.cross_object_mi(references, level, canny) for level in {c.split("_")[0] for c in configs}}


def variant_result(storage_root: str, spec: RequestSpec, run: Variant, row: dict, encoder=None,
                   references: list[dict] | None = None, model: str = "tiny",
                   mi_cross: dict[str, float | None] | None = None) -> dict:
    """One variant's row for `summarize`: its batch status, and once trained its accuracy, MI per object,
    the target's release about the background (`mi_cross`, by target level: `cross_object_mi`), and with
    an encoder and the raw references SIM per object."""
    from spinml_ray import report
    from spinml_ray.images import decode_rgb

    request_id = run.request_id(spec.request_id)
    result = {"name": run.name, "config": run.config, "alpha": run.alpha, "seed": run.seed, "request_id": request_id,
              "state": row.get("state"), "error": row.get("error")}
    if row.get("state") != "done":
        return result
    paths = storage.RequestPaths(storage_root, spec.tenant, request_id)
    metrics = storage.read_json(storage.join(paths.model, "metrics.json"))
    result.update(accuracy=metrics.get("accuracy", metrics.get("map")),
                  mi=report.own_mi(storage.read_committed_table(paths.sanitized).to_pylist()))
    if mi_cross is not None:
        result["mi_cross"] = mi_cross[run.config.split("_")[0]]
    if encoder is not None and references:
        table = storage.read_committed_table(paths.synthetic)
        columns = [c for c in ("image_id", "pool", "box", "image", "attention") if c in table.column_names]
        synthetic = [{**r, "array": decode_rgb(r["image"])} for r in table.select(columns).to_pylist()]
        report.locate_targets(synthetic, model)  # targets the conditioning did not place, as the report finds them
        found = report.similarity(encoder, synthetic, references)
        result["sim"] = {obj: e["sim"] for obj, e in found.get("objects", {}).items()}
    return result


def results_of(spec: RequestSpec, rows: list[dict], seeds: int,
               target_accuracy: float | None = None, within: float = 0.95) -> dict:
    summary = summarize(rows)
    return {"request_id": spec.request_id, "tenant": spec.tenant, "seeds": seeds, "variants": rows,
            "configurations": summary, "pareto_front": pareto_front(summary),
            "recommendation": recommend(summary, target_accuracy, within)}


def write(results: dict, storage_root: str) -> str:
    """sweep.json, sweep.md, sweep.png and index.html under `{root}/{tenant}/_sweeps/{request_id}/`."""
    out = storage.join(storage_root, results["tenant"], "_sweeps", results["request_id"])
    picture = plot(results)
    storage.write_json(storage.join(out, "sweep.json"), results)
    storage.write_bytes(storage.join(out, "sweep.md"), markdown(results).encode())
    storage.write_bytes(storage.join(out, "sweep.png"), picture)
    storage.write_bytes(storage.join(out, "index.html"), page(results, picture).encode())
    return out
