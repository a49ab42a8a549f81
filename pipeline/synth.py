"""Crowded-scenes generator: the project's embedded default COCO-format dataset.

Images of overlapping shapes (disc, square, triangle, ring, star) on textured, noisy
backgrounds. Objects are painted in order, later ones on top, and each annotation is the
*visible* part of its object, so occluded objects get partial and sometimes split masks.
Simple visible parts are written as polygons, split or holed ones (every ring) as
compressed RLE, and a few crowd regions as uncompressed RLE with ``iscrowd=1``, as COCO
does. Category ids have gaps (1, 2, 4, 7, 9) to exercise contiguous-id mapping.

Every non-crowd annotation also carries ``visible_fraction``: its visible pixels over the
pixels of the full (amodal) shape inside the image, rounded to 4 decimals; 1.0 for an
unoccluded object. COCO readers ignore the extra field; evaluation bins recall by it.

Image ``k`` depends only on ``(seed, k)``, ``size`` and the scene: generating more images
appends to the dataset without changing the earlier ones.

Scenes (``scene=``):

- ``shapes`` (the default): shapes mostly placed at random, 12% against a neighbour.
- ``crowd``: dense packs of one class each (the setting of the paper's Fig. 1): every pack
  member is placed overlapping an earlier member, so centres hide behind neighbours and
  about half of the objects are under half visible. Annotations are visible parts, as COCO's.
- ``amodal``: the very same images as ``crowd``, each object annotated with its full extent
  (an amodal mask, as KINS and COCO-Amodal annotate), so true instances overlap and
  mask-IoU NMS can suppress real objects.

``scene_statistics`` measures what a scene holds: objects per image, the share under half
visible, and how much true instances overlap (pairwise mask IoU).
"""

from __future__ import annotations

import colorsys
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from pipeline.coco import to_rle

logger = logging.getLogger(__name__)

CATEGORIES: tuple[dict[str, Any], ...] = (
    {"id": 1, "name": "disc", "supercategory": "shape"},
    {"id": 2, "name": "square", "supercategory": "shape"},
    {"id": 4, "name": "triangle", "supercategory": "shape"},
    {"id": 7, "name": "ring", "supercategory": "shape"},
    {"id": 9, "name": "star", "supercategory": "shape"},
)
"""COCO categories of the generated data; the ids have gaps on purpose."""

SPLITS = ("train", "val")
SCENES = ("shapes", "crowd", "amodal")
"""Generator scenes (see the module docstring); "shapes" is the original."""
GENERATOR_VERSION = "2"
"""Written as ``info.version``; "2" added ``visible_fraction`` (images and other fields as in
"1"), so a cached dataset of an older version is regenerated (`is_current`)."""
MIN_VISIBLE_AREA = 12
"""Instances whose visible part has fewer pixels than this are not annotated."""

_P_EMPTY = 0.03  # share of images without any object
_P_CROWD = 0.03  # share of non-empty images with one iscrowd region
MAX_OBJECTS = 20  # default bound on the objects per image
_P_NEIGHBOUR = 0.12  # an object is placed against an earlier one (else uniformly)
_P_SAME_CLASS = 0.6  # ... and then takes that neighbour's class
# sqrt(area) ranges at size 256 for COCO's small / medium / large (32**2, 96**2 limits),
# scaled linearly with the image size, and how often each is drawn.
_SIZE_BINS = ((10.0, 28.0), (32.0, 52.0), (100.0, 128.0))
_SIZE_BIN_P = (0.6, 0.37, 0.03)
_POLYGON_MIN_IOU = 0.9
# crowd / amodal scenes: packs per image, each member's sqrt(area) range at size 256, and
# how far a new member sits from the member it is placed against, in sums of radii
_PACKS = (1, 3)
_PACK_SQRT_AREA = (22.0, 44.0)
_PACK_DISTANCE = (0.3, 0.7)
_P_LONER = 0.1  # share of a crowd scene's objects placed alone, anywhere
_JPEG_QUALITY = 95


