"""Mixed precision as `train.amp` trains on a GPU: autocast forward, GradScaler backward.

On the CPU autocast takes bfloat16 and the scaler runs on the CPU; with PEP_TEST_DEVICE=cuda
it is float16 and CUDA's scaler, the pipeline's GPU training step (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import torch
from conftest import tiny_config

from pep_model import build_model


def amp_step(model, optimizer, scaler, images, targets, device):
    """One step of `pipeline.train.train_one_epoch` with amp on; returns the losses."""
    with torch.autocast(device.type):  # float16 on a GPU, bfloat16 on the CPU
        losses = model(images, targets)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(sum(losses.values())).backward()
    scaler.unscale_(optimizer)
    for params in model.clip_groups():
        torch.nn.utils.clip_grad_norm_(params, 10.0)
    scaler.step(optimizer)
    scaler.update()
    return losses


def test_mixed_precision_steps_give_finite_float32_losses_and_train_every_part(
    crowded_batch, model_device
):
    images, targets = crowded_batch
    torch.manual_seed(0)
    model = build_model(tiny_config()).train()  # excavating and purifying on
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler(model_device.type)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    for _ in range(3):  # until a step is taken: one whose gradients overflow is skipped
        scale = scaler.get_scale()
        losses = amp_step(model, optimizer, scaler, images, targets, model_device)
        assert set(losses) == {
            "loss_perceive",
            "loss_excavate",
            "loss_mined_cls",
            "loss_graph",
            "loss_mask",
        }
        for name, value in losses.items():
            assert value.dtype == torch.float32 and torch.isfinite(value), (name, value)
        if scaler.get_scale() == scale:  # no overflow: the optimizer stepped
            break
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.grad is not None}
    assert {"backbone", "perceiving", "mask_head", "excavating", "purifying"} <= trained
    moved = {
        name.split(".")[0]
        for name, p in model.named_parameters()
        if not torch.equal(p.detach(), before[name])
    }
    assert trained <= moved
