"""The launch options of `train`, `eval`, `caption` and `sweep` (`--launcher`, `--slurm`,
`--slurm_profile`, `--wait`, and a sweep's or caption's `--workers`), and running a command
through the launcher they name: checked, its MLflow run made, then submitted."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from taxonclip import config as cfg
from taxonclip.errors import ConfigError
from taxonclip.launch import get_launcher
from taxonclip.launch.base import Job

LAUNCHABLE = ("train", "eval", "caption", "sweep")
# commands that run as arrays of tasks, and the option that sets their count: a sweep's
# --workers; caption's --tasks (its --workers, like train's and eval's, are DataLoader workers)
ARRAY_COMMANDS = {"caption": "tasks", "sweep": "workers"}
# the launch options that MLproject's entry points pass (with the array commands' --workers);
# `mlflow run` follows a job to its end, so --wait is implied there
MLPROJECT_LAUNCH_PARAMS = ("launcher", "slurm", "slurm_profile")
# commands whose one MLflow run is made at submission, so that it can be named and resumed
ONE_RUN = ("train", "eval")
# file paths that no other machine sees
NODE_LOCAL = ("/tmp", "/var/tmp", "/dev/shm", "/run")


def add_launch_options(parser: argparse.ArgumentParser, command: str) -> None:
    """The launch options, on `command`'s parser (its --help) or a parser of them alone."""
    def text(path: str) -> str:
        return cfg.description(cfg.LaunchConfig, path)[0].replace("%", "%%")

    parser.add_argument("--launcher", default=None, metavar="local|slurm",
                        help=f"{text('launcher')} (default: local)")
    parser.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                        help=f"a SLURM option of the job, repeatable or comma-separated; keys: "
                             f"{', '.join(cfg.SLURM_OPTION_NAMES)} (default: none)")
    parser.add_argument("--slurm_profile", "--slurm-profile", default=None, metavar="FILE",
                        help="a file of SLURM options, one KEY=VALUE a line; --slurm overrides "
                             "it (default: none)")
    parser.add_argument("--wait", nargs="?", const="true", default=None, metavar="true|false",
                        help=f"{text('wait')} (default: false)")
    if command in ARRAY_COMMANDS:
        parser.add_argument(f"--{ARRAY_COMMANDS[command]}", dest="workers", default=None,
                            metavar="N", help=f"{text('workers')} (default: 1)")


def split_launch_options(argv: Sequence[str]) -> tuple[cfg.LaunchConfig | None, list[str]]:
    """The launch options of a command line and the rest of it; (None, argv) for a command
    that takes none."""
    argv = list(argv)
    if not argv or argv[0] not in LAUNCHABLE:
        return None, argv
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    add_launch_options(parser, argv[0])
    known, rest = parser.parse_known_args(argv[1:])
    pairs = [pair for given in known.slurm for pair in given.split(",")
             if pair.strip() and pair.strip().lower() != "none"]
    profile = None if (known.slurm_profile or "none").lower() == "none" else known.slurm_profile
    params = {"launcher": known.launcher, "wait": known.wait,
              "workers": getattr(known, "workers", None)}
    values = {name: cfg.coerce(cfg.LaunchConfig, name, value)
              for name, value in params.items() if value is not None}
    launch = cfg.LaunchConfig(slurm=cfg.slurm_options(pairs, profile), **values)
    if launch.launcher == "local" and (pairs or profile):
        raise ConfigError("--slurm and --slurm_profile describe a SLURM job: add --launcher slurm")
    return launch, [argv[0], *rest]


def run_command(launch: cfg.LaunchConfig, argv: Sequence[str], config: Any,
                here: Callable[[], int]) -> int:
    """Run the command `argv` (its typed `config` already built, so bad parameters were refused)
    through the launcher `launch` names."""
    launcher = get_launcher(launch.launcher)
    if launch.launcher == "local":
        job = Job(argv=tuple(argv), name=argv[0], launch=launch)
        launcher.check(job)
        return launcher.launch(job, here)
    command = argv[0]
    if command == "sweep":
        check_sweep_storage(config, launch)
    under_mlflow_run = os.environ.get("MLFLOW_RUN_ID")
    if under_mlflow_run:  # `mlflow run` ends its run when this process ends: follow the job
        from dataclasses import replace

        launch = replace(launch, wait=True)
    job = Job(argv=tuple(argv), name=f"taxonclip-{command}", launch=launch,
              distributed=command == "train", requeue=command == "train",
              then=(*argv, "--merge-only") if command == "caption" and launch.workers > 1 else None,
              env=tracking_env())
    launcher.check(job)
    warning = tracking_warning()
    if warning:
        print(f"warning: {warning}", file=sys.stderr)
    from taxonclip.tracking.jobs import ensure_experiment

    ensure_experiment()  # also finds an unreachable tracking server before anything is submitted
    if command not in ONE_RUN:
        return launcher.launch(job, here)
    return _launch_with_run(launcher, job, config, under_mlflow_run)


