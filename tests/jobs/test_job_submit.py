"""The cluster path, on stand-ins of the cluster's parts: `ray start --head` (token auth)
declaring a GPU this machine lacks (a GPU cluster as its CPU head sees it), an S3 server on
loopback for the shards (`prepare_coco.py --out s3://...`, the `s3_shards` fixture) and for
`--storage-path s3://...`, and a real `mlflow server` process with its artifacts on that S3;
`ray job submit` of jobs/train_pep.py, then of jobs/promote_pep.py."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import mlflow
import psutil
import pytest

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).parent / "ray")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["RAY_AUTH_MODE"] = "token"
    # `python` in the job entrypoint must be this interpreter (the one with the project).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.pop("RAY_ADDRESS", None)
    return env


def _stop_head(temp_dir: str) -> None:
    """Stop only this head's processes (`ray stop` would stop every Ray on the machine)."""
    procs = [
        p for p in psutil.process_iter(["cmdline"]) if temp_dir in " ".join(p.info["cmdline"] or [])
    ]
    for proc in procs:
        for child in proc.children(recursive=True):
            child.send_signal(signal.SIGTERM)
        proc.send_signal(signal.SIGTERM)
    _, alive = psutil.wait_procs(procs, timeout=3)  # then killed: the head is thrown away
    for proc in alive:
        proc.kill()


@pytest.fixture(scope="module")
def ray_head(s3_server):
    """A real Ray head started like on a cluster, with token authentication, one logical GPU,
    and the S3 endpoint in its environment (as an instance profile gives a cluster's nodes)."""
    env = {**_env(), **s3_server.env}
    subprocess.run([RAY, "get-auth-token", "--generate"], env=env, check=True, capture_output=True)
    temp_dir = tempfile.mkdtemp(prefix="rayhead", dir="/tmp")  # short: socket path limits
    # Explicit free ports: other Ray instances on this machine (the test session's own local
    # one included) already hold the defaults, e.g. the dashboard agent's 52365.
    port, dashboard, agent = _free_port(), _free_port(), _free_port()
    started = subprocess.run(
        [
            RAY, "start", "--head", f"--port={port}", f"--dashboard-port={dashboard}",
            "--dashboard-host=127.0.0.1", f"--dashboard-agent-listen-port={agent}",
            "--num-cpus=2", "--num-gpus=1", f"--temp-dir={temp_dir}",
            "--disable-usage-stats",
        ],
        env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert started.returncode == 0, started.stderr[-3000:]
    try:
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        _stop_head(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)


def _run_job(address: str, env: dict[str, str], job_id: str, entrypoint: list[str]):
    """`ray job submit` the entrypoint with the project as working dir, and wait for its end
    as a user does: the command tails the job's logs and ends with the job's final status
    (one process; polling `ray job status` started a Ray CLI every few seconds beside the
    job on the 2 cores).

    Returns (the command's output, which holds the job's logs; the final status text).
    """
    command = [RAY, "job", "submit", "--address", address, "--working-dir", str(ROOT),
               "--submission-id", job_id, "--"] + entrypoint  # fmt: skip
    for _ in range(20):  # a just-started head may not have its job agent up yet
        submit = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
        if "No available agent" not in submit.stdout + submit.stderr:
            break
        time.sleep(3)
    output = submit.stdout + submit.stderr
    # its last line: "Job '<id>' succeeded" (or failed / stopped), coloured, after a log prefix
    final = re.findall(rf"Job '{re.escape(job_id)}' (?:succeeded|failed|stopped)", output)
    assert final, f"no final status line (exit {submit.returncode}):\n{output[-3000:]}"
    return output, final[-1].lower()


def test_job_submit_trains_on_s3_logs_to_the_server_then_promotes(
    ray_head, s3_server, s3_shards, mlflow_server, tiny_overrides, tmp_path
):
    address, env = ray_head
    uri = mlflow_server
    job_id = f"pep-test-{int(time.time())}"
    storage = f"s3://{s3_server.bucket}/runs"
    entrypoint = [
        "python", "jobs/train_pep.py", "--config", "configs/tiny.yaml",
        "--data", s3_shards.root, "--work-dir", str(tmp_path / "work"),
        "--tracking-uri", uri, "--experiment", "pep-cluster", "--name", "submitted",
        "--storage-path", storage, "--use-gpu", "false",
    ] + [
        item for s in tiny_overrides + ["train.epochs=1"] for item in ("--set", s)
    ]  # fmt: skip
    logs, status = _run_job(address, env, job_id, entrypoint)
    # The upload must stay small: data, shards, stores and the virtualenv are excluded.
    upload = [line for line in logs.splitlines() if "Uploading" in line]
    assert "' succeeded" in status, status + logs[-4000:]
    assert "MLflow run:" in logs and "| segm |" in logs
    for line in upload:
        if "MiB" in line:  # e.g. "Uploading package ... (1.23MiB) to Ray cluster"
            size = float(line.split("(")[-1].split("MiB")[0])
            assert size < 20, line

    # The checkpoint in the bucket, and the final evaluation read it from there (it looked
    # for `pep-test/runs/...` on the local disk before, and the job failed).
    assert f"checkpoint:  {storage}/submitted/checkpoint_epoch_0000" in logs
    assert "runs/submitted/checkpoint_epoch_0000/checkpoint.pt" in s3_server.keys("runs/")

    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("pep-cluster").experiment_id],
        "tags.ray_run_name = 'submitted'",
    )
    assert run.info.status == "FINISHED"
    assert "segm/AP" in run.data.metrics and run.data.params["train.epochs"] == "1"
    # trained on the shards in the bucket, scored against the ground truth stored beside them
    assert run.data.tags["data_source"] == s3_shards.root
    assert run.data.tags["data_fingerprint"] == s3_shards.results["val"].manifest["source"][
        "fingerprint"
    ]
    assert not (tmp_path / "work" / "shards").exists()  # nothing was prepared on the head
    assert client.get_metric_history(run.info.run_id, "loss_mask")
    # (validation beside training on a Ray with a GPU it lacks: tests/jobs/test_train_job.py)
    # the server stored the run's artifacts and its model in the bucket
    artifacts = s3_server.keys("mlflow-artifacts/")
    assert any(key.endswith("/results.json") for key in artifacts)
    assert any(key.endswith("/MLmodel") for key in artifacts)

    # The registry step of the cluster workflow: the best run of the experiment -> @champion.
    logs, status = _run_job(
        address,
        env,
        f"{job_id}-promote",
        ["python", "jobs/promote_pep.py", "--tracking-uri", uri, "--experiment", "pep-cluster"],
    )
    assert "' succeeded" in status, status + logs[-4000:]
    assert "FIRST_CHAMPION" in logs
    champion = client.get_model_version_by_alias("pep", "champion")
    assert champion.run_id == run.info.run_id
    assert champion.tags["promotion.decision"] == "first_champion"
    assert champion.tags["data_fingerprint"] == run.data.tags["data_fingerprint"]
