"""GPU check, Ray-free: the model tests on the GPU, PEP vs Mask R-CNN speed, a short nuclei run.

For a GPU machine lent for a few minutes: one H100 with PyTorch, torchvision, pyarrow, PyYAML
and pytest, but no Ray, MLflow or pycocotools and nothing to download. This script imports
neither Ray nor MLflow (nor anything of pipeline/ that does), and prints one markdown table.

Before (here, with Ray; skip if `jobs/train_pep.py --config configs/nuclei.yaml --data
../shared/data/nuclei` already wrote them): the nuclei shards, 6.5 MB, carried along.

    for s in train val; do .venv/bin/python jobs/prepare_coco.py --max-size 256 \\
        --annotations ../shared/data/nuclei/$s/annotations.json \\
        --images ../shared/data/nuclei/$s/images --out work/shards/nuclei-256/$s; done

On the GPU machine (the device tool's `run`, carry ["work/shards/nuclei-256"], timeout 600):

    PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py --out $OUT 2>&1 | tee $OUT/log.txt

After (here, with pycocotools): the AP of the predictions it wrote.

    .venv/bin/python benchmarks/gpu_check.py --score OUT/nuclei_val_results.json

Smoke test on the CPU, every part at toy size in about 20 s (tests/benchmarks/test_gpu_check.py
runs it with Ray, MLflow and pycocotools made unimportable; on the GPU machine, `--tiny` is a
30-second rehearsal):

    python benchmarks/gpu_check.py --tiny        # --device cpu is the default without a GPU

Parts, each with its own limit, scaled from CPU timings (in parentheses) so that the whole run
stays under 8 minutes on an H100 (start-up ~20 s + tests <= 120 s + speed <= 120 s and the
row in flight + nuclei 150 s and ~30 s to predict: <= 7.5 min, 5-6 min expected). A part that
fails becomes an `error:` row, the others still run, and the exit status is 1:

1. tests: `pytest tests/pep_model` in a subprocess with PEP_TEST_DEVICE=cuda (the test
   modules build on that device, see tests/pep_model/conftest.py), AMP included
   (test_amp.py: autocast + GradScaler). Files importing Ray or MLflow, or a package that is
   not installed, are left out and named (there: test_overfit.py, for pycocotools).
   Limit 120 s (98 tests in 14 s on the 2-core CPU).
2. speed: bench_model.py's PEP (excavate+purify), PEP Baseline and torchvision Mask R-CNN,
   ResNet-50-FPN, random init, 2 random 800x1333 images with 8 rectangles each (Mask R-CNN's
   transform at its defaults 800/1333 leaves them as they are): train step and inference,
   fp32 (PyTorch's defaults: TF32 convolutions) and AMP (autocast float16 + GradScaler),
   median of 10 after 2 warm-ups, CUDA-synchronised. Rows not started within 120 s are
   skipped (CPU: 10 s per PEP train step at 2 x 512x512, BENCHMARKS.md; 4x the pixels here).
3. nuclei: configs/nuclei.yaml trained from the shards for 150 s (the whole epochs that fit,
   planned after the first, its lr milestone at the same fraction; the recipe's 15 epochs
   take 22 min on the CPU), AMP per `train.amp`, decoded as the training reader decodes
   (`pipeline.decode`) in DataLoader workers; then the val split predicted (fp32, as the
   pipeline predicts) and written as COCO results at the original sizes to
   OUT/nuclei_val_results.json. Reports training and inference images/s (2 and 9 on the
   loaded CPU) and the AP where pycocotools imports, else 'scored afterwards' (`--score`).

Writes to `--out` (default $OUT, else work/gpu_check): gpu_check.json (every row, the
settings and details), pytest.xml, pytest.log and nuclei_val_results.json (< 10 MB).

Expected on an H100 (not run there yet): one table of 17 rows, `check | value | notes`:
"pep_model tests on cuda | N passed, 0 failed, 3 skipped, 0 errors | ... left out
test_overfit.py (needs pycocotools, not installed)" (a failure is named in the notes; the
likely ones on a GPU compare results to CPU float rounding); 12 speed rows "<model>: train
step|inference, fp32|amp | 0.xxx s (r.rrx Mask R-CNN) | n images/s; ..."; "nuclei training
| tens of images/s | ~10-15 epochs in 150 s ..."; "nuclei val inference | images/s | 91
images, N instances -> nuclei_val_results.json"; "nuclei val segm AP | scored afterwards";
"total | ~300-400 s | cuda; ray and mlflow not imported". Scored here, the AP@400 should
approach the CPU recipe's 0.44 when ~15 epochs fit.
"""

