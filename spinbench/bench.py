"""SpinBench's benchmark: one user's requests through the real system, beside the plain baselines.

`run_benchmark` writes the user's world once (references with exact masks, a real test set), then
one request document per (configuration, alpha, seed) in the same folder, and a manifest; runs them
all with the batch job (`spinml_ray.ray_layer.batch.run_batch`: sanitize on Ray Data, personalize with Ray
Train for L2 targets, synthesize on Ray Serve, train in the fleet, evaluate on the real test set);
and gathers, per configuration, the accuracy per seed (mean, sd, per state), the MI released per
object (the sanitizer's meter, mean over references), the images generated and the seconds per stage.
With `baselines`, the baselines of `spinbench.baselines` run on the same test set with the same seeds.
The seed of a request is its synthesis seed, which also seeds its classifier's training.
"""

from __future__ import annotations

import json
import os
import statistics
import time

import yaml

from spinbench.baselines import BASELINES, Training, run_baseline
from spinbench.world import STATES, make_user, user_samples, write_user_request
from spinml_ray.ray_layer.pipeline import STAGE_NAMES as STAGES
from spinml_ray.spec import load_request
from spinml_ray.sweep import Variant, mean_sd, write_variants

CONFIGS = ("L0_L0", "L1_L0", "L0_L1", "L1_L1", "L2_L0", "L2_L2")
ALPHA_CONFIG = "L2_L0"  # where the mixing fraction alpha is swept


def user_base(user_seed: int) -> str:
    """The user's request id (`spinml spinbench world`'s); a run's id is `Variant.request_id(user_base(user))`."""
    return f"spinbench-user-{user_seed}"


def plan(configs=CONFIGS, alphas=(0.0,), seeds: int = 5, alpha_config: str = ALPHA_CONFIG) -> list[Variant]:
    """Every configuration at alpha 0, and `alpha_config` at each other alpha; each with `seeds` seeds."""
    pairs = [(c, 0.0) for c in configs] + [(alpha_config, a) for a in alphas if a != 0.0]
    return [Variant(c, a, s) for c, a in pairs for s in range(seeds)]


def write_requests(user_seed: int, out_dir: str, runs: list[Variant], synthesis: dict, training: Training,
                   personalization: dict, references_per_state: int, test_per_state: int) -> str:
    """The user's world in `out_dir` (its request with the benchmark's settings) and the runs as the
    sweep writes them (`spinml_ray.sweep.write_variants`): `spinml sweep` of that request with the same
    configurations, alphas and seeds runs the very same requests. Returns the manifest's path."""
    request = write_user_request(user_seed, out_dir, references_per_state=references_per_state,
                                 test_per_state=test_per_state, synthesis=synthesis, training=vars(training))
    with open(request) as handle:
        document = yaml.safe_load(handle)
    document["personalization"] = personalization
    with open(request, "w") as handle:
        yaml.safe_dump(document, handle, sort_keys=False)
    return write_variants(request, load_request(request), runs)


def _request_result(storage_root: str, request_id: str, row: dict) -> dict:
    from spinml_ray import storage

    paths = storage.RequestPaths(storage_root, "spinbench", request_id)
    result = {"request_id": request_id, "state": row.get("state"), "error": row.get("error"),
              "seconds": {s: row["stages"].get(s, {}).get("seconds") for s in STAGES}}
    if row.get("state") != "done":
        return result
    metrics = storage.read_json(storage.join(paths.model, "metrics.json"))
    sanitized = storage.read_committed_table(paths.sanitized).to_pylist()
    synthetic = storage.read_manifest(paths.synthetic) or {}
    result.update(accuracy=metrics["accuracy"], per_class=metrics["per_class_accuracy"],
                  images=synthetic.get("images"),
                  mi={obj: statistics.fmean(r["mi"] for r in sanitized if r["object"] == obj) if sanitized else 0.0
                      for obj in ("target", "background")})
    return result


