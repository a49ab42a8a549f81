"""jobs/evaluate_pep.py: the CLI wiring (shards in, AP table and JSON files out)."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

import pep_model
from pipeline.inference import InferenceError

JOB = Path(__file__).resolve().parents[2] / "jobs" / "evaluate_pep.py"


def _job():
    spec = importlib.util.spec_from_file_location("evaluate_pep", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_evaluates_shards_and_writes_results(tiny_config, tiny_shards, tmp_path, capsys):
    job = _job()
    cfg = tiny_config()
    checkpoint = tmp_path / "pep.pt"
    pep_model.save_checkpoint(checkpoint, pep_model.build_model(cfg.model), cfg)
    args = job.get_args_parser().parse_args(
        [
            "--checkpoint", str(checkpoint),
            "--data", str(tiny_shards / "val"),
            "--max-dets", "150",
            "--score-thresholds", "0", "0.01",
            "--use-gpu", "false",
            "--num-cpus-per-replica", "0.5",
            "--out", str(tmp_path / "results.json"),
            "--metrics-out", str(tmp_path / "metrics.json"),
        ]
    )  # fmt: skip
    metrics, per_threshold = job.main(args)
    out = capsys.readouterr().out
    assert "| segm @150 |" in out and "| score >= |" in out
    assert isinstance(json.loads((tmp_path / "results.json").read_text()), list)
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["segm/AP@150"] == metrics["segm/AP@150"]
    assert list(saved["per_threshold"]) == ["0.0", "0.01"] and list(per_threshold) == [0.0, 0.01]
    assert saved["params"]["segm"]["maxDets"] == [1, 10, 100, 150]


def test_unknown_mlflow_model_and_json_without_images_are_refused(tmp_path):
    job = _job()
    store = f"sqlite:///{tmp_path / 'empty.db'}"
    mlflow.MlflowClient(store).search_experiments()  # creates an empty store
    with pytest.raises(InferenceError, match="models:/pep@champion: cannot download"):
        job.resolve_checkpoint("models:/pep@champion", tracking_uri=store)
    (tmp_path / "a.json").write_text("{}")
    args = job.get_args_parser().parse_args(
        ["--checkpoint", "x.pt", "--data", str(tmp_path / "a.json")]
    )
    with pytest.raises(InferenceError, match="needs --images"):
        job.resolve_shards(args, tmp_path / "x.pt")


def test_console_is_the_tables_without_rays_start_up_lines_for_a_checkpoint_on_s3(
    tiny_config, tiny_shards, user_shell_env, s3_server, tmp_path
):
    """In a fresh process (its own local Ray): the AP table, not Ray's notices, for a Ray
    Train checkpoint directory on S3 (the endpoint from AWS_ENDPOINT_URL, as users name it;
    the job exited 2 with `checkpoint not found` before)."""
    cfg = tiny_config()
    checkpoint = tmp_path / "pep.pt"
    pep_model.save_checkpoint(checkpoint, pep_model.build_model(cfg.model), cfg)
    key = "eval/run/checkpoint_epoch_0000/checkpoint.pt"
    s3_server.client.upload_file(str(checkpoint), s3_server.bucket, key)
    done = subprocess.run(
        [sys.executable, str(JOB), "--checkpoint",
         f"s3://{s3_server.bucket}/eval/run/checkpoint_epoch_0000", "--data",
         str(tiny_shards / "val"), "--use-gpu", "false", "--num-cpus-per-replica", "0.5"],
        cwd=tmp_path, env={**user_shell_env, **s3_server.env}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "| segm |" in done.stdout
    for line in ("Token authentication is", "Started a local Ray instance"):
        assert line not in done.stdout + done.stderr
