"""MLflow model registry: register a run's PEP model and gate the `champion` alias on its AP.

    decision = promote(tracking_uri, experiment="pep", metric="segm/AP")   # best run
    decision = promote(tracking_uri, run_id="3f2a...", dry_run=True)       # one run, no changes
    print(decision.report())

Rules (what `jobs/promote_pep.py` runs):

- The candidate is one run (`run_id`) or the best FINISHED run of an experiment that logged a
  model (tag `model_uri`) and the metric, optionally only the children of one parent run (a
  sweep or an ablation). Higher is better unless `mode="min"`.
- The candidate's model becomes a new version of the registered model (the version of the
  same run is reused on a re-run), tagged with the decision: `promotion.decision`,
  `promotion.reason`, `promotion.metric`, `promotion.value`, `promotion.champion_value`,
  `promotion.champion_version`, `promotion.time`, `data_fingerprint`, `source_run_id`.
  Every candidate is registered, also one that loses or is refused: the registry is then
  the audit trail of every promotion attempt, and a version that did not win can still be
  served or aliased by hand. Registering copies nothing (the version points at the logged
  model). Only the aliases are gated.
- The alias `champion` moves to the candidate only when the candidate's metric strictly beats
  the champion's metric (read from the champion's source run) on the same evaluation set:
  the runs' `data_fingerprint` tags must be equal, otherwise the promotion is refused. With
  no champion the candidate becomes the first one. The replaced champion gets `previous`.
- `dry_run=True` reads only: it decides and reports, and changes nothing in the registry.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.entities.model_registry import ModelVersion
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import RESOURCE_DOES_NOT_EXIST, ErrorCode

from pipeline.cli import DEFAULT_METRIC, DEFAULT_MODEL_NAME  # shared with the jobs' flags

CHAMPION = "champion"
PREVIOUS = "previous"

# Decisions: the first three move `champion` or leave it on the candidate; `kept` leaves the
# current champion in place; `refused` means the two runs cannot be compared.
PROMOTED = "promoted"
FIRST_CHAMPION = "first_champion"
ALREADY_CHAMPION = "already_champion"
KEPT = "kept"
REFUSED = "refused"

Mode = Literal["max", "min"]


class PromotionError(ValueError):
    """The candidate cannot be found or used (no such run, no model, no metric, no data tag)."""


@dataclass
class Candidate:
    """A run whose logged model may be promoted, with what the decision needs from it."""

    run_id: str
    run_name: str
    model_uri: str
    value: float
    fingerprint: str


@dataclass
class Decision:
    """What the promotion decided (and, unless dry run, did) for one candidate."""

    decision: str
    reason: str
    model_name: str
    metric: str
    mode: Mode
    candidate: Candidate
    champion_version: str | None = None
    champion_run_id: str | None = None
    champion_value: float | None = None
    version: str | None = None  # the candidate's registered version (None in a dry run)
    dry_run: bool = False

    @property
    def moves_champion(self) -> bool:
        return self.decision in (PROMOTED, FIRST_CHAMPION)

    @property
    def refused(self) -> bool:
        return self.decision == REFUSED

    def tags(self) -> dict[str, str]:
        """The tags recorded on the candidate's model version."""
        return {
            "promotion.decision": self.decision,
            "promotion.reason": self.reason,
            "promotion.metric": self.metric,
            "promotion.mode": self.mode,
            "promotion.value": repr(self.candidate.value),
            "promotion.champion_value": (
                "" if self.champion_value is None else repr(self.champion_value)
            ),
            "promotion.champion_version": self.champion_version or "",
            "promotion.time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "data_fingerprint": self.candidate.fingerprint,
            "source_run_id": self.candidate.run_id,
        }

    def report(self) -> str:
        """A human summary of the decision (printed by the job)."""
        c = self.candidate
        champion = (
            f"version {self.champion_version} (run {self.champion_run_id}), "
            f"{self.metric} = {self.champion_value:.4f}"
            if self.champion_version and self.champion_value is not None
            else (f"version {self.champion_version}" if self.champion_version else "none")
        )
        if self.decision == ALREADY_CHAMPION:
            version = f"{self.model_name} version {self.champion_version} (unchanged)"
        elif self.dry_run:
            version = "not registered (dry run: nothing changed)"
        else:
            version = f"{self.model_name} version {self.version}"
        if self.moves_champion and not self.dry_run:
            aliases = f"@{CHAMPION} -> version {self.version}"
            if self.champion_version:
                aliases += f", @{PREVIOUS} -> version {self.champion_version}"
        elif self.moves_champion:
            aliases = f"would move @{CHAMPION} to the candidate"
        else:
            aliases = "unchanged"
        return "\n".join(
            [
                "",
                f"decision:   {self.decision.upper()}{' (dry run)' if self.dry_run else ''}",
                f"reason:     {self.reason}",
                f"candidate:  run {c.run_id} ({c.run_name}), {self.metric} = {c.value:.4f}",
                f"            model {c.model_uri}, data {c.fingerprint[:12]}",
                f"champion:   {champion}",
                f"registered: {version}",
                f"aliases:    {aliases}",
                f"load:       mlflow.pyfunc.load_model('models:/{self.model_name}@{CHAMPION}')",
            ]
        )