@dataclass
class _Shape:
    """One painted shape: its outline polygon(s) in image coordinates and its mask."""

    category_id: int
    polygon: list[float]  # x0, y0, x1, y1, ... (the outer outline)
    radius: float
    center: tuple[float, float]
    mask: np.ndarray  # H x W bool, the full (amodal) shape
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 (exclusive) of the mask, in image
    area: int  # pixels of the full shape
    inside: bool  # the outline lies within the image
    pack: list | None = None  # crowd scenes: the pack it belongs to


def make_dataset(
    out_dir: str | os.PathLike,
    images: int = 400,
    size: int = 256,
    seed: int = 0,
    val_fraction: float = 0.2,
    object_scale: float = 1.0,
    max_objects: int = MAX_OBJECTS,
    scene: str = "shapes",
) -> dict[str, Any]:
    """Write the crowded-shapes dataset as COCO ``train`` and ``val`` splits under ``out_dir``.

    ``object_scale`` multiplies every object's size (1.0: sizes scale with the image as at
    256 px, where a third of the objects are COCO-medium); ``max_objects`` bounds the objects
    per image (each image draws 1..max_objects; crowd scenes max_objects/2..max_objects).
    ``scene``: one of ``SCENES`` (module docstring). The defaults are the original scenes.

    Layout per split: ``<split>/annotations.json`` and ``<split>/images/*.jpg``; existing
    split folders are replaced. Every ``1/val_fraction``-th image (by index) goes to val,
    so an image keeps its split when ``images`` grows. Returns a summary with the paths
    and counts per split.
    """
    if images < 0:
        raise ValueError(f"images must be >= 0, got {images}")
    if size < 32:
        raise ValueError(f"size must be >= 32 pixels, got {size}")
    if not 0.0 <= val_fraction <= 1.0:
        raise ValueError(f"val_fraction must be within [0, 1], got {val_fraction}")
    if object_scale <= 0:
        raise ValueError(f"object_scale must be > 0, got {object_scale}")
    if max_objects < 1:
        raise ValueError(f"max_objects must be >= 1, got {max_objects}")
    if scene not in SCENES:
        raise ValueError(f"scene must be one of {', '.join(SCENES)}, got {scene!r}")
    out = Path(out_dir)
    split_of = [_split_of(k, val_fraction) for k in range(images)]
    summary: dict[str, Any] = {"out_dir": str(out), "size": size, "seed": seed, "splits": {}}
    overlapped = drawn = 0
    for split in SPLITS:
        split_dir = out / split
        if split_dir.exists():
            shutil.rmtree(split_dir)
        (split_dir / "images").mkdir(parents=True)
        coco: dict[str, Any] = {
            "info": {
                "description": f"PEP crowded shapes (synthetic), split {split}",
                "version": GENERATOR_VERSION,
                "size": size,
                "seed": seed,
                "object_scale": object_scale,
                "max_objects": max_objects,
                "scene": scene,
            },
            "licenses": [],
            "categories": [dict(c) for c in CATEGORIES],
            "images": [],
            "annotations": [],
        }
        empty = crowd = 0
        for index in (k for k in range(images) if split_of[k] == split):
            image_id = index + 1
            file_name = f"{image_id:06d}.jpg"
            pixels, anns, stats = render_image(
                index,
                size=size,
                seed=seed,
                object_scale=object_scale,
                max_objects=max_objects,
                scene=scene,
            )
            Image.fromarray(pixels).save(
                split_dir / "images" / file_name, quality=_JPEG_QUALITY, subsampling=0
            )
            coco["images"].append(
                {"id": image_id, "file_name": file_name, "width": size, "height": size}
            )
            for j, ann in enumerate(anns):
                # ids stay the same whatever the number of images (< 100 objects per image)
                coco["annotations"].append(
                    {"id": image_id * 100 + j + 1, "image_id": image_id, **ann}
                )
            empty += not anns
            crowd += sum(a["iscrowd"] for a in anns)
            overlapped += stats["overlapped"]
            drawn += stats["drawn"]
        ann_path = split_dir / "annotations.json"
        tmp = ann_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(coco))
        os.replace(tmp, ann_path)
        summary["splits"][split] = {
            "annotations": str(ann_path),
            "images_dir": str(split_dir / "images"),
            "images": len(coco["images"]),
            "instances": len(coco["annotations"]) - crowd,
            "crowd_regions": crowd,
            "empty_images": empty,
            "statistics": scene_statistics(coco),
        }
    summary["overlap_fraction"] = overlapped / drawn if drawn else 0.0
    logger.info(
        "wrote %d synthetic images to %s (%s)",
        images,
        out,
        ", ".join(
            f"{s}: {v['images']} images, {v['instances']} instances"
            for s, v in summary["splits"].items()
        ),
    )
    return summary


