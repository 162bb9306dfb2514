"""Shared fixtures. Everything stays offline and on loopback."""

import os
import socket

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # as on a real cluster; the token stays on this machine

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_REQUEST = os.path.join(REPO, "examples", "request.yaml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """A fresh model cache per test session (the tiny preset is built once into it)."""
    path = str(tmp_path_factory.mktemp("spinml-cache"))
    os.environ["SPINML_CACHE"] = path
    return path


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1, reachable by Ray workers and pyarrow; yields (endpoint, bucket)."""
    import boto3
    from moto.server import ThreadedMotoServer

    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_REGION="us-east-1",
    )
    bucket = "spinml-test"
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1").create_bucket(Bucket=bucket)
    yield endpoint, bucket
    server.stop()
