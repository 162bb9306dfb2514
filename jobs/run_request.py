"""Entry point for `ray job submit`: run one SpinML request on the cluster the job runs in.

    ray job submit --address http://127.0.0.1:8265 --working-dir . -- \
        python jobs/run_request.py examples/request.yaml --storage s3://bucket/spinml --model tiny

Arguments are those of `spinml run`.
"""

import sys

from spinml_ray.cli import main

if __name__ == "__main__":
    sys.exit(main(["run", *sys.argv[1:]]))