from __future__ import annotations

import argparse
import ast
import functools
import importlib.util
import itertools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import bench_model  # noqa: E402
import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import torchvision  # noqa: E402

from pep_model import Config, build_model, load_config  # noqa: E402
from pipeline.decode import decode_sample  # noqa: E402
from pipeline.rle import encode_counts  # noqa: E402

PARTS = ["tests", "speed", "nuclei"]
NOT_IMPORTED = ("ray", "mlflow")  # absent there; this script and the tests it runs avoid them
TEST_DIR = ROOT / "tests" / "pep_model"
TINY_TESTS = ["test_amp.py", "test_postprocess.py"]
TINY_FIXTURE = ROOT / "tests" / "fixtures" / "nuclei_tiny"  # 3 nuclei images, RLE masks
RESULTS_FILE = "nuclei_val_results.json"
DATA_WORKERS = min(8, max(0, (os.cpu_count() or 1) - 2))  # decoding processes beside training
# Columns of the shards (pipeline.prepare.SHARD_SCHEMA) that `decode_sample` reads.
SHARD_COLUMNS = ["image_id", "orig_height", "orig_width", "height", "width", "image"]
SHARD_COLUMNS += ["labels", "iscrowd", "masks"]


@dataclass
class Settings:
    """The size of each part: the GPU run's, or `--tiny`'s toy sizes."""

    test_files: list[str] | None  # None: every file of tests/pep_model
    test_timeout_s: float
    speed_size: tuple[int, int]  # height, width
    speed_batch: int
    speed_objects: int
    speed_iters: int
    speed_warmup: int
    speed_variants: list[str]
    speed_budget_s: float
    train_s: float
    config_overrides: list[str]
    threads: int | None = None  # torch's CPU threads (None: its default), also for the tests


FULL = Settings(
    test_files=None,
    test_timeout_s=120,
    speed_size=(800, 1333),
    speed_batch=2,
    speed_objects=8,
    speed_iters=10,
    speed_warmup=2,
    speed_variants=["pep", "baseline"],
    speed_budget_s=120,
    train_s=150,
    config_overrides=[],
)
TINY = Settings(
    test_files=TINY_TESTS,
    test_timeout_s=120,  # the limits only guard: a loaded CI machine may be slow
    speed_size=(64, 96),
    speed_batch=1,
    speed_objects=2,
    speed_iters=1,
    speed_warmup=0,
    speed_variants=["pep"],
    speed_budget_s=300,
    train_s=60,  # train.epochs=2 ends it first
    config_overrides=[
        "model.fpn_channels=32",
        "model.head_channels=32",
        "model.tower_convs=1",
        "model.descriptor_dim=32",
        "model.mask_channels=32",
        "model.mask_upsample=1",
        "model.score_threshold=0.0",  # untrained: keep predictions to write and score
        "data.train_size=[96]",
        "train.batch_size=2",
        "train.warmup_iters=2",
        "train.epochs=2",
        "train.milestones=[1]",
    ],
    threads=1,  # a CI machine's few cores are shared: one thread avoids oversubscription
)


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="every part at toy size (CPU, CI)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "work" / "gpu_check"))
    parser.add_argument("--parts", nargs="+", default=PARTS, choices=PARTS)
    parser.add_argument(
        "--shards",
        default=str(ROOT / "work" / "shards" / "nuclei-256"),
        help="shards root with train/ and val/ (ignored with --tiny)",
    )
    parser.add_argument("--config", default=str(ROOT / "configs" / "nuclei.yaml"))
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="config override for the nuclei part",
    )
    parser.add_argument("--train-s", type=float, default=None, help="nuclei training budget")
    parser.add_argument("--workers", type=int, default=None, help="DataLoader decoding workers")
    parser.add_argument(
        "--score",
        default=None,
        metavar="RESULTS_JSON",
        help="only score a results file written by an earlier run (pycocotools)",
    )
    parser.add_argument(
        "--annotations",
        default=None,
        help="ground truth for --score (default: the val shards' source)",
    )
    parser.add_argument(
        "--max-dets",
        type=int,
        default=None,
        help="COCOeval maxDets for --score (default: the config's eval.max_dets)",
    )
    return parser


