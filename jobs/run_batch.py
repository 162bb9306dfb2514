"""Entry point for `ray job submit`: many SpinML requests in one job, sharing one synthesis service.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run_batch.py s3://bucket/manifests/today.yaml --storage s3://bucket/spinml

Arguments are those of `spinml batch`. Re-running the same job finishes what is missing and repeats
nothing; the exit status is non-zero when any request failed (each one's error is in its status).
"""

import sys

from spinml_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["batch", *sys.argv[1:]]))
