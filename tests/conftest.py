"""Shared fixtures: one local Ray instance for the test session, tiny generated datasets.

A test that needs another Ray (tests/pipeline/test_multinode.py builds a multi-node cluster)
may shut the local instance down; `ray_session` and `tiny_shards` start it again on demand.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).resolve().parents[1]


# Logical CPUs of the tests' Ray: twice the 2 cores of the project's machines. A tiny run
# spends most of its time starting processes (each new Ray Train / Ray Data process imports
# torch: seconds), not computing, so the sweep's and the ablation's runs go two at a time
# (one run holds 2 logical CPUs: worker, decoding, validation). Measured on the ablation
# fixture alone (4 variants, 1 epoch each): 354 s with 4, 398 s with 2
# (`PEP_TEST_RAY_CPUS=2 pytest tests/jobs/test_ablation_pep.py -k four_variants`).
TEST_RAY_CPUS = int(os.environ.get("PEP_TEST_RAY_CPUS", "4"))

# Ray Train's controller polls its workers every 2 s (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S), and
# a run's start, reports and end each wait for a poll. The tests' runs are seconds long, so
# they poll every 0.5 s: measured on test_train's two runs, 66 -> 59 s. Set before any Ray
# starts, so every Ray process, `ray start` and job subprocess of the session inherits it.
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")


def ensure_local_ray():
    """Start the tests' local Ray instance (no dashboard) unless Ray is initialised."""
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local", num_cpus=TEST_RAY_CPUS, include_dashboard=False, log_to_driver=False
        )
    return ray


@pytest.fixture(scope="session")
def local_ray(s3_server):
    """`ensure_local_ray` for fixtures of any scope; shuts Ray down at the end of the session.
    Its processes see the S3 stand-in (`s3_server` sets the env first), as a cluster's nodes
    see their storage."""
    yield ensure_local_ray
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def ray_session(local_ray):
    """The local Ray instance: started once, restarted if a test shut it down."""
    return local_ray()