# ----------------------------------------------------------------------------- the table


@dataclass
class Row:
    check: str
    value: str
    notes: str = ""


def error_row(check: str, error: BaseException) -> Row:
    traceback.print_exception(error)
    return Row(check, f"error: {type(error).__name__}", str(error).splitlines()[0][:200])


def markdown(rows: list[Row]) -> str:
    lines = ["| check | value | notes |", "|---|---|---|"]
    lines += [f"| {r.check} | {r.value} | {r.notes} |" for r in rows]
    return "\n".join(lines)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def synced(fn, device: torch.device):
    """`fn` then a wait for the device's queued work: what a timer around it must measure."""

    def run():
        fn()
        synchronize(device)

    return run


# ----------------------------------------------------------------------------- 1. tests


def imported_modules(path: Path) -> set[str]:
    """Every module an import statement of the file names (top level or inside functions)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module)
    return names


def installed(package: str) -> bool:
    try:
        return importlib.util.find_spec(package) is not None
    except ImportError:  # a parent that fails to import, or a finder that refuses it
        return False


def left_out_tests(files: list[Path]) -> dict[str, str]:
    """Test files that cannot run here, by name: they import Ray or MLflow, or a package that
    is not installed (only the file's own import statements are read)."""
    left_out = {}
    for path in files:
        for top in sorted({name.split(".")[0] for name in imported_modules(path)}):
            local = (path.parent / f"{top}.py").exists() or (ROOT / top).is_dir()
            if top in NOT_IMPORTED:
                left_out[path.name] = f"imports {top}"
            elif not local and not installed(top):
                left_out[path.name] = f"needs {top}, not installed"
            if path.name in left_out:
                break
    return left_out


def junit_counts(xml_path: Path) -> tuple[dict[str, int], list[str]]:
    """(passed/failed/skipped/errors, names of the failed and errored tests) from pytest's
    JUnit XML."""
    suite = ET.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    failed = [
        case.get("name")
        for case in suite.iter("testcase")
        if case.find("failure") is not None or case.find("error") is not None
    ]
    return {
        "passed": counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"],
        "failed": counts["failures"],
        "skipped": counts["skipped"],
        "errors": counts["errors"],
    }, failed


def run_tests(device: str, settings: Settings, out: Path) -> tuple[list[Row], dict]:
    """tests/pep_model (or `--tiny`'s few files) on `device`, in a pytest subprocess."""
    names = settings.test_files or [p.name for p in sorted(TEST_DIR.glob("test_*.py"))]
    files = [TEST_DIR / name for name in names]
    left_out = left_out_tests(files)
    run = [str(f.relative_to(ROOT)) for f in files if f.name not in left_out]
    xml = out / "pytest.xml"
    xml.unlink(missing_ok=True)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        "--continue-on-collection-errors",
        f"--junitxml={xml}",
        *run,
    ]
    paths = [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {**os.environ, "PEP_TEST_DEVICE": device, "PYTHONPATH": os.pathsep.join(paths)}
    if settings.threads:
        env["OMP_NUM_THREADS"] = str(settings.threads)
    start = time.perf_counter()
    check = f"pep_model tests on {device}"
    try:
        done = subprocess.run(
            command,
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            timeout=settings.test_timeout_s,
        )
    except subprocess.TimeoutExpired as e:
        (out / "pytest.log").write_text((e.stdout or b"").decode(errors="replace"))
        return [Row(check, f"timed out after {settings.test_timeout_s:.0f} s")], {}
    seconds = time.perf_counter() - start
    (out / "pytest.log").write_text(done.stdout + done.stderr)
    print("\n".join((done.stdout + done.stderr).rstrip().splitlines()[-15:]), flush=True)
    if not xml.exists():
        return [Row(check, f"error: pytest exit status {done.returncode}", "see pytest.log")], {}
    counts, failed = junit_counts(xml)
    notes = [f"{len(run)} files, {seconds:.0f} s"]
    notes += [f"left out {name} ({why})" for name, why in left_out.items()]
    if failed:
        notes.append("failed: " + ", ".join(failed[:6]) + (" ..." if len(failed) > 6 else ""))
    value = ", ".join(f"{n} {k}" for k, n in counts.items())
    return [Row(check, value, "; ".join(notes))], {
        **counts,
        "failed_tests": failed,
        "left_out": left_out,
        "seconds": seconds,
    }


# ----------------------------------------------------------------------------- 2. speed


def to_device(images, targets, device: torch.device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [
        {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in t.items()}
        for t in targets
    ]
    return images, targets


def run_speed(device: torch.device, settings: Settings) -> tuple[list[Row], dict]:
    """bench_model.py's measurements on `device`, fp32 and AMP, for Mask R-CNN and PEP."""
    deadline = time.monotonic() + settings.speed_budget_s
    height, width = settings.speed_size
    batch = settings.speed_batch
    images, targets = to_device(
        *bench_model.make_batch(batch, (height, width), settings.speed_objects), device
    )
    # Mask R-CNN's transform sized to leave the images as they are (800-1333: its defaults)
    mask_rcnn = functools.partial(bench_model.mask_rcnn, min(height, width), max(height, width))
    builders = [("Mask R-CNN R50-FPN", mask_rcnn)]
    for key in settings.speed_variants:
        label, overrides = bench_model.VARIANTS[key]
        builders.append((label, functools.partial(bench_model.pep_model, **overrides)))
    setting = (
        f"{batch} x {height}x{width}, median of {settings.speed_iters} after "
        f"{settings.speed_warmup} warm-up"
    )
    rows, times, reference = [], {}, {}
    for label, build in builders:
        torch.manual_seed(0)
        model = build().to(device)
        for kind, precision in itertools.product(("train step", "inference"), ("fp32", "amp")):
            check = f"{label}: {kind}, {precision}"
            if time.monotonic() > deadline:
                rows.append(Row(check, "skipped", f"{settings.speed_budget_s:.0f} s budget spent"))
                continue
            amp = precision == "amp"
            fn = (
                bench_model.train_step_fn(model, images, targets, amp)
                if kind == "train step"
                else bench_model.inference_fn(model, images, amp)
            )
            try:
                seconds = bench_model.timed(
                    synced(fn, device), settings.speed_iters, settings.speed_warmup
                )
            except Exception as e:  # e.g. out of memory: the row says so, the rest runs
                rows.append(error_row(check, e))
                continue
            times[check] = seconds
            ratio = ""
            if label.startswith("Mask R-CNN"):
                reference[(kind, precision)] = seconds
            elif (kind, precision) in reference:
                ratio = f" ({seconds / reference[(kind, precision)]:.2f}x Mask R-CNN)"
            notes = f"{batch / seconds:.1f} images/s; {setting}"
            rows.append(Row(check, f"{seconds:.3f} s{ratio}", notes))
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows, times


# ----------------------------------------------------------------------------- 3. nuclei


def read_split(shards_dir: Path) -> tuple[list[dict], dict]:
    """The rows of a shards folder (the columns `decode_sample` reads) and its manifest."""
    manifest = json.loads((shards_dir / "manifest.json").read_text())
    tables = [
        pq.read_table(shards_dir / s["file"], columns=SHARD_COLUMNS) for s in manifest["shards"]
    ]
    return pa.concat_tables(tables).to_pylist(), manifest


def write_toy_shards(coco_dir: Path, out_dir: Path) -> Path:
    """`--tiny`'s data: a COCO folder with compressed-RLE masks as a shards folder, images
    and masks at their own size (no resize), without Ray or pycocotools."""
    data = json.loads((coco_dir / "annotations.json").read_text())
    by_image = {image["id"]: [] for image in data["images"]}
    for ann in data["annotations"]:
        by_image[ann["image_id"]].append(ann)
    contiguous = {c["id"]: i + 1 for i, c in enumerate(data["categories"])}
    rows = []
    for image in data["images"]:
        anns = by_image[image["id"]]
        rows.append({
            "image_id": image["id"],
            "orig_height": image["height"], "orig_width": image["width"],
            "height": image["height"], "width": image["width"],
            "image": (coco_dir / "images" / image["file_name"]).read_bytes(),
            "labels": [contiguous[a["category_id"]] for a in anns],
            "iscrowd": [bool(a.get("iscrowd", 0)) for a in anns],
            "masks": [a["segmentation"]["counts"] for a in anns],
        })  # fmt: skip
    out_dir.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), out_dir / "shard-00000-0.parquet")
    manifest = {
        "source": {"annotations": str(coco_dir / "annotations.json")},
        "categories": [
            {"contiguous_id": i + 1, "coco_id": c["id"], "name": c["name"]}
            for i, c in enumerate(data["categories"])
        ],
        "shards": [{"file": "shard-00000-0.parquet", "rows": len(rows)}],
    }
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return out_dir


