"""Training-side reader: batch format, augmentation consistency, Ray Data and Ray Train paths."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from torchvision.ops import masks_to_boxes

from pep_model.config import DataConfig
from pipeline.prepare import SHARD_SCHEMA
from pipeline.reader import (
    category_map,
    collate,
    collate_packed,
    decode_batch,
    image_sizes,
    local_batches,
    to_model_inputs,
    training_dataset,
    unpack_masks,
)

JITTER = DataConfig(train_size=[64, 96, 128], flip_prob=0.5)


def _check_target(image: torch.Tensor, target: dict, num_classes: int) -> None:
    n = len(target["labels"])
    h, w = image.shape[1:]
    assert image.dtype == torch.float32 and image.shape[0] == 3
    assert 0.0 <= image.min() and image.max() <= 1.0
    assert target["labels"].dtype == torch.int64 and target["labels"].shape == (n,)
    assert target["boxes"].dtype == torch.float32 and target["boxes"].shape == (n, 4)
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (n, h, w)
    assert target["iscrowd"].dtype == torch.bool and target["iscrowd"].shape == (n,)
    assert isinstance(target["image_id"], int) and len(target["orig_size"]) == 2
    if n:
        assert ((1 <= target["labels"]) & (target["labels"] <= num_classes)).all()
        assert target["masks"].flatten(1).any(1).all()  # no empty instance
        expected = masks_to_boxes(target["masks"]) + torch.tensor([0.0, 0.0, 1.0, 1.0])
        assert torch.equal(target["boxes"], expected)


def test_local_batches_give_model_inputs(tiny_shards):
    train = tiny_shards / "train"
    num_classes = category_map(train).num_classes
    sizes = image_sizes(train)
    seen, shapes = [], set()
    for images, targets in local_batches(train, JITTER, batch_size=4, augment=True, seed=0):
        assert isinstance(images, list) and len(images) == len(targets) <= 4
        for image, target in zip(images, targets):
            _check_target(image, target, num_classes)
            assert target["orig_size"] == sizes[target["image_id"]]
            assert max(image.shape[1:]) in JITTER.train_size
            shapes.add(tuple(image.shape))
            seen.append(target["image_id"])
    assert sorted(seen) == sorted(sizes)
    assert len(shapes) > 1  # variable sizes within the epoch, not padded


def _scene_row(width: int = 40, height: int = 30) -> dict:
    """An asymmetric scene: a white L on black, left of centre, and a 1-pixel object."""
    mask = np.zeros((height, width), np.uint8)
    mask[5:25, 4:10] = 1
    mask[19:25, 4:22] = 1
    dot = np.zeros_like(mask)
    dot[2, 35] = 1
    pixels = np.repeat(mask[:, :, None] * 255, 3, axis=2)
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=100)
    rles = [mask_utils.encode(np.asfortranarray(m))["counts"].decode() for m in (mask, dot)]
    return {
        "image_id": 7,
        "file_name": "scene.jpg",
        "image": buf.getvalue(),
        "orig_height": height,
        "orig_width": width,
        "height": height,
        "width": width,
        "labels": [2, 1],
        "boxes": [[4.0, 5.0, 22.0, 25.0], [35.0, 2.0, 36.0, 3.0]],
        "iscrowd": [False, True],
        "masks": rles,
        "ann_ids": [1, 2],
        "areas": [float(mask.sum()), 1.0],
    }


def _decode(row: dict, train_size=None, flip_prob=0.0, seed=0):
    table = pa.Table.from_pylist([row], schema=SHARD_SCHEMA)
    images, targets = collate(decode_batch(table, train_size, flip_prob, seed))
    return images[0], targets[0]


def test_batches_travel_as_uint8_and_packed_masks_and_become_the_models_inputs_on_the_device():
    """`collate_packed` (Ray Data's prefetch threads) keeps uint8 images and packed masks;
    `to_model_inputs` on the device gives exactly what the model took before: float images
    (x / 255 in float32) and the unpacked masks."""
    row = _scene_row()
    decoded = decode_batch(pa.Table.from_pylist([row, row], schema=SHARD_SCHEMA), [40], 1.0, 0)
    images, targets = collate_packed(decoded)
    (n, h, w) = targets[0]["mask_shape"]
    assert images[0].dtype == torch.uint8 and images[0].shape == (3, h, w)
    assert targets[0]["masks_packed"].dtype == torch.uint8
    assert targets[0]["masks_packed"].numel() == -(-n * h * w // 8)  # 1 bit per pixel
    model_images, model_targets = to_model_inputs(images, targets, "cpu")
    expected = np.multiply(images[0].numpy(), np.float32(1 / 255), dtype=np.float32)
    assert torch.equal(model_images[0], torch.from_numpy(expected))
    bits = np.unpackbits(targets[0]["masks_packed"].numpy(), count=n * h * w).reshape(n, h, w)
    assert torch.equal(model_targets[0]["masks"], torch.from_numpy(bits))
    assert "masks_packed" not in model_targets[0] and model_targets[0]["image_id"] == 7
    # what a GPU runs, here on the CPU: the same values
    as_float = images[0].to(torch.float32).mul_(float(np.float32(1 / 255)))
    assert torch.equal(as_float, model_images[0])
    assert torch.equal(
        unpack_masks(targets[0]["masks_packed"], (n, h, w)), model_targets[0]["masks"]
    )
    # odd bit counts: the padding of the last byte is dropped
    for shape in ((1, 3, 3), (3, 5, 7), (0, 4, 4)):
        mask = np.random.default_rng(0).random(shape) > 0.5
        packed = torch.from_numpy(np.packbits(mask))
        assert torch.equal(unpack_masks(packed, shape), torch.from_numpy(mask.astype(np.uint8)))


def test_flip_maps_pixel_x_to_width_minus_one_minus_x():
    row = _scene_row()
    image, target = _decode(row)
    flipped_image, flipped = _decode(row, train_size=[40], flip_prob=1.0)
    assert torch.equal(flipped_image, image.flip(-1))
    assert torch.equal(flipped["masks"], target["masks"].flip(-1))
    w = row["width"]
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    fys, fxs = torch.nonzero(flipped["masks"][0], as_tuple=True)
    assert set(zip(ys.tolist(), (w - 1 - xs).tolist())) == set(zip(fys.tolist(), fxs.tolist()))
    assert flipped["boxes"].tolist() == [[18.0, 5.0, 36.0, 25.0], [4.0, 2.0, 5.0, 3.0]]
    _check_target(flipped_image, flipped, num_classes=2)
    assert flipped["labels"].tolist() == [2, 1] and flipped["iscrowd"].tolist() == [False, True]


def test_scale_jitter_keeps_image_masks_and_boxes_aligned():
    row = _scene_row()
    for longer, flip in ((80, 1.0), (60, 0.0), (100, 1.0)):
        image, target = _decode(row, train_size=[longer], flip_prob=flip)
        assert max(image.shape[1:]) == longer
        _check_target(image, target, num_classes=2)
        bright = image[0] > 0.5
        mask = target["masks"][0].bool()
        iou = (bright & mask).sum() / (bright | mask).sum()
        assert iou > 0.9, (longer, iou)


def test_instances_vanishing_under_downscale_are_dropped_consistently():
    image, target = _decode(_scene_row(), train_size=[10])  # 40x30 -> 10x8: the dot vanishes
    assert image.shape == (3, 8, 10)
    assert target["labels"].tolist() == [2] and target["iscrowd"].tolist() == [False]
    assert target["masks"].shape == (1, 8, 10)
    _check_target(image, target, num_classes=2)


def test_seeded_augmentation_is_reproducible_and_unseeded_varies(tiny_shards):
    train = tiny_shards / "train"

    def epoch(seed):
        out = {}
        for images, targets in local_batches(train, JITTER, 4, augment=True, seed=seed):
            for image, target in zip(images, targets):
                out[target["image_id"]] = (tuple(image.shape), float(image[0, 0, 0]))
        return out

    assert epoch(1) == epoch(1)
    assert epoch(None) != epoch(None)


def test_ray_data_path_matches_local_decoding(tiny_shards):
    train = tiny_shards / "train"
    local = {
        t["image_id"]: (i, t)
        for images, targets in local_batches(train, JITTER, 4, augment=False)
        for i, t in zip(images, targets)
    }
    via_ray = {
        t["image_id"]: (i, t)
        for images, targets in local_batches(train, JITTER, 4, augment=False, use_ray=True)
        for i, t in zip(images, targets)
    }
    assert local.keys() == via_ray.keys()
    for image_id, (image, target) in local.items():
        other_image, other = via_ray[image_id]
        assert torch.equal(image, other_image)
        for key in ("labels", "boxes", "masks", "iscrowd"):
            assert torch.equal(target[key], other[key]), key


@pytest.mark.parametrize("cache_mb,survives", [(1024.0, True), (0.0, False)])
def test_small_shards_are_read_once_and_kept_across_epochs(
    ray_session, tiny_shards, tmp_path, cache_mb, survives
):
    """Cached shards: later epochs decode the kept rows, so they no longer need the files."""
    import shutil

    import ray

    copy = tmp_path / "train"
    shutil.copytree(tiny_shards / "train", copy)
    cfg = DataConfig(train_size=[64], flip_prob=0.5, cache_shards_mb=cache_mb)
    dataset = training_dataset(copy, cfg, seed=None)
    first = sorted(row["image_id"] for row in dataset.iter_rows())
    assert len(first) == 12  # tiny_coco's train split, every image
    for shard in copy.glob("shard-*.parquet"):
        shard.unlink()
    if survives:
        assert sorted(row["image_id"] for row in dataset.iter_rows()) == first
    else:
        with pytest.raises((ray.exceptions.RayError, OSError, FileNotFoundError)):
            list(dataset.iter_rows())


@pytest.mark.slow
def test_torch_trainer_worker_sees_every_image(ray_session, tiny_shards, tmp_path):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    def count_images_loop(config: dict) -> None:
        """Ray Train loop: pull every batch of this worker's shard, report what it saw.
        (Defined here so that cloudpickle ships it by value: tests are not a package.)"""
        import json
        import tempfile
        from pathlib import Path

        import ray.train
        import torch

        from pipeline.reader import iter_model_batches

        shard = ray.train.get_dataset_shard("train")
        ids, instances = [], 0
        for images, targets in iter_model_batches(shard, batch_size=config["batch_size"]):
            assert all(i.dtype == torch.float32 and i.dim() == 3 for i in images)
            ids += [t["image_id"] for t in targets]
            instances += sum(len(t["labels"]) for t in targets)
        with tempfile.TemporaryDirectory() as tmp:
            Path(tmp, "seen.json").write_text(json.dumps({"ids": ids, "instances": instances}))
            ray.train.report(
                {"images": len(ids), "instances": instances},
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
            )

    train = tiny_shards / "train"
    trainer = TorchTrainer(
        count_images_loop,
        train_loop_config={"batch_size": 4},
        scaling_config=ScalingConfig(num_workers=1, use_gpu=False),
        datasets={"train": training_dataset(train, JITTER, seed=None)},
        run_config=RunConfig(storage_path=str(tmp_path), name="reader"),
    )
    result = trainer.fit()
    with result.checkpoint.as_directory() as ckpt:
        seen = json.loads(Path(ckpt, "seen.json").read_text())
    assert sorted(seen["ids"]) == sorted(image_sizes(train))  # every image exactly once
    assert result.metrics["images"] == len(image_sizes(train))
    assert seen["instances"] > 0
