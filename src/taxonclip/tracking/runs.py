"""MLflow runs: connecting, starting or continuing the run of one entry point, and every
parameter, metric, table and artifact it logs.

Only rank 0 talks to MLflow: `tracked_run(..., main=False)` yields a `NullRun` whose methods do
nothing, so training code logs unconditionally and stays free of rank checks.
"""

from __future__ import annotations

import contextlib
import functools
import os
import shlex
import sys
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from taxonclip import names
from taxonclip.errors import DiskError, TrackingError
from taxonclip.formats import PERCENT_NOTE, csv_text, markdown_grid, percent
from taxonclip.tracking.connection import (  # noqa: F401 (their home before connection.py)
    DEFAULT_TRACKING_URI, activated, connect, redacted_uri, server_answers, tracking_uri)
from taxonclip.tracking.experiments import prepare_experiment
from taxonclip.tracking.spool import Spool


class NullRun:
    """Stands in for a run where nothing is logged (ranks other than 0)."""

    run_id: str | None = None
    experiment_id: str | None = None

    def __getattr__(self, name: str):
        return lambda *args, **kwargs: None


class Run:
    """One MLflow run, with the logging calls the project makes.

    Every call that writes goes through `_send`: while the tracking server cannot be reached it
    waits in the run's spool (`tracking/spool.py`) and training goes on; the next call that
    reaches the server first sends what waits, in order. Reads (`last_step`, `list_artifacts`)
    need the server."""

    def __init__(self, run_id: str, spool: Spool | None = None, info=None):
        from mlflow.tracking import MlflowClient

        self.run_id = run_id
        self._info = info  # the run's RunInfo where the caller has it: no call to the server
        self.client = MlflowClient()
        self.spool = spool or Spool.of_run(run_id)
        self.queued = len(self.spool.pending())
        self._outage_said = False

    def logged_params(self) -> dict[str, str]:
        """Parameters the run already holds (from `mlflow run`, or before a resume)."""
        return dict(self.client.get_run(self.run_id).data.params)

    def log_params(self, params: Mapping[str, Any]) -> None:
        """Log parameters, keeping any the run already holds in the string form it received them."""
        self._send("params", params={key: _param_text(value) for key, value in params.items()})

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        """Log several metrics of one step in one call."""
        self.log_metric_history([(step or 0, metrics)])

    def log_metric_history(self, history: list[tuple[int, Mapping[str, float]]]) -> None:
        """Log buffered per-step metrics [(step, {key: value})] in as few calls as possible."""
        self._send("metrics", timestamp=_now_ms(),
                   history=[[step, {key: float(value) for key, value in metrics.items()}]
                            for step, metrics in history])

    def last_step(self, key: str) -> int:
        """The highest step logged for `key`, or -1: a resumed run logs only later steps."""
        return max((step for step, _ in metric_history(self.run_id, key)), default=-1)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        """Set run tags."""
        self._send("tags", tags={key: str(value) for key, value in tags.items()})

    def staging(self, name: str) -> Path:
        """A path in the run's spool to write a file to before `log_artifact` uploads it: a
        checkpoint then has a copy on the local disk until its upload succeeds."""
        return self.spool.staging(name)

    def stage(self, name: str, writer, needed: int | None = None) -> Path:
        """Write a file to upload (a checkpoint) into the run's spool by `writer(path)`, whole
        or not at all (`Spool.write`); returns its path."""
        return self.spool.write(name, writer, needed)
    def local_copy(self, name: str) -> Path | None:
        """The file `name` staged in the run's spool whose upload still waits, if any."""
        return self.spool.kept(name)

    def log_artifact(self, path: str | Path, artifact_dir: str | None = None) -> None:
        """Upload one local file or folder into the run's artifacts."""
        self._send("artifact", path=str(path), artifact_dir=artifact_dir)

    def log_text(self, text: str, artifact_file: str) -> None:
        """Write `text` as an artifact file."""
        self._send("text", text=text, artifact_file=artifact_file)

    def log_figure(self, figure, artifact_file: str) -> None:
        """Save a matplotlib figure as an artifact image (a sweep's summary plots)."""
        self.client.log_figure(self.run_id, figure, artifact_file)

    def delete_artifact(self, artifact_path: str) -> None:
        """Remove one artifact."""
        self._send("delete", artifact_path=artifact_path)

    def prune_artifacts(self, folder: str, keep: set[str]) -> None:
        """Remove every file of an artifact folder whose name is not in `keep` (old checkpoints)."""
        self._send("prune", folder=folder, keep=sorted(keep))

    @functools.cached_property
    def _artifact_uri(self) -> str:
        return self._run_info.artifact_uri

    @functools.cached_property
    def _run_info(self):
        return self._info or self.client.get_run(self.run_id).info

    def download(self, artifact_path: str, dst: str | Path) -> Path:
        """Fetch one artifact of this run into `dst`."""
        return Path(self.client.download_artifacts(self.run_id, artifact_path, str(dst)))

    def has_logged_model(self) -> bool:
        """Whether the run already logged its `model` (a resume then logs it no more)."""
        found = self.client.search_logged_models(
            [self.experiment_id], filter_string=f"source_run_id = '{self.run_id}' AND "
                                           f"name = '{names.MODEL_ARTIFACT}'", max_results=1)
        return len(found) > 0

    def list_artifacts(self, folder: str) -> list[str]:
        """Paths of the files in one artifact folder."""
        return [f.path for f in self.client.list_artifacts(self.run_id, folder) if not f.is_dir]

    def log_eval_metrics(self, table: pd.DataFrame, step: int | None = None) -> None:
        """Log every score of the per-taxa table as a metric `eval/<taxa>/<level>/<score>`, and
        the counts of its overall rows as parameters (once: a later call keeps them)."""
        self.log_metrics(table_metrics(table), step=step)
        self.log_params(table_counts(table))

    def artifact_location(self, artifact_path: str) -> str:
        """Where one artifact of this run is kept: a path where the artifact store is a local
        folder, else its URI; while calls wait for the server, the spool they wait in."""
        if self.queued:
            return f"{self.spool.folder} (until the tracking server takes it)"
        uri = self._artifact_uri
        if uri.startswith("file:"):
            return str(Path(urllib.parse.unquote(urllib.parse.urlparse(uri).path), artifact_path))
        if "://" not in uri and not uri.startswith(("mlflow-artifacts:", "runs:")):
            return str(Path(uri, artifact_path))
        return f"{uri.rstrip('/')}/{artifact_path}"

    @property
    def experiment_id(self) -> str:
        """The id of the experiment the run is in."""
        return self._run_info.experiment_id

    def log_eval_table(self, table: pd.DataFrame) -> None:
        """Log the per-taxa table as an MLflow table (`eval/per_taxa.json`), CSV and Markdown,
        replacing any the run holds (MLflow appends the rows of a second table to the first)."""
        self._send("table", table=table.to_json(orient="split", index=False))
        self.log_text(csv_text(table), names.TABLE_CSV)
        self.log_text(markdown_table(table), names.TABLE_MARKDOWN)

    def log_named_table(self, table: pd.DataFrame, artifact_file: str) -> None:
        """Log `table` as an MLflow table (a `.json` artifact the UI shows as a table)."""
        self._send("named_table", table=table.to_json(orient="split", index=False),
                   artifact_file=artifact_file)

    def log_model(self, encoder, register_as: str | None = None) -> None:
        """Log the encoder as the run's `model` (see `tracking.logged_model.log_model`)."""
        self._send("model", encoder=encoder, register_as=register_as)

    def end(self, status: str) -> None:
        """End the run with `status` (FINISHED, FAILED or KILLED)."""
        self._send("end", status=status)

    def _send(self, call: str, **args: Any) -> None:
        """Make one call now, or queue it when the server is away (or others still wait)."""
        record = {"call": call, **args}
        if self.queued and not self.resend():
            self._queue(record)
            return
        try:
            self._apply(record)
        except Exception as error:  # MLflow raises many types for one lost connection
            if not self._server_away(error):
                raise
            self._queue(record)

    def resend(self) -> bool:
        """Send the queued calls, oldest first; False while the server is still away."""
        if not self.queued:
            return True
        if self.spool.waiting():
            return False
        sent = 0
        for record in self.spool.pending():
            try:
                self._apply(record)
            except Exception as error:  # as in _send
                if not self._server_away(error):
                    raise
                return False
            self.spool.drop_first()
            self.queued, sent = self.queued - 1, sent + 1
        self.spool.remove_if_empty()
        print(f"tracking server back: sent the {sent} queued call(s) of run {self.run_id}",
              file=sys.stderr)
        self._outage_said = False
        return True

    def _queue(self, record: dict) -> None:
        if record["call"] == "artifact":
            record["path"] = str(self.spool.keep(record["path"]))
            print(f"tracking server unreachable: {Path(record['path']).name} kept in "
                  f"{self.spool.folder} until it can be uploaded", file=sys.stderr)
        if record["call"] == "model":
            record = self._spooled_model(record)
        self.spool.add(record)
        self.queued += 1

    def _server_away(self, error: BaseException) -> bool:
        """Whether `error` came from a tracking server that does not answer (then say so once
        per outage); False for any other error, which the caller raises."""
        uri = tracking_uri()
        if not uri.startswith(("http://", "https://")) or server_answers(uri):
            return False
        self.spool.wait_before_retry()
        if not self._outage_said:
            print(f"tracking server {redacted_uri(uri)} unreachable ({type(error).__name__}); "
                  f"run {self.run_id}: {self.queued + 1} call(s) queued in {self.spool.folder}; "
                  f"training goes on", file=sys.stderr)
            self._outage_said = True
        return True

    def _apply(self, record: dict) -> None:
        args = {key: value for key, value in record.items() if key != "call"}
        getattr(self, f"_write_{record['call']}")(**args)

    def _write_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        held = self.logged_params()
        fresh = [Param(key, value) for key, value in params.items() if key not in held]
        for start in range(0, len(fresh), 100):
            self.client.log_batch(self.run_id, params=fresh[start:start + 100])

    def _write_metrics(self, history: list, timestamp: int) -> None:
        from mlflow.entities import Metric

        batch = [Metric(key, value, timestamp, step)
                 for step, metrics in history for key, value in metrics.items()]
        for start in range(0, len(batch), 1000):
            self.client.log_batch(self.run_id, metrics=batch[start:start + 1000])

    def _write_tags(self, tags: dict[str, str]) -> None:
        for key, value in tags.items():
            self.client.set_tag(self.run_id, key, value)

    def _write_artifact(self, path: str, artifact_dir: str | None) -> None:
        if Path(path).is_dir():
            self.client.log_artifacts(self.run_id, path, artifact_dir)
        else:
            self.client.log_artifact(self.run_id, path, artifact_dir)
        self.spool.release(path)
        if not self.queued:  # a checkpoint staged and sent at once leaves no folder behind
            self.spool.remove_if_empty()

    def _write_text(self, text: str, artifact_file: str) -> None:
        self.client.log_text(self.run_id, text, artifact_file)

    def _write_delete(self, artifact_path: str) -> None:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        get_artifact_repository(self._artifact_uri).delete_artifacts(artifact_path)

    def _write_prune(self, folder: str, keep: list[str]) -> None:
        for artifact in self.list_artifacts(folder):
            if Path(artifact).name not in keep:
                self._write_delete(artifact)

    def _write_table(self, table: str) -> None:
        import io

        import mlflow

        folder = Path(names.PER_TAXA_TABLE).parent.as_posix()
        if names.PER_TAXA_TABLE in self.list_artifacts(folder):
            self._write_delete(names.PER_TAXA_TABLE)
        frame = pd.read_json(io.StringIO(table), orient="split")
        mlflow.log_table(frame, artifact_file=names.PER_TAXA_TABLE, run_id=self.run_id)

    def _write_named_table(self, table: str, artifact_file: str) -> None:
        import io

        import mlflow

        frame = pd.read_json(io.StringIO(table), orient="split", dtype=False)
        mlflow.log_table(frame, artifact_file=artifact_file, run_id=self.run_id)

    def _spooled_model(self, record: dict) -> dict:
        """The model call with its encoder written into the spool as a logged model's files."""
        from taxonclip.tracking.logged_model import write_encoder_files

        def write(folder: Path) -> None:
            folder.mkdir()
            write_encoder_files(record["encoder"], folder)

        folder = self.spool.write("model", write)
        return {"call": "model", "folder": str(folder), "register_as": record["register_as"]}

    def _write_model(self, register_as: str | None, encoder=None, folder: str | None = None) -> None:
        from taxonclip.tracking.logged_model import (CONFIG_FILE, WEIGHTS_FILE, log_model,
                                                     read_logged_encoder)

        if encoder is None:
            encoder = read_logged_encoder(Path(folder) / CONFIG_FILE, Path(folder) / WEIGHTS_FILE)
        with activated(self.run_id):
            log_model(encoder, register_as)
        if folder is not None:
            self.spool.release(folder)

    def _write_end(self, status: str) -> None:
        import mlflow

        if status == "RUNNING":  # stopped, resumable: leave MLflow's active run, end nothing
            active = mlflow.active_run()
            if active is not None and active.info.run_id == self.run_id:
                mlflow.end_run("KILLED")
                self.client.update_run(self.run_id, status="RUNNING")
            return
        active = mlflow.active_run()
        if active is not None and active.info.run_id == self.run_id:
            mlflow.end_run(status)
        else:
            self.client.set_terminated(self.run_id, status)


