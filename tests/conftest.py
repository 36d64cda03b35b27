"""Shared fixtures and the session's check that the tests leave nothing in the checkout: the
generated specimens, a real MLflow server, PostgreSQL, no network, the demo runs. Plain helpers
the tests import live in tests/helpers.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.helpers import (LEEDS, checkout_entries, free_port, gained_entries, sqlite_tracking,
                           wait_for_http)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated data and cached embeddings out of the user's home folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TAXONCLIP_CACHE", str(tmp_path_factory.mktemp("taxonclip-cache")))
    yield
    mp.undo()


@pytest.fixture(autouse=True, scope="session")
def _checkout_left_clean(request):
    """Tests write under tmp paths only: fail the session if the checkout (pytest's rootdir)
    gained files (an ./mlruns, a mlflow.db, a report) while it ran."""
    root = request.config.rootpath
    before = checkout_entries(root)
    yield
    gained = gained_entries(before, checkout_entries(root))
    if gained:
        pytest.fail("the tests left files in the checkout (write them under tmp_path): "
                    + ", ".join(gained), pytrace=False)


@pytest.fixture(scope="session")
def leeds() -> Path:
    """The real butterfly photographs in ../shared, or a visible skip where they are absent."""
    if not (LEEDS / "metadata.csv").exists():
        pytest.skip(f"real sample data not found at {LEEDS} (it lies in ../shared beside the checkout)")
    return LEEDS


@pytest.fixture(scope="session")
def specimens(tmp_path_factory) -> Path:
    """A small generated specimen set in the VLM4Bio layout (2 taxa x 2 genera x 3 species x 8 images)."""
    from taxonclip.data.synthetic import generate

    return generate(tmp_path_factory.mktemp("specimens"), seed=0, taxa=2, genera=2, species=3,
                    images=8, size=32)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    """A real `mlflow server` (sqlite backend, artifact folder) on a free loopback port."""
    import subprocess
    import sys

    root = tmp_path_factory.mktemp("mlflow-server")
    port = free_port()
    log = open(root / "server.log", "w")
    process = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "server",
         "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
         "--artifacts-destination", str(root / "artifacts"),
         "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
        stdout=log, stderr=subprocess.STDOUT, cwd=root)
    uri = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{uri}/health", process)
    except RuntimeError:
        process.kill()
        raise RuntimeError((root / "server.log").read_text()[-3000:]) from None
    yield uri
    process.terminate()
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:  # a loaded machine: the server's workers may linger
        process.kill()
        process.wait()
    log.close()


@pytest.fixture
def tracking(mlflow_server, monkeypatch) -> str:
    """Point this test (and the processes it starts) at the session's MLflow server."""
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        monkeypatch.delenv(name, raising=False)
    import mlflow

    mlflow.set_tracking_uri(mlflow_server)
    return mlflow_server


def _postgres_programs() -> Path | None:
    """The folder of PostgreSQL's server programs: beside `initdb` on PATH, else the newest
    Debian install under /usr/lib/postgresql/*/bin."""
    import shutil

    found = shutil.which("initdb")
    if found:
        return Path(found).resolve().parent
    versions = [p for p in Path("/usr/lib/postgresql").glob("*") if p.name.isdigit()]
    installed = [p / "bin" for p in sorted(versions, key=lambda p: int(p.name))
                 if (p / "bin" / "initdb").exists()]
    return installed[-1] if installed else None


def _postgres_user() -> str | None:
    """The account to run the server as: PostgreSQL refuses root, so root lends it `postgres`
    (or `nobody`); anyone else runs it as themselves (None)."""
    import os
    import pwd

    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            return pwd.getpwnam(name).pw_name
        except KeyError:
            continue
    pytest.skip("running as root and no `postgres` or `nobody` account to run PostgreSQL as")


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL cluster on a free loopback port; yields the URL of its empty
    database `optuna` (trust authentication, so the password in the URL is never checked)."""
    import shutil
    import subprocess
    import tempfile

    programs = _postgres_programs()
    if programs is None:
        pytest.skip("PostgreSQL is not installed (no initdb on PATH or in "
                    "/usr/lib/postgresql/*/bin); .ci/run installs it")
    psycopg2 = pytest.importorskip("psycopg2", reason="psycopg2-binary is not installed")
    user = _postgres_user()
    # Outside pytest's tmp folders: those are private to the current user.
    root = Path(tempfile.mkdtemp(prefix="taxonclip-pg-"))
    if user is not None:
        shutil.chown(root, user)
    data, port = root / "data", free_port()

    def run(*command: str) -> None:
        done = subprocess.run([str(programs / command[0]), *command[1:]], user=user,
                              capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{command[0]} failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")

    options = f"-F -p {port} -k {root} -c listen_addresses=127.0.0.1"
    try:
        run("initdb", "-D", str(data), "-U", "taxonclip", "-A", "trust", "-E", "UTF8",
            "--locale=C", "--no-sync")
        run("pg_ctl", "-D", str(data), "-l", str(root / "server.log"), "-o", options, "-w",
            "-t", "60", "start")
        try:
            connection = psycopg2.connect(host="127.0.0.1", port=port, user="taxonclip",
                                          dbname="postgres")
            connection.autocommit = True
            connection.cursor().execute("CREATE DATABASE optuna")
            connection.close()
            yield f"postgresql://taxonclip:secret@127.0.0.1:{port}/optuna"
        finally:
            run("pg_ctl", "-D", str(data), "-m", "immediate", "-w", "stop")
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture
def offline(tmp_path, monkeypatch) -> Path:
    """No network (every connection fails like a DNS failure) and an empty home folder."""
    import socket

    def no_network(*args, **kwargs):
        raise socket.gaierror(socket.EAI_AGAIN, "Temporary failure in name resolution")

    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket, "create_connection", no_network)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("UNICOM_CACHE", raising=False)
    return tmp_path


DEMO_EXPERIMENT = "demo-runs"
DEMO_TRAIN = ["train", "--model", "tiny", "--epochs", "3", "--batch_size", "8", "--lr", "2e-3",
              "--margin_s", "16", "--margin_m2", "0.2", "--workers", "0"]


@pytest.fixture(scope="session")
def demo_runs(specimens, tmp_path_factory) -> dict:
    """What `make demo` does, on the small specimens, in one sqlite store: a pretrained eval of
    the tiny model, a train matched to it (its stdout and stderr kept, as a shell not attached to
    a terminal gets them, and its command line as `taxonclip train` sets it), and a compare of
    the two. Returns the store's `client`, the `train` run, `stdout`, `stderr` and `report`."""
    import io
    import re

    from mlflow.tracking import MlflowClient

    from taxonclip.cli import main

    root = tmp_path_factory.mktemp("demo-runs")
    patch = pytest.MonkeyPatch()
    sqlite_tracking(patch, root, DEMO_EXPERIMENT)
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        patch.delenv(name, raising=False)
    patch.chdir(root)
    data = ["--data", str(specimens)]
    out, err = io.StringIO(), io.StringIO()
    try:
        assert main(["eval", "--model", "tiny", "--workers", "0", *data]) == 0
        with patch.context() as captured:
            captured.setattr("sys.stdout", out)
            captured.setattr("sys.stderr", err)
            captured.setattr("sys.argv", ["/venv/taxonclip/__main__.py", *DEMO_TRAIN, *data])
            status = main([*DEMO_TRAIN, *data])
        assert status == 0, err.getvalue()
        assert main(["compare", "--experiments", DEMO_EXPERIMENT, "--out", str(root / "report")]) == 0
    finally:
        patch.undo()
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    run_id = re.search(r"MLflow run ([0-9a-f]{32})", out.getvalue()).group(1)
    return {"client": client, "train": client.get_run(run_id), "stdout": out.getvalue(),
            "stderr": err.getvalue(), "report": root / "report" / "report.html"}
