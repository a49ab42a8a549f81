"""Diagnose a trained PEP: what excavating and purifying add at inference, and purifying's errors.

    python benchmarks/diag_pep.py CHECKPOINT [--data COCO_FOLDER_OR_SHARDS] [--work-dir work]
        [--max-dets 100] [--threads 2] [--try KEY=VALUE[,KEY=VALUE] ...] [--only-table]

Measurements with the checkpoint's own weights:

1. The same weights, inference switched: AP as trained, with purifying's grouping replaced by
   Matrix NMS (what the Baseline uses), without the mined descriptors, and with neither. If
   a switched row beats "as trained", that module costs AP at this state of training.
   Each `--try` adds a row with post-processing parameters changed on the same weights
   (`excavate=false` / `purify=false` among them take that module out).
2. Purifying's graph against the ground truth: every descriptor whose location lies in exactly
   one ground-truth mask belongs to that object. For the pairs of such descriptors: the mean
   symmetrised similarity and the share at or above `purify_threshold`, for pairs on the same
   object and on different objects; then the groups that hold descriptors of two or more
   objects (false merges: one mask for several objects) and the objects whose descriptors
   end up in two or more groups (splits: duplicates).
3. Mask quality at any score: for each ground-truth object the best mask IoU of any final
   prediction (can the model's output match it at all?), and the predictions that match no
   object at IoU 0.5.
4. With excavating: the objects found only with the mined descriptors (matched at mask IoU
   0.5 by a prediction scoring >= 0.05 / 0.1 / 0.3 with them, not without), and those lost.
5. With excavating: how training's mask loss (Eq. 7, over all N_all descriptors) divides
   between original and mined descriptors, on the first training batches (train split).

`--data` defaults to the generated crowded scenes of the checkpoint's config (prepared under
`--work-dir` if absent), as the default training run uses them.
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
import yaml  # noqa: E402
from bench_accuracy import evaluate_model  # noqa: E402
from torch import Tensor  # noqa: E402

from pep_model import PEP, load_checkpoint  # noqa: E402
from pep_model.postprocess import group_by_similarity  # noqa: E402
from pipeline import experiment, reader  # noqa: E402

SWITCHES = {
    "as trained": {},
    "purifying -> Matrix NMS": {"purify": False},
    "no mined descriptors": {"excavate": False},
    "neither (Baseline inference)": {"excavate": False, "purify": False},
}
MODULES = {"excavate": "excavating", "purify": "purifying"}


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--data", default=None, help="COCO folder or shards root")
    parser.add_argument("--work-dir", default=str(ROOT / "work"))
    parser.add_argument("--max-dets", type=int, default=100)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument(
        "--try",
        dest="tries",
        action="append",
        default=[],
        metavar="KEY=VALUE[,KEY=VALUE]",
        help="one more row of table 1: inference parameters (PEP.set_inference_params) "
        "changed on the same weights, e.g. purify_merge=seed,purify_threshold=0.3",
    )
    parser.add_argument(
        "--only-table", action="store_true", help="print table 1 only (skip the slower reports)"
    )
    return parser


def parse_try(text: str) -> dict[str, object]:
    """"a=1,b=seed" -> {"a": 1, "b": "seed"} (values read as YAML scalars)."""
    params = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--try {text!r}: expected KEY=VALUE[,KEY=VALUE]")
        params[key.strip()] = yaml.safe_load(value)
    return params


@contextlib.contextmanager
def inference_params(model: PEP, **params) -> Iterator[PEP]:
    """The model with post-processing parameters changed, restored on exit. The keys
    `excavate` / `purify` (false) take that module out, as `switched` does."""
    modules = {key: bool(params.pop(key)) for key in list(params) if key in MODULES}
    saved = {key: getattr(model.config, key) for key in params}
    model.set_inference_params(**params)
    try:
        with switched(model, **modules):
            yield model
    finally:
        model.set_inference_params(**saved)


@contextlib.contextmanager
def switched(model: PEP, excavate: bool = True, purify: bool = True) -> Iterator[PEP]:
    """The model with its excavating / purifying module taken out (PEP.inference then skips
    mining, or falls back to Matrix NMS), restored on exit."""
    saved = model.excavating, model.purifying
    model.excavating = saved[0] if excavate else None
    model.purifying = saved[1] if purify else None
    try:
        yield model
    finally:
        model.excavating, model.purifying = saved


def descriptor_owners(positions: Tensor, masks: Tensor) -> Tensor:
    """[N] index of the one ground-truth mask ([G, H, W]) holding each descriptor's pixel
    position ([N, 2] x, y), or -1 (background, or inside several overlapping masks)."""
    if masks.shape[0] == 0:
        return torch.full((positions.shape[0],), -1, dtype=torch.int64)
    h, w = masks.shape[-2:]
    x = positions[:, 0].long().clamp(0, w - 1)
    y = positions[:, 1].long().clamp(0, h - 1)
    inside = masks[:, y, x].bool()  # G x N
    one = inside.sum(0) == 1
    return torch.where(one, inside.float().argmax(0), torch.full_like(x, -1))


def graph_stats(
    similarity: Tensor, scores: Tensor, owners: Tensor, threshold: float
) -> dict[str, Tensor | int]:
    """Pair similarities (same / different object) and the grouping errors of one image, for
    the groups inference forms (`group_by_similarity` with the descriptors' scores)."""
    sym = (similarity + similarity.T) / 2
    i, j = torch.triu_indices(len(owners), len(owners), 1)
    a, b = owners[i], owners[j]
    known = (a >= 0) & (b >= 0)
    groups = group_by_similarity(similarity, scores, threshold)
    merged = 0
    groups_per_object: Counter[int] = Counter()
    for g in groups.unique():
        objects = set(owners[(groups == g) & (owners >= 0)].tolist())
        merged += len(objects) >= 2
        groups_per_object.update(objects)
    split = sum(1 for n in groups_per_object.values() if n >= 2)
    return {
        "same": sym[i, j][known & (a == b)],
        "different": sym[i, j][known & (a != b)],
        "groups": int(groups.max()) + 1 if len(groups) else 0,
        "merged_groups": merged,
        "objects_found": len(groups_per_object),
        "split_objects": split,
    }


def purifying_report(model: PEP, shards: str, data_cfg) -> str:
    """Purifying's graph on every val image against the ground truth (see the module doc)."""
    captured: list[tuple[Tensor, Tensor]] = []  # (positions, similarity) per purifying call
    scores: list[Tensor] = []  # the candidates' scores, which pick the groups' seeds
    hook = model.purifying.register_forward_hook(
        lambda module, inputs, output: captured.append((inputs[1], output.sigmoid()))
    )
    postprocess = model.postprocess

    def recording_postprocess(descriptors, locations, loc_strides, score, *rest):
        scores.append(score)
        return postprocess(descriptors, locations, loc_strides, score, *rest)

    threshold = model.config.purify_threshold
    same, different, totals = [], [], Counter()
    try:
        with mock.patch.object(model, "postprocess", recording_postprocess), torch.no_grad():
            for images, targets in reader.local_batches(shards, data_cfg, 1):
                captured.clear()
                scores.clear()
                model(images)
                totals["objects"] += len(targets[0]["labels"])
                if not captured:  # no descriptor passed the candidate threshold
                    continue
                positions, similarity = captured[0]
                owners = descriptor_owners(positions, targets[0]["masks"])
                totals["descriptors"] += len(owners)
                totals["descriptors_on_one_object"] += int((owners >= 0).sum())
                stats = graph_stats(similarity, scores[0], owners, threshold)
                same.append(stats.pop("same"))
                different.append(stats.pop("different"))
                totals.update(stats)
    finally:
        hook.remove()
    same_t, diff_t = torch.cat(same), torch.cat(different)
    return "\n".join(
        [
            f"purify_threshold {threshold}; {totals['descriptors']} descriptors, "
            f"{totals['descriptors_on_one_object']} inside exactly one object",
            f"same-object pairs      {len(same_t):>8}: mean similarity {same_t.mean():.3f}, "
            f">= threshold {(same_t >= threshold).float().mean():.1%}",
            f"different-object pairs {len(diff_t):>8}: mean similarity {diff_t.mean():.3f}, "
            f">= threshold {(diff_t >= threshold).float().mean():.1%}",
            f"groups {totals['groups']}: {totals['merged_groups']} hold >= 2 objects "
            f"(false merges); objects with a descriptor {totals['objects_found']} of "
            f"{totals['objects']}: {totals['split_objects']} split over >= 2 groups (duplicates)",
        ]
    )


def best_ious(pred_masks: Tensor, gt_masks: Tensor) -> tuple[Tensor, Tensor]:
    """Mask IoU of each ground-truth object with its best prediction ([G]), and of each
    prediction with its best object ([K]); 0 where the other side is empty."""
    pred = pred_masks.flatten(1).float()
    gt = gt_masks.flatten(1).float()
    if len(pred) == 0 or len(gt) == 0:
        return torch.zeros(len(gt)), torch.zeros(len(pred))
    inter = gt @ pred.T  # G x K
    union = gt.sum(1, keepdim=True) + pred.sum(1) - inter
    iou = inter / union.clamp(min=1)
    return iou.max(1).values, iou.max(0).values


def mask_quality(model: PEP, shards: str, data_cfg) -> str:
    """Whether the final predictions (any score) cover the objects, and how well."""
    per_object, per_prediction = [], []
    for images, targets in reader.local_batches(shards, data_cfg, 1):
        with torch.no_grad():
            (out,) = model(images)
        objects, predictions = best_ious(out["masks"], targets[0]["masks"])
        per_object.append(objects)
        per_prediction.append(predictions)
    objects, predictions = torch.cat(per_object), torch.cat(per_prediction)
    return (
        f"{len(objects)} objects: best mask IoU of any prediction >= 0.5 for "
        f"{(objects >= 0.5).float().mean():.1%}, >= 0.75 for {(objects >= 0.75).float().mean():.1%}"
        f" (median {objects.median():.2f}); {len(predictions)} predictions: "
        f"{(predictions < 0.5).float().mean():.1%} match no object at IoU 0.5"
    )


def found_with_mining(
    model: PEP, batches, min_scores: tuple[float, ...] = (0.05, 0.1, 0.3), iou: float = 0.5
) -> dict[float, dict[str, int]]:
    """Per score bar in `min_scores`: the objects a prediction scoring at least that matches at
    mask IoU >= `iou`, with the mined descriptors and without them (excavating taken out at
    inference), on `batches` of one image each: which objects mining alone finds, and which
    it loses. One inference pass each way per image serves every bar."""
    counts = {bar: Counter() for bar in min_scores}
    for images, targets in batches:
        outputs = {}
        for excavate in (True, False):
            with switched(model, excavate=excavate), torch.no_grad():
                (outputs[excavate],) = model(images)
        for bar, count in counts.items():
            found = {}
            for excavate, out in outputs.items():
                keep = out["scores"] >= bar
                objects, _ = best_ious(out["masks"][keep], targets[0]["masks"])
                found[excavate] = objects >= iou
            count["objects"] += len(found[True])
            count["with"] += int(found[True].sum())
            count["without"] += int(found[False].sum())
            count["only_with"] += int((found[True] & ~found[False]).sum())
            count["only_without"] += int((~found[True] & found[False]).sum())
    return {bar: dict(count) for bar, count in counts.items()}


def mask_loss_split(model: PEP, batches) -> dict[str, float]:
    """Training's mask loss (Eq. 7 per descriptor, `model.mask_loss`) over `batches` of
    (images, targets), split into original and mined descriptors: how many of each and
    their mean loss. Needs a model with excavating."""
    per_image: list[Tensor] = []  # each image's N_all = N_ori + K losses, in order
    mined: list[int] = []  # K mined descriptors per image
    mask_losses, mine = model.mask_losses, model.excavating.mine

    def record_losses(*args):
        per_image.append(mask_losses(*args))
        return per_image[-1]

    def count_mined(*args):
        out = mine(*args)
        mined.append(out[0].shape[0])
        return out

    original, mined_losses = [], []
    model.train()
    try:
        with (
            mock.patch.object(model, "mask_losses", record_losses),
            mock.patch.object(model.excavating, "mine", count_mined),
            torch.no_grad(),
        ):
            for images, targets in batches:
                per_image.clear()
                mined.clear()
                model(images, targets)
                for losses, k in zip(per_image, mined):
                    original.append(losses[: len(losses) - k])
                    mined_losses.append(losses[len(losses) - k :])
    finally:
        model.eval()
    o, m = torch.cat(original), torch.cat(mined_losses)
    return {
        "original": len(o),
        "mined": len(m),
        "original_loss": float(o.mean()) if len(o) else float("nan"),
        "mined_loss": float(m.mean()) if len(m) else float("nan"),
    }


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    model, cfg = load_checkpoint(args.checkpoint)
    model.set_inference_params(max_instances=args.max_dets)
    splits = experiment.resolve_data(args.data, cfg, args.work_dir)
    print(f"{args.checkpoint}: excavate={cfg.model.excavate} purify={cfg.model.purify}")
    print("| inference | segm AP | segm AP50 | bbox AP | R50 | R50 vis < 0.5 | ms/img |")
    print("|---|---|---|---|---|---|---|")
    rows = [(name, switched(model, **switches)) for name, switches in SWITCHES.items()
            if all(getattr(model, MODULES[k]) is not None for k in switches)]
    rows += [(text, inference_params(model, **parse_try(text))) for text in args.tries]
    for name, context in rows:
        with context:
            metrics, ms = evaluate_model(model, splits, args.max_dets)
        print(
            f"| {name} | {metrics['segm/AP']:.4f} | {metrics['segm/AP50']:.4f} | "
            f"{metrics['bbox/AP']:.4f} | {metrics.get('segm/R50', float('nan')):.3f} | "
            f"{metrics.get('segm/R50_vis_lo', float('nan')):.3f} | {ms:.0f} |", flush=True,
        )
    if args.only_table:
        return
    print()
    print("as trained: " + mask_quality(model, splits.val_shards, cfg.data))
    with switched(model, purify=False):
        print("purifying -> Matrix NMS: " + mask_quality(model, splits.val_shards, cfg.data))
    if model.purifying is not None:
        print()
        print(purifying_report(model, splits.val_shards, cfg.data))
    if model.excavating is not None:
        found = found_with_mining(model, reader.local_batches(splits.val_shards, cfg.data, 1))
        print()
        print("objects matched at mask IoU >= 0.5, with and without the mined descriptors:")
        print("| score >= | objects | with | without | only with | only without |")
        print("|---|---|---|---|---|---|")
        for bar, n in found.items():
            print(f"| {bar:g} | {n.get('objects', 0)} | {n.get('with', 0)} | "
                  f"{n.get('without', 0)} | {n.get('only_with', 0)} | {n.get('only_without', 0)} |")
        batches = itertools.islice(reader.local_batches(splits.train_shards, cfg.data, 4), 10)
        split = mask_loss_split(model, batches)
        total = split["original"] + split["mined"]
        print()
        print(
            f"training mask loss, first 10 training batches: {split['original']} original "
            f"descriptors, {split['mined']} mined ({split['mined'] / max(1, total):.0%} of the "
            f"loss's terms); mean mask loss per descriptor: original "
            f"{split['original_loss']:.3f}, mined {split['mined_loss']:.3f}"
        )


if __name__ == "__main__":
    main(get_args_parser().parse_args())