def table_metrics(table: pd.DataFrame, key=names.eval_metric) -> dict[str, float]:
    """The scores of a per-taxa table as metrics, keyed `eval/<taxa>/<level>/<score>` (or by
    `key`: `names.val_metric` for a training's validation); the counts (`n_test`, ...) are no
    curve: see `table_counts`."""
    scores = table.drop(columns=["taxa", "level", *names.COUNT_COLUMNS],
                        errors="ignore").select_dtypes("number")
    return {key(row.taxa, row.level, column): float(getattr(row, column))
            for row in table.itertuples(index=False) for column in scores.columns
            if pd.notna(getattr(row, column))}


def table_counts(table: pd.DataFrame, key=names.eval_metric) -> dict[str, int]:
    """The counts of the overall rows (`All`, `All:seen`, ...) as parameters, keyed like the
    metrics (`eval/All/species/n_test`): they are the same at every epoch, and the counts of
    every row are in the table."""
    overall = table[table["taxa"].astype(str).str.startswith(names.ALL_TAXA)]
    return {key(row.taxa, row.level, column): int(getattr(row, column))
            for row in overall.itertuples(index=False) for column in names.COUNT_COLUMNS
            if column in table.columns and pd.notna(getattr(row, column))}


def markdown_table(table: pd.DataFrame) -> str:
    """The per-taxa table in GitHub Markdown: the scores in percent with two decimals, then the
    counts, as two tables narrow enough that a viewer shows every header in full."""
    scores = [c for c in table.columns if c not in ("taxa", "level", *names.COUNT_COLUMNS)]
    counts = [c for c in names.COUNT_COLUMNS if c in table.columns]
    shown = table.copy()
    for column in scores:
        shown[column] = shown[column].map(percent)
    shown.insert(0, "taxa/level", shown["taxa"].astype(str) + "/" + shown["level"].astype(str))
    return (f"Scores, {PERCENT_NOTE}:\n\n{markdown_grid(shown[['taxa/level', *scores]])}\n"
            f"Counts: scored test images, classes, test images whose label has no train image:"
            f"\n\n{markdown_grid(shown[['taxa/level', *counts]])}")


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
                            f"{redacted_uri(tracking_uri())}: {exc}") from None
    if launched and launched != active.info.run_id:
        _point_to_resumed(launched, active.info.run_id)
    run = Run(active.info.run_id, info=active.info)
    run.resend()  # what an earlier process of this run left in its spool goes first
    prepare_experiment(run.client, active.info.experiment_id)
    _describe(run, launched_by_mlflow=launched is not None, resumed=resume_run_id is not None)
    if resume_run_id is not None:  # the reason it stopped, once it goes on, is no more
        with contextlib.suppress(Exception):  # MLflow raises where the tag is not set
            run.client.delete_tag(run.run_id, names.TAG_STOPPED_REASON)
    status = "FAILED"
    try:
        yield run
        status = "FINISHED"
    except (KeyboardInterrupt, RunKilled):
        status = "KILLED"
        raise
    except DiskError as error:
        if entry != "train":
            raise
        status = "RUNNING"  # a training goes on from its last checkpoint once space is freed
        with contextlib.suppress(Exception):  # the store may lie on the full disk too
            run.set_tags({names.TAG_STOPPED_REASON: str(error)})
        raise DiskError(f"{error}; then continue the run with: taxonclip train --resume "
                        f"{run.run_id}") from None
    finally:
        run.end(status)
        _settle_spool(run, raise_error=status == "FINISHED")


