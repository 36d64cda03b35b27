"""Every MLflow call of the project: runs, parameters, metrics, tables, artifacts, models.

Only rank 0 talks to MLflow: `tracked_run(..., main=False)` yields a `NullRun` whose methods do
nothing, so training code logs unconditionally and stays free of rank checks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from taxonclip import names
from taxonclip.config import ModelConfig
from taxonclip.errors import ModelError, TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
MODEL_URI_PREFIXES = ("runs:/", "models:/")
# Requirements of the logged model, given explicitly: inferring them re-imports the model in a
# subprocess, which costs far more than the logging itself.
MODEL_REQUIREMENTS = ["taxonclip", "torch", "torchvision", "openai-clip"]


def tracking_uri() -> str:
    """The tracking URI in force: `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in this folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect() -> str:
    """Point MLflow at the tracking URI and fail fast, with one message, if a server is unreachable."""
    import mlflow

    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        _check_server(uri)
    mlflow.set_tracking_uri(uri)
    return uri


def _check_server(uri: str, timeout: float = 10.0) -> None:
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {uri} ({reason}); start it "
            f"(`make server`) or set MLFLOW_TRACKING_URI to a reachable server") from None


class NullRun:
    """Stands in for a run where nothing is logged (ranks other than 0)."""

    run_id: str | None = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class Run:
    """One MLflow run, with the logging calls the project makes."""

    def __init__(self, run_id: str):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self.client = MlflowClient()

    def logged_params(self) -> dict[str, str]:
        """Parameters the run already holds (from `mlflow run`, or before a resume)."""
        return dict(self.client.get_run(self.run_id).data.params)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters, keeping any the run already holds in the string form it received them."""
        from mlflow.entities import Param

        held = self.logged_params()
        fresh = [Param(key, _param_text(value)) for key, value in params.items() if key not in held]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metrics of one step in one call."""
        self.log_metric_history([(step or 0, metrics)])

    def log_metric_history(self, history: list[tuple[int, Mapping[str, float]]]) -> None:
        """Log buffered per-step metrics [(step, {key: value})] in as few calls as possible."""
        from mlflow.entities import Metric

        now = _now_ms()
        batch = [Metric(key, float(value), now, step)
                 for step, metrics in history for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def last_step(self, key: str) -> int:
        """The highest step logged for `key`, or -1: a resumed run logs only later steps."""
        return max((step for step, _ in metric_history(self.run_id, key)), default=-1)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, str(value))

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        """Upload one local file or folder into the run's artifacts."""
        path = Path(path)
        if path.is_dir():
            self.client.log_artifacts(self.run_id, str(path), artifact_dir)
        else:
            self.client.log_artifact(self.run_id, str(path), artifact_dir)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` as an artifact file."""
        self.client.log_text(self.run_id, text, artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact image."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def delete_artifact(self, artifact_path: str) -> None:
        """Remove one artifact (an old checkpoint)."""
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(self._artifact_uri).delete_artifacts(artifact_path)

    @functools.cached_property
    def _artifact_uri(self) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        """Fetch one artifact of this run into `dst`."""
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def list_artifacts(self, folder: str) -> list[str]:
        """Paths of the files in one artifact folder."""
        return [f.path for f in self.client.list_artifacts(self.run_id, folder) if not f.is_dir]

    def log_eval_metrics(self, table: pd.DataFrame, step: int | None = None) -> None:
        """Log every cell of the per-taxa table as a metric `eval/<taxa>/<level>/<metric>`."""
        self.log_metrics(table_metrics(table), step=step)

    def log_eval_table(self, table: pd.DataFrame) -> None:
        """Log the per-taxa table as an MLflow table (`eval/per_taxa.json`), CSV and Markdown."""
        import mlflow

        mlflow.log_table(table, artifact_file=names.PER_TAXA_TABLE, run_id=self.run_id)
        self.log_text(table.to_csv(index=False), names.TABLE_CSV)
        self.log_text(markdown_table(table), names.TABLE_MARKDOWN)

    def log_model(self, encoder, register_as: str | None = None) -> str:
        """Log the encoder as an MLflow PyTorch model (pickle format: it loads back as the same
        module class, usable by `eval`) and register it under `register_as` when given."""
        import mlflow

        with _active(self.run_id):
            info = mlflow.pytorch.log_model(
                encoder.cpu(), name=names.MODEL_ARTIFACT, serialization_format="pickle",
                pip_requirements=MODEL_REQUIREMENTS, registered_model_name=register_as)
        return info.model_uri


def table_metrics(table: pd.DataFrame) -> dict[str, float]:
    """The scalar metrics of a per-taxa table, keyed `eval/<taxa>/<level>/<metric>`."""
    values = table.drop(columns=["taxa", "level"]).select_dtypes("number")
    return {names.eval_metric(row.taxa, row.level, column): float(getattr(row, column))
            for row in table.itertuples(index=False) for column in values.columns
            if pd.notna(getattr(row, column))}


def markdown_table(table: pd.DataFrame) -> str:
    """A GitHub-style Markdown table, floats with 4 decimals."""
    def cell(value: Any) -> str:
        return f"{value:.4f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def tracked_run(entry: str, *, main: bool = True, resume_run_id: str | None = None,
                parent_run_id: str | None = None, run_name: str | None = None,
                experiment: str | None = None, tags: Mapping[str, Any] | None = None,
                ) -> Iterator[Run | NullRun]:
    """Start (or continue) the run of one entry point and end it FINISHED, FAILED or KILLED.

    Under `mlflow run` the run it created (`MLFLOW_RUN_ID`) is used; `resume_run_id` continues an
    earlier run instead, and the run `mlflow run` created then says where the work went on;
    `parent_run_id` makes a child run (one per sweep trial).
    """
    if not main:
        yield NullRun()
        return
    import mlflow

    connect()
    if experiment and not os.environ.get("MLFLOW_EXPERIMENT_ID"):
        mlflow.set_experiment(experiment)
    # Taken out of the environment: mlflow.start_run would otherwise resume it as the next run
    # started without a run id, such as a sweep's first trial.
    launched = os.environ.pop("MLFLOW_RUN_ID", None) if parent_run_id is None else None
    run_id = resume_run_id or launched
    try:
        active = mlflow.start_run(run_id=run_id, run_name=run_name, parent_run_id=parent_run_id,
                                  nested=parent_run_id is not None,
                                  tags={k: str(v) for k, v in
                                        {names.TAG_ENTRY: entry, **(tags or {})}.items()})
    except Exception as exc:
        raise TrackingError(f"cannot start or resume the MLflow run {run_id or ''} at "
                            f"{tracking_uri()}: {exc}") from None
    if launched and launched != active.info.run_id:
        _point_to_resumed(launched, active.info.run_id)
    status = "FAILED"
    try:
        yield Run(active.info.run_id)
        status = "FINISHED"
    except (KeyboardInterrupt, RunKilled):
        status = "KILLED"
        raise
    finally:
        mlflow.end_run(status)


def _point_to_resumed(launched: str, resumed: str) -> None:
    """Tag the run `mlflow run` created for a resume, which stays empty, with the run that goes on."""
    Run(launched).set_tags({names.TAG_RESUMED_INTO: resumed,
                            names.TAG_NOTE: f"This launch resumed run {resumed}: its metrics, "
                                            f"checkpoints and model continue there."})


class RunKilled(Exception):
    """Raised through `tracked_run` to end the run as KILLED (a pruned trial)."""


@contextlib.contextmanager
def _active(run_id: str) -> Iterator[None]:
    import mlflow

    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=current is not None):
        yield


def load_encoder(model: ModelConfig, device: str = "cpu", seed: int = 0):
    """Build the encoder a `ModelConfig` names: a registry name (`weights=none` drawn from
    `seed`), or a logged model URI (`runs:/<run_id>/model`, `models:/<name>/<version or @alias>`)."""
    from taxonclip.models import create_model

    if not model.name.startswith(MODEL_URI_PREFIXES):
        return create_model(model.name, model.weights, device=device, seed=seed)
    import mlflow

    connect()
    try:
        encoder = mlflow.pytorch.load_model(model.name, map_location=device)
    except Exception as exc:
        raise ModelError(f"cannot load the logged model {model.name} from {tracking_uri()}: "
                         f"{exc}") from None
    return encoder.to(device).float().eval()


def _param_text(value: Any) -> str:
    text = "" if value is None else str(value)
    return text[:6000]


def _now_ms() -> int:
    return int(time.time() * 1000)


# Queries behind `compare`: read-only searches, plus the registry aliases it moves.


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
                            f"{tracking_uri()}")
    return experiment.experiment_id, experiment.name


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


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) logged for one metric of a run, by step."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def runs_with_logged_model(experiment_ids: list[str]) -> set[str]:
    """Ids of the runs of these experiments that logged a ready `model` (`Run.log_model`)."""
    from mlflow.entities import LoggedModelStatus
    from mlflow.tracking import MlflowClient

    models = _all_pages(MlflowClient().search_logged_models, experiment_ids,
                        filter_string=f"name = '{names.MODEL_ARTIFACT}'")
    return {m.source_run_id for m in models
            if m.source_run_id and m.status == LoggedModelStatus.READY}


def model_version_for_run(run_id: str, name: str) -> tuple[str, str]:
    """The registered model version of a run's `model` as (name, version): an existing one
    (preferring registered model `name`), else a new version registered under `name`."""
    import mlflow
    from mlflow.tracking import MlflowClient

    versions = list(MlflowClient().search_model_versions(f"run_id = '{run_id}'"))
    if versions:
        chosen = max(versions, key=lambda v: (v.name == name, int(v.version)))
        return chosen.name, str(chosen.version)
    created = mlflow.register_model(f"runs:/{run_id}/{names.MODEL_ARTIFACT}", name)
    return created.name, str(created.version)


def set_model_alias(name: str, alias: str, version: str) -> None:
    """Point registry alias `alias` of model `name` at `version` (its other aliases stay)."""
    from mlflow.tracking import MlflowClient

    MlflowClient().set_registered_model_alias(name, alias, version)


def child_run_id(parent_run_id: str, tags: Mapping[str, str]) -> str | None:
    """The run started under `parent_run_id` that carries every tag of `tags` (one sweep
    trial's), or None. Tag values are matched literally and may not contain quotes."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient()
    experiment_id = client.get_run(parent_run_id).info.experiment_id
    clauses = [f"tags.`mlflow.parentRunId` = '{parent_run_id}'"]
    clauses += [f"tags.`{key}` = '{value}'" for key, value in tags.items()]
    runs = client.search_runs([experiment_id], " and ".join(clauses), max_results=1)
    return runs[0].info.run_id if runs else None


def record_failure(parent_run_id: str, tags: Mapping[str, str], params: Mapping[str, Any],
                   error: BaseException) -> str:
    """Record `error` in the run under `parent_run_id` carrying `tags`: `params`, a tag with the
    message (`taxonclip.error`) and the traceback (`error.txt`). When the error came before that
    run started, the run is created, ended FAILED. Returns its id."""
    import traceback

    from mlflow.tracking import MlflowClient
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    run_id = child_run_id(parent_run_id, tags)
    if run_id is None:
        client = MlflowClient()
        experiment_id = client.get_run(parent_run_id).info.experiment_id
        created = client.create_run(experiment_id, tags={MLFLOW_PARENT_RUN_ID: parent_run_id, **tags})
        run_id = created.info.run_id
        client.set_terminated(run_id, "FAILED")
    run = Run(run_id)
    run.log_params(params)
    run.set_tags({names.TAG_ERROR: f"{type(error).__name__}: {error}"[:5000]})
    run.log_text("".join(traceback.format_exception(error)), names.ERROR_ARTIFACT)
    return run_id
