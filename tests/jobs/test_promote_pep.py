"""jobs/promote_pep.py against a real `mlflow server` process (as cluster.yaml runs it on the
head; its artifacts on an S3 server on loopback): who becomes @champion, and why.

The runs are made directly with MLflow (metrics, tags and a real PEP pyfunc model logged
by `pipeline.tracking.log_pep_model` from an untrained tiny checkpoint) instead of training
through Ray: the registry logic only reads what `train_and_evaluate` records. Each test uses
its own registered model name, so the tests share the runs but not the registry state.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest

from pipeline import registry, tracking

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "jobs"))

import promote_pep  # noqa: E402

FP_VAL = "a" * 64  # data_fingerprint of the evaluation set most runs used
FP_OTHER = "b" * 64
# The store's experiment: its own name, since the session's MLflow server also holds the runs
# other modules log to `pep` (their APs would enter an experiment-wide pick).
EXPERIMENT = "pep-promote-tests"


@pytest.fixture(scope="module")
def store(mlflow_server, tmp_path_factory, tiny_config):
    """A store with runs in EXPERIMENT (A, parent P with children B and C) and `other`.

    A 0.40 (val set), B 0.30 and C 0.10 (children of P, val set), P: a parent with a metric
    but no model, F: a FAILED run with the best metric, D 0.50 on another evaluation set.
    """
    from pep_model import build_model, save_checkpoint

    work = tmp_path_factory.mktemp("promote")
    uri = mlflow_server
    cfg = tiny_config()
    checkpoint = work / "checkpoint.pt"
    save_checkpoint(checkpoint, build_model(cfg.model), cfg)
    categories = {k: f"class{k}" for k in range(1, cfg.model.num_classes + 1)}

    def make_run(name: str, ap: float, fingerprint: str, parent: str | None = None) -> str:
        tags = {"data_fingerprint": fingerprint}
        if parent:
            tags["mlflow.parentRunId"] = parent
        with mlflow.start_run(run_name=name, tags=tags) as run:
            mlflow.log_metrics({"segm/AP": ap, "segm/AP50": ap + 0.1})
            info = tracking.log_pep_model(checkpoint, categories)
            mlflow.set_tag("model_uri", info.model_uri)
        return run.info.run_id

    runs: dict[str, str] = {}
    tracking.set_experiment(EXPERIMENT, uri)
    runs["A"] = make_run("A", 0.40, FP_VAL)
    with mlflow.start_run(run_name="P", tags={"data_fingerprint": FP_VAL}) as parent:
        mlflow.log_metric("segm/AP", 0.99)  # e.g. a sweep's summary; it has no model
    runs["P"] = parent.info.run_id
    runs["B"] = make_run("B", 0.30, FP_VAL, parent=runs["P"])
    runs["C"] = make_run("C", 0.10, FP_VAL, parent=runs["P"])
    with mlflow.start_run(run_name="F", tags={"data_fingerprint": FP_VAL}) as failed:
        mlflow.log_metric("segm/AP", 0.98)
        mlflow.set_tag("model_uri", mlflow.get_run(runs["A"]).data.tags["model_uri"])
    mlflow.MlflowClient(uri).set_terminated(failed.info.run_id, "FAILED")
    tracking.set_experiment("other", uri)
    runs["D"] = make_run("D", 0.50, FP_OTHER)
    return uri, runs, mlflow.MlflowClient(uri)


def _main(*argv: str) -> int:
    return promote_pep.main(promote_pep.get_args_parser().parse_args(list(argv)))


def _aliases(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    return {k: str(v) for k, v in client.get_registered_model(name).aliases.items()}


def _versions(client: mlflow.MlflowClient, name: str) -> dict[str, str]:
    """version -> source run id of every version of `name`."""
    return {str(v.version): v.run_id for v in client.search_model_versions(f"name = '{name}'")}


def test_first_candidate_becomes_champion_and_a_better_one_replaces_it(store, capsys):
    uri, runs, client = store
    assert _main("--run-id", runs["C"], "--model-name", "better", "--tracking-uri", uri) == 0
    assert _aliases(client, "better") == {"champion": "1"}
    assert client.get_model_version("better", "1").tags["promotion.decision"] == "first_champion"

    assert _main("--run-id", runs["B"], "--model-name", "better", "--tracking-uri", uri) == 0
    out = capsys.readouterr().out
    assert "PROMOTED" in out and runs["B"] in out
    assert _aliases(client, "better") == {"champion": "2", "previous": "1"}
    assert _versions(client, "better") == {"1": runs["C"], "2": runs["B"]}
    tags = client.get_model_version("better", "2").tags
    assert tags["promotion.decision"] == "promoted"
    assert tags["promotion.metric"] == "segm/AP"
    assert float(tags["promotion.value"]) == pytest.approx(0.30)
    assert float(tags["promotion.champion_value"]) == pytest.approx(0.10)
    assert tags["promotion.champion_version"] == "1"
    assert tags["data_fingerprint"] == FP_VAL
    assert tags["source_run_id"] == runs["B"]
    # the version serves the run's logged model
    model_uri = client.get_run(runs["B"]).data.tags["model_uri"]
    assert client.get_model_version("better", "2").source == model_uri


def test_a_worse_candidate_is_registered_but_moves_no_alias(store, capsys):
    uri, runs, client = store
    registry.promote(uri, run_id=runs["A"], model_name="worse")
    assert _main("--run-id", runs["B"], "--model-name", "worse", "--tracking-uri", uri) == 0
    assert "KEPT" in capsys.readouterr().out
    assert _aliases(client, "worse") == {"champion": "1"}
    tags = client.get_model_version("worse", "2").tags
    assert tags["promotion.decision"] == "kept"
    assert "does not beat the champion's 0.4000" in tags["promotion.reason"]
    assert float(tags["promotion.champion_value"]) == pytest.approx(0.40)
    # promoting the champion's own run again changes nothing
    again = registry.promote(uri, run_id=runs["A"], model_name="worse")
    assert again.decision == registry.ALREADY_CHAMPION
    assert _versions(client, "worse") == {"1": runs["A"], "2": runs["B"]}
    # a re-run for an already registered run reuses its version (no duplicate)
    registry.promote(uri, run_id=runs["B"], model_name="worse")
    assert _versions(client, "worse") == {"1": runs["A"], "2": runs["B"]}


def test_a_candidate_from_another_evaluation_set_is_refused(store, capsys):
    uri, runs, client = store
    registry.promote(uri, run_id=runs["A"], model_name="data")
    # D has the higher AP (0.50 > 0.40), but on other data
    assert _main("--run-id", runs["D"], "--model-name", "data", "--tracking-uri", uri) == 3
    err = capsys.readouterr().err
    assert "refused" in err and "different evaluation sets" in err
    assert runs["D"] in err and runs["A"] in err
    assert _aliases(client, "data") == {"champion": "1"}
    tags = client.get_model_version("data", "2").tags
    assert tags["promotion.decision"] == "refused"
    assert tags["data_fingerprint"] == FP_OTHER


def test_dry_run_changes_nothing(store, capsys, monkeypatch):
    uri, runs, client = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the store when --tracking-uri is not given
    registry.promote(uri, run_id=runs["C"], model_name="dry")
    before = (_versions(client, "dry"), _aliases(client, "dry"))
    tags_before = client.get_model_version("dry", "1").tags

    assert _main("--run-id", runs["B"], "--model-name", "dry", "--dry-run") == 0
    out = capsys.readouterr().out
    assert "PROMOTED (dry run)" in out and "nothing changed" in out
    assert (_versions(client, "dry"), _aliases(client, "dry")) == before
    assert client.get_model_version("dry", "1").tags == tags_before
    # nor is a registered model created for a first champion
    assert _main("--experiment", EXPERIMENT, "--model-name", "dry-new", "--tracking-uri", uri,
                 "--dry-run") == 0  # fmt: skip
    assert "FIRST_CHAMPION (dry run)" in capsys.readouterr().out
    assert not client.search_registered_models("name = 'dry-new'")


def test_best_run_of_an_experiment_or_of_a_parents_children(store):
    uri, runs, _ = store
    # P (no model) and F (FAILED) have higher AP but are not candidates
    best = registry.promote(uri, experiment=EXPERIMENT, model_name="exp", dry_run=True)
    assert best.candidate.run_id == runs["A"]
    children = registry.promote(
        uri, experiment=EXPERIMENT, parent_run_id=runs["P"], model_name="exp", dry_run=True
    )
    assert children.candidate.run_id == runs["B"]
    lowest = registry.promote(
        uri, experiment=EXPERIMENT, metric="segm/AP", mode="min", dry_run=True
    )
    assert lowest.candidate.run_id == runs["C"]


def test_bad_input_names_the_run_or_experiment(store, capsys):
    uri, runs, _ = store
    assert _main("--run-id", runs["P"], "--tracking-uri", uri, "--dry-run") == 2
    assert f"run {runs['P']}: no logged model" in capsys.readouterr().err
    assert _main("--run-id", runs["A"], "--metric", "segm/AP@400", "--tracking-uri", uri) == 2
    assert "no metric 'segm/AP_at_400'" in capsys.readouterr().err
    assert _main("--experiment", "nope", "--tracking-uri", uri) == 2
    assert "experiment 'nope': not found" in capsys.readouterr().err
    assert _main("--run-id", "0" * 32, "--tracking-uri", uri) == 2
    assert f"run {'0' * 32}: not found" in capsys.readouterr().err


def test_champion_loads_in_a_fresh_process_and_predicts(
    store, tiny_coco, tmp_path, load_pyfunc_fresh
):
    uri, runs, _ = store
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    done = subprocess.run(
        [sys.executable, str(ROOT / "jobs" / "promote_pep.py"), "--run-id", runs["A"],
         "--model-name", "served", "--tracking-uri", uri],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "FIRST_CHAMPION" in done.stdout and "@champion -> version 1" in done.stdout
    image = sorted((tiny_coco / "val" / "images").glob("*.jpg"))[0]
    # loads without unpickling anything (models from code), predicts with the served params
    params = {"score_threshold": 0.0, "max_instances": 2}
    done, report = load_pyfunc_fresh(uri, "models:/served@champion", image, params, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert report["columns"][:4] == ["image_index", "label", "category", "score"]
    assert report["run_id"] == runs["A"] and len(report["rows"]) == 2