def _settle_spool(run: Run, raise_error: bool) -> None:
    """At the end of a run, give an absent server one more chance; if calls still wait, say
    where they are kept and how to send them (an error when the run itself went well)."""
    if not run.queued:
        return
    time.sleep(max(0.0, run.spool.retry_at - time.monotonic()))
    if run.resend():
        return
    message = (f"the tracking server at {redacted_uri(tracking_uri())} is unreachable: "
               f"{run.queued} call(s) of run {run.run_id} (metrics, checkpoints, the model, its "
               f"end) are kept in {run.spool.folder}; once the server is back, send them with: "
               f"taxonclip sync {run.spool.folder}")
    if raise_error:
        raise TrackingError(message)
    print(f"error: {message}", file=sys.stderr)


def sync_spool(folder: Path) -> tuple[str, int]:
    """Send what the spool `folder` (named by its run id) holds; returns the run id and how many
    calls went. TrackingError when there is nothing to send or the server is still away."""
    folder = Path(folder)
    spool = Spool(folder)
    if not spool.pending():
        raise TrackingError(f"{folder} holds no queued calls of a run (a spool folder is named "
                            f"by its run id and holds {spool.queue_file.name})")
    connect()
    run = Run(folder.name, spool)
    count = run.queued
    if not run.resend():
        raise TrackingError(f"the tracking server at {redacted_uri(tracking_uri())} is still "
                            f"unreachable; {run.queued} call(s) wait in {folder}")
    return run.run_id, count