def metric_key(metric: str) -> str:
    """The name a metric is stored under in MLflow ('@' is logged as '_at_')."""
    return metric.replace("@", "_at_")


# ------------------------------------------------------------------------------ candidates


def _candidate_from_run(run: Run, metric: str) -> Candidate:
    """Candidate of a run; PromotionError names the run and what it lacks."""
    run_id = run.info.run_id
    model_uri = run.data.tags.get("model_uri")
    if not model_uri:
        raise PromotionError(f"run {run_id}: no logged model (tag 'model_uri' is missing)")
    value = run.data.metrics.get(metric_key(metric))
    if value is None or math.isnan(value):
        raise PromotionError(f"run {run_id}: no metric {metric_key(metric)!r}")
    fingerprint = run.data.tags.get("data_fingerprint")
    if not fingerprint:
        raise PromotionError(
            f"run {run_id}: no 'data_fingerprint' tag, so its evaluation set is unknown"
        )
    return Candidate(run_id, run.info.run_name or "", model_uri, float(value), fingerprint)


def _better(a: float, b: float, mode: Mode) -> bool:
    return a > b if mode == "max" else a < b


def find_candidate(
    client: MlflowClient,
    *,
    run_id: str | None = None,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    metric: str = DEFAULT_METRIC,
    mode: Mode = "max",
) -> Candidate:
    """The run `run_id`, or the best finished run with a model in `experiment`.

    With `parent_run_id` only that run's children count (a sweep's trials). Ties go to the
    earlier run.
    """
    if (run_id is None) == (experiment is None):
        raise PromotionError("give exactly one of a run id or an experiment name")
    if run_id is not None:
        try:
            run = client.get_run(run_id)
        except MlflowException as e:
            raise PromotionError(f"run {run_id}: not found in the tracking store ({e})") from e
        return _candidate_from_run(run, metric)

    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise PromotionError(f"experiment {experiment!r}: not found in the tracking store")
    filters = ["attributes.status = 'FINISHED'"]
    if parent_run_id:
        filters.append(f"tags.`mlflow.parentRunId` = '{parent_run_id}'")
    runs: list[Run] = []
    token = None
    while True:
        page = client.search_runs(
            [found.experiment_id],
            " and ".join(filters),
            order_by=["attributes.start_time ASC"],
            max_results=1000,
            page_token=token,
        )
        runs.extend(page)
        token = page.token
        if not token:
            break
    best: Candidate | None = None
    for run in runs:
        try:
            candidate = _candidate_from_run(run, metric)
        except PromotionError:
            continue  # parent runs, runs without a model or without the metric
        if best is None or _better(candidate.value, best.value, mode):
            best = candidate
    if best is None:
        scope = f"children of run {parent_run_id} in " if parent_run_id else ""
        raise PromotionError(
            f"no finished run with a logged model and metric {metric_key(metric)!r} among the "
            f"{len(runs)} {scope}experiment {experiment!r}"
        )
    return best


# ------------------------------------------------------------------------------ registry


def _registered_model(client: MlflowClient, name: str):
    try:
        return client.get_registered_model(name)
    except MlflowException as e:
        if e.error_code == ErrorCode.Name(RESOURCE_DOES_NOT_EXIST):
            return None
        raise


def current_champion(client: MlflowClient, name: str) -> ModelVersion | None:
    """The version holding alias `champion` of registered model `name`, if any."""
    model = _registered_model(client, name)
    if model is None or CHAMPION not in (model.aliases or {}):
        return None
    return client.get_model_version(name, str(model.aliases[CHAMPION]))


def _existing_version(client: MlflowClient, name: str, candidate: Candidate) -> ModelVersion | None:
    """The version already registered for this run's model (a re-run reuses it)."""
    if _registered_model(client, name) is None:
        return None
    for version in client.search_model_versions(
        f"name = '{name}' and run_id = '{candidate.run_id}'"
    ):
        if version.tags.get("source_run_id") == candidate.run_id:
            return version
    return None


