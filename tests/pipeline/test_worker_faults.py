"""Faults of multi-worker training: a non-finite loss on one rank, BatchNorm over several
workers, resuming with AMP from a checkpoint saved without it.

The non-finite loss runs for real: 2 Ray Train workers on gloo, the tiny PEP under DDP, and
`pipeline.train.train_one_epoch` itself; only the loss of rank 1 is made NaN at chosen steps.
Before, rank 1 raised alone while rank 0 waited in DDP's all-reduce.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from pathlib import Path

import pytest
import ray.cloudpickle
import torch

from pep_model import ModelConfig, build_model
from pipeline.train import prepare_norm_layers, restore_scaler

STEPS = 6
# The workers cannot import this test module: its functions travel by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


def _tiny_model_config(norm: str = "frozen_bn") -> ModelConfig:
    return ModelConfig(
        num_classes=2, backbone="resnet18", norm=norm, fpn_channels=32, head_channels=32,
        tower_convs=1, descriptor_dim=32, mask_channels=32, excavate_channels=16,
        purify_embed_dim=16,
    )  # fmt: skip


def _batches(steps: int):
    """Two 64 px images with two rectangles each, per step (fixed, so every step trains)."""
    masks = torch.zeros((2, 64, 64), dtype=torch.uint8)
    masks[0, 8:30, 8:30] = 1
    masks[1, 30:60, 34:60] = 1
    target = {
        "labels": torch.tensor([1, 2]),
        "boxes": torch.tensor([[8.0, 8.0, 30.0, 30.0], [34.0, 30.0, 60.0, 60.0]]),
        "masks": masks,
    }
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        yield [torch.rand(3, 64, 64, generator=generator) for _ in range(2)], [target, target]


class NanOnRank(torch.nn.Module):
    """The model, with its loss made NaN on `rank` at the given steps (counted per call)."""

    def __init__(self, model: torch.nn.Module, rank: int, nan_steps: set[int]):
        super().__init__()
        self.model, self.nan_steps, self.step = model, nan_steps if rank == 1 else set(), 0

    def forward(self, images, targets):
        losses = self.model(images, targets)
        if self.step in self.nan_steps:
            losses["loss_mask"] = losses["loss_mask"] * float("nan")
        self.step += 1
        return losses


def _loop(config: dict) -> None:
    import ray.train
    import ray.train.torch

    from pep_model import load_config
    from pipeline.train import build_lr_scheduler, build_optimizer, train_one_epoch

    rank = ray.train.get_context().get_world_rank()
    cfg = load_config(None, [f"train.max_nonfinite_steps={config['max_in_a_row']}"])
    torch.manual_seed(0)
    model = NanOnRank(build_model(_tiny_model_config()), rank, set(config["nan_steps"]))
    model = ray.train.torch.prepare_model(
        model, parallel_strategy_kwargs={"find_unused_parameters": True}
    )
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, STEPS)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    out = Path(config["out"]) / f"rank{rank}.json"
    seen = {}
    try:
        for epoch in range(2):
            seen[epoch] = train_one_epoch(
                model, optimizer, scheduler, _batches(STEPS), torch.device("cpu"), cfg, scaler
            )
    except FloatingPointError as e:
        seen["error"] = f"{type(e).__name__}: {e}"
        raise
    finally:
        out.write_text(json.dumps(seen))


def _train_two_workers(tmp_path: Path, nan_steps: list[int], max_in_a_row: int) -> dict:
    """Run `_loop` on 2 gloo workers in a thread: {"ranks": rank -> what it saw, "error": fit's
    error}; a hang fails the test instead of the suite."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    trainer = TorchTrainer(
        _loop,
        train_loop_config={
            "nan_steps": nan_steps,
            "max_in_a_row": max_in_a_row,
            "out": str(tmp_path),
        },
        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
        run_config=RunConfig(
            storage_path=str(tmp_path / "runs"), failure_config=FailureConfig(max_failures=0)
        ),
    )
    outcome: dict = {}

    def fit():
        try:
            trainer.fit()
        except Exception as e:  # noqa: BLE001 - checked by the caller
            outcome["error"] = e

    thread = threading.Thread(target=fit)
    thread.start()
    thread.join(timeout=300)
    assert not thread.is_alive(), "2-worker training hung"
    outcome["ranks"] = {
        rank: json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)
    }
    return outcome


@pytest.mark.slow
def test_nan_on_one_rank_is_skipped_by_both_then_stops_both_after_n_in_a_row(ray_session, tmp_path):
    # epoch 1 (steps 0-5): steps 1 and 3 are NaN on rank 1 only; both ranks skip them.
    # epoch 2 (steps 6-11): steps 8 and 9 in a row, with max_nonfinite_steps=2: both stop.
    outcome = _train_two_workers(tmp_path, nan_steps=[1, 3, 8, 9], max_in_a_row=2)
    assert "NonFiniteLossError" in str(outcome.get("error")), outcome
    for rank in (0, 1):
        seen = outcome["ranks"][rank]
        first = seen["0"]
        assert (first["steps"], first["skipped_steps"]) == (STEPS - 2, 2), (rank, first)
        assert torch.isfinite(torch.tensor(first["loss"]))
        assert seen["error"].startswith("NonFiniteLossError: 2 steps in a row"), (rank, seen)


def test_an_empty_scaler_state_resumes_an_enabled_scaler():
    """A checkpoint saved without AMP (CPU) holds an empty GradScaler state; loading it into
    the enabled scaler of a GPU resume raised."""
    enabled = torch.amp.GradScaler("cpu", enabled=True)
    with pytest.raises(RuntimeError, match="empty"):
        enabled.load_state_dict(torch.amp.GradScaler("cpu", enabled=False).state_dict())
    restore_scaler(enabled, torch.amp.GradScaler("cpu", enabled=False).state_dict())
    assert enabled.get_scale() == 65536.0  # the defaults
    saved = torch.amp.GradScaler("cpu", init_scale=1024.0, enabled=True).state_dict()
    restore_scaler(enabled, saved)
    assert enabled.get_scale() == 1024.0


def test_batchnorm_over_several_gpu_workers_becomes_syncbatchnorm(tiny_config, caplog):
    def norms(model):
        return {type(m).__name__ for m in model.modules() if "BatchNorm" in type(m).__name__}

    cfg = tiny_config("model.norm=bn")
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert norms(prepare_norm_layers(build_model(cfg.model), cfg, 2, cuda)) == {"SyncBatchNorm"}
    assert norms(prepare_norm_layers(build_model(cfg.model), cfg, 1, cuda)) == {"BatchNorm2d"}
    # PyTorch's SyncBatchNorm runs on GPUs only: CPU workers keep BatchNorm, and say why
    with caplog.at_level(logging.WARNING, logger="pipeline.train"):
        assert norms(prepare_norm_layers(build_model(cfg.model), cfg, 2, cpu)) == {"BatchNorm2d"}
    assert "SyncBatchNorm needs GPUs" in caplog.text
    frozen = tiny_config("model.norm=frozen_bn")
    model = prepare_norm_layers(build_model(frozen.model), frozen, 2, cuda)
    assert "SyncBatchNorm" not in norms(model)