def is_current(out_dir: str | os.PathLike) -> bool:
    """Whether ``out_dir`` holds both splits as this version of the generator writes them."""
    for split in SPLITS:
        path = Path(out_dir) / split / "annotations.json"
        try:
            info = json.loads(path.read_text()).get("info", {})
        except (FileNotFoundError, json.JSONDecodeError, UnicodeDecodeError):
            return False
        if info.get("version") != GENERATOR_VERSION:
            return False
    return True


def _split_of(index: int, val_fraction: float) -> str:
    """``val`` for every ``1/val_fraction``-th index, independent of the dataset size."""
    step = int((index + 1) * val_fraction + 1e-9) - int(index * val_fraction + 1e-9)
    return "val" if step > 0 else "train"


def render_image(
    index: int,
    size: int = 256,
    seed: int = 0,
    object_scale: float = 1.0,
    max_objects: int = MAX_OBJECTS,
    scene: str = "shapes",
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, int]]:
    """Draw image ``index`` of the dataset seeded with ``seed``.

    Returns the H x W x 3 uint8 pixels, the COCO annotations without ``id``/``image_id``
    (visible parts of the objects, in drawing order, crowd region first; each object's with
    its ``visible_fraction``), and counts of
    drawn objects and of those whose shape overlaps another's (``drawn``, ``overlapped``).
    """
    if scene != "shapes":
        return _render_crowd(index, size, seed, object_scale, max_objects, amodal=scene == "amodal")
    rng = np.random.default_rng([seed, index])
    scale = size / 256.0 * object_scale
    pixels = _background(rng, size)  # H x W x 3 float
    owner = np.full((size, size), -1, dtype=np.int32)  # index of the shape seen at a pixel
    shapes: list[_Shape] = []

    n_objects = 0 if rng.random() < _P_EMPTY else int(rng.integers(1, max_objects + 1))
    crowd_members: list[int] = []
    if n_objects and rng.random() < _P_CROWD:
        crowd_members = _paint_crowd(rng, size, scale, pixels, owner, shapes)
    first_object = len(shapes)
    objects: list[_Shape] = []
    for _ in range(n_objects):
        shape = _random_shape(rng, size, scale, objects)
        if shape is not None:
            objects.append(shape)
    # large objects go on top, so that some of them stay large once occlusion is applied
    large = (96.0 * scale) ** 2
    objects.sort(key=lambda shape: shape.area >= large)
    overlapping: set[int] = set()
    for shape in objects:
        j = len(shapes)
        x0, y0, x1, y1 = shape.box
        below = owner[y0:y1, x0:x1][shape.mask[y0:y1, x0:x1]]
        hit = {int(o) for o in np.unique(below) if o >= first_object}
        if hit:
            overlapping |= hit | {j}
        shapes.append(shape)
        _paint(rng, pixels, owner, shape, j)

    pixels += rng.normal(0.0, rng.uniform(2.0, 7.0), size=pixels.shape)  # sensor noise
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)

    anns: list[dict[str, Any]] = []
    if crowd_members:
        visible = np.isin(owner, crowd_members)
        if visible.sum() >= 4 * MIN_VISIBLE_AREA:
            anns.append(_crowd_annotation(visible, shapes[crowd_members[0]].category_id))
    for j in range(first_object, len(shapes)):
        ann = _instance_annotation(shapes[j], owner == j)
        if ann is not None:
            anns.append(ann)
    stats = {"drawn": len(shapes) - first_object, "overlapped": len(overlapping)}
    return pixels, anns, stats