def to_model_input(sample: dict) -> tuple[torch.Tensor, dict]:
    """A decoded sample (`pipeline.decode.decode_sample`) as the model takes it: what the
    training reader's collate (`pipeline.reader.collate`, which imports Ray) makes of it."""
    h, w, n = sample["height"], sample["width"], len(sample["labels"])
    masks = np.unpackbits(sample["masks_packed"], count=n * h * w).reshape(n, h, w)
    image = torch.from_numpy(np.multiply(sample["image"], np.float32(1 / 255), dtype=np.float32))
    target = {
        "labels": torch.from_numpy(sample["labels"].astype(np.int64)),
        "boxes": torch.from_numpy(sample["boxes"]),
        "masks": torch.from_numpy(masks),
        "iscrowd": torch.from_numpy(sample["iscrowd"]),
        "image_id": int(sample["image_id"]),
        "orig_size": (int(sample["orig_height"]), int(sample["orig_width"])),
    }
    return image, target


class ShardImages(torch.utils.data.Dataset):
    """Shard rows decoded and augmented (`train_size` jitter, flips) as the reader does."""

    def __init__(self, rows: list[dict], train_size: list[int] | None, flip_prob: float):
        self.rows, self.train_size, self.flip_prob = rows, train_size, flip_prob

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict]:
        return to_model_input(decode_sample(self.rows[i], self.train_size, self.flip_prob, None))


