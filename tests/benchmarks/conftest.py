"""The benchmark scripts are not a package: tests load them by path."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[2] / "benchmarks"


@pytest.fixture(scope="session")
def load_benchmark():
    """`load_benchmark("bench_scaling")` -> the module benchmarks/bench_scaling.py."""

    def load(name: str):
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # what dataclasses look their module up in
        spec.loader.exec_module(module)
        return module

    return load
