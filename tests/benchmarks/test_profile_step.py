"""benchmarks/profile_step.py: variants side by side, and the parts of a step."""

from __future__ import annotations

from pathlib import Path

import pytest

import pep_model.pep as pep_module

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def profiler(load_benchmark):
    return load_benchmark("profile_step")


def test_variants_default_to_table_2_and_parse_overrides(profiler):
    assert list(profiler.parse_variants([])) == ["baseline", "excavate", "purify", "pep"]
    variants = profiler.parse_variants(["a=model.excavate=false,model.purify=true", "b="])
    assert variants == {"a": ["model.excavate=false", "model.purify=true"], "b": []}
    # commas inside a list value stay with it
    lean = "model.perceive_levels=[3,4,5,6],model.scale_ranges=[[0,96],[48,100000]],model.x=1"
    assert profiler.parse_variants([f"lean={lean}"])["lean"] == [
        "model.perceive_levels=[3,4,5,6]", "model.scale_ranges=[[0,96],[48,100000]]", "model.x=1"
    ]
    with pytest.raises(SystemExit, match="NAME=key=value"):
        profiler.parse_variants(["=model.excavate=false"])


def test_prints_each_variants_step_time_and_the_parts_it_runs(profiler, tiny_shards, capsys):
    heat_maps = pep_module.ObjectExcavating.heat_maps
    args = profiler.get_args_parser().parse_args([
        "--shards", str(tiny_shards / "train"), "--config", str(ROOT / "configs" / "tiny.yaml"),
        "--set", "train.batch_size=2", "--steps", "1", "--images", "12", "--threads", "1",
        "--variant", "baseline=model.excavate=false,model.purify=false", "--variant", "pep=",
        "--parts",
    ])
    profiler.main(args)
    out = capsys.readouterr().out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("|")}
    assert rows["baseline"].rstrip().endswith("| 1.00x |")
    assert float(rows["pep"].split("|")[3]) > 0  # s/step
    part = {label: [float(v) for v in line.split("|")[2:-1]]
            for label, line in rows.items() if "." in label or label in ("forward", "backward")}
    assert all(ms > 0 for ms in part["backward"] + part["forward"])
    baseline_ms, pep_ms = part["ObjectExcavating.heat_maps"]
    assert baseline_ms == 0 and pep_ms > 0  # only the variant with excavating runs it
    assert pep_module.ObjectExcavating.heat_maps is heat_maps  # the wrappers are gone again