def command_line(argv: list[str] | None = None) -> str:
    """The command that started this process, as a user would type it again (`taxonclip train
    ...` for `python -m taxonclip`), with any password in a URL replaced by `***`."""
    argv = list(sys.argv if argv is None else argv)
    program = Path(argv[0]).name if argv else "taxonclip"
    if program in ("__main__.py", "taxonclip"):
        head = ["taxonclip"]
    elif program.endswith(".py"):
        head = ["python", os.path.relpath(argv[0]) if os.path.isabs(argv[0]) else argv[0]]
    else:
        head = [program]
    return shlex.join(head + [redacted_uri(word) if "@" in word else word for word in argv[1:]])


def _describe(run: Run, launched_by_mlflow: bool, resumed: bool) -> None:
    """Write the command that made the run into its description (the MLflow UI's note); a
    resume adds its own command below the first."""
    how = " (started by `mlflow run`)" if launched_by_mlflow else ""
    line = f"{'Resumed' if resumed else 'Made'} by `{command_line()}`{how} in `{os.getcwd()}`."
    held = run.client.get_run(run.run_id).data.tags.get(names.TAG_NOTE, "") if resumed else ""
    run.set_tags({names.TAG_NOTE: f"{held}\n\n{line}".strip()})


def _point_to_resumed(launched: str, resumed: str) -> None:
    """Tag the run `mlflow run` created for a resume, which stays empty, with the run that goes on."""
    Run(launched).set_tags({names.TAG_RESUMED_INTO: resumed,
                            names.TAG_NOTE: f"This launch resumed run {resumed}: its metrics, "
                                            f"checkpoints and model continue there."})


class RunKilled(Exception):
    """Raised through `tracked_run` to end the run as KILLED (a pruned trial)."""


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