def as_lists(batch: list[tuple]) -> tuple[list, list]:
    images, targets = zip(*batch)
    return list(images), list(targets)


def build_optimizer(model: torch.nn.Module, cfg: Config) -> torch.optim.Optimizer:
    """`pipeline.train.build_optimizer` (which imports Ray): no decay on norms and biases."""
    params = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in params if p.ndim > 1], "weight_decay": cfg.train.weight_decay},
        {"params": [p for p in params if p.ndim <= 1], "weight_decay": 0.0},
    ]
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr)
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=cfg.train.momentum)


def lr_factor(step: int, cfg: Config, milestone_steps: list[int]) -> float:
    """`pipeline.train.build_lr_scheduler`'s: linear warm-up, x lr_gamma at each milestone."""
    scale = cfg.train.lr_gamma ** sum(step >= m for m in milestone_steps)
    if step < cfg.train.warmup_iters:
        scale *= 0.001 + (1 - 0.001) * step / cfg.train.warmup_iters
    return scale


def train(model, loader, cfg: Config, device: torch.device, budget_s: float) -> dict:
    """The config's recipe for the whole epochs that fit in `budget_s` (planned from the
    first epoch, its lr milestones at the same fractions), as `train_one_epoch` steps."""
    amp = cfg.train.amp and device.type == "cuda"
    optimizer = build_optimizer(model, cfg)
    scaler = torch.amp.GradScaler(device.type, enabled=amp)
    iters = len(loader)
    epochs, milestones = cfg.train.epochs, list(cfg.train.milestones)
    step = seen = 0
    epoch_losses: list[float] = []
    model.train()
    start = time.perf_counter()
    for epoch in range(cfg.train.epochs):
        if epoch >= epochs or time.perf_counter() - start > budget_s:
            break
        epoch_losses = []
        for images, targets in loader:
            for group in optimizer.param_groups:
                group["lr"] = cfg.train.lr * lr_factor(step, cfg, [m * iters for m in milestones])
            images, targets = to_device(images, targets, device)
            with torch.autocast(device.type, enabled=amp):
                losses = model(images, targets)
            loss = sum(losses.values())
            if not torch.isfinite(loss):
                terms = ", ".join(f"{k}={v.item():.4g}" for k, v in losses.items())
                raise FloatingPointError(f"non-finite loss at step {step}: {terms}")
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if cfg.train.grad_clip > 0:
                scaler.unscale_(optimizer)
                for params in model.clip_groups():
                    torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
            scaler.step(optimizer)
            scaler.update()
            step += 1
            seen += len(images)
            epoch_losses.append(loss.item())
            if time.perf_counter() - start > budget_s:
                break
        if epoch == 0:
            first_s = time.perf_counter() - start
            epochs = max(1, min(cfg.train.epochs, math.floor(budget_s / first_s)))
            milestones = sorted(
                {
                    min(epochs, max(1, round(m * epochs / cfg.train.epochs)))
                    for m in cfg.train.milestones
                }
            )
    synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "images": seen, "steps": step, "epochs": seen / len(loader.dataset),
        "planned_epochs": epochs, "milestones": milestones, "seconds": seconds,
        "images_per_s": seen / seconds, "amp": amp,
        "last_epoch_loss": statistics.fmean(epoch_losses) if epoch_losses else float("nan"),
    }  # fmt: skip


