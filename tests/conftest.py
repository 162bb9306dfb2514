"""Shared fixtures. Everything stays offline and on loopback."""

import os
import secrets
import socket
import tempfile

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "token")  # as on a real cluster; the token stays on this machine
# An empty torch hub cache (before any Ray starts, so workers inherit it): `training.pretrained: auto`
# finds no ImageNet weights here whatever this machine has cached, so trainings start from random weights.
os.environ["TORCH_HOME"] = tempfile.mkdtemp(prefix="spinml-torch-home-")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_REQUEST = os.path.join(REPO, "examples", "request.yaml")
CANARY_TOKEN = "canary-" + secrets.token_hex(16)  # an API token no log, job table or error may ever show


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


@pytest.fixture(scope="session")
def lora_adapter(tmp_path_factory, model_cache):
    """A LoRA adapter for the tiny model (random, non-zero), saved as diffusers' save_lora_weights does."""
    import torch
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from spinml_ray.models.source import resolve

    unet = StableDiffusionPipeline.from_pretrained(resolve("tiny")).unet
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, param in unet.named_parameters():
            if "lora_B" in name:  # peft starts B at zero (a no-op adapter); make this one act
                param.normal_(std=0.5)
    out = str(tmp_path_factory.mktemp("adapter"))
    state = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(out, unet_lora_layers=state, safe_serialization=True)
    return out


@pytest.fixture(scope="session")
def ray_cluster(s3_server):
    """One local Ray for the test session (started on first use); the S3 settings are set before it starts, so workers inherit them."""
    import ray
    from ray import serve

    from spinml_ray.ray_layer.cluster import connect

    # Set on this "node" before Ray starts, as a platform sets it on `ray start`: workers inherit it.
    os.environ["SPINML_API_TOKENS"] = f"demo-token:demo,other-token:other,{CANARY_TOKEN}:canary"

    connect(num_cpus=4)
    yield ray
    serve.shutdown()
    ray.shutdown()


@pytest.fixture(scope="session")
def http_port():
    return free_port()


@pytest.fixture(scope="session")
def synthesis_storage(tmp_path_factory):
    return str(tmp_path_factory.mktemp("api-storage"))


@pytest.fixture(scope="session")
def synthesis(ray_cluster, http_port, synthesis_storage):
    """The synthesis app, deployed once and shared by the tests (as a platform would run it)."""
    from spinml_ray.ray_layer.service import ensure_running

    handle, _ = ensure_running("tiny", http_port=http_port, storage_root=synthesis_storage)
    return handle