def summarize(rows: list[dict]) -> dict:
    """Per configuration name: accuracy mean/sd and per seed, per-state means, MI, images, seconds."""
    out: dict[str, dict] = {}
    for name in dict.fromkeys(r["name"] for r in rows):
        group = [r for r in rows if r["name"] == name]
        done = [r for r in group if r.get("accuracy") is not None]
        per_state = {state: mean_sd([r["per_class"][i] for r in done])["mean"] for i, state in enumerate(STATES)}
        out[name] = {
            "config": group[0]["config"], "alpha": group[0]["alpha"],
            "accuracy": mean_sd([r["accuracy"] for r in done]),
            "accuracy_per_seed": {r["seed"]: r.get("accuracy") for r in group},
            "per_state": per_state,
            "mi": {obj: mean_sd([r["mi"][obj] for r in done])["mean"] for obj in ("target", "background")},
            "images": mean_sd([r["images"] for r in done if r.get("images") is not None])["mean"],
            "seconds": {s: mean_sd([r["seconds"][s] for r in group if r["seconds"].get(s) is not None])["mean"]
                        for s in STAGES},
            "failed": [r["request_id"] for r in group if r.get("accuracy") is None],
        }
    return out


def baseline_results(user_seed: int, seeds: int, references_per_state: int, test_per_state: int, count: int,
                     training: Training) -> dict:
    user = make_user(user_seed)
    test = user_samples(user, test_per_state, "test")
    out = {}
    for name in BASELINES:
        started = time.time()
        results = [run_baseline(name, user, test, references_per_state, count, seed, training) for seed in range(seeds)]
        out[name] = {
            "accuracy": mean_sd([r["accuracy"] for r in results]),
            "accuracy_per_seed": {seed: r["accuracy"] for seed, r in enumerate(results)},
            "per_state": {state: statistics.fmean(r["per_class_accuracy"][i] for r in results)
                          for i, state in enumerate(STATES)},
            "seconds": round((time.time() - started) / seeds, 1),
        }
    return out


def _fmt(stat: dict) -> str:
    return "-" if stat["mean"] is None else f"{stat['mean']:.3f} ± {stat['sd']:.3f} (n={stat['n']})"