def coco_results(prediction: dict, target: dict, to_coco: dict[int, int]) -> list[dict]:
    """One image's predictions as COCO results at its original size: what
    `pipeline.evaluate.predictions_to_coco_results` writes (bilinear resize, threshold 0.5,
    the box of the mask, the model's box scaled where the mask vanished), without
    pycocotools."""
    masks, boxes = prediction["masks"], prediction["boxes"].float()
    if len(masks) == 0:
        return []
    (height, width), (in_h, in_w) = target["orig_size"], masks.shape[-2:]
    if (in_h, in_w) != (height, width):
        resized = F.interpolate(masks[:, None].float(), size=(height, width), mode="bilinear")
        masks = resized[:, 0] >= 0.5  # K x H x W
    rows, cols = masks.any(2), masks.any(1)  # K x H, K x W
    x0, y0 = cols.float().argmax(1), rows.float().argmax(1)
    x1, y1 = width - cols.flip(1).float().argmax(1), height - rows.flip(1).float().argmax(1)
    mask_boxes = torch.stack([x0, y0, x1 - x0, y1 - y0], 1).float()
    scale = boxes.new_tensor([width / in_w, height / in_h, width / in_w, height / in_h])
    xyxy = boxes * scale
    xyxy[:, 0::2] = xyxy[:, 0::2].clamp(0, width)
    xyxy[:, 1::2] = xyxy[:, 1::2].clamp(0, height)
    scaled = torch.cat([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], 1)
    bboxes = torch.where(rows.any(1)[:, None], mask_boxes, scaled)
    counts = encode_counts(masks.cpu().numpy())
    labels, scores = prediction["labels"].tolist(), prediction["scores"].float().tolist()
    return [
        {"image_id": target["image_id"], "category_id": to_coco[label],
         "segmentation": {"size": [height, width], "counts": rle}, "bbox": bbox, "score": score}
        for label, score, rle, bbox in zip(labels, scores, counts, bboxes.tolist())
    ]  # fmt: skip


