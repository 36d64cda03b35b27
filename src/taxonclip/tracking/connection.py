"""Connecting to the MLflow tracking store: the URI in force, a fast check that a server
answers, credentials kept out of messages, and making a run the active one. `runs` and
`run_logging` (the runs), `queries` and `models` (the logged models) build on it.
"""

from __future__ import annotations

import base64
import contextlib
import functools
import logging
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator

from taxonclip.errors import TrackingError

DEFAULT_TRACKING_URI = "sqlite:///mlflow.db"
# MLflow's HTTP retries, unless the user sets them: its own defaults retry a lost server for
# minutes in silence; the spool takes over after a few seconds instead.
HTTP_RETRY_DEFAULTS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
                       "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
                       "MLFLOW_HTTP_REQUEST_TIMEOUT": "60"}
# MLflow's own progress bars ("Downloading artifacts") say nothing to a user of this tool, and
# turn a log file into carriage returns.
QUIET_DEFAULTS = {"MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}
HEALTH_TIMEOUT_S = 5.0  # asking a server whether it is there, after a call failed


def tracking_uri() -> str:
    """The tracking URI in force: `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in this folder."""
    return os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def connect() -> str:
    """Point MLflow at the tracking URI and fail fast, with one message, if a server is unreachable.

    A server URI's `user:password@` moves to MLflow's MLFLOW_TRACKING_USERNAME and
    MLFLOW_TRACKING_PASSWORD (its basic auth, inherited by the processes this one starts): MLflow
    prints its tracking URI (`View run ... at`) and puts it into error messages."""
    import mlflow

    uri = tracking_uri()
    for name, value in QUIET_DEFAULTS.items():
        os.environ.setdefault(name, value)
    logging.getLogger("mlflow.store.db.utils").setLevel(logging.WARNING)
    if uri.startswith(("http://", "https://")):
        for name, value in HTTP_RETRY_DEFAULTS.items():
            os.environ.setdefault(name, value)
        uri, credentials = _split_credentials(uri)
        _check_server(uri, credentials)
        if credentials is not None:
            user, password = credentials
            os.environ.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    mlflow.set_tracking_uri(uri)
    _initialise_store(uri)
    return uri


STORE_ATTEMPTS = 4


@functools.cache
def _initialise_store(uri: str) -> None:
    """Create (or migrate) a SQLite tracking store once, one process at a time: processes
    started together on a new store (sweep workers) would otherwise race through MLflow's
    schema migration, and all but one fail. A failure is retried, then one message."""
    if not uri.startswith("sqlite:///"):
        return
    import fcntl
    import hashlib

    from mlflow.tracking import MlflowClient

    from taxonclip.config import cache_dir

    path = os.path.abspath(uri.removeprefix("sqlite:///"))
    # in the cache: a lock next to the database would be litter, and a lock on the database
    # itself would meddle with SQLite's own
    lock = cache_dir() / "locks" / f"store-{hashlib.sha256(path.encode()).hexdigest()[:16]}.lock"
    error: Exception | None = None
    for attempt in range(STORE_ATTEMPTS):
        time.sleep(attempt)
        try:
            lock.parent.mkdir(parents=True, exist_ok=True)
            with open(lock, "a") as held:
                fcntl.flock(held, fcntl.LOCK_EX)
                MlflowClient(uri).search_experiments(max_results=1)
            return
        except Exception as exc:  # SQLAlchemy and Alembic raise many types for one race
            error = exc
    first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    raise TrackingError(f"cannot create or open the tracking store {path} ({first}); another "
                        f"process may hold it, or it is damaged; run again, or point "
                        f"MLFLOW_TRACKING_URI at another store")


def redacted_uri(uri: str) -> str:
    """`uri` fit for a message: any `user:password@` (or `user@`) before its host becomes `***@`."""
    scheme, separator, rest = uri.partition("://")
    _, at, address = rest.rpartition("@")
    if not (separator and at) or rest.startswith("/"):  # `sqlite:////a@b/mlflow.db` names a path
        return uri
    return f"{scheme}://***@{address}"


def _split_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """A server URI without its `user:password@`, and those two percent-decoded (None where it
    has none). They run from `://` to the last `@`, so a password may hold `/`, `@` and `:`."""
    scheme, _, rest = uri.partition("://")
    credentials, at, address = rest.rpartition("@")
    if not at:
        return uri, None
    user, _, password = credentials.partition(":")
    return f"{scheme}://{address}", (urllib.parse.unquote(user), urllib.parse.unquote(password))


def _check_server(uri: str, credentials: tuple[str, str] | None, timeout: float = 10.0) -> None:
    request = urllib.request.Request(f"{uri.rstrip('/')}/health")
    if credentials is not None:  # a proxy in front of the server may guard /health too
        token = base64.b64encode(":".join(credentials).encode()).decode()
        request.add_header("Authorization", f"Basic {token}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            response.read()
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise TrackingError(
            f"cannot reach the MLflow tracking server at {redacted_uri(uri)} ({reason}); start it "
            f"(`make server`) or set MLFLOW_TRACKING_URI to a reachable server") from None


def server_answers(uri: str) -> bool:
    """Whether the tracking server at `uri` answers its health check now."""
    try:
        _check_server(*_split_credentials(uri), timeout=HEALTH_TIMEOUT_S)
    except TrackingError:
        return False
    return True


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