def _launch_with_run(launcher, job: Job, config: Any, existing: str | None) -> int:
    """Make the job's MLflow run (or take the one `mlflow run` made), then launch; a job that
    could not be submitted takes its new run with it."""
    from dataclasses import replace

    from taxonclip.errors import TaxonclipError
    from taxonclip.tracking import jobs

    if existing:
        return launcher.launch(replace(job, run_id=existing), lambda: 0)
    run_id, experiment_id = jobs.create_run(job.argv[0], _run_name(job.argv[0], config))
    try:
        return launcher.launch(replace(job, run_id=run_id, experiment_id=experiment_id), lambda: 0)
    except TaxonclipError:
        if jobs.run_status(run_id) == "RUNNING" and not jobs.has_params(run_id):
            jobs.delete_run(run_id)
        raise


def _run_name(command: str, config: Any) -> str:
    if command == "train":
        from taxonclip.train import run_name

        return run_name(config)
    from taxonclip.jobs import eval_run_name

    return eval_run_name(config)


def check_sweep_storage(config: cfg.SweepConfig, launch: cfg.LaunchConfig) -> None:
    """Array workers share one study: SQLite cannot serve several nodes at once."""
    if launch.workers <= 1:
        return
    from taxonclip.sweep.storage import default_storage, is_shared, redact
    from taxonclip.tracking.connection import tracking_uri

    storage = config.storage or default_storage(tracking_uri())
    if not is_shared(storage):
        given = "" if config.storage else " (the default, as no --storage was given)"
        raise ConfigError(f"--workers {launch.workers} shares one study among array tasks on "
                          f"several nodes, but storage {redact(storage)!r}{given} is SQLite, "
                          f"which does not serve many nodes; give --storage "
                          f"postgresql://USER@HOST/DB (or mysql://...)")


def tracking_env() -> dict[str, str]:
    """What the job must be told about tracking: the default store made absolute (the job may
    start in another folder); a URI the user set travels in the exported environment."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        return {}
    from taxonclip.tracking.connection import DEFAULT_TRACKING_URI

    path = Path(DEFAULT_TRACKING_URI.removeprefix("sqlite:///")).absolute()
    return {"MLFLOW_TRACKING_URI": f"sqlite:///{path}"}


def tracking_warning(uri: str | None = None) -> str | None:
    """Why compute nodes may not reach the tracking store `uri`: a file or SQLite store is a
    path that other machines see only on a shared filesystem (never in /tmp)."""
    from taxonclip.tracking.connection import redacted_uri, tracking_uri

    uri = uri or tracking_uri()
    if "://" in uri and not uri.startswith(("file:", "sqlite:")):
        return None
    path = str(Path(_store_path(uri)).absolute())
    local = next((root for root in NODE_LOCAL if path == root or path.startswith(root + "/")), None)
    where = (f"{path} is under {local}, which each node keeps to itself: the job's runs would "
             f"land on the node (or fail)" if local else
             f"the nodes reach {path} only if it lies on a filesystem they share")
    return (f"the tracking URI {redacted_uri(uri)} is a file on this machine; {where}. A tracking "
            f"server (README: A tracking server for a group) serves every node: set "
            f"MLFLOW_TRACKING_URI=http://HOST:PORT")


def _store_path(uri: str) -> str:
    """The path of a file or SQLite store URI: sqlite:///rel.db, sqlite:////abs.db, file:///abs."""
    if uri.startswith("sqlite:///"):
        return uri.removeprefix("sqlite:///")
    if uri.startswith("file://"):
        return uri.removeprefix("file://")
    return uri.removeprefix("file:")