def predict(model, dataset: ShardImages, cfg: Config, device: torch.device, to_coco) -> dict:
    """The val images through the model in eval mode (fp32, as the pipeline predicts) and
    into COCO results; times the model (decoded inputs at hand) apart from the conversion."""
    model.eval()
    results, seconds, convert_s = [], 0.0, 0.0
    for start in range(0, len(dataset), cfg.eval.batch_size):
        batch = [dataset[i] for i in range(start, min(start + cfg.eval.batch_size, len(dataset)))]
        images = [image.to(device) for image, _ in batch]
        synchronize(device)
        tic = time.perf_counter()
        with torch.no_grad():
            outputs = model(images)
        synchronize(device)
        seconds += time.perf_counter() - tic
        tic = time.perf_counter()
        for output, (_, target) in zip(outputs, batch):
            results += coco_results(output, target, to_coco)
        convert_s += time.perf_counter() - tic
    return {
        "results": results,
        "seconds": seconds,
        "images_per_s": len(dataset) / seconds,
        "convert_s": convert_s,
    }


def score(results: list[dict], annotations: str | Path, max_dets: int) -> dict | None:
    """COCO metrics of the results (`pipeline.evaluate`), None where pycocotools is absent."""
    try:
        from pipeline import evaluate
    except ImportError:
        return None
    return evaluate.evaluate_coco(str(annotations), results, max_dets=max_dets)


def ap_value(metrics: dict, max_dets: int) -> str:
    raised = f"segm/AP@{max_dets}"
    if raised in metrics:
        return f"{metrics[raised]:.3f} (maxDets {max_dets}), {metrics['segm/AP']:.3f} (100)"
    return f"{metrics['segm/AP']:.3f} (maxDets 100)"


def nuclei_data(args, settings: Settings) -> tuple[Config, list[dict], list[dict], dict, Path]:
    """The config (its classes from the data), the train and val rows, contiguous -> COCO
    category ids, and the val ground truth file the shards were prepared from."""
    cfg = load_config(args.config, [*settings.config_overrides, *args.set])
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            train_dir = val_dir = write_toy_shards(TINY_FIXTURE, Path(tmp) / "toy")
        else:
            train_dir, val_dir = Path(args.shards) / "train", Path(args.shards) / "val"
        train_rows, manifest = read_split(train_dir)
        val_rows, val_manifest = read_split(val_dir)
    cfg.model.num_classes = len(manifest["categories"])
    to_coco = {c["contiguous_id"]: c["coco_id"] for c in manifest["categories"]}
    return cfg, train_rows, val_rows, to_coco, Path(val_manifest["source"]["annotations"])


def run_nuclei(args, settings: Settings, device: torch.device, out: Path) -> tuple[list[Row], dict]:
    """Train the config from the shards for `train_s`, predict val, write and score results."""
    cfg, train_rows, val_rows, to_coco, annotations = nuclei_data(args, settings)
    workers = args.workers if args.workers is not None else 0 if args.tiny else DATA_WORKERS
    loader = torch.utils.data.DataLoader(
        ShardImages(train_rows, list(cfg.data.train_size), cfg.data.flip_prob),
        batch_size=cfg.train.batch_size, shuffle=True, num_workers=workers,
        collate_fn=as_lists, persistent_workers=workers > 0,
    )  # fmt: skip
    torch.manual_seed(cfg.train.seed)
    model = build_model(cfg.model).to(device)
    trained = train(model, loader, cfg, device, args.train_s or settings.train_s)
    predicted = predict(model, ShardImages(val_rows, None, 0.0), cfg, device, to_coco)
    results = predicted.pop("results")
    (out / RESULTS_FILE).write_text(json.dumps(results))
    metrics = score(results, annotations, cfg.eval.max_dets) if annotations.exists() else None
    precision = "amp" if trained["amp"] else "fp32"
    rows = [
        Row("nuclei training", f"{trained['images_per_s']:.1f} images/s",
            f"{trained['epochs']:.1f} epochs ({trained['steps']} steps) in "
            f"{trained['seconds']:.0f} s, last epoch's loss {trained['last_epoch_loss']:.3f}; "
            f"{Path(args.config).name}, {len(train_rows)} images, batch "
            f"{cfg.train.batch_size}, {precision}, {workers} workers"),
        Row("nuclei val inference", f"{predicted['images_per_s']:.1f} images/s",
            f"{len(val_rows)} images, {len(results)} instances -> {RESULTS_FILE} "
            f"(COCO conversion {predicted['convert_s']:.1f} s)"),
        Row("nuclei val segm AP", "scored afterwards",
            f"no pycocotools or no {annotations.name} here: python benchmarks/gpu_check.py "
            f"--score OUT/{RESULTS_FILE}") if metrics is None else
        Row("nuclei val segm AP", ap_value(metrics, cfg.eval.max_dets),
            f"bbox AP {metrics['bbox/AP']:.3f}"),
    ]  # fmt: skip
    scalars = {k: v for k, v in (metrics or {}).items() if isinstance(v, float)}
    return rows, {
        "train": trained, "predict": predicted, "annotations": str(annotations),
        "metrics": scalars,
    }  # fmt: skip


