"""benchmarks/gpu_check.py: every part at toy size where Ray, MLflow and pycocotools are absent
(as on the GPU machine), its predictions scored here afterwards."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
FIXTURE = ROOT / "tests" / "fixtures" / "nuclei_tiny"

# A sitecustomize for the subprocess and the pytest it starts: the GPU machine's Python,
# where importing any of these fails as for a package that is not installed.
ABSENT = """
import sys


class Absent:
    names = {"ray", "mlflow", "pycocotools", "faster_coco_eval"}

    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in self.names:
            raise ModuleNotFoundError(f"No module named {name!r} (absent for the test)", name=name)
        return None


sys.meta_path.insert(0, Absent())
"""


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    site = tmp_path_factory.mktemp("site")
    (site / "sitecustomize.py").write_text(ABSENT)
    out = tmp_path_factory.mktemp("gpu_check")
    env = {**os.environ, "PYTHONPATH": str(site)}
    command = [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny",
               "--device", "cpu", "--out", str(out)]  # fmt: skip
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=240)
    return done, out


def final_table(stdout: str) -> dict[str, tuple[str, str]]:
    """check -> (value, notes) of the last markdown table printed."""
    lines = stdout.splitlines()
    start = max(i for i, line in enumerate(lines) if line == "| check | value | notes |")
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        check, value, notes = (cell.strip() for cell in line.strip("|").split("|"))
        rows[check] = (value, notes)
    return rows


def per_s(text: str) -> float:
    return float(re.search(r"([\d.]+) images/s", text).group(1))


def test_every_part_runs_without_ray_mlflow_or_pycocotools(tiny_run):
    done, out = tiny_run
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    rows = final_table(done.stdout)

    counts = dict(
        (k, int(n)) for n, k in re.findall(r"(\d+) (\w+)", rows["pep_model tests on cpu"][0])
    )
    assert counts["passed"] >= 30 and counts["failed"] == counts["errors"] == 0
    assert "2 files" in rows["pep_model tests on cpu"][1]  # test_amp.py, test_postprocess.py

    for model in ("Mask R-CNN R50-FPN", "PEP (excavate+purify)"):
        for kind in ("train step", "inference"):
            for precision in ("fp32", "amp"):
                value, notes = rows[f"{model}: {kind}, {precision}"]
                assert float(value.split()[0]) > 0 and per_s(notes) > 0
                assert ("x Mask R-CNN" in value) == model.startswith("PEP")

    assert per_s(rows["nuclei training"][0]) > 0
    assert "2.0 epochs (4 steps)" in rows["nuclei training"][1]  # 3 images, batch 2
    value, notes = rows["nuclei val inference"]
    assert per_s(value) > 0 and notes.startswith("3 images, ")
    assert rows["nuclei val segm AP"][0] == "scored afterwards"
    assert rows["total"][1] == "tiny, cpu; ray and mlflow not imported"

    saved = json.loads((out / "gpu_check.json").read_text())
    assert {r["check"]: (r["value"], r["notes"]) for r in saved["rows"]} == rows
    results = json.loads((out / "nuclei_val_results.json").read_text())
    instances = int(re.search(r"(\d+) instances", notes).group(1))
    assert len(results) == instances
    assert {r["image_id"] for r in results} <= {7, 13, 95} and all(
        r["category_id"] == 1 for r in results
    )


def test_its_predictions_are_scored_here_afterwards(tiny_run, load_benchmark, capsys):
    _, out = tiny_run
    gpu_check = load_benchmark("gpu_check")
    args = gpu_check.get_args_parser().parse_args([
        "--score", str(out / "nuclei_val_results.json"),
        "--annotations", str(FIXTURE / "annotations.json"),
    ])  # fmt: skip
    assert gpu_check.main(args) == 0
    printed = capsys.readouterr().out
    assert "| segm @400 |" in printed
    ap_400 = float(re.search(r"segm AP: ([\d.]+) \(maxDets 400\)", printed).group(1))
    assert 0 <= ap_400 <= 1


def test_its_coco_results_are_the_pipelines(load_benchmark):
    from pipeline.evaluate import predictions_to_coco_results

    gpu_check = load_benchmark("gpu_check")
    g = torch.Generator().manual_seed(0)
    masks = torch.rand(5, 40, 50, generator=g) > 0.7
    masks[3] = False  # vanishes: its box is the model's, scaled
    masks[4] = False
    masks[4, 10:12, 20:22] = True  # a speck that the resize to the original size keeps or not
    prediction = {
        "labels": torch.tensor([1, 2, 1, 2, 1]),
        "scores": torch.tensor([0.9, 0.8, 0.5, 0.3, 0.1]),
        "masks": masks,
        "boxes": torch.tensor([[0.0, 0.0, 50.0, 40.0]] * 3 + [[5.0, 5.0, 20.0, 15.0]] * 2),
    }
    to_coco = {1: 1, 2: 5}
    for size in [(64, 80), (40, 50), (30, 33)]:  # upscaled, as is, downscaled
        ours = gpu_check.coco_results(prediction, {"image_id": 7, "orig_size": size}, to_coco)
        theirs = predictions_to_coco_results([prediction], [7], [size], to_coco)
        assert [r["segmentation"] for r in ours] == [r["segmentation"] for r in theirs]
        assert [(r["category_id"], r["score"]) for r in ours] == [
            (r["category_id"], pytest.approx(r["score"])) for r in theirs
        ]
        np.testing.assert_allclose([r["bbox"] for r in ours], [r["bbox"] for r in theirs],
                                   rtol=1e-5, atol=1e-4)  # fmt: skip
