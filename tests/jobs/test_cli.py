"""The jobs' command lines: --help without the heavy libraries, defaults found from anywhere."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
JOBS = sorted(p.stem for p in (ROOT / "jobs").glob("*.py"))
HEAVY = ("torch", "ray", "mlflow", "torchvision", "pyarrow")

# Builds the job's parser and prints its defaults and what got imported on the way.
PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("job", sys.argv[1])
job = importlib.util.module_from_spec(spec)
spec.loader.exec_module(job)
parser = job.get_args_parser()
defaults = {a.dest: a.default for a in parser._actions if isinstance(a.default, str)}
print(json.dumps({"modules": sorted(sys.modules), "defaults": defaults}))
"""


def test_every_job_is_probed():
    assert {"train_pep", "sweep_pep", "ablation_pep", "evaluate_pep", "promote_pep"} <= set(JOBS)


@pytest.mark.parametrize("job", JOBS)
def test_parser_imports_no_heavy_library_and_defaults_resolve_elsewhere(job, tmp_path):
    # Run from an unrelated folder: a default config must not depend on the current directory.
    out = subprocess.run(
        [sys.executable, "-c", PROBE, str(ROOT / "jobs" / f"{job}.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
    )
    probe = json.loads(out.stdout)
    loaded = {m.split(".")[0] for m in probe["modules"]}
    assert not loaded & set(HEAVY), f"{job}: building the parser imported {loaded & set(HEAVY)}"
    config = probe["defaults"].get("config")
    if config is not None:
        assert Path(config).is_absolute() and Path(config).is_file(), config


def test_prepare_flags_default_to_prepare_config():
    """jobs/prepare_coco.py repeats PrepareConfig's defaults (its --help imports no Ray)."""
    import importlib.util
    from dataclasses import asdict

    from pipeline.prepare import PrepareConfig

    spec = importlib.util.spec_from_file_location("prepare_coco", ROOT / "jobs" / "prepare_coco.py")
    job = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(job)
    assert job.DEFAULTS == asdict(PrepareConfig())


@pytest.mark.parametrize("job", JOBS)
def test_help_of_every_job_answers_from_another_folder(job, tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / f"{job}.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("usage:") and not out.stderr


def test_help_runs_from_another_folder(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_pep.py"), "--help"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    # argparse wraps help lines, also at hyphens inside the path (a clone in /tmp/ci-try)
    unwrapped = "".join(out.stdout.split())
    assert "--config" in out.stdout and str(ROOT / "configs" / "tiny.yaml") in unwrapped


def test_bad_config_is_reported_without_starting_anything(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "train_pep.py"), "--set", "train.nope=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert "unknown key" in out.stderr and "nope" in out.stderr
    assert not (tmp_path / "work").exists()  # no data, Ray or MLflow store was started
