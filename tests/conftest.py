"""Shared fixtures: paths, the generated specimens and a real MLflow server."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LEEDS = SHARED / "data" / "leeds-butterflies"
UNICOM_REFERENCE = SHARED / "reference" / "unicom"


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Keep generated data and cached embeddings out of the user's home folder."""
    mp = pytest.MonkeyPatch()
    mp.setenv("TAXONCLIP_CACHE", str(tmp_path_factory.mktemp("taxonclip-cache")))
    yield
    mp.undo()


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


def free_port() -> int:
    """A TCP port on the loopback interface that nothing listens on now."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process, seconds: float = 90.0) -> None:
    """Poll `url` until it answers 200, failing early if `process` exits."""
    import time
    import urllib.request

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with status {process.returncode} before answering {url}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"no answer from {url} within {seconds} s")


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
    process.wait(timeout=30)
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
