"""One MLflow run as the project logs to it: every parameter, metric, table, artifact and model
it writes, and the few reads a resumed run needs. Starting and ending a run is `runs.py`'s.

Only rank 0 talks to MLflow: other ranks get a `NullRun` whose methods do nothing, so training
code logs unconditionally and stays free of rank checks.
"""

from __future__ import annotations

import functools
import sys
import time
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from taxonclip import names
from taxonclip.formats import csv_text
from taxonclip.tracking.connection import activated, redacted_uri, server_answers, tracking_uri
from taxonclip.tracking.queries import metric_history
from taxonclip.tracking.spool import Spool
from taxonclip.tracking.tables import markdown_table, table_counts, table_metrics


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



def _param_text(value: Any) -> str:
    text = "" if value is None else str(value)
    return text[:6000]


def _now_ms() -> int:
    return int(time.time() * 1000)
