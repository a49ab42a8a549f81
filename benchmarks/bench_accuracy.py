"""Accuracy: PEP, its Table 2 ablation variants and torchvision Mask R-CNN, same budget, one run.

    python benchmarks/bench_accuracy.py [--data COCO_FOLDER] [--config configs/tiny.yaml]
        [--set key=value ...] [--models pep baseline excavate purify maskrcnn]
        [--seeds 1 2] [--epochs 12] [--max-dets 100] [--maskrcnn-width matched|torchvision]
        [--train-images N] [--threads 2] [--out results.json] [--save-dir DIR]
        [--budget-s SECONDS|maskrcnn] [--plot curves.png]
    python benchmarks/bench_accuracy.py --report results.json [more.json ...]  # tables, no training

Equal epochs (default): every model trains the config's epochs. Equal time (`--budget-s`):
every model trains the number of epochs whose time is nearest the budget (planned from the
first epoch's time), on the config's schedule shape (its lr milestones as fractions of its
epochs).
`--budget-s maskrcnn` trains Mask R-CNN first (per seed, the config's epochs) and gives its
training time to every other model. Each model is evaluated after every epoch (or every
`--eval-every` N and the last; evaluation time is not training time), so each run has an
AP-versus-training-time curve; `--plot`
draws every run's curve (default: beside `--out`, as .png).

`--report` with several `--out` files merges their runs into one table (e.g. a run that
crashed part-way, continued with `--models`/`--seeds` for the missing runs): the files must
agree on every setting except models and seeds, and a (model, seed) may appear only once.

Every model is trained in this process by the same loop (`pipeline.train.train_one_epoch`:
same optimizer and LR schedule from the config, same batches in the same shuffled order per
seed, same augmentation, same image sizes, same number of epochs and torch threads), then
evaluated by the same code (`pipeline.inference.predict_rows` -> COCO results at the
original image size -> COCOeval, segm and bbox). Nothing is pretrained (no weights here).

- PEP variants: `model.excavate` / `model.purify` switched as in the paper's Table 2.
- Mask R-CNN: torchvision's `MaskRCNN` on the same ResNet depth as the config's backbone
  (BatchNorm, all layers trainable, as `maskrcnn_resnet50_fpn(weights=None,
  weights_backbone=None)` builds it), torchvision's own losses and default heads (FPN 256
  wide). Two settings are adapted to the data like PEP's: the transform does not resize
  (both models see exactly the same pixels) and anchor sizes are scaled with the config's
  object-scale ranges (COCO-size anchors 32..512 x scale_ranges[0][1] / 96: 16..256 for the
  tiny config's 256-px images). Its detection cap follows `--max-dets`, like PEP's.
  `--maskrcnn-width matched` (the default) builds the FPN and every head as wide as the
  config's `model.fpn_channels` (tiny: 64; box MLP 4x that, as torchvision's 1024 is for 256),
  so both models spend comparable compute on the same backbone; `--maskrcnn-width torchvision`
  keeps torchvision's 256-wide FPN and heads (measured on the generated 192-px scenes: 12x
  PEP's training time per image, which no 2-core budget here can hold for 2 seeds).

`--data` takes a COCO folder (`train/annotations.json` + `train/images`, same for `val/`) or a
shards root; default: the generated crowded scenes of the config. Prints a markdown table
(mean and spread over seeds) ready for BENCHMARKS.md, a second one with recall at mask IoU
0.5 by visibility (generated scenes: ground truth from the val annotations.json, whose
objects carry `visible_fraction`) and the duplicates / false merges per image, then each
loss term at the first and last epoch per model, and writes every number (per-epoch losses
included) to `--out`.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torchvision.models import resnet  # noqa: E402
from torchvision.models.detection import MaskRCNN  # noqa: E402
from torchvision.models.detection.anchor_utils import AnchorGenerator  # noqa: E402
from torchvision.models.detection.backbone_utils import (  # noqa: E402
    BackboneWithFPN,
    resnet_fpn_backbone,
)
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead  # noqa: E402
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor  # noqa: E402
from torchvision.models.detection.transform import GeneralizedRCNNTransform  # noqa: E402
from torchvision.ops.feature_pyramid_network import LastLevelMaxPool  # noqa: E402

from pep_model import Config, build_model, load_config, save_checkpoint  # noqa: E402
from pipeline import cli, evaluate, experiment, reader  # noqa: E402
from pipeline.inference import INFERENCE_COLUMNS, predict_rows  # noqa: E402
from pipeline.train import build_lr_scheduler, build_optimizer, train_one_epoch  # noqa: E402

# name -> (row label, ModelConfig switches); "maskrcnn" is built separately
PEP_VARIANTS = {
    "baseline": ("PEP Baseline", dict(excavate=False, purify=False)),
    "excavate": ("PEP +excavating", dict(excavate=True, purify=False)),
    "purify": ("PEP +purifying", dict(excavate=False, purify=True)),
    "pep": ("PEP (both)", dict(excavate=True, purify=True)),
}
MODELS = [*PEP_VARIANTS, "maskrcnn"]
COLUMNS = ["segm/AP", "segm/AP50", "segm/AP75", "segm/APs", "segm/APm", "segm/APl", "bbox/AP"]
# recall at mask IoU 0.5, overall and by visibility: (metric key, header)
RECALL_COLUMNS = [
    ("segm/R50", "R50"),
    *((f"segm/R50_vis_{b}", evaluate.VISIBILITY_LABELS[b]) for b in evaluate.VISIBILITY_BINS),
]
_THR = f"thr{evaluate.COUNT_SCORE_THRESHOLD:g}"
COUNT_COLUMNS = [
    (f"segm/duplicates_per_img_{_THR}", "duplicates/img"),
    (f"segm/false_merges_per_img_{_THR}", "false merges/img"),
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cli.add_data_flag(parser)
    cli.add_config_flags(
        parser, cli.project_config("tiny.yaml"), set_help="config override for every model"
    )
    parser.add_argument("--models", nargs="+", default=MODELS, choices=MODELS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--epochs", type=int, default=None, help="default: the config's")
    parser.add_argument(
        "--max-dets",
        type=int,
        default=100,
        help="COCOeval maxDets and both models' output caps (crowded data: 400)",
    )
    parser.add_argument(
        "--train-images",
        type=int,
        default=None,
        help="use only the first N training images (a smaller budget)",
    )
    parser.add_argument(
        "--maskrcnn-width",
        choices=["matched", "torchvision"],
        default="matched",
        help="Mask R-CNN FPN/head width: the config's model.fpn_channels, or torchvision's 256",
    )
    parser.add_argument(
        "--budget-s",
        default=None,
        help="equal training time: seconds per model, or 'maskrcnn' (its config-epochs time)",
    )
    parser.add_argument(
        "--plot", default=None, help="AP-vs-training-time PNG (default: --out with .png)"
    )
    parser.add_argument(
        "--eval-every", type=int, default=1, help="evaluate every N epochs (and the last)"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--work-dir", default=str(ROOT / "work"), help="data and shards go here")
    parser.add_argument("--out", default=None, help="write all numbers as JSON here")
    parser.add_argument(
        "--save-dir",
        default=None,
        help="save each PEP model as DIR/<model>-seed<N>.pt (a checkpoint diag_pep.py reads)",
    )
    parser.add_argument(
        "--report",
        nargs="+",
        default=None,
        metavar="JSON",
        help="print the tables of earlier runs' --out files (merged), train nothing",
    )
    return parser


# ----------------------------------------------------------------------------- Mask R-CNN


class _NoResize(GeneralizedRCNNTransform):
    """torchvision's transform without its resize: Mask R-CNN sees PEP's exact input pixels."""

    def resize(self, image, target=None):
        return image, target


def _resnet_fpn(name: str, width: int) -> BackboneWithFPN:
    """`resnet_fpn_backbone(weights=None, trainable_layers=5, BatchNorm)` with a `width` FPN."""
    body = getattr(resnet, name)(weights=None, norm_layer=nn.BatchNorm2d)
    stage2 = body.inplanes // 8  # 64 (ResNet-18/34) or 256 (ResNet-50/101), as torchvision
    return BackboneWithFPN(
        body,
        return_layers={f"layer{i}": str(i - 1) for i in range(1, 5)},
        in_channels_list=[stage2 * 2 ** (i - 1) for i in range(1, 5)],
        out_channels=width,
        extra_blocks=LastLevelMaxPool(),
    )


class MaskRCNNAdapter(nn.Module):
    """torchvision Mask R-CNN with PEP's train/eval contract.

    Training: drops crowd and degenerate boxes (torchvision has no ignore regions) and
    returns torchvision's loss dict. Eval: masks binarised at 0.5 as bool K x H x W.
    """

    def __init__(self, cfg: Config, max_dets: int, width: str = "matched") -> None:
        super().__init__()
        scale = cfg.model.scale_ranges[0][1] / 96
        sizes = tuple((max(4, round(s * scale)),) for s in (32, 64, 128, 256, 512))
        num_classes = cfg.model.num_classes + 1
        heads = {}
        if width == "torchvision":
            backbone = resnet_fpn_backbone(
                backbone_name=cfg.model.backbone,
                weights=None,
                trainable_layers=5,
                norm_layer=nn.BatchNorm2d,
            )
        else:
            backbone = _resnet_fpn(cfg.model.backbone, cfg.model.fpn_channels)
            w = cfg.model.fpn_channels
            heads = dict(
                box_head=TwoMLPHead(w * 7 * 7, 4 * w),
                box_predictor=FastRCNNPredictor(4 * w, num_classes),
                mask_head=MaskRCNNHeads(w, (w, w, w, w), 1),
                mask_predictor=MaskRCNNPredictor(w, w, num_classes),
            )
        self.model = MaskRCNN(
            backbone,
            num_classes=None if heads else num_classes,
            rpn_anchor_generator=AnchorGenerator(sizes, ((0.5, 1.0, 2.0),) * len(sizes)),
            box_detections_per_img=max_dets,
            box_score_thresh=cfg.model.score_threshold,
            **heads,
        )
        t = self.model.transform
        self.model.transform = _NoResize(
            t.min_size, t.max_size, t.image_mean, t.image_std, size_divisible=32
        )
        self.anchor_sizes = [s[0] for s in sizes]

    def forward(self, images, targets=None):
        if self.training:
            clean = []
            for t in targets:
                boxes = t["boxes"]
                keep = ~t["iscrowd"] & (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
                clean.append(
                    {"boxes": boxes[keep], "labels": t["labels"][keep], "masks": t["masks"][keep]}
                )
            return self.model(images, clean)
        out = self.model(images)
        return [
            {
                "labels": o["labels"],
                "scores": o["scores"],
                "masks": o["masks"][:, 0] > 0.5,
                "boxes": o["boxes"],
            }
            for o in out
        ]


def build(name: str, cfg: Config, max_dets: int, maskrcnn_width: str = "matched") -> nn.Module:
    if name == "maskrcnn":
        return MaskRCNNAdapter(cfg, max_dets, maskrcnn_width)
    model = build_model(cfg.model)
    model.set_inference_params(max_instances=max_dets)
    return model


# ----------------------------------------------------------------------------- train / eval


def read_rows(shards_dir: str, limit: int | None = None) -> pa.Table:
    table = pa.concat_tables(pq.read_table(p) for p in reader.shard_files(shards_dir))
    return table.slice(0, limit) if limit else table


def epoch_batches(table: pa.Table, cfg: Config, seed: int, epoch: int):
    """This seed's shuffled order for this epoch, decoded and augmented like the Ray reader."""
    order = np.random.default_rng([seed, epoch]).permutation(table.num_rows)
    size = cfg.train.batch_size
    for start in range(0, len(order), size):
        rows = table.take(pa.array(order[start : start + size]))
        yield reader.collate(
            reader.decode_batch(
                rows, list(cfg.data.train_size), cfg.data.flip_prob, seed=seed * 100_003 + epoch
            )
        )