# ----------------------------------------------------------------------------- main


def score_main(args) -> None:
    """--score: AP of an earlier run's results here, where pycocotools is installed."""
    from pipeline import evaluate

    max_dets = args.max_dets or load_config(args.config, args.set).eval.max_dets
    manifest = Path(args.shards) / "val" / "manifest.json"
    annotations = args.annotations or json.loads(manifest.read_text())["source"]["annotations"]
    results = json.loads(Path(args.score).read_text())
    metrics = evaluate.evaluate_coco(annotations, results, max_dets=max_dets)
    print(f"{args.score}: {len(results)} results on {annotations}")
    print(evaluate.format_ap_table(metrics))
    print(f"segm AP: {ap_value(metrics, max_dets)}")


def environment(device: torch.device) -> str:
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.machine()
    return (
        f"torch {torch.__version__}, torchvision {torchvision.__version__}, "
        f"Python {platform.python_version()}, {device.type}: {gpu}, {os.cpu_count()} CPUs"
    )


def main(args: argparse.Namespace) -> int:
    if args.score:
        score_main(args)
        return 0
    settings = TINY if args.tiny else FULL
    device = torch.device(args.device)
    if settings.threads:
        torch.set_num_threads(settings.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    setup = environment(device)
    print(setup, flush=True)
    rows, details = [], {}
    parts = {
        "tests": lambda: run_tests(device.type, settings, out),
        "speed": lambda: run_speed(device, settings),
        "nuclei": lambda: run_nuclei(args, settings, device, out),
    }
    for name in args.parts:
        print(f"\n## {name}", flush=True)
        part_start = time.perf_counter()
        try:
            part_rows, details[name] = parts[name]()
        except Exception as e:  # one broken part must not cost the others' numbers
            part_rows = [error_row(name, e)]
        rows += part_rows
        print(markdown(part_rows), f"\n({time.perf_counter() - part_start:.0f} s)", flush=True)
    imported = [m for m in NOT_IMPORTED if m in sys.modules]
    imports = f"imported {', '.join(imported)}!" if imported else "ray and mlflow not imported"
    mode = f"{'tiny, ' if args.tiny else ''}{device.type}"
    rows.append(Row("total", f"{time.perf_counter() - start:.0f} s", f"{mode}; {imports}"))
    saved = {"environment": setup, "args": vars(args), "settings": asdict(settings),
             "rows": [asdict(r) for r in rows], "details": details}  # fmt: skip
    (out / "gpu_check.json").write_text(json.dumps(saved, indent=1, default=str))
    print("\n" + markdown(rows))
    tests = details.get("tests", {})
    broken = any(r.value.startswith(("error", "timed out")) for r in rows)
    return int(broken or bool(imported) or bool(tests.get("failed") or tests.get("errors")))


if __name__ == "__main__":
    sys.exit(main(get_args_parser().parse_args()))
