"""jobs/ablation_pep.py: the Table 2 matrix through Ray and MLflow, and its table."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import mlflow
import pytest
import ray
import ray.train

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))

import ablation_pep  # noqa: E402

from pipeline import ablation  # noqa: E402

EXPECTED_SWITCHES = {
    "baseline": ("False", "False"),
    "excavating": ("True", "False"),
    "purifying": ("False", "True"),
    "pep": ("True", "True"),
}


def _outcome(variant: str, seed: int, ap: float, **kw) -> ablation.RunOutcome:
    metrics = {f"segm/{c}": ap for c in ablation.COLUMNS} | {"segm/APl": -1.0}
    return ablation.RunOutcome(variant, seed, f"t-{variant}-s{seed}", metrics=metrics, **kw)


def _row(table: str, label: str, part: int = 0) -> list[str]:
    """Cells of a variant's row in the AP table (part 0) or the recall table (part 1)."""
    tables = [t for t in table.split("\n\n") if t.startswith("|")]
    (line,) = [line for line in tables[part].splitlines() if line.startswith(f"| {label} ")]
    return [cell.strip() for cell in line.strip("|").split("|")]


def test_table_shows_mean_and_sample_std_over_seeds():
    outcomes = [
        _outcome("baseline", 1, 0.30, train_seconds=100, eval_seconds=2.0, eval_images=10),
        _outcome("baseline", 2, 0.40, train_seconds=120, eval_seconds=4.0, eval_images=10),
        _outcome("pep", 1, 0.50, train_seconds=200, eval_seconds=3.0, eval_images=10),
        _outcome("pep", 2, 0.50, train_seconds=200, eval_seconds=3.0, eval_images=10),
    ]
    table = ablation.format_table(outcomes)
    # mean 35.0, sample std of (30, 40) = 7.07; APl is -1 (no large objects) -> "-"
    assert _row(table, "Baseline") == [
        "Baseline", *(["35.0 ± 7.1"] * 5), "-", "110 ± 14", "300.0 ± 141.4",
    ]  # fmt: skip
    assert _row(table, "PEP")[1:3] == ["50.0 ± 0.0", "50.0 ± 0.0"]
    assert "+excavating" not in table  # variants without runs are left out
    assert "mean ± sample std" in table


def test_table_with_one_seed_shows_no_std():
    table = ablation.format_table([_outcome("pep", 7, 0.123, train_seconds=5)])
    assert _row(table, "PEP")[1:3] == ["12.3", "12.3"]
    assert "±" not in _row(table, "PEP")[-2]


def test_recall_table_shows_visibility_bins_duplicates_and_merges():
    def recall(lo, dup):
        counts = {"segm/n_vis_hi": 238.0, "segm/n_vis_mid": 53.0, "segm/n_vis_lo": 24.0}
        return {
            "segm/R50": 0.5, "segm/R50_vis_hi": 0.6, "segm/R50_vis_mid": 0.4,
            "segm/R50_vis_lo": lo, "segm/duplicates_per_img_thr0.3": dup,
            "segm/false_merges_per_img_thr0.3": 0.25, **counts,
        }  # fmt: skip

    outcomes = [
        _outcome("baseline", 1, 0.3, train_seconds=1),
        _outcome("baseline", 2, 0.4, train_seconds=1),
        _outcome("excavating", 1, 0.3, train_seconds=1),
        ablation.RunOutcome("pep", 1, "t-pep-s1", error="OSError: disk full"),
    ]
    outcomes[0].metrics |= recall(0.10, dup=1.0)
    outcomes[1].metrics |= recall(0.20, dup=2.0)
    outcomes[2].metrics |= recall(0.30, dup=0.5)
    table = ablation.format_table(outcomes)
    header = [line for line in table.splitlines() if "R50" in line and line.startswith("|")]
    assert header == [
        "|  | R50 | vis>0.9 (n=238) | vis 0.5-0.9 (n=53) | vis<0.5 (n=24) | duplicates/img "
        "| false merges/img |"
    ]
    assert _row(table, "Baseline", part=1) == [
        "Baseline", "50.0 ± 0.0", "60.0 ± 0.0", "40.0 ± 0.0", "15.0 ± 7.1", "1.50 ± 0.71",
        "0.25 ± 0.00",
    ]  # fmt: skip
    assert _row(table, "+excavating", part=1)[4] == "30.0"
    assert _row(table, "PEP", part=1)[1:] == ["failed"] * 6
    assert _row(table, "Baseline")[1] == "35.0 ± 7.1"  # the AP table is unchanged
    # data without visible_fraction (e.g. nuclei): bins show "-", headers carry no count
    plain = ablation.format_table([_outcome("baseline", 1, 0.3) for _ in range(1)])
    assert "| vis<0.5 |" in plain and _row(plain, "Baseline", part=1)[1:] == ["-"] * 6


