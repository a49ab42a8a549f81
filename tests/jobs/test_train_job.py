"""jobs/train_pep.py end to end: data -> Ray Train -> COCO AP -> MLflow, read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import mlflow
import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))

import train_pep  # noqa: E402

EPOCHS = 3  # one more than Ray Train keeps checkpoints (and their reports) of


def _sets(overrides: list[str]) -> list[str]:
    """--set arguments: the shared tiny budget, 3 epochs, validation every second epoch."""
    extra = [f"train.epochs={EPOCHS}", "eval.every_epochs=2"]
    return [item for o in overrides + extra for item in ("--set", o)]


@pytest.fixture(scope="module")
def job_console(tiny_coco, tiny_overrides, user_shell_env, tmp_path_factory):
    """One real run of the job, as a user starts it, with `--verbose`: a fresh process on the
    tiny generated COCO folder (prepared on the fly) that starts its own local Ray. That Ray
    declares a GPU this machine lacks (`RAY_OVERRIDE_RESOURCES`, as a GPU cluster looks from
    its CPU head), and the job runs with `--use-gpu false`: every stage must then run on the
    CPU, validation beside training included (it took the cluster's GPU for its own and
    failed, silently, before). Returns the work folder, the tracking URI and the console."""
    work = tmp_path_factory.mktemp("job")
    uri = f"sqlite:///{work / 'mlflow.db'}"
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_pep.py"), "--data", str(tiny_coco),
         "--work-dir", str(work), "--tracking-uri", uri, "--name", "job", "--use-gpu", "false",
         "--verbose"] + _sets(tiny_overrides),
        cwd=work, env={**user_shell_env, "RAY_OVERRIDE_RESOURCES": '{"GPU": 1}'},
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return work, uri, done.stdout + done.stderr


@pytest.fixture(scope="module")
def finished_job(job_console):
    work, uri, _ = job_console
    client = mlflow.MlflowClient(uri)
    (run,) = client.search_runs(
        [client.get_experiment_by_name("pep").experiment_id], "tags.ray_run_name = 'job'"
    )
    return work, uri, client, run


def test_run_records_config_metrics_tags_and_artifacts(finished_job):
    work, uri, client, run = finished_job
    assert run.data.params["model.backbone"] == "resnet18"
    assert run.data.params["train.epochs"] == str(EPOCHS)
    assert run.data.tags["git_commit"]
    assert len(run.data.tags["data_fingerprint"]) == 64
    # per-epoch training metrics, logged by the rank-0 worker
    for key in ("loss_perceive", "loss_excavate", "loss_mined_cls", "loss_graph", "loss_mask"):
        assert [m.step for m in client.get_metric_history(run.info.run_id, key)] == [0, 1, 2]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "images_per_s")] == [0, 1, 2]
    # validation beside training (Ray Train ValidationConfig): every 2nd epoch and the last;
    # the last once, from the final evaluation of the same checkpoint (same numbers, no task)
    val = client.get_metric_history(run.info.run_id, "val/segm/AP")
    assert sorted(m.step for m in val) == [1, 2]
    assert "validation_missing" not in run.data.tags and "val/failed" not in run.data.metrics
    (last,) = [m for m in val if m.step == EPOCHS - 1]
    assert last.value == run.data.metrics["segm/AP"]
    for key in ("bbox/AP", "segm/AP50"):
        assert run.data.metrics[f"val/{key}"] == run.data.metrics[key]
    assert run.data.metrics["val/epoch"] == EPOCHS - 1
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "results.json", "ap_table.md", "plots", "overlays"} <= artifacts
    plots = {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert plots == {
        "plots/losses.png",
        "plots/val_ap.png",
        "plots/curves.json",
        "plots/segm_pr_curve.png",
    }
    overlays = sorted(a.path for a in client.list_artifacts(run.info.run_id, "overlays"))
    assert len(overlays) == 8 and {Path(p).suffix for p in overlays} == {".json", ".png"}
    # each drawing's full prediction set beside it; the drawing keeps the best-F1 threshold
    record = json.loads(
        Path(client.download_artifacts(run.info.run_id, overlays[0], str(work))).read_text()
    )
    if "segm/F1_threshold" in run.data.metrics:  # a 3-epoch tiny model may detect nothing
        assert record["from"] == "best F1 on val"
        assert record["display_threshold"] == run.data.metrics["segm/F1_threshold"]
    else:
        assert (record["from"], record["display_threshold"]) == ("model.score_threshold", 0.05)
    for prediction in record["predictions"]:
        assert prediction["score"] >= 0.05 and prediction["image_id"] == int(
            Path(overlays[0]).stem.split("_")[1]
        )
    # the AP table in MLflow is the one in results.json
    results = json.loads(
        Path(client.download_artifacts(run.info.run_id, "results.json", str(work))).read_text()
    )
    for key in ("segm/AP", "segm/AP50", "bbox/AP", "segm/APs"):
        assert run.data.metrics[key] == pytest.approx(results["metrics"][key])
        assert 0.0 <= results["metrics"][key] <= 1.0 or results["metrics"][key] == -1
    # recall by visibility: the generated val objects' visible_fraction reaches MLflow
    assert run.data.metrics["segm/n_vis_hi"] > 0 and "segm/duplicates_thr0.3" in run.data.metrics
    for key in ("segm/R50", "segm/R50_vis_hi", "segm/R50_vis_mid", "segm/R50_vis_lo"):
        assert run.data.metrics[key] == pytest.approx(results["metrics"][key])
    assert "val/segm/R50_vis_hi" in run.data.metrics  # validation beside training too


def test_validation_asks_for_a_gpu_of_its_own_and_a_failure_is_said_out_loud(
    gpu_head_ray, finished_job, tiny_coco, tiny_config, caplog
):
    """A validation task of a GPU run asks Ray for a GPU; here Ray assigns it the declared one
    and torch finds no CUDA, a real failure. It must reach the log, the MLflow run (metric and
    tag with the reason), the driver's progress lines and the summary's unvalidated epochs."""
    import ray

    from pipeline import experiment, progress

    work, uri, client, finished = finished_job
    cfg = tiny_config()
    splits = experiment.resolve_data(str(tiny_coco), cfg, work)  # the job's shards, reused
    run_id = client.create_run(finished.info.experiment_id).info.run_id
    validation = experiment.validation_config(cfg, splits, True, (run_id, uri))
    assert validation.ray_remote_kwargs["num_gpus"] == 1
    assert (
        experiment.validation_config(cfg, splits, False, (run_id, uri)).ray_remote_kwargs[
            "num_gpus"
        ]
        == 0
    )
    checkpoint = ray.train.Checkpoint.from_directory(
        str(work / "runs" / "job" / "checkpoint_epoch_0002")
    )
    task = ray.remote(validation.fn).options(**validation.ray_remote_kwargs)
    with pytest.raises(ray.exceptions.RayTaskError, match="torch sees no CUDA device"):
        ray.get(task.remote(checkpoint, **validation.task_config.fn_kwargs))

    run = client.get_run(run_id)
    assert [(m.step, m.value) for m in client.get_metric_history(run_id, "val/failed")] == [(2, 1)]
    assert "torch sees no CUDA device" in run.data.tags["validation_failed.epoch_3"]
    with caplog.at_level("WARNING", logger="pipeline.progress"):
        progress.EpochReporter(client, run_id, EPOCHS).poll()
    assert "validation after epoch 3/3 FAILED: DeviceError" in caplog.text
    assert experiment.unvalidated_epochs(client, run_id, [1, 2]) == [2, 3]
    assert client.get_run(run_id).data.tags["validation_missing"] == "2,3"


def test_each_task_takes_the_device_it_holds_not_the_clusters(gpu_head_ray):
    from pipeline import devices

    ray = gpu_head_ray
    assert devices.resolve_use_gpu("auto") is True  # the cluster has a GPU: stages ask for it

    @ray.remote
    def decide(use_gpu):
        try:
            return ray.get_gpu_ids(), str(devices.local_device(use_gpu, "evaluation"))
        except devices.DeviceError as e:
            return ray.get_gpu_ids(), str(e)

    # a CPU task on a GPU cluster: the CPU, whatever the cluster's totals say
    assert ray.get(decide.options(num_cpus=0.5).remote("auto")) == ([], "cpu")
    no_gpu = ray.get(decide.options(num_cpus=0.5).remote("true"))[1]
    assert no_gpu == "evaluation: use_gpu is true but this Ray task was given no GPU " + (
        "(it must ask for num_gpus)"
    )
    # a GPU task: Ray assigns the declared GPU; torch has no CUDA here, so `auto` falls back to
    # the CPU and `true` says why (on a GPU node both take cuda)
    ids, text = ray.get(decide.options(num_cpus=0.5, num_gpus=1).remote("true"))
    assert ids == [0] and "Ray assigned GPU [0] but torch sees no CUDA device" in text
    assert ray.get(decide.options(num_cpus=0.5, num_gpus=1).remote("auto")) == ([0], "cpu")
    assert str(devices.local_device("auto")) == "cpu"  # the driver: its own (absent) GPU


def test_existing_name_without_resume_is_refused(finished_job, tiny_coco, tiny_overrides, capsys):
    work, uri, _, _ = finished_job
    args = train_pep.get_args_parser().parse_args(
        ["--data", str(tiny_coco), "--work-dir", str(work), "--tracking-uri", uri, "--name", "job"]
        + _sets(tiny_overrides)
    )
    assert train_pep.main(args) == 2
    assert "already exists" in capsys.readouterr().err


def test_logged_model_loads_in_a_fresh_process_and_predicts(
    finished_job, tiny_coco, load_pyfunc_fresh
):
    work, uri, client, run = finished_job
    image = sorted((tiny_coco / "val" / "images").glob("*.jpg"))[0]
    # no unpickling (models from code), weights read with weights_only=True
    params = {"score_threshold": 0.0, "max_instances": 5}
    done, report = load_pyfunc_fresh(uri, run.data.tags["model_uri"], image, params, cwd=work)
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["signature"] and report["run_id"] == run.info.run_id
    assert report["columns"][:4] == ["image_index", "label", "category", "score"]
    # a 3-epoch tiny model's masks are still below mask_threshold, so there may be no rows;
    # rows for a real image: tests/pipeline/test_tracking.py
    assert len(report["rows"]) <= 5
    assert {(row["height"], row["width"]) for row in report["rows"]} <= {(96, 96)}


def test_plots_cover_every_epoch_of_the_run(finished_job):
    """The curves come from the run's MLflow history, not from Ray Train's result (which
    holds only the reports of the 2 checkpoints it keeps)."""
    work, uri, client, run = finished_job
    curves = json.loads(
        Path(client.download_artifacts(run.info.run_id, "plots/curves.json", str(work))).read_text()
    )
    assert set(curves["losses"]) >= {"loss", "loss_perceive", "loss_mask", "loss_graph"}
    history = client.get_metric_history(run.info.run_id, "loss_mask")
    for points in curves["losses"].values():
        assert [epoch for epoch, _ in points] == [1, 2, 3]
    assert curves["losses"]["loss_mask"] == [[m.step + 1, m.value] for m in history]
    assert [epoch for epoch, _ in curves["val"]["val/segm/AP"]] == [2, 3]
    assert curves["val"]["val/segm/AP"][-1][1] == pytest.approx(
        client.get_metric_history(run.info.run_id, "val/segm/AP")[-1].value
    )
    for name in ("losses.png", "val_ap.png"):
        with Image.open(
            client.download_artifacts(run.info.run_id, f"plots/{name}", str(work))
        ) as im:
            assert im.size == (600, 400)


def test_overlays_show_ground_truth_beside_the_prediction_upscaled(finished_job):
    work, uri, client, run = finished_job
    first = next(
        a.path for a in client.list_artifacts(run.info.run_id, "overlays") if a.path.endswith("png")
    )
    with Image.open(client.download_artifacts(run.info.run_id, first, str(work))) as im:
        overlay = np.asarray(im.convert("RGB"), dtype=int)
    # two 96 px images drawn 4x (384 px) side by side under a 16 px title strip
    assert overlay.shape == (16 + 384, 384 + 6 + 384, 3)
    truth, prediction = overlay[16:, :384], overlay[16:, 390:]
    assert np.abs(truth - prediction).max() > 30  # different drawings of the same image


# Lines Ray and its libraries print in a local run unless --verbose: Ray's start-up notices, Ray
# Train's per-report dumps and checkpoint notices, the error line Ray logs when it creates
# Ray Train's preemption watcher.
RAY_OWN_LINES = (
    "Token authentication is",  # enabled (a token exists) or disabled (none)
    "Started a local Ray instance",
    "PreemptionWatcher",
    "TrainingReport(",
    "Checkpoint successfully created",
    "Progress bars disabled",  # Ray Data's notice, in the driver and the SplitCoordinator
)
# Lines no run prints any more: our own use of Ray Data's "overwrite" write mode, Ray Train's
# default ingest options (which pass the deprecated exclude_resources).
FIXED_LINES = ("SaveMode", "exclude_resources")


@pytest.fixture(scope="module")
def console(tiny_coco, tiny_overrides, user_shell_env, tmp_path_factory):
    """Factory: the console (stdout + stderr) of `python jobs/train_pep.py` in a fresh process
    with its own local Ray: one epoch on the tiny COCO folder, from a folder of its own."""

    def run(*flags: str) -> str:
        work = tmp_path_factory.mktemp("console")
        sets = [item for o in tiny_overrides + ["train.epochs=1"] for item in ("--set", o)]
        done = subprocess.run(
            [sys.executable, str(ROOT / "jobs" / "train_pep.py"), "--data", str(tiny_coco)]
            + sets + list(flags),
            cwd=work, env=user_shell_env, capture_output=True, text=True, timeout=600,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        return done.stdout + done.stderr

    return run


@pytest.mark.slow
def test_console_shows_our_lines_not_rays_by_default(console):
    text = console()
    assert "epoch 1/1  loss" in text and "MLflow run:" in text
    for line in RAY_OWN_LINES + FIXED_LINES:
        assert line not in text, f"{line!r} printed without --verbose:\n{text[-3000:]}"


@pytest.mark.slow
def test_verbose_keeps_rays_own_lines(job_console):
    _, _, text = job_console
    assert f"epoch {EPOCHS}/{EPOCHS}  loss" in text
    assert " CPUs, 1 GPUs on 1 node(s)" in text  # its local Ray declares a GPU it lacks
    for line in (
        "Token authentication is",
        "Started a local Ray instance",
        "TrainingReport(",
    ):
        assert line in text, f"{line!r} missing with --verbose"
    for line in FIXED_LINES:
        assert line not in text
