"""One console line per training epoch, read from the run's MLflow history on the driver.

The rank-0 worker logs each epoch's metrics to MLflow and the validation task logs
`val/...` at its epoch (pipeline.train, pipeline.experiment), so the driver, which only waits
in `trainer.fit()`, learns of every epoch from there, wherever the workers run:

    epoch 2/10  loss 7.95 (excavate 1.15, graph 0.50, mask 1.40, mined_cls 1.79,
        perceive 3.27)  2.1 img/s  val segm AP 0.012 @1  ETA 4m10s      (one line)
    epoch 3/10 running: 30s in, run ETA 3m40s

plus a line when a validation result arrives after the last epoch line, and a line every
`heartbeat_s` inside an epoch that takes longer than that.
"""

from __future__ import annotations

import logging
import threading
import time

import mlflow

from pipeline import tracking

logger = logging.getLogger(__name__)

VAL_AP = "val/segm/AP"
VAL_FAILED = "val/failed"  # 1 at each epoch whose validation task failed


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


def epoch_line(
    epoch: int, epochs: int, metrics: dict[str, float], val: tuple[int, float] | None, eta: float
) -> str:
    """`epoch i/N  loss ... (terms)  img/s  val segm AP @epoch  ETA` (epochs counted from 1)."""
    terms = ", ".join(
        f"{key[len('loss_') :]} {value:.2f}"
        for key, value in sorted(metrics.items())
        if key.startswith("loss_")
    )
    parts = [f"epoch {epoch}/{epochs}", f"loss {metrics.get('loss', float('nan')):.2f} ({terms})"]
    if "images_per_s" in metrics:
        parts.append(f"{metrics['images_per_s']:.1f} img/s")
    if metrics.get("skipped_steps"):
        parts.append(f"{metrics['skipped_steps']:.0f} steps skipped (non-finite loss)")
    if val is not None:
        parts.append(f"val segm AP {val[1]:.3f} @{val[0]}")
    parts.append(f"ETA {_duration(eta)}" if epoch < epochs else "done")
    return "  ".join(parts)


class EpochReporter:
    """Logs a line per epoch of an MLflow run while training runs (a daemon thread).

    Args:
        client: MLflow client of the run's tracking store.
        run_id: the run the workers log to.
        epochs: the run's configured epochs (N in `epoch i/N`).
        poll_s: how often the history is read.
        heartbeat_s: a `running` line when an epoch has lasted this long without a report.
    """

    def __init__(
        self,
        client: mlflow.MlflowClient,
        run_id: str,
        epochs: int,
        poll_s: float = 5.0,
        heartbeat_s: float = 30.0,
    ):
        self.client, self.run_id, self.epochs = client, run_id, epochs
        self.poll_s, self.heartbeat_s = poll_s, heartbeat_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="epoch-reporter", daemon=True)
        self._done = self._first_done = 0  # epochs reported (earlier attempts included)
        self._val_step = -1  # last validation shown
        self._failed_shown: set[int] = set()  # epochs whose failed validation was shown
        self._started = self._epoch_started = self._last_line = 0.0

    def __enter__(self) -> EpochReporter:
        self._done = self._first_done = len(self._history("loss"))  # a resumed run's epochs
        self._started = self._epoch_started = self._last_line = time.monotonic()
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()  # the last epoch and validation, logged just before fit() returned

    def _report_failed_validations(self) -> None:
        """A warning per validation that failed (`val/failed` at its epoch), with its reason."""
        failed = [step for step, _ in self._history(VAL_FAILED) if step not in self._failed_shown]
        if not failed:
            return
        tags = self.client.get_run(self.run_id).data.tags
        for step in failed:
            self._failed_shown.add(step)
            reason = tags.get(f"validation_failed.epoch_{step + 1}", "reason not recorded")
            logger.warning("validation after epoch %d/%d FAILED: %s", step + 1, self.epochs, reason)

    def _history(self, key: str) -> list[tuple[int, float]]:
        return tracking.metric_histories(self.client, self.run_id, [key])[key]

    def _loop(self) -> None:
        while not self._stop.wait(self.poll_s):
            try:
                self.poll()
            except Exception as e:  # noqa: BLE001 - the console must not stop training
                logger.debug("progress poll failed: %s", e)

    def _eta(self, now: float) -> float:
        """Remaining epochs times the mean time of the epochs this process saw end, less the
        time the current epoch has run (never below the epochs after it)."""
        done_here = self._done - self._first_done
        if done_here <= 0:
            return float("nan")
        per_epoch = (self._epoch_started - self._started) / done_here
        left = self.epochs - self._done
        return max(left * per_epoch - (now - self._epoch_started), (left - 1) * per_epoch)

    def poll(self) -> None:
        """Log the epochs and validation results that appeared since the last poll."""
        now = time.monotonic()
        losses = self._history("loss")
        vals = self._history(VAL_AP)
        new = [step for step, _ in losses if step >= self._done]
        if new:
            keys = [
                k for k in self.client.get_run(self.run_id).data.metrics if k.startswith("loss")
            ]
            histories = tracking.metric_histories(
                self.client, self.run_id, keys + ["images_per_s", "skipped_steps"]
            )
            by_step = {key: dict(points) for key, points in histories.items()}
            self._epoch_started = self._last_line = now  # the next epoch starts (ETA's base)
            for step in new:
                metrics = {key: points[step] for key, points in by_step.items() if step in points}
                self._done = step + 1
                val = next(((s + 1, v) for s, v in reversed(vals) if s <= step), None)
                if val is not None:
                    self._val_step = max(self._val_step, val[0] - 1)
                logger.info(epoch_line(step + 1, self.epochs, metrics, val, self._eta(now)))
        for step, value in vals:
            if step > self._val_step:
                self._val_step = step
                logger.info(
                    "validation after epoch %d/%d: segm AP %.3f", step + 1, self.epochs, value
                )
        self._report_failed_validations()
        if now - self._last_line >= self.heartbeat_s and self._done < self.epochs:
            eta = self._eta(now)
            logger.info(
                "epoch %d/%d running: %s in%s",
                self._done + 1,
                self.epochs,
                _duration(now - self._epoch_started),
                "" if eta != eta else f", run ETA {_duration(eta)}",  # nan: no epoch done yet
            )
            self._last_line = now