def test_failed_runs_are_marked_with_their_reason():
    outcomes = [
        _outcome("baseline", 1, 0.3),
        _outcome("baseline", 2, 0.5),
        ablation.RunOutcome("baseline", 3, "t-baseline-s3", error="OSError: disk full"),
        ablation.RunOutcome("pep", 1, "t-pep-s1", error="FloatingPointError: non-finite loss"),
    ]
    table = ablation.format_table(outcomes)
    assert _row(table, "Baseline (2/3 seeds)")[1] == "40.0 ± 14.1"
    assert _row(table, "PEP")[1] == "failed: FloatingPointError: non-finite loss"
    assert "- t-baseline-s3 (seed 3): OSError: disk full" in table


def test_variant_configs_differ_only_in_switches_and_seed(tiny_config):
    base = tiny_config("train.lr=0.005")
    configs = {v.key: ablation.variant_config(base, v, seed=4) for v in ablation.VARIANTS}
    for key, cfg in configs.items():
        assert (str(cfg.model.excavate), str(cfg.model.purify)) == EXPECTED_SWITCHES[key]
        assert cfg.train.seed == 4 and cfg.train.lr == 0.005
        assert cfg.data == base.data and cfg.eval == base.eval
    assert base.model.excavate and base.model.purify  # the base config is not modified


def test_overriding_what_the_ablation_controls_is_refused(capsys):
    args = ablation_pep.get_args_parser().parse_args(["--set", "model.purify=false"])
    assert ablation_pep.main(args) == 2
    assert "model.purify is set by the ablation" in capsys.readouterr().err


def test_parallel_runs_follow_cluster_resources(tiny_config):
    cfg = tiny_config()  # one run: 1 worker + 0.5 CPU decoding + 0.5 CPU validation
    assert ablation.parallel_runs({"CPU": 2}, cfg, 1, use_gpu=False, validate=True) == 1
    assert ablation.parallel_runs({"CPU": 9}, cfg, 1, use_gpu=False, validate=True) == 4
    assert ablation.parallel_runs({"CPU": 64, "GPU": 8}, cfg, 4, use_gpu=True, validate=True) == 2
    assert ablation.parallel_runs({"CPU": 1}, cfg, 1, use_gpu=False, validate=True) == 1


def test_a_local_ray_is_sized_for_one_run_per_core(tiny_config):
    cfg = tiny_config()  # one run holds 2 logical CPUs
    assert ablation.local_ray_size(cfg, 1, True, None, num_runs=4, cores=2) == (2, 4)
    assert ablation.local_ray_size(cfg, 1, True, None, num_runs=4, cores=16) == (4, 16)
    assert ablation.local_ray_size(cfg, 1, True, 1, num_runs=4, cores=2) == (1, 2)
    assert ablation.local_ray_size(cfg, 4, True, None, num_runs=4, cores=2) == (1, 5)
    # a run whose worker takes both cores (train.cpus_per_worker=2) runs alone on 2 cores
    two = tiny_config("train.cpus_per_worker=2")  # one run holds 3 logical CPUs
    assert ablation.local_ray_size(two, 1, True, None, num_runs=4, cores=2) == (1, 3)
    assert ablation.local_ray_size(two, 1, True, None, num_runs=4, cores=8) == (4, 12)
    assert ablation.parallel_runs({"CPU": 6}, two, 1, use_gpu=False, validate=True) == 2


@ray.remote(num_cpus=0)
def _fake_run(config: dict, run_name: str, kwargs: dict) -> dict:
    if config["model"]["purify"] and not config["model"]["excavate"]:
        raise ValueError(f"{run_name}: purifying broke")
    return {
        "run_id": run_name,
        "metrics": {"segm/AP": 0.1 * config["train"]["seed"]},
        "train_seconds": 1.0,
        "eval_seconds": 1.0,
        "eval_images": 4,
    }


