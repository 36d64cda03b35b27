"""MLflow runs: connecting, starting or continuing the run of one entry point, and every
parameter, metric, table and artifact it logs.

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
from pathlib import Path
from typing import Any

import pandas as pd

from taxonclip import names
from taxonclip.errors import TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"


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

    def has_logged_model(self) -> bool:
        """Whether the run already logged its `model` (a resume then logs it no more)."""
        experiment_id = self.client.get_run(self.run_id).info.experiment_id
        found = self.client.search_logged_models(
            [experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND "
                                           f"name = '{names.MODEL_ARTIFACT}'", max_results=1)
        return len(found) > 0

    def list_artifacts(self, folder: str) -> list[str]:
        """Paths of the files in one artifact folder."""
        return [f.path for f in self.client.list_artifacts(self.run_id, folder) if not f.is_dir]

    def log_eval_metrics(self, table: pd.DataFrame, step: int | None = None) -> None:
        """Log every cell of the per-taxa table as a metric `eval/<taxa>/<level>/<metric>`."""
        self.log_metrics(table_metrics(table), step=step)

    def log_eval_table(self, table: pd.DataFrame) -> None:
        """Log the per-taxa table as an MLflow table (`eval/per_taxa.json`), CSV and Markdown,
        replacing any the run holds (MLflow appends the rows of a second table to the first)."""
        import mlflow

        folder = Path(names.PER_TAXA_TABLE).parent.as_posix()
        if names.PER_TAXA_TABLE in self.list_artifacts(folder):
            self.delete_artifact(names.PER_TAXA_TABLE)
        mlflow.log_table(table, artifact_file=names.PER_TAXA_TABLE, run_id=self.run_id)
        self.log_text(table.to_csv(index=False), names.TABLE_CSV)
        self.log_text(markdown_table(table), names.TABLE_MARKDOWN)

    def log_model(self, encoder, register_as: str | None = None) -> str:
        """Log the encoder as the run's `model` (see `tracking.models.log_model`)."""
        from taxonclip.tracking.models import log_model

        return log_model(self.run_id, encoder, register_as)


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
def activated(run_id: str) -> Iterator[None]:
    """Make `run_id` MLflow's active run for the calls that only act on the active run."""
    import mlflow

    current = mlflow.active_run()
    if current is not None and current.info.run_id == run_id:
        yield
        return
    with mlflow.start_run(run_id=run_id, nested=current is not None):
        yield


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """Every (step, value) logged for one metric of a run, by step."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient().get_metric_history(run_id, key)
    return [(m.step, m.value) for m in sorted(history, key=lambda m: (m.step, m.timestamp))]


def _param_text(value: Any) -> str:
    text = "" if value is None else str(value)
    return text[:6000]


def _now_ms() -> int:
    return int(time.time() * 1000)
