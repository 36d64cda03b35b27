"""The tracking server goes away during a training: a real `mlflow server` on a loopback port,
stopped and started again by its PID. Down for 30 s mid-run (5 s in `make test`), nothing is
lost; down for good,
the run exits with one message naming its spool, and `taxonclip sync` completes the run."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from taxonclip import names
from taxonclip import train as train_module
from taxonclip.cli import main
from taxonclip.training import loop
from tests.helpers import free_port, wait_for_http

pytestmark = pytest.mark.integration

OUTAGE_S = 30
ARGS = ["--model", "tiny", "--batch_size", "16", "--lr", "3e-3", "--margin_s", "16",
        "--margin_m2", "0.2", "--workers", "0", "--keep_checkpoints", "1"]


class Server:
    """An `mlflow server` whose process can be stopped and started again on the same port,
    backend and artifact folder."""

    def __init__(self, root: Path):
        self.root, self.port, self.process = root, free_port(), None
        self.uri = f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start the server and wait until it answers."""
        log = open(self.root / "server.log", "a")
        self.process = subprocess.Popen(
            [str(Path(sys.executable).parent / "mlflow"), "server",
             "--backend-store-uri", f"sqlite:///{self.root / 'mlflow.db'}",
             "--artifacts-destination", str(self.root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
            stdout=log, stderr=subprocess.STDOUT, cwd=self.root, start_new_session=True)
        wait_for_http(f"{self.uri}/health", self.process)

    def stop(self) -> None:
        """Stop the server (its whole process group: the workers too)."""
        import os
        import signal

        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=30)


@pytest.fixture
def server(tmp_path, monkeypatch):
    """A fresh stoppable server for this test, with the spool and the retry wait set short."""
    found = Server(tmp_path)
    found.start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", found.uri)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "outage")
    monkeypatch.setenv("TAXONCLIP_SPOOL", str(tmp_path / "spool"))
    monkeypatch.setenv("TAXONCLIP_TRACKING_RETRY_S", "2")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    yield found
    if found.process.poll() is None:
        found.stop()


def _stop_after_first_checkpoint(monkeypatch, server: Server, back_after: float | None) -> None:
    """Stop the server right after the first checkpoint is saved; start it again `back_after`
    seconds later (never, for None). While an outage that ends lasts, every step takes a little
    time, so that the training outlasts a 30 s outage."""
    real_save, real_step, down = train_module.save_checkpoint, loop.train_step, []

    def save_then_stop(state, ctx):
        real_save(state, ctx)
        if not down:
            server.stop()
            down.append(time.monotonic())
            if back_after is not None:
                threading.Timer(back_after, lambda: (server.start(), down.append(0))).start()

    def slow_while_down(*args, **kwargs):
        if len(down) == 1:
            time.sleep(1.0)
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train_module, "save_checkpoint", save_then_stop)
    if back_after is not None:
        monkeypatch.setattr(loop, "train_step", slow_while_down)


def _assert_whole(run_id: str, epochs: int) -> None:
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    losses = Counter(m.step for m in client.get_metric_history(run_id, names.TRAIN_LOSS))
    assert set(losses.values()) == {1} and sorted(losses) == list(range(1, len(losses) + 1))
    evals = Counter(m.step for m in client.get_metric_history(
        run_id, names.val_metric("All", "species", "top1_cos")))
    assert evals == Counter(range(1, epochs + 1)), sorted(evals.items())
    tests = client.get_metric_history(run_id, names.eval_metric("All", "species", "top1_cos"))
    assert len(tests) == 1  # the selected model, scored once on the test split
    checkpoints = {Path(a.path).name for a in client.list_artifacts(run_id, names.CHECKPOINT_DIR)}
    assert f"epoch_{epochs:03d}.pt" in checkpoints and len(checkpoints) <= 2
    models = client.search_logged_models([run.info.experiment_id],
                                         filter_string=f"source_run_id = '{run_id}'")
    assert len(models) == 1


def _only_run_id() -> str:
    client = MlflowClient()
    [run] = client.search_runs([client.get_experiment_by_name("outage").experiment_id])
    return run.info.run_id


@pytest.mark.parametrize("outage_s", [pytest.param(OUTAGE_S, marks=pytest.mark.slow), 5])
def test_an_outage_mid_run_loses_nothing(outage_s, server, specimens, monkeypatch, tmp_path,
                                         capsys):
    epochs = 12
    _stop_after_first_checkpoint(monkeypatch, server, back_after=outage_s)
    assert main(["train", "--data", str(specimens), "--epochs", str(epochs), *ARGS]) == 0
    error = capsys.readouterr().err
    assert "unreachable" in error and "training goes on" in error, error
    assert "tracking server back: sent the" in error
    _assert_whole(_only_run_id(), epochs)
    assert not any((tmp_path / "spool").glob("*/queue.jsonl")), "calls left in the spool"


def test_a_server_gone_for_good_leaves_a_spool_that_sync_sends(server, specimens, monkeypatch,
                                                               tmp_path, capsys):
    epochs = 3
    _stop_after_first_checkpoint(monkeypatch, server, back_after=None)
    assert main(["train", "--data", str(specimens), "--epochs", str(epochs), *ARGS]) == 1
    error = capsys.readouterr().err
    [queue] = list((tmp_path / "spool").glob("*/queue.jsonl"))
    folder = queue.parent
    assert f"kept in {folder}" in error and f"taxonclip sync {folder}" in error, error
    assert "Traceback" not in error
    kept = {path.name for path in (folder / "files").rglob("*.pt")}
    assert f"epoch_{epochs:03d}.pt" in kept  # nothing lost locally

    assert main(["sync", str(folder)]) == 1  # still away: said, and the spool stays
    assert "cannot reach the MLflow tracking server" in capsys.readouterr().err and queue.exists()
    server.start()
    assert main(["sync", str(folder)]) == 0
    assert f"of run {folder.name}" in capsys.readouterr().out
    _assert_whole(folder.name, epochs)
    assert not folder.exists()