def test_a_failing_ray_task_is_reported_and_the_others_finish(ray_session, tiny_config):
    runs = [(v, s) for v in ablation.VARIANTS for s in (1, 2)]
    outcomes = ablation._run_all(runs, tiny_config(), "t", {}, max_parallel=3, task=_fake_run)
    failed = [(o.variant, o.seed) for o in outcomes if not o.ok]
    assert failed == [("purifying", 1), ("purifying", 2)]
    assert outcomes[-1].run_id == "t-pep-s2" and outcomes[-1].metrics["segm/AP"] == 0.2
    table = ablation.format_table(outcomes)
    assert _row(table, "+purifying")[1] == "failed: ValueError: t-purifying-s1: purifying broke"
    assert _row(table, "PEP")[1] == "15.0 ± 7.1"


@ray.remote(num_cpus=0)
def _flaky_run(config: dict, run_name: str, kwargs: dict) -> dict:
    """Stopped by Ray on the first attempt (as a lost placement group does), fine on resume."""
    if not kwargs.get("resume"):
        raise ray.train.ControllerError(RuntimeError("placement group was removed"))
    if config["model"]["excavate"]:
        raise ray.train.ControllerError(RuntimeError("placement group was removed again"))
    return {"run_id": run_name, "metrics": {}, "train_seconds": 1.0, "eval_seconds": 1.0,
            "eval_images": 1}  # fmt: skip


def test_a_run_stopped_by_ray_is_resumed_once(ray_session, tiny_config):
    runs = [(v, 1) for v in ablation.VARIANTS]
    outcomes = ablation._run_all(runs, tiny_config(), "t", {}, max_parallel=2, task=_flaky_run)
    by_key = {o.variant: o for o in outcomes}
    assert [by_key[k].attempts for k in ("baseline", "pep")] == [2, 2]
    assert by_key["baseline"].ok and by_key["purifying"].ok
    assert by_key["pep"].error == "ControllerError: placement group was removed again"
    assert not ablation.is_system_failure(ValueError("bad config"))


