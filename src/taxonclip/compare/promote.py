"""Promotion: with `promote`, the registry alias `champion` moves to the model version of the
best run that logged a model and `challenger` to the runner-up; other aliases of the registered
models are left as they are. The registry calls are `tracking.models`'.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from taxonclip.compare.rank import Comparison
from taxonclip.tracking import queries
from taxonclip.tracking.models import model_version_for_run, set_model_alias
from taxonclip.tracking.queries import RunRecord

CHAMPION, CHALLENGER = "champion", "challenger"


@dataclass(frozen=True)
class Promotion:
    """A registry alias set on the model version of a ranked run."""

    alias: str
    run_id: str
    model_name: str
    version: str


def registry_name(run: RunRecord) -> str:
    """The registered model name of a run's model: its `register_as`, else `taxonclip-<model>`
    with every character a model URI cannot hold replaced by `-`."""
    register_as = run.params.get("register_as", "").strip()
    if register_as and register_as.lower() != "none":
        return register_as
    model = re.sub(r"[^A-Za-z0-9_.-]+", "-", run.params.get("model", "model")).strip("-")
    return f"taxonclip-{model}"


def promote(comparison: Comparison) -> list[Promotion]:
    """Set `champion` on the model version of the best run with a logged model and `challenger`
    on the runner-up, registering a run's model where it has no version yet."""
    experiment_ids = sorted({run.experiment_id for run in comparison.runs.values()})
    logged = queries.runs_with_logged_model(experiment_ids)
    candidates = [run_id for run_id in comparison.board.index if run_id in logged][:2]
    promotions = []
    for alias, run_id in zip((CHAMPION, CHALLENGER), candidates):
        name = registry_name(comparison.runs[run_id])
        name, version = model_version_for_run(run_id, name)
        set_model_alias(name, alias, version)
        promotions.append(Promotion(alias, run_id, name, version))
    return promotions


def format_promotions(promotions: list[Promotion], asked: bool) -> str:
    """What `promote` did, one line per alias."""
    if not asked:
        return "registry aliases unchanged (promote=false)"
    if not promotions:
        return "no ranked run has a logged model: no alias moved"
    return "\n".join(f"{p.alias}: {p.model_name} version {p.version} (run {p.run_id})"
                     for p in promotions)
