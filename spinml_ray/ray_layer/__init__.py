"""The Ray layer: the only package that imports Ray, kept thin.

Each module wires plain functions from the rest of `spinml_ray` into Ray: `sanitize.py` (Ray Data),
`personalize.py` and `train.py` (Ray Train), `synthesize.py` and `service.py` (Ray Serve), `fleet.py`
(long-lived Ray Train slots), `pipeline.py` (the table of stages, one request), `batch.py` (many
requests), `cluster.py` (connecting, node pinning, lost nodes), `metrics.py` (`ray.util.metrics`) and
`progress.py` (the display, with a relay actor for counts made in workers). `tests/test_layout.py`
checks that nothing outside it imports Ray.
"""
