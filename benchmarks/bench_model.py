"""Model speed: PEP vs torchvision Mask R-CNN on the same ResNet-50-FPN (random init), CPU.

    python benchmarks/bench_model.py [--iters 3] [--threads 2] [--size 512] [--batch 2]
        [--profile] [--variants pep baseline lean lean128]

PEP rows: the paper's widths (256) with and without excavating/purifying, and the lean speed
setting (perceiving on P3..P6 instead of P2..P6, the mask feature B at stride 8), also with
128-wide perceiving towers. Every row has the default dynamic mask head except
"lean128-linear" (`model.mask_head=linear`, the earlier reading of Eq. 6), which prices it.

One batch of `--batch` random `--size` x `--size` images with 8 random rectangles each
(80 classes). Measured, median over `--iters` after one warm-up:

- train step: forward + backward + SGD step, model.train();
- inference: model.eval() forward under no_grad;
- PEP heads' overhead: PEP forward+backward vs the bare ResNet-50-FPN forward+backward
  (its outputs summed as the loss) -- everything PEP adds on top of the shared features.

Both models use the torchvision ResNet-50 with BatchNorm, all layers trainable (what
`maskrcnn_resnet50_fpn(weights=None, weights_backbone=None)` builds), and the same input
size (Mask R-CNN's transform is set to min_size = max_size = `--size`, no upscaling to 800).
Untrained models give arbitrary numbers of detections, so both are pinned to a realistic
inference workload: Mask R-CNN box_score_thresh=0 (100 detections, mask head on all of
them); PEP score_threshold=0, 100 original descriptors (pre_topk) and, with excavating, one
mined descriptor per original (excavate_threshold=0, excavate_topk=1), i.e. 200 masks.
`--profile` prints torch.profiler tables of one PEP train step and one inference.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from torchvision.models.detection import maskrcnn_resnet50_fpn  # noqa: E402
from torchvision.ops import masks_to_boxes  # noqa: E402

from pep_model import ModelConfig, build_model  # noqa: E402

NUM_CLASSES = 80


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=3, help="timed iterations per measurement")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--size", type=int, default=512, help="square image side")
    parser.add_argument("--batch", type=int, default=2, help="images per batch")
    parser.add_argument("--objects", type=int, default=8, help="rectangles per image")
    parser.add_argument("--profile", action="store_true", help="profile PEP train/inference")
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        choices=list(VARIANTS),
        help="PEP settings to time beside Mask R-CNN",
    )
    return parser


def make_batch(batch: int, size: int | tuple[int, int], objects: int, seed: int = 0):
    """Random images (0..1) and rectangle targets in the PEP/torchvision target format.

    `size` is a square side or (height, width); rectangle sides scale with the shorter side.
    """
    height, width = (size, size) if isinstance(size, int) else size
    short = min(height, width)
    g = torch.Generator().manual_seed(seed)
    images, targets = [], []
    for _ in range(batch):
        images.append(torch.rand(3, height, width, generator=g))
        masks = torch.zeros((objects, height, width), dtype=torch.uint8)
        for i in range(objects):
            w, h = torch.randint(short // 16, short // 3, (2,), generator=g).tolist()
            x, y = (
                torch.randint(0, width - w, (1,), generator=g).item(),
                torch.randint(0, height - h, (1,), generator=g).item(),
            )
            masks[i, y : y + h, x : x + w] = 1
        boxes = masks_to_boxes(masks)
        boxes[:, 2:] += 1
        labels = torch.randint(1, NUM_CLASSES + 1, (objects,), generator=g)
        targets.append({"labels": labels, "boxes": boxes, "masks": masks})
    return images, targets


# The lean speed setting: perceiving on P3..P6 (no stride-4 map) and B at stride 8.
LEAN = dict(
    perceive_levels=[3, 4, 5, 6],
    scale_ranges=[[0, 96], [48, 192], [96, 384], [192, 100000]],
    mask_stride=8,
)
# name -> ModelConfig overrides; the paper's widths (256) unless a row says otherwise
VARIANTS = {
    "pep": ("PEP (excavate+purify)", {}),
    "baseline": ("PEP Baseline (no E/P)", dict(excavate=False, purify=False)),
    "lean": ("PEP lean (P3-P6, B stride 8)", LEAN),
    "lean128": ("PEP lean, heads 128 wide", dict(LEAN, head_channels=128)),
    "lean128-linear": (
        "PEP lean, heads 128 wide, linear mask head",
        dict(LEAN, head_channels=128, mask_head="linear"),
    ),
}


def pep_model(**overrides):
    config = ModelConfig(
        num_classes=NUM_CLASSES,
        backbone="resnet50",
        norm="bn",
        trainable_layers=5,
        score_threshold=0.0,
        candidate_threshold=0.0,
        pre_topk=100,
        excavate_threshold=0.0,
        excavate_topk=1,
    )
    for key, value in overrides.items():
        setattr(config, key, value)
    return build_model(config)


def mask_rcnn(min_size: int, max_size: int | None = None):
    """Its transform resizes the shorter side to `min_size`, the longer to at most `max_size`
    (default `min_size`: a square image of that side is not resized)."""
    return maskrcnn_resnet50_fpn(
        weights=None,
        weights_backbone=None,
        num_classes=NUM_CLASSES + 1,
        min_size=min_size,
        max_size=max_size or min_size,
        box_score_thresh=0.0,
    )


def timed(fn, iters: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def train_step_fn(model, images, targets, amp: bool = False):
    """With `amp`, the step of `train.amp`: autocast forward (float16 on a GPU, bfloat16 on
    the CPU: torch's defaults) and a GradScaler backward, on the model's device."""
    optimizer = torch.optim.SGD(
        [p for p in model.parameters() if p.requires_grad], lr=1e-4, momentum=0.9
    )
    device = next(model.parameters()).device.type
    scaler = torch.amp.GradScaler(device, enabled=amp)

    def step():
        model.train()
        with torch.autocast(device, enabled=amp):
            losses = model(images, targets)
        optimizer.zero_grad()
        scaler.scale(sum(losses.values())).backward()
        scaler.step(optimizer)
        scaler.update()

    return step


def forward_backward_fn(model, images, targets):
    def step():
        model.train()
        model.zero_grad()
        sum(model(images, targets).values()).backward()

    return step


def inference_fn(model, images, amp: bool = False):
    device = next(model.parameters()).device.type

    def step():
        model.eval()
        with torch.no_grad(), torch.autocast(device, enabled=amp):
            model(images)

    return step


def backbone_fn(model, images):
    """Bare ResNet-50-FPN forward + backward on PEP's preprocessed batch."""
    batch, _ = model.preprocess(images)

    def step():
        model.train()
        model.zero_grad()
        sum(f.sum() for f in model.backbone(batch)).backward()

    return step


def profile(fn, title: str, rows: int = 18) -> None:
    from torch.profiler import profile as torch_profile

    fn()
    with torch_profile(record_shapes=True) as prof:
        fn()
    print(f"\n### profile: {title}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=rows))
    print(
        prof.key_averages(group_by_input_shape=True).table(
            sort_by="self_cpu_time_total", row_limit=10
        )
    )


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    images, targets = make_batch(args.batch, args.size, args.objects)
    print(
        f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
        f"{args.threads} threads, batch {args.batch} x {args.size}x{args.size}, "
        f"{args.objects} objects/image, median of {args.iters} after 1 warm-up"
    )

    rows = []
    mrcnn = mask_rcnn(args.size)
    t_mr_train = timed(train_step_fn(mrcnn, images, targets), args.iters)
    t_mr_inf = timed(inference_fn(mrcnn, images), args.iters)
    rows.append(("Mask R-CNN R50-FPN", t_mr_train, t_mr_inf, None))
    del mrcnn

    for key in args.variants:
        name, overrides = VARIANTS[key]
        model = pep_model(**overrides)
        t_train = timed(train_step_fn(model, images, targets), args.iters)
        t_inf = timed(inference_fn(model, images), args.iters)
        t_fb = timed(forward_backward_fn(model, images, targets), args.iters)
        t_bb = timed(backbone_fn(model, images), args.iters)
        rows.append((name, t_train, t_inf, (t_fb, t_bb)))
        if args.profile and key in ("pep", "lean128"):
            profile(forward_backward_fn(model, images, targets), "PEP forward+backward")
            profile(inference_fn(model, images), "PEP inference")
        del model

    print(
        "\n| model | train step (s) | vs Mask R-CNN | inference (s) | vs Mask R-CNN "
        "| fwd+bwd (s) | backbone+FPN fwd+bwd (s) | heads overhead |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name, t_train, t_inf, fb in rows:
        extra = (
            "| - | - | -"
            if fb is None
            else (f"| {fb[0]:.2f} | {fb[1]:.2f} | {100 * (fb[0] / fb[1] - 1):.0f}%")
        )
        print(
            f"| {name} | {t_train:.2f} | {t_train / t_mr_train:.2f}x | {t_inf:.2f} "
            f"| {t_inf / t_mr_inf:.2f}x {extra} |"
        )
    print("\ntargets: PEP train step <= 0.6x Mask R-CNN, inference <= 0.5x, heads overhead <= 40%")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