def budget_epochs(budget_s: float, first_epoch_s: float) -> int:
    """The whole number of epochs whose time at the first epoch's pace is nearest the budget
    (at least the one done). Rounded, not floored: flooring cost a model up to a whole epoch
    (nuclei, 2026-12-03: 6.98 epochs of PEP fit, 6 ran, 345 s of 400) while one whose epoch
    divides the budget evenly lost nothing; rounding errs by at most half an epoch either way."""
    return max(1, round(budget_s / max(first_epoch_s, 1e-9)))


def scaled_milestones(milestones: list[int], config_epochs: int, epochs: int) -> list[int]:
    """The config's lr milestones at the same fractions of `epochs` (its schedule shape)."""
    return sorted({min(epochs, max(1, round(m * epochs / config_epochs))) for m in milestones})


def replan_schedule(
    optimizer: torch.optim.Optimizer, cfg: Config, iters: int, epochs: int
) -> tuple[torch.optim.lr_scheduler.LambdaLR, list[int]]:
    """After the first epoch: the config's warm-up and lr steps with its milestones moved to
    the same fractions of `epochs`, continuing at iteration `iters`."""
    planned = scaled_milestones(cfg.train.milestones, cfg.train.epochs, epochs)
    plan = replace(cfg, train=replace(cfg.train, milestones=planned))
    factor = build_lr_scheduler(optimizer, plan, iters).lr_lambdas[0]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=iters - 1), planned


