"""jobs/sweep_pep.py end to end: a real Ray Tune sweep (2 trials), read back from MLflow."""

from __future__ import annotations

import argparse
import copy
import json
import sys
from pathlib import Path

import mlflow
import pytest

from pep_model import load_config

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))

import sweep_pep  # noqa: E402

RANGES = {"alpha": (0.5, 2.0), "beta": (0.25, 4.0), "gamma": (0.3, 3.0), "delta": (0.5, 1.5)}
THRESHOLDS = [0.05, 0.2, 0.4]


def _args(
    tiny_shards, tiny_overrides: list[str], work: Path, uri: str, storage: str
) -> argparse.Namespace:
    """The job's arguments: the shared tiny budget with one epoch and three thresholds."""
    overrides = tiny_overrides + ["train.epochs=1", f"eval.score_thresholds={THRESHOLDS}"]
    return sweep_pep.get_args_parser().parse_args(
        ["--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(tiny_shards)]
        + ["--work-dir", str(work), "--tracking-uri", uri, "--name", "sw"]
        + ["--storage-path", storage]
        + ["--num-samples", "2", "--no-model", "--no-early-stop"]
        + [item for k, (lo, hi) in RANGES.items() for item in ("--range", f"{k}={lo}:{hi}")]
        + [item for o in overrides for item in ("--set", o)]
    )


@pytest.fixture(scope="module")
def finished_sweep(ray_session, s3_server, tiny_shards, tiny_overrides, tmp_path_factory):
    """One real sweep: 2 trials of one epoch on the tiny shards, every trial run to the end;
    Tune's experiment and the trials' runs on the S3 stand-in (as on a cluster)."""
    work = tmp_path_factory.mktemp("sweep")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    args = _args(tiny_shards, tiny_overrides, work, uri, f"s3://{s3_server.bucket}/sweeps")
    assert sweep_pep.main(args) == 0
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("pep").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.sweep_role = 'parent'")
    children = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    return work, uri, client, parent, children, args


def test_each_trial_is_a_child_run_with_searched_params_and_ap(finished_sweep):
    _, _, client, parent, children, _ = finished_sweep
    assert len(children) == 2
    assert len({c.data.tags["tune_trial_id"] for c in children}) == 2
    for child in children:
        assert child.info.status == "FINISHED"
        for name, (low, high) in RANGES.items():
            value = float(child.data.params[f"model.{name}"])
            assert low <= value <= high, (name, value)
            assert float(child.data.tags[f"search.{name}"]) == pytest.approx(value, rel=1e-5)
        metrics = child.data.metrics
        assert 0.0 <= metrics["segm/AP"] <= 1.0
        per_threshold = {t: metrics[f"segm/AP_thr_{t:g}".replace(".", "_")] for t in THRESHOLDS}
        assert metrics["best_segm_AP"] == pytest.approx(max(per_threshold.values()))
        assert metrics["best_threshold"] in THRESHOLDS
        assert per_threshold[metrics["best_threshold"]] == pytest.approx(metrics["best_segm_AP"])
        # per-epoch training metrics reached the child run
        assert [m.step for m in client.get_metric_history(child.info.run_id, "loss_mask")] == [0]
    # the parent records the search space and the best trial
    assert parent.data.params["sweep.range.alpha"] == "loguniform(0.5, 2)"
    assert parent.data.metrics["trials_completed"] == 2


def _by_ap(children):
    """Best first, with the sweep's tie rule (equal AP: lower Tune trial id first)."""
    return sorted(
        children, key=lambda c: (-c.data.metrics["best_segm_AP"], c.data.tags["tune_trial_id"])
    )


def test_best_config_loads_and_carries_the_best_trial(finished_sweep):
    work, _, client, parent, children, _ = finished_sweep
    best = _by_ap(children)[0]
    path = work / "sweeps" / "sw" / "best_config.yaml"
    cfg = load_config(path)  # what `jobs/train_pep.py --config` does with it
    for name in RANGES:
        assert getattr(cfg.model, name) == pytest.approx(float(best.data.params[f"model.{name}"]))
    assert cfg.model.score_threshold == pytest.approx(best.data.metrics["best_threshold"])
    assert cfg.train.epochs == 1 and cfg.data.max_size == 96  # the sweep's base config
    assert parent.data.metrics["best_segm_AP"] == pytest.approx(best.data.metrics["best_segm_AP"])
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"best_config.yaml", "leaderboard.md", "base_config.yaml"} <= artifacts
    logged = Path(client.download_artifacts(parent.info.run_id, "best_config.yaml", str(work)))
    assert load_config(logged) == cfg


def test_leaderboard_lists_every_trial_best_first(finished_sweep):
    work, _, client, parent, children, _ = finished_sweep
    text = Path(
        client.download_artifacts(parent.info.run_id, "leaderboard.md", str(work / "dl"))
    ).read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ") and "rank" not in line]
    assert len(rows) == 2
    by_ap = _by_ap(children)
    for rank, (row, child) in enumerate(zip(rows, by_ap), 1):
        cells = [c.strip() for c in row.strip("|").split("|")]
        assert cells[0] == str(rank)
        assert cells[1] == child.data.tags["tune_trial_id"]
        assert float(cells[7]) == pytest.approx(100 * child.data.metrics["best_segm_AP"], abs=0.06)


def test_existing_sweep_without_resume_is_refused(finished_sweep, capsys):
    *_, args = finished_sweep
    assert sweep_pep.main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_resume_of_a_finished_sweep_runs_no_trial_again(finished_sweep, s3_server):
    work, uri, client, parent, children, args = finished_sweep
    args = copy.copy(args)
    args.resume = True
    assert sweep_pep.main(args) == 0
    again = client.search_runs(
        [parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert {r.info.run_id for r in again} == {c.info.run_id for c in children}
    # the trials' Ray Train runs and their checkpoints, in the bucket
    keys = s3_server.keys("sweeps/sw/train_runs/")
    train_runs = {key.split("/")[3] for key in keys} - {""}  # "": the folder's own marker
    assert len(train_runs) == 2
    for run in train_runs:
        key = f"sweeps/sw/train_runs/{run}/checkpoint_epoch_0000/checkpoint.pt"
        assert key in keys, key


def test_a_quiet_sweep_shows_no_tune_status_tables_and_quiets_its_trials(tiny_config, tmp_path):
    """Quiet: Tune's status tables off (TrialProgress prints a line per ended trial); the spec
    that tells the trials is saved for --resume, and specs saved before it had `quiet` load."""
    from pipeline import sweep

    spec = sweep.SweepSpec(
        name="q", base_config=sweep.config_to_dict(tiny_config()), data_root=str(tmp_path),
        work_dir=str(tmp_path), storage_path=str(tmp_path), tracking_uri="sqlite:///x.db",
        experiment_name="pep", parent_run_id="", ranges={"alpha": (0.5, 2.0)}, quiet=True,
    )  # fmt: skip
    run_config = sweep._make_tuner(spec, restore=False)._local_tuner.get_run_config()
    assert run_config.verbose == 0
    assert any(isinstance(c, sweep.TrialProgress) for c in run_config.callbacks)
    spec.quiet = False
    assert sweep._make_tuner(spec, restore=False)._local_tuner.get_run_config().verbose != 0
    sweep.write_spec(spec)
    assert sweep.read_spec(spec.experiment_path) == spec
    saved = Path(spec.experiment_path) / sweep.SPEC_FILE
    older = {k: v for k, v in json.loads(saved.read_text()).items() if k != "quiet"}
    saved.write_text(json.dumps(older))
    assert sweep.read_spec(spec.experiment_path).quiet is False