def decide(
    client: MlflowClient,
    candidate: Candidate,
    model_name: str = DEFAULT_MODEL_NAME,
    metric: str = DEFAULT_METRIC,
    mode: Mode = "max",
) -> Decision:
    """Compare the candidate with the current champion; reads only."""
    decision = Decision("", "", model_name, metric, mode, candidate)
    champion = current_champion(client, model_name)
    if champion is None:
        decision.decision = FIRST_CHAMPION
        decision.reason = f"registered model {model_name!r} has no @{CHAMPION} yet"
        return decision
    decision.champion_version = str(champion.version)
    champion_run_id = champion.run_id or champion.tags.get("source_run_id")
    decision.champion_run_id = champion_run_id
    if champion_run_id == candidate.run_id:
        decision.decision = ALREADY_CHAMPION
        decision.reason = (
            f"run {candidate.run_id} is already @{CHAMPION} (version {champion.version})"
        )
        decision.champion_value = candidate.value
        return decision
    if not champion_run_id:
        decision.decision = REFUSED
        decision.reason = (
            f"champion version {champion.version} has no source run, so its {metric} cannot be read"
        )
        return decision
    try:
        champion_run = client.get_run(champion_run_id)
    except MlflowException:
        decision.decision = REFUSED
        decision.reason = (
            f"the champion's source run {champion_run_id} (version {champion.version}) "
            "is not in the tracking store"
        )
        return decision
    value = champion_run.data.metrics.get(metric_key(metric))
    if value is not None:
        decision.champion_value = float(value)
    fingerprint = champion.tags.get("data_fingerprint") or champion_run.data.tags.get(
        "data_fingerprint"
    )
    if fingerprint != candidate.fingerprint:
        decision.decision = REFUSED
        decision.reason = (
            f"different evaluation sets: run {candidate.run_id} was evaluated on data "
            f"{candidate.fingerprint[:12]}, champion version {champion.version} (run "
            f"{champion_run_id}) on data {(fingerprint or 'unknown')[:12]}; "
            f"{metric} values are not comparable"
        )
    elif value is None or math.isnan(value):
        decision.decision = REFUSED
        decision.reason = (
            f"champion version {champion.version} (run {champion_run_id}) has no metric "
            f"{metric_key(metric)!r} to compare with"
        )
    elif _better(candidate.value, value, mode):
        decision.decision = PROMOTED
        decision.reason = (
            f"{metric} {candidate.value:.4f} beats the champion's {value:.4f} on the same "
            "evaluation set"
        )
    else:
        decision.decision = KEPT
        decision.reason = (
            f"{metric} {candidate.value:.4f} does not beat the champion's {value:.4f} "
            f"({'higher' if mode == 'max' else 'lower'} is better)"
        )
    return decision


@contextlib.contextmanager
def _global_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's global tracking URI at `uri` for the duration.

    MLflow's SQL registry store resolves a `models:/<model_id>` source with a client on the
    global tracking URI, not the calling client's (a TODO in its `create_model_version`).
    """
    previous = mlflow.get_tracking_uri() if mlflow.is_tracking_uri_set() else None
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(previous)


def apply(client: MlflowClient, decision: Decision) -> Decision:
    """Register the candidate (or reuse its version), tag the decision, move the aliases."""
    name, candidate = decision.model_name, decision.candidate
    if decision.decision == ALREADY_CHAMPION:
        decision.version = decision.champion_version
        return decision
    if _registered_model(client, name) is None:
        client.create_registered_model(
            name, description="PEP instance segmentation (jobs/promote_pep.py)"
        )
    version = _existing_version(client, name, candidate)
    if version is None:
        model_id = None
        if candidate.model_uri.startswith("models:/m-"):
            model_id = candidate.model_uri[len("models:/") :]
        with _global_tracking_uri(client.tracking_uri):
            version = client.create_model_version(
                name, source=candidate.model_uri, run_id=candidate.run_id, model_id=model_id
            )
    decision.version = str(version.version)
    for key, value in decision.tags().items():
        client.set_model_version_tag(name, decision.version, key, value)
    if decision.moves_champion:
        if decision.champion_version:
            client.set_registered_model_alias(name, PREVIOUS, decision.champion_version)
        client.set_registered_model_alias(name, CHAMPION, decision.version)
    return decision


def promote(
    tracking_uri: str,
    *,
    run_id: str | None = None,
    experiment: str | None = None,
    parent_run_id: str | None = None,
    metric: str = DEFAULT_METRIC,
    mode: Mode = "max",
    model_name: str = DEFAULT_MODEL_NAME,
    dry_run: bool = False,
    registry_uri: str | None = None,
) -> Decision:
    """Find the candidate, decide against the champion and (unless `dry_run`) apply it.

    The registry is `registry_uri`, else MLFLOW_REGISTRY_URI, else the tracking store.
    """
    client = MlflowClient(tracking_uri=tracking_uri, registry_uri=registry_uri)
    candidate = find_candidate(
        client,
        run_id=run_id,
        experiment=experiment,
        parent_run_id=parent_run_id,
        metric=metric,
        mode=mode,
    )
    decision = decide(client, candidate, model_name, metric, mode)
    decision.dry_run = dry_run
    if not dry_run:
        apply(client, decision)
    return decision