def train(
    model: nn.Module,
    table: pa.Table,
    cfg: Config,
    seed: int,
    budget_s: float | None = None,
    evaluate=None,
    ap_key: str = "segm/AP",
    eval_every: int = 1,
) -> tuple[float, list, list]:
    """Train for the config's epochs, or for as many as fit in `budget_s`.

    `evaluate(model) -> metrics` runs after every `eval_every`-th epoch and the last (not
    counted as training time).
    Returns (training seconds, per-epoch loss terms, curve: per-epoch {epoch, train_s,
    metrics}).
    """
    iters = math.ceil(table.num_rows / cfg.train.batch_size)
    optimizer = build_optimizer(model, cfg)
    scheduler = build_lr_scheduler(optimizer, cfg, iters)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    epochs = cfg.train.epochs
    history, curve = [], []
    train_s = 0.0
    epoch = 0
    while epoch < epochs:
        start = time.perf_counter()
        metrics = train_one_epoch(
            model,
            optimizer,
            scheduler,
            epoch_batches(table, cfg, seed, epoch),
            torch.device("cpu"),
            cfg,
            scaler,
        )
        train_s += time.perf_counter() - start
        if budget_s is not None and epoch == 0:
            epochs = budget_epochs(budget_s, train_s)
            scheduler, planned = replan_schedule(optimizer, cfg, iters, epochs)
            print(
                f"    budget {budget_s:.0f} s: {epochs} epochs at {train_s:.0f} s/epoch, "
                f"lr x{cfg.train.lr_gamma} after epochs {planned}",
                flush=True,
            )
        history.append({k: v for k, v in metrics.items() if k.startswith("loss")})
        line = (
            f"    epoch {epoch + 1}/{epochs} loss {metrics['loss']:.3f} "
            f"({metrics['epoch_time_s']:.0f} s, {train_s:.0f} s in all)"
        )
        if evaluate is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
            scores = evaluate(model)
            curve.append({"epoch": epoch + 1, "train_s": train_s, "metrics": scores})
            line += f", {ap_key} {scores[ap_key]:.3f}"
        print(line, flush=True)
        epoch += 1
    return train_s, history, curve


