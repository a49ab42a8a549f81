"""pipeline.progress: the driver's line per epoch, read from a real MLflow run's history."""

from __future__ import annotations

import logging

import mlflow

from pipeline.progress import EpochReporter


def test_one_line_per_epoch_with_losses_speed_val_ap_and_eta(tmp_path, caplog):
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("progress")).info.run_id
    client.log_metric(run_id, "loss", 9.0, step=0)  # an epoch of an earlier attempt (resume)
    with caplog.at_level(logging.INFO, logger="pipeline.progress"):
        with EpochReporter(client, run_id, epochs=4, poll_s=60):
            for step, (loss, mask) in enumerate([(8.0, 1.5), (7.0, 1.25), (6.0, 1.0)], start=1):
                client.log_metric(run_id, "loss", loss, step=step)
                client.log_metric(run_id, "loss_mask", mask, step=step)
                client.log_metric(run_id, "images_per_s", 2.5, step=step)
            client.log_metric(run_id, "val/segm/AP", 0.125, step=1)
            client.log_metric(run_id, "val/segm/AP", 0.25, step=3)
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.progress"]
    # the validation of epoch 2 had arrived when epoch 2's line was written
    assert lines[0].startswith("epoch 2/4  loss 8.00 (mask 1.50)  2.5 img/s  val segm AP 0.125 @2")
    assert " ETA " in lines[0] and " ETA " in lines[1]
    assert lines[1].startswith("epoch 3/4  loss 7.00 (mask 1.25)  2.5 img/s  val segm AP 0.125 @2")
    assert lines[2] == "epoch 4/4  loss 6.00 (mask 1.00)  2.5 img/s  val segm AP 0.250 @4  done"
    assert len(lines) == 3  # no separate validation line: each one showed in an epoch line


def test_a_sweep_prints_one_line_per_ended_trial_with_the_best_so_far(caplog):
    from types import SimpleNamespace

    from pipeline.sweep import OBJECTIVE, TrialProgress

    progress = TrialProgress(num_samples=3)
    with caplog.at_level(logging.INFO, logger="pipeline.sweep"):
        progress.on_trial_complete(0, [], SimpleNamespace(trial_id="a", last_result={
            OBJECTIVE: 0.25, "epochs_done": 4}))
        progress.on_trial_complete(1, [], SimpleNamespace(trial_id="b", last_result={
            "epochs_done": 2}))
        progress.on_trial_complete(2, [], SimpleNamespace(trial_id="c", last_result={
            OBJECTIVE: 0.5}))
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline.sweep"]
    assert lines == [
        f"trial a finished: {OBJECTIVE} 0.250 (1/3 ended); best so far: {OBJECTIVE} 0.250 (a)",
        f"trial b stopped early after 2 epochs (2/3 ended); best so far: {OBJECTIVE} 0.250 (a)",
        f"trial c finished: {OBJECTIVE} 0.500 (3/3 ended); best so far: {OBJECTIVE} 0.500 (c)",
    ]


def test_eta_inside_an_epoch_counts_down_from_the_epochs_seen(tmp_path):
    # 10 epochs; the first ended 100 s after the start. The ETA inside epoch 2 is the 9 epochs
    # left at 100 s each less the time epoch 2 has run, not (time so far) x 9: 870 s, not
    # 1170 s, 30 s into epoch 2. An epoch that overruns leaves at least the epochs after it.
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    run_id = client.create_run(client.create_experiment("progress")).info.run_id
    reporter = EpochReporter(client, run_id, epochs=10)
    reporter._started, reporter._done, reporter._epoch_started = 0.0, 1, 100.0
    assert reporter._eta(100.0) == 900.0  # at the end of epoch 1 (its line)
    assert reporter._eta(130.0) == 870.0
    assert reporter._eta(400.0) == 800.0  # epoch 2 overran: the 8 after it
