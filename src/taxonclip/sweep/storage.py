"""Where a sweep's study lives: Optuna storage URLs (SQLite, PostgreSQL, MySQL, a journal file),
their redaction for messages, the storage itself, and the heartbeat timing of running trials.

Database storages keep a heartbeat of every running trial; a trial silent for the grace period
has lost its process (`taxonclip.sweep.run.Reconciler` closes what it left). A journal file
keeps no heartbeat. The names of what a sweep records on trials and studies beside Optuna's own
(`*_ATTR`) are here too: every module of the sweep reads or writes them.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable
from importlib.util import find_spec
from urllib.parse import unquote

import optuna
from optuna.trial import FrozenTrial
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

from taxonclip.errors import ConfigError

SHARED_STORAGE_PREFIXES = ("postgresql", "mysql", "journal:")
DATABASE_PREFIXES = ("postgresql", "mysql")
JOURNAL_PREFIX = "journal:"
SQLITE_PREFIX = "sqlite:///"
QUERY_PASSWORD = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)  # as MySQL URLs may hold it
OPTUNA_DB = "optuna.db"
# A running trial records a heartbeat in a database storage, and a running sweep in its MLflow
# run, every HEARTBEAT_S seconds; one silent for GRACE_BEATS beats has lost its process. Tests
# shorten the beat with the environment variable HEARTBEAT_ENV (whole seconds).
HEARTBEAT_S = 60
GRACE_BEATS = 5
HEARTBEAT_ENV = "TAXONCLIP_SWEEP_HEARTBEAT_S"

# What a sweep records in the storage beside Optuna's own: on each trial its MLflow run, the
# sweep run that started it, its error and its test-split metric; on the study its metric.
RUN_ID_ATTR = "mlflow_run_id"
PARENT_RUN_ATTR = "mlflow_parent_run_id"
ERROR_ATTR = "error"
TEST_ATTR = "test_value"  # a trial's metric on the test split: shown for the best trial only
METRIC_ATTR = "metric"

StaleTrialCallback = Callable[[optuna.Study, FrozenTrial], None]
"""Called by Optuna for each trial it failed because its heartbeat went stale."""


def default_storage(tracking_uri: str) -> str:
    """`optuna.db` beside a SQLite MLflow store, else `sqlite:///optuna.db` in this folder."""
    if tracking_uri.startswith(SQLITE_PREFIX):
        return f"{tracking_uri.rsplit('/', 1)[0]}/{OPTUNA_DB}"
    return f"{SQLITE_PREFIX}{OPTUNA_DB}"


def redact(url: str) -> str:
    """The storage URL fit for a message, param or tag: its password, and a `password=` option,
    replaced by `***`. A journal file or SQLite database is a path, shown as it is."""
    if url.startswith((JOURNAL_PREFIX, SQLITE_PREFIX)):
        return url
    # The option first: an `@` in its value would end the credentials there.
    url = QUERY_PASSWORD.sub(r"\1***", url)
    try:
        shown = _parse_database_url(url).render_as_string(hide_password=True)
    except ConfigError:
        return _masked(url)
    return QUERY_PASSWORD.sub(r"\1***", shown)  # SQLAlchemy percent-encodes the `***`


def _masked(url: str) -> str:
    """A storage URL that does not parse, everything before its last `@` (the credentials, if
    any, end there at the latest) shown as `***`."""
    head, at, address = url.rpartition("@")
    if not at:
        return url
    scheme, separator, _ = head.partition("://")
    return f"{scheme}://***@{address}" if separator else f"***@{address}"


def _parse_database_url(url: str) -> URL:
    """SQLAlchemy's URL of a database storage. SQLAlchemy ends a password at its first `@`; here
    the credentials run from `://` to the last `@` (a host, port or database name holds none), so
    a password may hold `/`, `@` and `:` unencoded, or percent-encoded as SQLAlchemy wants."""
    scheme, separator, rest = url.partition("://")
    if not separator:
        raise ConfigError(f"storage {_masked(url)!r}: not a database URL (no scheme://)")
    credentials, at, address = rest.rpartition("@")
    try:
        parsed = make_url(f"{scheme}://{address}")
    except (ArgumentError, ValueError) as exc:  # ValueError: a port that is not a number
        raise ConfigError(f"storage {_masked(url)!r}: not a database URL ({exc})") from None
    if not at:
        return parsed
    user, has_password, password = credentials.partition(":")
    return parsed.set(username=unquote(user), password=unquote(password) if has_password else None)


def is_shared(url: str) -> bool:
    """Whether several workers can share the storage (PostgreSQL, MySQL, journal file)."""
    return url.startswith(SHARED_STORAGE_PREFIXES)


def heartbeat_timing() -> tuple[int, int]:
    """(heartbeat interval, grace period) in seconds: HEARTBEAT_S, or the HEARTBEAT_ENV variable."""
    text = os.environ.get(HEARTBEAT_ENV, "").strip()
    if not text:
        return HEARTBEAT_S, GRACE_BEATS * HEARTBEAT_S
    if not text.isdigit() or int(text) == 0:
        raise ConfigError(f"{HEARTBEAT_ENV}={text!r}: give a whole number of seconds above 0")
    return int(text), GRACE_BEATS * int(text)


def open_storage(url: str, on_stale: StaleTrialCallback | None = None,
                 ) -> optuna.storages.BaseStorage:
    """The Optuna storage of a URL: `sqlite:///FILE`, `postgresql://...`, `mysql://...` or
    `journal:FILE` (a journal file on a disk every worker mounts).

    A database storage records a heartbeat of each running trial; Optuna fails a trial silent
    for the grace period, then calls `on_stale(study, trial)`. Optuna 5's journal storage keeps
    no heartbeat (`Reconciler` covers it)."""
    if url.startswith(JOURNAL_PREFIX):
        backend = optuna.storages.journal.JournalFileBackend(url[len(JOURNAL_PREFIX):])
        return optuna.storages.JournalStorage(backend)
    if url.startswith((SQLITE_PREFIX, *DATABASE_PREFIXES)):
        interval_s, grace_s = heartbeat_timing()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.storages.RDBStorage(
                _engine_url(url), heartbeat_interval=interval_s, grace_period=grace_s,
                heartbeat_stale_trial_callback=on_stale)
    raise ConfigError(f"storage {redact(url)!r}: use sqlite:///FILE, postgresql://USER@HOST/DB, "
                      f"mysql://USER@HOST/DB or journal:FILE")


def _engine_url(url: str) -> str:
    """The URL SQLAlchemy connects to: a PostgreSQL or MySQL one re-encoded (its password
    percent-encoded) with a driver that is installed."""
    if url.startswith(SQLITE_PREFIX):
        return url
    return _with_driver(_parse_database_url(url)).render_as_string(hide_password=False)


def _with_driver(url: URL) -> URL:
    """`postgresql://` names no driver, and SQLAlchemy 2.1 then wants psycopg 3: use psycopg2
    (the project's `postgres` extra) where only that one is installed."""
    if url.drivername == "postgresql" and find_spec("psycopg") is None and \
            find_spec("psycopg2") is not None:
        return url.set(drivername="postgresql+psycopg2")
    return url


def dashboard_target(url: str) -> str:
    """What `optuna-dashboard` opens for a storage, without the password."""
    if url.startswith(JOURNAL_PREFIX):
        return url[len(JOURNAL_PREFIX):]
    return redact(_engine_url(url))
