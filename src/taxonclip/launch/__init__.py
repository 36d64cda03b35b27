"""Launchers: where a `taxonclip` command runs. `local` runs it in this process, as always;
`slurm` submits it as a batch job. A new launcher is one module with a `Launcher` class and one
line in LAUNCHERS."""

from __future__ import annotations

from importlib import import_module

from taxonclip.launch.base import Job, Launcher

# name -> "module:class", imported only when chosen
LAUNCHERS = {
    "local": "taxonclip.launch.local:LocalLauncher",
    "slurm": "taxonclip.launch.slurm:SlurmLauncher",
}


def get_launcher(name: str) -> Launcher:
    """The launcher registered as `name` (config.LaunchConfig has already checked the name)."""
    module, cls = LAUNCHERS[name].split(":")
    return getattr(import_module(module), cls)()


__all__ = ["LAUNCHERS", "Job", "Launcher", "get_launcher"]