def _render_crowd(
    index: int, size: int, seed: int, object_scale: float, max_objects: int, amodal: bool
) -> tuple[np.ndarray, list[dict[str, Any]], dict[str, int]]:
    """`render_image` of the crowd and amodal scenes: one drawing, two annotations."""
    rng = np.random.default_rng([seed, index, 1])  # a stream of its own: "shapes" unchanged
    scale = size / 256.0 * object_scale
    pixels = _background(rng, size)
    owner = np.full((size, size), -1, dtype=np.int32)
    n_objects = int(rng.integers(max(1, max_objects // 2), max_objects + 1))
    n_loners = int(rng.binomial(n_objects, _P_LONER))
    packs = [[] for _ in range(int(rng.integers(_PACKS[0], _PACKS[1] + 1)))]
    shapes: list[_Shape] = []
    for k in range(n_objects):
        if k < n_loners:
            shape = _random_shape(rng, size, scale, [], p_neighbour=0.0)
        else:
            shape = _pack_member(rng, size, scale, packs[k % len(packs)])
        if shape is not None:
            shapes.append(shape)
    rng.shuffle(shapes)  # drawing order: any member may hide any other
    colours = {}  # one hue per class and pack, jittered per object: look-alike neighbours
    for j, shape in enumerate(shapes):
        group = id(shape.pack) if shape.pack is not None else id(shape)  # a loner: its own
        base = colours.setdefault(group, _random_colour(rng))
        _paint(rng, pixels, owner, shape, j, np.clip(base + rng.normal(0, 18, 3), 0, 255))
    pixels += rng.normal(0.0, rng.uniform(2.0, 7.0), size=pixels.shape)
    pixels = np.clip(pixels, 0, 255).astype(np.uint8)
    anns = []
    overlapping = 0
    for j, shape in enumerate(shapes):
        visible = owner == j
        ann = _instance_annotation(shape, visible, shape.mask if amodal else None)
        if ann is not None:
            anns.append(ann)
        overlapping += int(visible.sum()) < shape.area
    return pixels, anns, {"drawn": len(shapes), "overlapped": overlapping}


def _pack_member(
    rng: np.random.Generator, size: int, scale: float, pack: list[_Shape]
) -> _Shape | None:
    """A shape of the pack's class and size, overlapping a random earlier member (the
    first one anywhere); appended to `pack`."""
    low, high = _PACK_SQRT_AREA
    if not pack:
        category_id = int(CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"])
        sqrt_area = float(np.exp(rng.uniform(np.log(low), np.log(high)))) * scale
        center = (float(rng.uniform(0.15, 0.85) * size), float(rng.uniform(0.15, 0.85) * size))
    else:
        category_id = pack[0].category_id
        sqrt_area = np.sqrt(pack[0].area) * float(rng.uniform(0.8, 1.25))
        anchor = pack[int(rng.integers(len(pack)))]
        angle = rng.uniform(0, 2 * np.pi)
        distance = (anchor.radius + sqrt_area / np.sqrt(np.pi)) * rng.uniform(*_PACK_DISTANCE)
        center = (
            float(np.clip(anchor.center[0] + distance * np.cos(angle), 0, size)),
            float(np.clip(anchor.center[1] + distance * np.sin(angle), 0, size)),
        )
    shape = _make_shape(
        category_id, center, max(4.0, sqrt_area), rng.uniform(0, 2 * np.pi), rng, size
    )
    if shape is not None:
        shape.pack = pack
        pack.append(shape)
    return shape


# ----------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, size: int) -> np.ndarray:
    """A dim, low-saturation texture: smooth blotches plus optional stripes."""
    hue, sat, val = rng.random(), rng.uniform(0.0, 0.35), rng.uniform(0.15, 0.45)
    base = np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255.0
    cells = int(rng.integers(3, 9))
    # mostly brightness, a little hue
    blotches = rng.uniform(-25.0, 25.0, size=(cells, cells, 1)) + rng.uniform(
        -8.0, 8.0, size=(cells, cells, 3)
    )
    blotches = Image.fromarray(np.uint8(blotches + 128.0)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    pixels = base + np.asarray(blotches, dtype=np.float32) - 128.0
    if rng.random() < 0.5:
        yy, xx = np.mgrid[0:size, 0:size]
        angle, period = rng.uniform(0, np.pi), rng.uniform(4.0, 16.0)
        phase = (xx * np.cos(angle) + yy * np.sin(angle)) * (2 * np.pi / period)
        pixels += rng.uniform(4.0, 12.0) * np.sin(phase)[..., None]
    return pixels.astype(np.float64)


def _unit_outline(category_id: int, rng: np.random.Generator, radius: float) -> np.ndarray:
    """Outline of a shape with circumradius 1 (K x 2), before rotation and scaling."""
    if category_id in (1, 7):  # disc, ring: a slightly elliptic circle
        k = int(np.clip(radius * 1.5, 16, 64))
        t = np.linspace(0, 2 * np.pi, k, endpoint=False)
        return np.stack([np.cos(t), rng.uniform(0.8, 1.0) * np.sin(t)], axis=1)
    if category_id == 2:  # square
        t = np.pi / 4 + np.arange(4) * np.pi / 2
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    if category_id == 4:  # triangle
        t = np.pi / 2 + np.arange(3) * 2 * np.pi / 3
        return np.stack([np.cos(t), np.sin(t)], axis=1)
    t = np.pi / 2 + np.arange(10) * np.pi / 5  # star: 5 points, inner radius 0.45
    r = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _shoelace(points: np.ndarray) -> float:
    x, y = points[:, 0], points[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def _rasterize(polygon: list[float], size: int) -> np.ndarray:
    """H x W bool mask of a polygon, rasterised exactly as pycocotools reads it back."""
    rle = mask_utils.frPyObjects([polygon], size, size)
    return mask_utils.decode(rle)[..., 0].astype(bool)


def _make_shape(
    category_id: int,
    center: tuple[float, float],
    sqrt_area: float,
    rotation: float,
    rng: np.random.Generator,
    size: int,
) -> _Shape | None:
    """Place a shape of ``sqrt_area`` (full area, before occlusion) and rasterise it."""
    # circumradius giving the requested area: area = unit_area * radius**2
    probe = _unit_outline(category_id, rng, sqrt_area)
    hole = rng.uniform(0.5, 0.65) if category_id == 7 else 0.0
    unit_area = _shoelace(probe) * (1.0 - hole**2)
    radius = sqrt_area / np.sqrt(unit_area)
    cos, sin = np.cos(rotation), np.sin(rotation)
    rot = np.array([[cos, -sin], [sin, cos]])
    outline = probe @ rot.T * radius + np.asarray(center)
    outline = np.round(outline, 2)  # what goes into the JSON is what gets painted
    polygon = [float(v) for v in outline.ravel()]
    mask = _rasterize(polygon, size)
    if hole:
        inner = np.round(probe @ rot.T * radius * hole + np.asarray(center), 2)
        mask &= ~_rasterize([float(v) for v in inner.ravel()], size)
    rows, cols = np.any(mask, axis=1), np.any(mask, axis=0)
    if not rows.any():
        return None
    y0, y1 = np.flatnonzero(rows)[[0, -1]]
    x0, x1 = np.flatnonzero(cols)[[0, -1]]
    inside = bool(outline.min() >= 0 and outline.max() <= size)
    box = (int(x0), int(y0), int(x1) + 1, int(y1) + 1)
    return _Shape(category_id, polygon, radius, center, mask, box, int(mask.sum()), inside)


def _random_shape(
    rng: np.random.Generator,
    size: int,
    scale: float,
    placed: list[_Shape],
    p_neighbour: float = _P_NEIGHBOUR,
) -> _Shape | None:
    """A random shape, either anywhere or touching/overlapping an earlier one."""
    category_id = int(CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"])
    low, high = _SIZE_BINS[int(rng.choice(len(_SIZE_BINS), p=_SIZE_BIN_P))]
    sqrt_area = max(4.0, float(np.exp(rng.uniform(np.log(low), np.log(high)))) * scale)
    rough_radius = sqrt_area / np.sqrt(np.pi)
    if placed and rng.random() < p_neighbour:
        neighbour = placed[int(rng.integers(len(placed)))]
        if rng.random() < _P_SAME_CLASS:
            category_id = neighbour.category_id
        angle = rng.uniform(0, 2 * np.pi)
        distance = (neighbour.radius + rough_radius) * rng.uniform(0.6, 1.05)
        cx = neighbour.center[0] + distance * np.cos(angle)
        cy = neighbour.center[1] + distance * np.sin(angle)
        center = (float(np.clip(cx, 0, size)), float(np.clip(cy, 0, size)))
    else:
        center = (float(rng.uniform(0, size)), float(rng.uniform(0, size)))
    return _make_shape(category_id, center, sqrt_area, rng.uniform(0, 2 * np.pi), rng, size)


def _random_colour(rng: np.random.Generator) -> np.ndarray:
    hue, sat, val = rng.random(), rng.uniform(0.45, 1.0), rng.uniform(0.6, 1.0)
    return np.array(colorsys.hsv_to_rgb(hue, sat, val)) * 255.0


def _paint(
    rng: np.random.Generator,
    pixels: np.ndarray,
    owner: np.ndarray,
    shape: _Shape,
    index: int,
    colour: np.ndarray | None = None,
) -> None:
    """Paint a shape over everything drawn so far: shaded fill with a darker rim."""
    colour = _random_colour(rng) if colour is None else colour
    x0, y0, x1, y1 = shape.box
    mask = shape.mask[y0:y1, x0:x1]
    yy, xx = np.mgrid[y0:y1, x0:x1]
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (xx - shape.center[0]) * np.cos(angle) + (yy - shape.center[1]) * np.sin(angle)
    shade = 1.0 + 0.18 * ramp / max(shape.radius, 1.0)  # h x w
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    shade = np.where(mask & ~interior, 0.55, shade)
    patch = pixels[y0:y1, x0:x1]
    patch[mask] = (shade[..., None] * colour)[mask]
    owner[y0:y1, x0:x1][mask] = index


def _paint_crowd(
    rng: np.random.Generator,
    size: int,
    scale: float,
    pixels: np.ndarray,
    owner: np.ndarray,
    shapes: list[_Shape],
) -> list[int]:
    """Paint a dense cluster of tiny shapes of one class; return their shape indices."""
    category_id = int(CATEGORIES[int(rng.integers(len(CATEGORIES)))]["id"])
    colour = _random_colour(rng)
    cx, cy = rng.uniform(0.2, 0.8, size=2) * size
    spread = rng.uniform(0.08, 0.15) * size
    members = []
    for _ in range(int(rng.integers(15, 35))):
        r = spread * np.sqrt(rng.random())
        t = rng.uniform(0, 2 * np.pi)
        center = (float(cx + r * np.cos(t)), float(cy + r * np.sin(t)))
        sqrt_area = max(3.0, rng.uniform(5.0, 9.0) * scale)
        shape = _make_shape(category_id, center, sqrt_area, rng.uniform(0, 2 * np.pi), rng, size)
        if shape is None:
            continue
        members.append(len(shapes))
        shapes.append(shape)
        jitter = np.clip(colour + rng.normal(0.0, 15.0, size=3), 0, 255)
        _paint(rng, pixels, owner, shape, members[-1], colour=jitter)
    return members


# ------------------------------------------------------------------------- statistics


def scene_statistics(coco: dict[str, Any]) -> dict[str, float]:
    """What a generated split holds, from its COCO dict (crowd regions left out):
    objects per image (mean, max); the share of objects under half visible; the share that
    touch or overlap an object of their own class (masks 1 px apart at most); and how much
    true instances overlap: the share whose mask IoU with another instance reaches 0.2 and
    0.5, and the mean of each object's highest IoU with another."""
    sizes = {image["id"]: (image["height"], image["width"]) for image in coco["images"]}
    per_image: dict[int, list[dict[str, Any]]] = {image_id: [] for image_id in sizes}
    for ann in coco["annotations"]:
        if not ann.get("iscrowd"):
            per_image[ann["image_id"]].append(ann)
    counts = [len(anns) for anns in per_image.values()]
    objects = sum(counts)
    hidden = touching = iou_02 = iou_05 = 0
    best_ious = []
    for image_id, anns in per_image.items():
        hidden += sum(ann.get("visible_fraction", 1.0) < 0.5 for ann in anns)
        if len(anns) < 2:
            best_ious += [0.0] * len(anns)
            continue
        h, w = sizes[image_id]
        rles = [to_rle(ann["segmentation"], h, w) for ann in anns]
        iou = mask_utils.iou(rles, rles, [0] * len(rles))  # N x N
        np.fill_diagonal(iou, 0.0)
        best = iou.max(axis=1)
        best_ious += best.tolist()
        iou_02 += int((best >= 0.2).sum())
        iou_05 += int((best >= 0.5).sum())
        masks = mask_utils.decode(rles).transpose(2, 0, 1).astype(bool)  # N x H x W
        grown = np.pad(masks, ((0, 0), (1, 1), (1, 1)))
        grown = (
            grown[:, 1:-1, 1:-1] | grown[:, :-2, 1:-1] | grown[:, 2:, 1:-1]
            | grown[:, 1:-1, :-2] | grown[:, 1:-1, 2:]
        )  # fmt: skip
        meets = grown.reshape(len(anns), -1).astype(np.float32) @ masks.reshape(
            len(anns), -1
        ).T.astype(np.float32)  # N x N: pixels of j within 1 px of i
        np.fill_diagonal(meets, 0.0)
        labels = np.array([ann["category_id"] for ann in anns])
        touching += int(((meets > 0) & (labels[:, None] == labels[None, :])).any(axis=1).sum())
    share = (lambda n: round(n / objects, 4)) if objects else (lambda n: 0.0)
    return {
        "objects_per_image": round(objects / len(counts), 2) if counts else 0.0,
        "max_objects_per_image": max(counts, default=0),
        "under_half_visible": share(hidden),
        "touching_same_class": share(touching),
        "iou_ge_0.2": share(iou_02),
        "iou_ge_0.5": share(iou_05),
        "mean_best_iou": round(float(np.mean(best_ious)), 4) if best_ious else 0.0,
    }


# ------------------------------------------------------------------------- annotations


def _box_of(mask: np.ndarray) -> list[float]:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [
        float(cols[0]),
        float(rows[0]),
        float(cols[-1] - cols[0] + 1),
        float(rows[-1] - rows[0] + 1),
    ]


def _instance_annotation(
    shape: _Shape, visible: np.ndarray, amodal: np.ndarray | None = None
) -> dict[str, Any] | None:
    """COCO annotation of a shape's visible part, or of its full extent (`amodal`, the
    shape's mask inside the image); None when too little of it shows."""
    visible_area = int(visible.sum())
    if visible_area < MIN_VISIBLE_AREA:
        return None
    visible_fraction = round(visible_area / shape.area, 4)
    if amodal is not None:
        visible = amodal
    area = int(visible.sum())
    x0, y0, x1, y1 = shape.box
    segmentation: Any = None
    if shape.inside and area == shape.area and shape.category_id != 7:
        segmentation = [shape.polygon]  # unoccluded: the outline it was painted from
    else:
        outline = trace_outline(visible[y0:y1, x0:x1])
        if outline is not None:
            outline = outline + np.array([x0, y0])
            segmentation = [[float(v) for v in outline.ravel()]]
    if segmentation is not None and _polygon_iou(segmentation, visible) < _POLYGON_MIN_IOU:
        segmentation = None
    if segmentation is None:
        rle = mask_utils.encode(np.asfortranarray(visible.astype(np.uint8)))
        segmentation = {"size": [int(s) for s in rle["size"]], "counts": rle["counts"].decode()}
    return {
        "category_id": shape.category_id,
        "segmentation": segmentation,
        "area": float(area),
        "bbox": _box_of(visible),
        "iscrowd": 0,
        # visible pixels / pixels of the full shape as rasterised inside the image
        "visible_fraction": visible_fraction,
    }


def _polygon_iou(polygons: list[list[float]], mask: np.ndarray) -> float:
    h, w = mask.shape
    drawn = mask_utils.merge(mask_utils.frPyObjects(polygons, h, w))
    truth = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    return float(mask_utils.iou([drawn], [truth], [0])[0, 0])


def _crowd_annotation(visible: np.ndarray, category_id: int) -> dict[str, Any]:
    """An ``iscrowd=1`` region as uncompressed RLE (column-major run lengths from 0s)."""
    flat = visible.ravel(order="F").astype(np.int8)
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0]:
        counts.insert(0, 0)
    return {
        "category_id": category_id,
        "segmentation": {"size": list(visible.shape), "counts": [int(c) for c in counts]},
        "area": float(visible.sum()),
        "bbox": _box_of(visible),
        "iscrowd": 1,
    }


def trace_outline(mask: np.ndarray) -> np.ndarray | None:
    """Pixel-edge outline (K x 2 corner points, x y) of a mask that is a single
    4-connected region without holes or pinch points; None for any other mask.

    The outline rasterises back (pycocotools) to exactly the mask.
    """
    p = np.pad(mask.astype(bool), 1)
    inside = p[1:-1, 1:-1]
    starts, ends = [], []
    # boundary edges between an inside pixel (r, c) and an outside neighbour, walked
    # clockwise on screen; corners are (x, y) = (c, r) .. (c + 1, r + 1)
    for outside, (sx, sy, ex, ey) in (
        (~p[:-2, 1:-1], (0, 0, 1, 0)),  # top
        (~p[1:-1, 2:], (1, 0, 1, 1)),  # right
        (~p[2:, 1:-1], (1, 1, 0, 1)),  # bottom
        (~p[1:-1, :-2], (0, 1, 0, 0)),  # left
    ):
        r, c = np.nonzero(inside & outside)
        starts.append(np.stack([c + sx, r + sy], axis=1))
        ends.append(np.stack([c + ex, r + ey], axis=1))
    start, end = np.concatenate(starts), np.concatenate(ends)  # E x 2
    n = len(start)
    if n == 0:
        return None
    width = mask.shape[1] + 2
    start_key = start[:, 1] * width + start[:, 0]
    end_key = end[:, 1] * width + end[:, 0]
    order = np.argsort(start_key, kind="stable")
    sorted_keys = start_key[order]
    if np.any(sorted_keys[1:] == sorted_keys[:-1]):
        return None  # two regions touch at a corner
    successor = order[np.searchsorted(sorted_keys, end_key)].tolist()
    walk = [0]
    edge = successor[0]
    while edge != 0:
        walk.append(edge)
        edge = successor[edge]
    if len(walk) != n:
        return None  # several loops: split parts or holes
    corners = start[walk]
    step = np.roll(corners, -1, axis=0) - corners
    turn = np.any(step != np.roll(step, 1, axis=0), axis=1)
    return corners[turn]
