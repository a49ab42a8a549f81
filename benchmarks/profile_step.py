"""Training-step cost of PEP variants, side by side in one process, and where a step's time goes.

    python benchmarks/profile_step.py --shards SHARDS_DIR [--config configs/nuclei.yaml]
        [--variant NAME=key=value,key=value ...] [--steps 6] [--images 40] [--parts]

Every variant (default: the Table 2 four) gets its own model and optimizer from the same seed
and trains on the same batches (the first `--images` rows of the shards, the config's batch
size, sizes and flips for seed 1). Steps are interleaved (step i of every variant, then step
i + 1), so a machine that slows down part-way slows all variants alike; the first step of each
is a warm-up and not timed. Prints the median seconds per step and the ratio to the first
variant. `--parts` also times the forward of each part of `PEP.losses` (wrapped functions,
`torch.profiler.record_function`) and the backward pass, over two more steps per variant.

A variant is NAME=overrides, the overrides as for `--set`, comma-separated (model settings;
the batches follow the config and `--set` alone):
    --variant baseline=model.excavate=false,model.purify=false --variant pep=
Commas inside brackets belong to a list value: --variant "lean=model.perceive_levels=[3,4,5,6]".
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

import torch  # noqa: E402
from bench_accuracy import PEP_VARIANTS, epoch_batches, read_rows  # noqa: E402
from torch.profiler import ProfilerActivity, profile, record_function  # noqa: E402

import pep_model.pep as pep_module  # noqa: E402
from pep_model import build_model, load_config  # noqa: E402

# The Table 2 variants as overrides, from bench_accuracy's switches.
TABLE2 = {
    name: ",".join(f"model.{key}={str(on).lower()}" for key, on in switches.items())
    for name, (_, switches) in PEP_VARIANTS.items()
}

# Parts of `PEP.losses` timed with --parts: (owner, attribute) wrapped in record_function.
PARTS = [
    (pep_module, "perceive_targets"),
    (pep_module, "downsample_masks"),
    (pep_module, "centre_regions"),
    (pep_module, "excavate_targets"),
    (pep_module, "sample_training_keys"),
    (pep_module, "heat_loss"),
    (pep_module, "graph_targets"),
    (pep_module, "graph_loss"),
    (pep_module.ObjectExcavating, "heat_maps"),
    (pep_module.ObjectExcavating, "mine"),
    (pep_module.InstancePurifying, "forward"),
    (pep_module.PEP, "mask_losses"),
    (pep_module.PEP, "_graph_candidates"),
]


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shards", required=True, help="a training shards folder")
    parser.add_argument("--config", default=str(ROOT / "configs" / "nuclei.yaml"))
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override for every variant")
    parser.add_argument("--variant", action="append", default=[], metavar="NAME=OVERRIDES",
                        help="a variant (default: baseline, excavate, purify, pep)")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    parser.add_argument("--images", type=int, default=40, help="rows of the shards to use")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--parts", action="store_true", help="also time the parts of a step")
    return parser


def split_overrides(overrides: str) -> list[str]:
    """`a=1,b=[[0,9],[5,20]]` -> ["a=1", "b=[[0,9],[5,20]]"]: commas inside brackets stay."""
    parts, depth, start = [], 0, 0
    for i, char in enumerate(overrides + ","):
        depth += {"[": 1, "]": -1}.get(char, 0)
        if char == "," and depth == 0:
            parts.append(overrides[start:i])
            start = i + 1
    return [part for part in parts if part]


def parse_variants(specs: list[str]) -> dict[str, list[str]]:
    if not specs:
        specs = [f"{name}={overrides}" for name, overrides in TABLE2.items()]
    variants = {}
    for spec in specs:
        name, _, overrides = spec.partition("=")
        if not name:
            raise SystemExit(f"--variant {spec!r}: expected NAME=key=value,...")
        variants[name] = split_overrides(overrides)
    return variants


@contextlib.contextmanager
def timed_parts():
    """Wrap every part of PARTS in a record_function of its label while inside; yields the
    labels and restores the originals on leaving."""
    labels, originals = [], []
    for owner, attr in PARTS:
        original = getattr(owner, attr)
        label = f"{getattr(owner, '__name__', '')}.{attr}"

        def timed(*args, __original=original, __label=label, **kwargs):
            with record_function(__label):
                return __original(*args, **kwargs)

        originals.append((owner, attr, original))
        setattr(owner, attr, timed)
        labels.append(label)
    try:
        yield labels
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


def main(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    variants = parse_variants(args.variant)
    models, optimizers = {}, {}
    for name, overrides in variants.items():
        cfg = load_config(args.config, [*args.set, *overrides])
        torch.manual_seed(1)
        models[name] = build_model(cfg.model).train()
        optimizers[name] = torch.optim.AdamW(models[name].parameters(), lr=1e-4)
    data_cfg = load_config(args.config, args.set)  # the batches: the same for every variant
    table = read_rows(args.shards, args.images)
    batches = list(epoch_batches(table, data_cfg, 1, 0))
    needed = 1 + args.steps + (2 if args.parts else 0)
    if len(batches) < needed:
        raise SystemExit(f"{len(batches)} batches from {args.images} images; need {needed}")

    def step(name, images, targets):
        with record_function("forward"):
            losses = models[name](images, targets)
        optimizers[name].zero_grad()
        with record_function("backward"):
            sum(losses.values()).backward()
        optimizers[name].step()

    times = defaultdict(list)
    for i in range(1 + args.steps):
        for name in variants:
            start = time.perf_counter()
            step(name, *batches[i])
            if i > 0:
                times[name].append(time.perf_counter() - start)
    first = statistics.median(times[next(iter(variants))])
    print(f"{args.config}, {len(batches)} batches of {data_cfg.train.batch_size}, "
          f"{args.threads} threads, {args.steps} timed steps per variant")
    print("| variant | overrides | s/step (median) | min | max | vs first |")
    print("|---|---|---|---|---|---|")
    for name, overrides in variants.items():
        t = times[name]
        print(f"| {name} | {' '.join(overrides) or '-'} | {statistics.median(t):.3f} | "
              f"{min(t):.3f} | {max(t):.3f} | {statistics.median(t) / first:.2f}x |")
    if not args.parts:
        return
    print("\nforward of each part and the backward pass, ms per step (2 steps):")
    rows = {}
    with timed_parts() as parts:
        labels = ["forward", "backward", *parts]
        for name in variants:
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for b in batches[1 + args.steps: 3 + args.steps]:
                    step(name, *b)
            rows[name] = {e.key: e.cpu_time_total / 1e3 / 2 for e in prof.key_averages()
                          if e.key in labels}
    print("| part | " + " | ".join(variants) + " |")
    print("|---|" + "---|" * len(variants))
    for label in labels:
        print(f"| {label} | " + " | ".join(f"{rows[n].get(label, 0):.0f}" for n in variants) + " |")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
