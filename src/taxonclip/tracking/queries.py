"""Read-only queries: what `compare` reads (experiments, runs and their tables, the runs that
logged a model), one run by id, and a run's metric history (the curves of the report, the last
step of a resumed run). The registry writes of `promote` are `models.py`'s."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import pandas as pd

from taxonclip import names
from taxonclip.errors import TrackingError
from taxonclip.tracking.connection import connect, redacted_uri, tracking_uri


@dataclass(frozen=True)
class RunRecord:
    """What `compare` needs to know about one run, read in the search that found it: `entry` is
    the taxonclip entry point that made it (its tag, else the MLproject entry point), `tables`
    the paths of the MLflow tables it logged."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int
    entry: str
    parent_run_id: str | None
    params: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    tables: tuple[str, ...] = ()


def find_experiments(spec: str | None) -> dict[str, str]:
    """Experiments named in `spec` (comma-separated names or ids; empty: every active one), as
    {id: name}; an unknown one raises TrackingError naming it."""
    from mlflow.entities import ViewType
    from mlflow.tracking import MlflowClient

    connect()
    client = MlflowClient()
    if not spec or not spec.strip():
        return {e.experiment_id: e.name
                for e in _all_pages(client.search_experiments, view_type=ViewType.ACTIVE_ONLY)}
    wanted = [item.strip() for item in spec.split(",") if item.strip()]
    return dict(_experiment(client, item) for item in wanted)


def _experiment(client, name_or_id: str) -> tuple[str, str]:
    from mlflow.exceptions import MlflowException

    experiment = client.get_experiment_by_name(name_or_id)
    if experiment is None:
        try:
            experiment = client.get_experiment(name_or_id)
        except MlflowException:
            experiment = None
    if experiment is None or experiment.lifecycle_stage != "active":
        raise TrackingError(f"no active MLflow experiment named or numbered {name_or_id!r} at "
                            f"{redacted_uri(tracking_uri())}")
    return experiment.experiment_id, experiment.name


def get_run(run_id: str) -> RunRecord:
    """One run by id; TrackingError when the server holds none of that id."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    connect()
    try:
        return _run_record(MlflowClient().get_run(run_id))
    except MlflowException as exc:
        raise TrackingError(f"no MLflow run {run_id!r} at {redacted_uri(tracking_uri())}: "
                            f"{exc.message}") from None


def find_runs(experiment_ids: list[str], filter_string: str | None = None) -> list[RunRecord]:
    """Every active run of the experiments that matches the MLflow search filter, newest first."""
    from mlflow.entities import ViewType
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    pages = _all_pages(MlflowClient().search_runs, experiment_ids, filter_string or "",
                       run_view_type=ViewType.ACTIVE_ONLY, max_results=1000,
                       order_by=["attributes.start_time DESC"])
    try:
        return [_run_record(run) for run in pages]
    except MlflowException as exc:
        raise TrackingError(f"cannot search runs with the filter {filter_string!r}: "
                            f"{exc.message}") from None


def _all_pages(search, *args, **kwargs) -> Iterator:
    """Every item of a paged MLflow search, following its page tokens."""
    token = None
    while True:
        page = search(*args, page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


def _run_record(run) -> RunRecord:
    import json

    from mlflow.utils.mlflow_tags import (MLFLOW_LOGGED_ARTIFACTS, MLFLOW_PARENT_RUN_ID,
                                          MLFLOW_PROJECT_ENTRY_POINT)

    tags = dict(run.data.tags)
    logged = json.loads(tags.get(MLFLOW_LOGGED_ARTIFACTS) or "[]")
    return RunRecord(
        run_id=run.info.run_id, experiment_id=run.info.experiment_id,
        name=run.info.run_name or "", status=run.info.status, start_time=run.info.start_time or 0,
        entry=tags.get(names.TAG_ENTRY) or tags.get(MLFLOW_PROJECT_ENTRY_POINT) or "",
        parent_run_id=tags.get(MLFLOW_PARENT_RUN_ID), params=dict(run.data.params), tags=tags,
        tables=tuple(item["path"] for item in logged if item.get("type") == "table"))


def load_tables(runs: list[RunRecord], artifact_file: str) -> pd.DataFrame:
    """The MLflow table `artifact_file` of every run whose table can be read, stacked, with a
    `run_id` column. One `load_table` query per experiment (it searches one experiment at a
    time); only a batch that fails is read again run by run, leaving out the unreadable ones."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    by_experiment: dict[str, list[str]] = {}
    for run in runs:
        by_experiment.setdefault(run.experiment_id, []).append(run.run_id)
    frames = []
    for experiment_id, run_ids in by_experiment.items():
        batch = _load_table(client, experiment_id, artifact_file, run_ids)
        if batch is not None:
            frames.append(batch)
            continue
        singles = (_load_table(client, experiment_id, artifact_file, [run_id])
                   for run_id in run_ids)
        frames += [single for single in singles if single is not None]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id"])


def _load_table(client, experiment_id: str, artifact_file: str,
                run_ids: list[str]) -> pd.DataFrame | None:
    from mlflow.exceptions import MlflowException

    try:
        return client.load_table(experiment_id, artifact_file, run_ids=run_ids,
                                 extra_columns=["run_id"])
    except MlflowException:
        return None


def runs_with_logged_model(experiment_ids: list[str]) -> set[str]:
    """Ids of the runs of these experiments that logged a ready `model` (`Run.log_model`)."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    models = _all_pages(MlflowClient().search_logged_models, experiment_ids,
                        filter_string=f"name = '{names.MODEL_ARTIFACT}'")
    return {m.source_run_id for m in models
            if m.source_run_id and m.status == LoggedModelStatus.READY}


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) logged for one metric of a run, by step."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]