def results_markdown(results: dict) -> str:
    lines = [f"# SpinBench, user {results['user_seed']} (model `{results['model']}`)", "",
             f"Chance: {1 / len(STATES):.2f}. Accuracy on the user's real test set ({results['test_images']} images), "
             f"mean ± sd over seeds; MI per object from the sanitizer's meter (0 at L0).", "",
             "| configuration | alpha | accuracy | " + " | ".join(STATES) + " | MI target | MI background | images | "
             "sanitize s | personalize s | synthesize s | train s |",
             "|---|---|---|" + "---|" * len(STATES) + "---|---|---|---|---|---|---|"]
    for name, row in results["configurations"].items():
        states = " | ".join("-" if row["per_state"][s] is None else f"{row['per_state'][s]:.2f}" for s in STATES)
        seconds = " | ".join("-" if row["seconds"][s] is None else f"{row['seconds'][s]:.0f}" for s in STAGES)
        lines.append(f"| {row['config']} | {row['alpha']:g} | {_fmt(row['accuracy'])} | {states} | "
                     f"{row['mi']['target'] or 0:.4f} | {row['mi']['background'] or 0:.4f} | {row['images'] or 0:.0f} | "
                     f"{seconds} |")
    if results.get("baselines"):
        lines += ["", "| baseline | accuracy | " + " | ".join(STATES) + " | seconds per seed |",
                  "|---|---|" + "---|" * len(STATES) + "---|"]
        for name, row in results["baselines"].items():
            states = " | ".join(f"{row['per_state'][s]:.2f}" for s in STATES)
            lines.append(f"| {name} | {_fmt(row['accuracy'])} | {states} | {row['seconds']} |")
    failed = [rid for row in results["configurations"].values() for rid in row["failed"]]
    if failed:
        lines += ["", f"Failed requests (left out of the means): {', '.join(failed)}"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: str) -> str:
    """Accuracy against leakage (MI of target + background), one point per configuration with its sd,
    the baselines as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, row in results["configurations"].items():
        if row["accuracy"]["mean"] is None:
            continue
        leak = (row["mi"]["target"] or 0) + (row["mi"]["background"] or 0)
        ax.errorbar(leak, row["accuracy"]["mean"], yerr=row["accuracy"]["sd"], fmt="o", capsize=3)
        ax.annotate(name.removesuffix("-a0"), (leak, row["accuracy"]["mean"]),
                    textcoords="offset points", xytext=(5, 4), fontsize=8)
    for i, (name, row) in enumerate((results.get("baselines") or {}).items()):
        ax.axhline(row["accuracy"]["mean"], linestyle="--", color=f"C{i + 2}", linewidth=1, label=f"{name} baseline")
    ax.axhline(1 / len(STATES), color="grey", linewidth=0.8, label="chance")
    ax.set_xlabel("MI released (target + background, the sanitizer's meter)")
    ax.set_ylabel("accuracy on the user's real test set")
    ax.set_title(f"SpinBench user {results['user_seed']}: accuracy against leakage")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def run_benchmark(user_seed: int, out_dir: str, runs: list[Variant], model: str = "spinbench",
                  storage_root: str | None = None, address: str | None = None, num_cpus: int | None = None,
                  baselines: bool = False, synthesis: dict | None = None, training: Training = Training(),
                  personalization: dict | None = None, references_per_state: int = 4, test_per_state: int = 25,
                  baseline_images: int = 256, max_concurrent: int | None = None, http_port: int = 8000) -> dict:
    """Run `runs` for one user through the batch job; write results.json, results.md and accuracy.png."""
    from spinml_ray.ray_layer.batch import list_requests, run_batch
    from spinml_ray.ray_layer.cluster import connect

    os.makedirs(out_dir, exist_ok=True)
    synthesis = {"images_per_label": 32, "resolution": 64, "steps": 20, "guidance": 3.0, "scheduler": "dpmsolver++",
                 **(synthesis or {})}
    personalization = {"steps": 150, "class_images": 16, "checkpoint_every": 50, **(personalization or {})}
    world = os.path.join(out_dir, "world")
    manifest = write_requests(user_seed, world, runs, synthesis, training, personalization, references_per_state,
                              test_per_state)
    storage_root = storage_root or os.path.join(out_dir, "storage")
    connect(address, num_cpus=num_cpus)
    started = time.time()
    summary = run_batch(list_requests(manifest), storage_root, model=model, max_concurrent=max_concurrent,
                        name=f"spinbench-u{user_seed}", http_port=http_port)
    rows = []
    for run, row in zip(runs, summary):
        rows.append({"name": run.name, "config": run.config, "alpha": run.alpha, "seed": run.seed,
                     **_request_result(storage_root, run.request_id(user_base(user_seed)), row)})
    results = {"user_seed": user_seed, "model": model, "test_images": test_per_state * len(STATES),
               "synthesis": synthesis, "training": vars(training), "personalization": personalization,
               "seconds": round(time.time() - started, 1), "requests": rows, "configurations": summarize(rows)}
    if baselines:
        seeds = len({r.seed for r in runs})
        results["baselines"] = baseline_results(user_seed, seeds, references_per_state, test_per_state,
                                                baseline_images, training)
    with open(os.path.join(out_dir, "results.json"), "w") as handle:
        json.dump(results, handle, indent=1)
    with open(os.path.join(out_dir, "results.md"), "w") as handle:
        handle.write(results_markdown(results))
    plot(results, os.path.join(out_dir, "accuracy.png"))
    return results
