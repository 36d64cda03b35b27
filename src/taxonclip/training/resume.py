"""Resuming a run: the configuration it continues with (its own parameters; from a request only
where and how fast it computes), and its state loaded from its last readable checkpoint with
what it had logged already, so that nothing is logged twice."""

from __future__ import annotations

from taxonclip import distributed as dist
from taxonclip import names
from taxonclip.config import TrainConfig
from taxonclip.data.shards import is_sharded
from taxonclip.errors import ConfigError
from taxonclip.params import TRAIN_PARAMS, flat_fields, from_params, to_params
from taxonclip.training.checkpoint import last_checkpoint, restore
from taxonclip.training.context import Logged, TrainContext
from taxonclip.training.loop import TrainState

# What a resume may change: where and how fast the run computes, not what it computes (and
# not the worker count of a sharded dataset).
RESUME_MAY_CHANGE = ("resume", "device", "workers", "compile", "register_as")


def resume_config(requested: TrainConfig) -> TrainConfig:
    """The configuration a resume of run `requested.resume` continues with: the run's own
    parameters, and from `requested` only those of RESUME_MAY_CHANGE.

    Only an unfinished train run can be resumed. A parameter that `requested` sets to a value
    other than its default and other than the run's own would change the result: refused,
    naming it. (A parameter at its default counts as not given, since `mlflow run` passes every
    parameter with its MLproject default.)"""
    from taxonclip.tracking.queries import get_run

    record = get_run(requested.resume)
    if record.entry != "train" or record.status == "FINISHED":
        kind = record.entry or "unknown"
        # only a train run logs a model to train further from
        further = (f" To train a finished model further, start a new run from its weights: "
                   f"taxonclip train --model {record.params.get('model', '<model>')} --weights "
                   f"runs:/{record.run_id}/model ..." if kind == "train" else
                   f" A {kind} run logs no model; start a new train run.")
        raise ConfigError(
            f"run {record.run_id} is a {record.status} {kind} run; only an unfinished train run "
            f"can be resumed, and that run is left as it is.{further}")
    logged = {name: value for name, value in record.params.items() if name in TRAIN_PARAMS}
    _check_resumable(record, logged)
    own = from_params(TrainConfig, {**logged, "resume": requested.resume}, TRAIN_PARAMS)
    asked, kept, default = (flat_fields(c) for c in (requested, own, TrainConfig()))
    # from shards, each worker batches its own shards: the worker count shapes the batches
    may_change = tuple(name for name in RESUME_MAY_CHANGE
                       if name != "workers" or not is_sharded(own.data.data))
    for name, path in TRAIN_PARAMS.items():
        if name in may_change or asked[path] in (kept[path], default[path]):
            continue
        why = " (from shards, the worker count shapes the batches)" if name == "workers" else ""
        raise ConfigError(f"parameter {name!r} is {asked[path]!r}, but run {record.run_id} was "
                          f"trained with {kept[path]!r}{why}; a resume continues the run with its "
                          f"own parameters (leave {name} out, or start a new run)")
    changes = {name: to_params(requested, TRAIN_PARAMS)[name] for name in may_change}
    return from_params(TrainConfig, {**to_params(own, TRAIN_PARAMS), **changes}, TRAIN_PARAMS)


def _check_resumable(record, logged: dict[str, str]) -> None:
    """Refuse a run whose parameters are not all logged: a resume takes every parameter from
    the run, never a default. A run that holds none (stopped between its start and its first
    call, which logs them all at once) did no work to keep: it is ended KILLED, saying why."""
    missing = [name for name in TRAIN_PARAMS if name not in logged and name not in RESUME_MAY_CHANGE]
    if not missing:
        return
    if not logged:
        from taxonclip.tracking.sweeps import end_killed

        end_killed(record.run_id, "stopped before it logged its parameters; it cannot be resumed")
        raise ConfigError(f"run {record.run_id} holds no parameters: it was stopped before it "
                          f"logged them, so what it was to train is unknown and it cannot be "
                          f"resumed; it is ended KILLED. Start the training anew (taxonclip "
                          f"train with its parameters, without --resume)")
    raise ConfigError(f"run {record.run_id} lacks the parameter(s) {', '.join(missing)}, which a "
                      f"resume would have to guess; it is left as it is. Start the training anew "
                      f"(taxonclip train with its parameters, without --resume)")


def resume_state(state: TrainState, ctx: TrainContext) -> Logged:
    """Load the run's last readable checkpoint when resuming; returns what the run holds."""
    if not ctx.config.resume:
        return Logged()
    saved, logged = None, Logged()
    if ctx.info.is_main:
        saved = last_checkpoint(ctx.run)
        logged = Logged(ctx.run.last_step(names.TRAIN_LOSS),
                        ctx.run.last_step(names.VAL_EMBED_IMG_PER_S), ctx.run.has_logged_model(),
                        ctx.run.last_step(names.EVAL_EMBED_IMG_PER_S) >= 0)
    saved, logged = dist.broadcast_object((saved, logged))
    if saved is not None:
        restore(state, saved, ctx.info)
    return logged