def test_a_quiet_ablations_runs_keep_only_the_libraries_warnings(tiny_config, monkeypatch):
    """A run's Ray task drives its own Ray Train and MLflow: it quiets them in its process
    (the driver's logger levels do not reach it) and passes `quiet` on."""
    import logging
    from types import SimpleNamespace

    from pipeline import cli, experiment

    seen = {}

    import ray.data

    def fake_train_and_evaluate(cfg, name, **kwargs):
        seen.update(kwargs, levels={n: logging.getLogger(n).level for n in cli.CHATTY_LOGGERS},
                    bars=ray.data.DataContext.get_current().enable_progress_bars)
        return SimpleNamespace(run_id="r", metrics={"segm/AP": 0.5}, train_seconds=1.0,
                               eval_seconds=1.0, eval_images=1)  # fmt: skip

    monkeypatch.setattr(experiment, "train_and_evaluate", fake_train_and_evaluate)
    monkeypatch.setenv("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "true")
    loggers = [logging.getLogger(name) for name in cli.CHATTY_LOGGERS]
    levels = [logger.level for logger in loggers]
    config = ablation.config_to_dict(tiny_config())
    context = ray.data.DataContext.get_current()
    bars = context.enable_progress_bars
    context.enable_progress_bars = True  # as in a fresh process
    try:
        for logger in loggers:
            logger.setLevel(logging.NOTSET)
        ablation._run_variant._function(config, "r", {"quiet": False})
        assert seen["quiet"] is False and set(seen["levels"].values()) == {logging.NOTSET}
        assert seen["bars"] is True
        ablation._run_variant._function(config, "r", {"quiet": True})
        assert seen["quiet"] is True and set(seen["levels"].values()) == {logging.WARNING}
        assert seen["bars"] is False  # the run's own datasets draw no progress bars
    finally:
        context.enable_progress_bars = bars
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def test_job_exits_non_zero_when_a_run_failed(monkeypatch, capsys):
    result = ablation.AblationResult(
        name="t",
        parent_run_id="p",
        tracking_uri="sqlite:///x.db",
        seeds=[1],
        max_parallel=1,
        outcomes=[
            _outcome("baseline", 1, 0.3),
            ablation.RunOutcome("pep", 1, "t-pep-s1", error="E"),
        ],
        wall_seconds=1.0,
    )
    monkeypatch.setattr(ablation, "run_ablation", lambda *a, **k: result)
    assert ablation_pep.main(ablation_pep.get_args_parser().parse_args([])) == 1
    out = capsys.readouterr()
    assert "| PEP | failed: E |" in out.out and "1 run(s) failed" in out.err


@pytest.fixture(scope="module")
def finished_ablation(ray_session, s3_server, tiny_shards, tiny_overrides, tmp_path_factory):
    """One real ablation: four variants x one seed, one epoch each, on the tiny shards, its
    runs' checkpoints on the S3 stand-in (`--storage-path s3://...`, as on a cluster)."""
    work = tmp_path_factory.mktemp("ablation")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    sets = tiny_overrides + ["train.epochs=1", "eval.every_epochs=1"]
    args = ablation_pep.get_args_parser().parse_args(
        ["--config", str(ROOT / "configs" / "tiny.yaml"), "--data", str(tiny_shards)]
        + ["--work-dir", str(work), "--tracking-uri", uri, "--name", "abl", "--seeds", "1"]
        + ["--overlays", "0", "--storage-path", f"s3://{s3_server.bucket}/ablation"]
        + [item for s in sets for item in ("--set", s)]
    )
    code = ablation_pep.main(args)
    return code, work, uri, args.storage_path


def test_ablation_trains_four_variants_as_nested_mlflow_runs(finished_ablation, s3_server):
    code, work, uri, storage = finished_ablation
    assert code == 0
    client = mlflow.MlflowClient(uri)
    experiment_id = client.get_experiment_by_name("pep-ablation").experiment_id
    (parent,) = client.search_runs([experiment_id], "tags.ablation = 'table2'")
    assert parent.info.status == "FINISHED" and parent.info.run_name == "abl"
    children = client.search_runs(
        [experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'"
    )
    assert len(children) == 4
    for child in children:
        variant = child.data.tags["variant"]
        assert child.data.tags["seed"] == "1" and child.data.params["train.seed"] == "1"
        switches = (child.data.params["model.excavate"], child.data.params["model.purify"])
        assert switches == EXPECTED_SWITCHES[variant]
        assert child.info.run_name == f"abl-{variant}-s1" and child.info.status == "FINISHED"
        assert 0.0 <= child.data.metrics["segm/AP"] <= 1.0
        # each run's checkpoint is in the bucket, and its final evaluation read it from there
        assert child.data.tags["storage_path"] == storage
        key = f"ablation/abl-{variant}-s1/checkpoint_epoch_0000/checkpoint.pt"
        assert key in s3_server.keys("ablation/"), key
    # one data set for all: every child points at the same shards
    assert {c.data.tags["data_fingerprint"] for c in children} == {
        parent.data.tags["data_fingerprint"]
    }
    table = Path(client.download_artifacts(parent.info.run_id, "ablation.md", str(work)))
    text = table.read_text()
    for label in ("Baseline", "+excavating", "+purifying", "PEP"):
        assert f"| {label} |" in text
    numbers = json.loads(
        Path(client.download_artifacts(parent.info.run_id, "ablation.json", str(work))).read_text()
    )
    by_key = {r["variant"]: r for r in numbers["runs"]}
    for child in children:
        run = by_key[child.data.tags["variant"]]
        assert run["run_id"] == child.info.run_id
        assert run["metrics"]["segm/AP"] == pytest.approx(child.data.metrics["segm/AP"])
        assert run["train_seconds"] > 0 and run["eval_ms_per_image"] > 0
    assert parent.data.metrics["pep/segm_AP"] == pytest.approx(by_key["pep"]["metrics"]["segm/AP"])
    assert parent.data.metrics["failed_runs"] == 0


def test_reusing_an_ablation_name_is_refused(finished_ablation, tiny_shards, capsys):
    _, work, uri, storage = finished_ablation
    args = ablation_pep.get_args_parser().parse_args(
        ["--data", str(tiny_shards), "--work-dir", str(work), "--tracking-uri", uri]
        + ["--name", "abl", "--seeds", "1", "--storage-path", storage]
    )
    assert ablation_pep.main(args) == 2
    assert "already exist" in capsys.readouterr().err
