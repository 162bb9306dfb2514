"""`spinml sweep` on the cluster: the request's variants as one batch job, then the sweep's results."""

from __future__ import annotations

from spinml_ray import sweep
from spinml_ray.ray_layer.batch import list_requests, run_batch
from spinml_ray.spec import load_request


def run_sweep(request_uri: str, storage_root: str, configs: tuple[str, ...], alphas: tuple[float, ...], seeds: int,
              model: str = "tiny", target_accuracy: float | None = None, within: float = 0.95,
              references_from: str | None = None, max_concurrent: int | None = None, http_port: int = 8000,
              progress=None) -> tuple[dict, str]:
    """Run every variant of the request (on the connected cluster) and write the sweep's results;
    returns (results, their folder). SIM is measured when `references_from` (the user's copy of the
    request's folder) is given and the model source has an image encoder."""
    from spinml_ray import report
    from spinml_ray.encoders import load_encoder

    spec = load_request(request_uri)
    sweep.require_test_set(spec, request_uri)
    runs = sweep.variants(configs, alphas, seeds)
    manifest = sweep.write_variants(request_uri, spec, runs)
    summary = run_batch(list_requests(manifest), storage_root, model=model, max_concurrent=max_concurrent,
                        name=f"sweep-{spec.request_id}", http_port=http_port, progress=progress)
    references = encoder = mi_cross = None
    if references_from:
        references, _ = report.load_references(load_request(request_uri, base_uri=references_from))
        encoder = load_encoder(model)
        mi_cross = sweep.cross_object_mi(spec, configs, references)
    rows = [sweep.variant_result(storage_root, spec, run, row, encoder, references, model, mi_cross)
            for run, row in zip(runs, summary)]
    results = sweep.results_of(spec, rows, seeds, target_accuracy, within)
    return results, sweep.write(results, storage_root)
