"""Learning check: a tiny PEP overfits a handful of generated crowded images (segm AP >= 0.5).

Checked for each Table 2 variant (Baseline, +excavating, +purifying, PEP) on one training of
the full PEP (`trained_pep`). The data comes from
`pipeline.synth.make_dataset`, read back with pycocotools, and the predictions are scored
with COCOeval on the same (training) images.
"""

from __future__ import annotations

import contextlib
import io
import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from pep_model import ModelConfig, build_model

NUM_IMAGES = 4
IMAGE_SIZE = 192
STEPS = 150


def overfit_config(excavate: bool, purify: bool) -> ModelConfig:
    """A tiny CPU model: ResNet-18 with BN, 32-wide heads."""
    return ModelConfig(
        num_classes=5, backbone="resnet18", norm="bn", fpn_channels=32, head_channels=32,
        tower_convs=2, descriptor_dim=32, mask_channels=32, mask_stride=4,
        excavate_channels=32, purify_embed_dim=32, excavate=excavate, purify=purify,
        cls_loss="focal", mask_loss="bce_dice", score_threshold=0.05,
    )


def load_coco_split(ann_path: Path, images_dir: Path):
    """COCO split -> (coco, image ids, images [3,H,W] 0..1, targets, contiguous->category id)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO(str(ann_path))
    cat_ids = sorted(coco.getCatIds())
    to_label = {c: i + 1 for i, c in enumerate(cat_ids)}
    image_ids = sorted(coco.getImgIds())
    images, targets = [], []
    for image_id in image_ids:
        info = coco.loadImgs(image_id)[0]
        pixels = np.asarray(Image.open(images_dir / info["file_name"]).convert("RGB"))
        images.append(torch.from_numpy(pixels.copy()).permute(2, 0, 1).float() / 255)
        anns = coco.loadAnns(coco.getAnnIds(imgIds=image_id))
        h, w = info["height"], info["width"]
        masks = [coco.annToMask(a) for a in anns]
        targets.append({
            "labels": torch.tensor([to_label[a["category_id"]] for a in anns], dtype=torch.int64),
            "boxes": torch.tensor(
                [[a["bbox"][0], a["bbox"][1], a["bbox"][0] + a["bbox"][2],
                  a["bbox"][1] + a["bbox"][3]] for a in anns], dtype=torch.float32
            ).reshape(-1, 4),
            "masks": torch.from_numpy(np.stack(masks)) if masks
            else torch.zeros((0, h, w), dtype=torch.uint8),
            "iscrowd": torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool),
        })
    return coco, image_ids, images, targets, {v: k for k, v in to_label.items()}


def train_model(config: ModelConfig, images, targets, steps: int = STEPS, lr: float = 2e-3):
    """AdamW on the whole (tiny) training set as one batch, with a short warm-up."""
    torch.manual_seed(0)
    model = build_model(config)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: min(1.0, (i + 1) / 10) * (0.1 if i >= 0.8 * steps else 1.0)
    )
    history = []
    for _ in range(steps):
        losses = model(images, targets)
        total = sum(losses.values())
        optimizer.zero_grad()
        total.backward()
        torch.nn.utils.clip_grad_norm_(params, 10.0)
        optimizer.step()
        schedule.step()
        history.append({k: float(v) for k, v in losses.items()})
    return model, history


def segm_ap(model, coco, image_ids, images, to_category) -> float:
    """COCO segm AP of the model's predictions on the given images."""
    model.eval()
    results = []
    with torch.no_grad():
        outputs = [model([im])[0] for im in images]
    for image_id, out in zip(image_ids, outputs):
        for label, score, mask in zip(out["labels"], out["scores"], out["masks"]):
            rle = mask_utils.encode(np.asfortranarray(mask.numpy().astype(np.uint8)))
            rle["counts"] = rle["counts"].decode("ascii")
            results.append({"image_id": image_id, "category_id": to_category[int(label)],
                            "segmentation": rle, "score": float(score)})
    if not results:
        return 0.0
    with contextlib.redirect_stdout(io.StringIO()):
        dets = coco.loadRes(json.loads(json.dumps(results)))
        evaluator = COCOeval(coco, dets, "segm")
        evaluator.params.imgIds = image_ids
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[0])


@pytest.fixture(scope="module")
def crowded_scenes(tmp_path_factory):
    from pipeline.synth import make_dataset

    root = tmp_path_factory.mktemp("synth")
    summary = make_dataset(root, images=NUM_IMAGES, size=IMAGE_SIZE, seed=1, val_fraction=0.0)
    split = summary["splits"]["train"]
    return load_coco_split(Path(split["annotations"]), Path(split["images_dir"]))


@pytest.fixture(scope="module")
def trained_pep(crowded_scenes):
    """The full PEP trained once. Its modules train apart from the shared network (their
    gradients and RNG draws stay theirs: test_losses' isolation test), so its shared network
    is the Baseline's, and each Table 2 variant is these weights with modules taken out."""
    torch.set_num_threads(2)
    coco, image_ids, images, targets, to_category = crowded_scenes
    start = time.time()
    # the full PEP at 150 steps sat at the bar (0.530 before Eq. 7 became a per-descriptor
    # mean, 0.467 after: same loss values, other float rounding); it gets 200
    model, history = train_model(overfit_config(True, True), images, targets, steps=200)
    print(f"trained in {time.time() - start:.0f}s; final losses {history[-1]}")
    return model, history


@contextlib.contextmanager
def modules_taken_out(model, excavate: bool, purify: bool):
    """The model with its excavating / purifying module removed for inference."""
    saved = model.excavating, model.purifying
    model.excavating = model.excavating if excavate else None
    model.purifying = model.purifying if purify else None
    try:
        yield model
    finally:
        model.excavating, model.purifying = saved


@pytest.mark.slow
@pytest.mark.parametrize(
    "excavate,purify",
    [(False, False), (True, False), (False, True), (True, True)],
    ids=["baseline", "excavating", "purifying", "pep"],
)
def test_tiny_model_overfits_crowded_scenes(crowded_scenes, trained_pep, excavate, purify):
    coco, image_ids, images, targets, to_category = crowded_scenes
    trained, history = trained_pep
    assert all(np.isfinite(v) for v in history[-1].values())
    with modules_taken_out(trained, excavate, purify) as model:
        ap = segm_ap(model, coco, image_ids, images, to_category)
    print(f"excavate={excavate} purify={purify}: segm AP {ap:.3f}")
    assert ap >= 0.5, f"segm AP {ap:.3f} < 0.5 after 200 steps; losses {history[-1]}"