@pytest.fixture(scope="module")
def gpu_head_ray(local_ray):
    """A local Ray that declares one GPU this machine lacks: a GPU cluster as its CPU head
    sees it. The scheduler places GPU work as on such a cluster, and CUDA stays absent, so a
    task that wrongly takes the cluster's GPUs for its own fails as it would on the head.
    The session's plain local Ray is back for the next module."""
    import ray

    ray.shutdown()
    ray.init(
        address="local",
        num_cpus=TEST_RAY_CPUS,
        num_gpus=1,
        include_dashboard=False,
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()
    local_ray()


# ----------------------------------------------------------------------------- cluster stand-ins

S3_BUCKET = "pep-test"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def s3_server():
    """An S3-compatible server on loopback (moto's, a real HTTP server speaking the S3
    protocol) with the bucket `S3_BUCKET`, named the way AWS tools read it: the returned
    `env` (AWS_ENDPOINT_URL, MLFLOW_S3_ENDPOINT_URL, test credentials) is also set in this
    process for the session, so pyarrow, boto3 and MLflow here find it; give it to
    subprocesses. A Ray started before this fixture does not have it in its workers.
    `keys(prefix)` lists the bucket's object keys."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=_free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    env = {
        "AWS_ENDPOINT_URL": endpoint,
        "MLFLOW_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    client = boto3.client("s3", endpoint_url=endpoint)
    client.create_bucket(Bucket=S3_BUCKET)

    def keys(prefix: str) -> list[str]:
        """The object keys under `prefix` in the bucket."""
        pages = client.get_paginator("list_objects_v2").paginate(Bucket=S3_BUCKET, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    try:
        yield SimpleNamespace(
            endpoint=endpoint, bucket=S3_BUCKET, env=env, client=client, keys=keys
        )
    finally:
        server.stop()
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@pytest.fixture(scope="session")
def mlflow_server(s3_server, tmp_path_factory):
    """A real `mlflow server` process, as cluster.yaml runs it on the head: a SQLite backend
    store, artifacts proxied to the S3 stand-in (`s3://S3_BUCKET/mlflow-artifacts`). Returns
    its tracking URI; clients need no S3 access of their own."""
    import time
    import urllib.request

    root = tmp_path_factory.mktemp("mlflow_server")
    port = _free_port()
    log = open(root / "server.log", "w")  # noqa: SIM115 - closed at teardown
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server", "--host", "127.0.0.1",
         "--port", str(port), "--workers", "1",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", f"s3://{S3_BUCKET}/mlflow-artifacts"],
        # no job runner: its ~8 huey consumer processes (MLflow's GenAI jobs, unused here)
        # cost ~20 s of CPU at start and poll for the whole session
        env={**os.environ, **s3_server.env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
        stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    uri = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as response:
                if response.status == 200:
                    break
        except OSError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
        time.sleep(0.5)
    try:
        yield uri
    finally:
        process.terminate()
        process.wait(timeout=30)
        log.close()


TINY_OVERRIDES = [
    # A very small PEP and budget for tests that train through Ray Train.
    "model.fpn_channels=32",
    "model.head_channels=32",
    "model.tower_convs=1",
    "model.descriptor_dim=32",
    "model.mask_channels=32",
    # tiny.yaml's masks at stride 2 quadruple the mask pixels (the suite took 1,026 s with
    # them against 937 s at the CI before); the tests keep stride 4 and tiny.yaml's 24-cell
    # mask windows (which cover a 96-px image's whole map)
    "model.mask_upsample=1",
    "data.train_size=[96]",
    "data.max_size=96",
    "train.batch_size=2",
    "train.cpus_per_worker=1",  # the tests' Ray is shared by several runs
    "train.warmup_iters=5",
    "train.epochs=2",
    "train.milestones=[100]",
    "eval.batch_size=4",
]


@pytest.fixture(scope="session")
def user_shell_env() -> dict[str, str]:
    """This process's environment as a user's shell has it, for jobs run as subprocesses: no
    RAY_ADDRESS, and no RAY_AUTH_MODE (a ray.init earlier in the test process sets it, which
    silences Ray's token notice in the child)."""
    return {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "RAY_AUTH_MODE")}


@pytest.fixture(scope="session")
def tiny_overrides() -> list[str]:
    """TINY_OVERRIDES as a fixture, for tests that pass them to a job's --set."""
    return list(TINY_OVERRIDES)


@pytest.fixture(scope="session")
def tiny_config():
    """Factory: configs/tiny.yaml with TINY_OVERRIDES plus the given `key=value` overrides."""
    from pep_model import load_config

    def make(*overrides: str):
        return load_config(ROOT / "configs" / "tiny.yaml", TINY_OVERRIDES + list(overrides))

    return make


@pytest.fixture(scope="session")
def tiny_coco(tmp_path_factory):
    """A generated crowded-scenes COCO folder: 12 train + 4 val images of 96 px."""
    from pipeline.synth import make_dataset

    root = tmp_path_factory.mktemp("tiny_coco")
    make_dataset(root, images=16, size=96, seed=3, val_fraction=0.25)
    return root


@pytest.fixture(scope="session")
def tiny_shards(local_ray, tiny_coco, tmp_path_factory):
    """`tiny_coco` prepared into train/ and val/ shards (a `--data` shards root)."""
    from pipeline.prepare import PrepareConfig, prepare

    local_ray()
    root = tmp_path_factory.mktemp("tiny_shards")
    for split in ("train", "val"):
        prepare(
            tiny_coco / split / "annotations.json",
            tiny_coco / split / "images",
            root / split,
            PrepareConfig(max_size=96),
        )
    return root


@pytest.fixture(scope="session")
def s3_shards(s3_server, local_ray, tiny_coco):
    """`tiny_coco` shards on the S3 stand-in, written by jobs/prepare_coco.py as a user runs
    it (`--out s3://...`): the URI of a `--data` shards root with train/ and val/, and what
    each split's run of the job returned."""
    from jobs.prepare_coco import get_args_parser, main

    local_ray()
    root = f"s3://{s3_server.bucket}/shards/tiny"
    results = {}
    for split in ("train", "val"):
        argv = ["--annotations", str(tiny_coco / split / "annotations.json")]
        argv += ["--images", str(tiny_coco / split / "images"), "--out", f"{root}/{split}"]
        results[split] = main(get_args_parser().parse_args(argv + ["--max-size", "96"]))
    return SimpleNamespace(root=root, results=results)


# Loads an MLflow pyfunc model in a fresh Python and predicts one image; prints the rows as
# JSON. argv: tracking URI, model URI, image file, params JSON, "refuse-pickle" or "allow".
# With "refuse-pickle", any unpickling raises; torch.load must always be weights_only.
_LOAD_PYFUNC = """
import json, pickle, sys
import cloudpickle, mlflow, pandas as pd, torch

tracking_uri, model_uri, image, params, mode = sys.argv[1:]
if mode == "refuse-pickle":
    def refuse(*args, **kwargs):
        raise RuntimeError("unpickling refused by the test")
    cloudpickle.load = cloudpickle.loads = pickle.load = pickle.loads = refuse
real_load = torch.load
def checked_load(*args, **kwargs):
    assert kwargs.get("weights_only") is True, kwargs
    return real_load(*args, **kwargs)
torch.load = checked_load

mlflow.set_tracking_uri(tracking_uri)
model = mlflow.pyfunc.load_model(model_uri)
with open(image, "rb") as f:
    out = model.predict(pd.DataFrame({"image": [f.read()]}), params=json.loads(params))
print(json.dumps({
    "columns": list(out.columns),
    "rows": out.to_dict(orient="records"),
    "run_id": model.metadata.run_id,
    "signature": model.metadata.signature is not None,
    "code": sys.modules["pipeline.tracking"].__file__,
}))
"""


@pytest.fixture(scope="session")
def load_pyfunc_fresh():
    """Factory: load an MLflow model in a fresh process and predict one image.

    Returns the subprocess result and, when it succeeded, its JSON report (columns, rows,
    run_id, signature, code: the file the model's `pipeline.tracking` was imported from).
    """

    def run(tracking_uri, model_uri, image, params=None, refuse_pickle=True, env=None, cwd=None):
        mode = "refuse-pickle" if refuse_pickle else "allow"
        argv = [tracking_uri, model_uri, str(image), json.dumps(params or {}), mode]
        done = subprocess.run(
            [sys.executable, "-c", _LOAD_PYFUNC, *argv],
            capture_output=True, text=True, timeout=300, env=env, cwd=cwd,
        )  # fmt: skip
        report = json.loads(done.stdout.strip().splitlines()[-1]) if done.returncode == 0 else None
        return done, report

    return run