def evaluate_model(model: nn.Module, splits, max_dets: int) -> tuple[dict, float]:
    model.eval()
    to_coco = {k + 1: v for k, v in enumerate(splits.categories.coco_ids)}
    results, image_ids, seconds = [], [], 0.0
    for path in reader.shard_files(splits.val_shards):
        for rb in pq.ParquetFile(path).iter_batches(batch_size=1, columns=INFERENCE_COLUMNS):
            start = time.perf_counter()
            per_image = predict_rows(model, rb.to_pydict(), to_coco)
            seconds += time.perf_counter() - start
            for image_id, rows in per_image:
                image_ids.append(image_id)
                results.extend(rows)
    metrics = evaluate.evaluate_coco(
        splits.val_annotations, results, max_dets=max_dets, img_ids=image_ids
    )
    return evaluate.scalar_metrics(metrics), 1000 * seconds / max(1, len(image_ids))


# ----------------------------------------------------------------------------- report


def summarise(values: list[float], digits: int = 3) -> str:
    """Mean ± sample std over seeds; COCOeval's -1 (no objects of that size) shows as n/a."""
    values = [v for v in values if v is not None and v >= 0 and not math.isnan(v)]
    if not values:
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def table(
    runs: list[dict], models: list[str], max_dets: int, maskrcnn_label: str = "Mask R-CNN"
) -> str:
    # every AP column at the raised detection limit when there is one (not only AP itself)
    suffix = "" if max_dets == 100 else f"@{max_dets}"
    head = [
        "model", "seeds", *(c + suffix for c in COLUMNS), "epochs", "train s", "infer ms/img",
        "params M",
    ]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        mine = [r for r in runs if r["model"] == name]
        label = PEP_VARIANTS[name][0] if name in PEP_VARIANTS else maskrcnn_label
        cells = [label, ",".join(str(r["seed"]) for r in mine)]
        for key in COLUMNS:
            cells.append(summarise([r["metrics"].get(key + suffix, float("nan")) for r in mine]))
        epochs = sorted({r["epochs"] for r in mine if "epochs" in r})
        cells.append("/".join(str(e) for e in epochs) or "-")
        cells.append(summarise([r["train_s"] for r in mine], digits=0))
        cells.append(summarise([r["infer_ms"] for r in mine], digits=0))
        cells.append(f"{mine[0]['params_m']:.1f}" if mine else "-")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recall_table(
    runs: list[dict], models: list[str], max_dets: int, maskrcnn_label: str = "Mask R-CNN"
) -> str:
    """Recall at mask IoU 0.5 by visibility (at the run's detection limit, as the AP table)
    and duplicates / false merges per val image at score >= 0.3 (`pipeline.evaluate`); n/a
    for data without `visible_fraction` and for results files written before these metrics.
    """
    suffix = "" if max_dets == 100 else f"@{max_dets}"
    head = ["model", "seeds"]
    for key, label in RECALL_COLUMNS:
        label += suffix
        counts = {r["metrics"].get(key.replace("/R50_vis_", "/n_vis_")) for r in runs}
        if "/R50_vis_" in key and len(counts) == 1 and None not in counts:
            label += f" (n={counts.pop():.0f})"  # objects in the bin (one val set for all)
        head.append(label)
    head += [label for _, label in COUNT_COLUMNS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name in models:
        mine = [r for r in runs if r["model"] == name]
        label = PEP_VARIANTS[name][0] if name in PEP_VARIANTS else maskrcnn_label
        cells = [label, ",".join(str(r["seed"]) for r in mine)]
        for key, _ in RECALL_COLUMNS:
            cells.append(summarise([r["metrics"].get(key + suffix, float("nan")) for r in mine]))
        for key, _ in COUNT_COLUMNS:
            values = [r["metrics"].get(key, float("nan")) for r in mine]
            cells.append(summarise(values, digits=2))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def loss_table(runs: list[dict], models: list[str]) -> str:
    """Each loss term at the first and the last epoch (mean over seeds), one row per model."""
    lines = ["| model | loss term | first epoch | last epoch |", "|---|---|---|---|"]
    for name in models:
        mine = [r for r in runs if r["model"] == name and r.get("losses")]
        if not mine:
            continue
        for key in mine[0]["losses"][0]:
            first = statistics.mean(r["losses"][0][key] for r in mine)
            last = statistics.mean(r["losses"][-1][key] for r in mine)
            lines.append(f"| {name} | {key} | {first:.3f} | {last:.3f} |")
    return "\n".join(lines)


def print_report(runs: list[dict], models: list[str], max_dets: int, maskrcnn_label: str) -> None:
    print()
    print(table(runs, models, max_dets, maskrcnn_label))
    print()
    print(recall_table(runs, models, max_dets, maskrcnn_label))
    print()
    print(loss_table(runs, models))


# settings that may differ between --out files merged by --report
_MERGEABLE = {"models", "seeds", "out", "report", "save_dir"}


def merge_saved(paths: list[str]) -> dict:
    """The runs of several `--out` files as one; their other settings must be equal."""
    merged: dict | None = None
    seen: dict[tuple[str, int], str] = {}
    for path in paths:
        saved = json.loads(Path(path).read_text())
        settings = {k: v for k, v in saved["args"].items() if k not in _MERGEABLE}
        if merged is None:
            merged = {**saved, "runs": []}
            first, first_settings = path, settings
        elif settings != first_settings:
            differ = sorted(
                k
                for k in settings.keys() | first_settings.keys()
                if settings.get(k) != first_settings.get(k)
            )
            raise SystemExit(f"--report: {path} and {first} differ in {', '.join(differ)}")
        for run in saved["runs"]:
            key = (run["model"], run["seed"])
            if key in seen:
                raise SystemExit(
                    f"--report: {run['model']} seed {run['seed']} is in both {seen[key]} and {path}"
                )
            seen[key] = path
            merged["runs"].append(run)
    return merged


def ap_key(max_dets: int) -> str:
    """The segm AP column at the run's detection limit (COCOeval's own at 100)."""
    return "segm/AP" if max_dets == 100 else f"segm/AP@{max_dets}"


def plot_curves(
    runs: list[dict],
    models: list[str],
    path: str | Path,
    title: str,
    maskrcnn_label: str = "Mask R-CNN",
    max_dets: int = 100,
) -> None:
    """segm AP (at the run's maxDets) against training time, one line per (model, seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(MODELS, ["C0", "C1", "C2", "C3", "C7"]))
    for name in models:
        label = PEP_VARIANTS[name][0] if name in PEP_VARIANTS else maskrcnn_label
        for i, run in enumerate(r for r in runs if r["model"] == name and r.get("curve")):
            xs = [point["train_s"] / 60 for point in run["curve"]]
            ys = [point["metrics"][ap_key(max_dets)] for point in run["curve"]]
            ax.plot(
                xs,
                ys,
                marker="o",
                markersize=3,
                color=colours[name],
                linestyle=["-", "--", ":", "-."][i % 4],
                label=f"{label}, seed {run['seed']}" if i < 4 else None,
            )
    ax.set_xlabel("training time (min, this CPU)")
    ax.set_ylabel(f"val {ap_key(max_dets)}")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(args: argparse.Namespace) -> None:
    if args.report:
        saved = merge_saved(args.report)
        models = [m for m in MODELS if any(r["model"] == m for r in saved["runs"])]
        label = saved.get("maskrcnn_label", "Mask R-CNN")
        print_report(saved["runs"], models, saved["args"]["max_dets"], label)
        if args.plot:
            plot_curves(
                saved["runs"],
                models,
                args.plot,
                saved.get("title", ""),
                label,
                saved["args"]["max_dets"],
            )
            print(f"plot: {args.plot}")
        return
    budget = args.budget_s
    if budget is not None and budget != "maskrcnn":
        try:
            budget = float(budget)
        except ValueError:
            raise SystemExit(f"--budget-s: seconds or 'maskrcnn', got {budget!r}") from None
    if budget == "maskrcnn" and "maskrcnn" not in args.models:
        raise SystemExit("--budget-s maskrcnn needs maskrcnn in --models")
    torch.set_num_threads(args.threads)
    overrides = list(args.overrides) + ([f"train.epochs={args.epochs}"] if args.epochs else [])
    cfg = load_config(args.config, overrides)
    splits = experiment.resolve_data(args.data, cfg, args.work_dir)  # starts Ray only to prepare
    cfg.model.num_classes = splits.categories.num_classes
    rows = read_rows(splits.train_shards, args.train_images)
    if budget is None:
        mode = f"{cfg.train.epochs} epochs"
    elif budget == "maskrcnn":
        mode = f"equal time (Mask R-CNN's {cfg.train.epochs}-epoch training time)"
    else:
        mode = f"equal time ({budget:.0f} s)"
    print(
        f"torch {torch.__version__}, {platform.machine()}, {args.threads} threads; data "
        f"{splits.source}: {rows.num_rows} train images, val {splits.val_shards}; "
        f"{mode}, batch {cfg.train.batch_size}, {cfg.train.optimizer} lr "
        f"{cfg.train.lr}, sizes {cfg.data.train_size}, backbone {cfg.model.backbone}, "
        f"maxDets {args.max_dets}",
        flush=True,
    )
    width = cfg.model.fpn_channels if args.maskrcnn_width == "matched" else 256
    label = f"Mask R-CNN (torchvision, {width}-wide)"
    title = f"{Path(str(splits.source)).name}: {rows.num_rows} train images, {mode}"
    # with the budget taken from Mask R-CNN, it trains first in every seed
    order = (
        sorted(args.models, key=lambda m: m != "maskrcnn") if budget == "maskrcnn" else args.models
    )
    plot = args.plot or (str(Path(args.out).with_suffix(".png")) if args.out else None)
    runs = []
    for seed in args.seeds:
        seed_budget = None if budget == "maskrcnn" else budget
        for name in order:
            model_cfg = load_config(args.config, overrides)
            model_cfg.model.num_classes = cfg.model.num_classes
            for key, value in PEP_VARIANTS.get(name, (None, {}))[1].items():
                setattr(model_cfg.model, key, value)
            torch.manual_seed(seed)
            model = build(name, model_cfg, args.max_dets, args.maskrcnn_width)
            params = sum(p.numel() for p in model.parameters()) / 1e6
            print(f"{name} seed {seed} ({params:.1f} M parameters)", flush=True)
            infer = []

            def score(m, infer=infer):
                metrics, ms = evaluate_model(m, splits, args.max_dets)
                infer.append(ms)
                return metrics

            run_budget = None if name == "maskrcnn" and budget == "maskrcnn" else seed_budget
            train_s, history, curve = train(
                model, rows, model_cfg, seed, run_budget, score, ap_key(args.max_dets),
                args.eval_every,
            )
            if name == "maskrcnn" and budget == "maskrcnn":
                seed_budget = train_s
            metrics = curve[-1]["metrics"]
            print(
                f"    {ap_key(args.max_dets)} {metrics[ap_key(args.max_dets)]:.3f} "
                f"(segm AP {metrics['segm/AP']:.3f}, bbox AP {metrics['bbox/AP']:.3f}), "
                f"train {train_s:.0f} s, {infer[-1]:.0f} ms/img",
                flush=True,
            )
            runs.append(
                {
                    "model": name,
                    "seed": seed,
                    "metrics": metrics,
                    "train_s": train_s,
                    "budget_s": run_budget,
                    "epochs": len(history),
                    "infer_ms": infer[-1],
                    "params_m": params,
                    "losses": history,
                    "curve": curve,
                }
            )
            if args.save_dir and name in PEP_VARIANTS:
                save_checkpoint(Path(args.save_dir) / f"{name}-seed{seed}.pt", model, model_cfg)
            if args.out:
                saved = {"args": vars(args), "maskrcnn_label": label, "title": title, "runs": runs}
                Path(args.out).write_text(json.dumps(saved, indent=1))
            if plot:
                plot_curves(runs, args.models, plot, title, label, args.max_dets)
    print_report(runs, args.models, args.max_dets, label)
    if plot:
        print(f"plot: {plot}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
