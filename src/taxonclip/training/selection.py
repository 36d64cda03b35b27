"""Validation every `eval_every` epochs and the choice of the run's epoch: each validation's
`val/` metrics, the best epoch by `config.metric` (its weights kept on the CPU for select=best),
and at the end the selected epoch's weights loaded back with its validation table."""

from __future__ import annotations

import math

import torch

from taxonclip import distributed as dist
from taxonclip import names
from taxonclip.config import TrainConfig
from taxonclip.errors import DataError
from taxonclip.evaluation import evaluate
from taxonclip.formats import percent
from taxonclip.table import EvalResult, table_cell
from taxonclip.tracking.tables import table_counts, table_metrics
from taxonclip.training.checkpoint import checkpoint_name, checkpoint_of
from taxonclip.training.context import TrainContext
from taxonclip.training.loop import TrainState


def _validate(state: TrainState, ctx: TrainContext) -> EvalResult | None:
    """Score the validation rows (every rank embeds its share, rank 0 scores): no test row is
    embedded."""
    manifest, split = ctx.data.validation
    return evaluate(ctx.config.eval_config(), state.encoder, manifest, split,
                    seen=ctx.data.seen, spread=True, refuse_label_text=False)


def validate_epoch(state: TrainState, ctx: TrainContext) -> EvalResult | None:
    """Validate, log the epoch's `val/` metrics unless a resumed run holds them, and keep the
    best epoch by `config.metric` of the validation table."""
    result = _validate(state, ctx)
    if ctx.info.is_main:
        if state.epoch > ctx.logged.last_eval_epoch:
            # one call, so that a kill leaves the epoch's metrics all logged or none
            ctx.run.log_metrics({**table_metrics(result.table, names.val_metric),
                                 names.VAL_EMBED_IMG_PER_S: result.img_per_s}, step=state.epoch)
            ctx.run.log_params(table_counts(result.table, names.val_metric))
        metric = _selection_metric(result, ctx.config.metric)
        state.last_metric = metric
        state.selected_table = result.table if ctx.config.select == "last" else state.selected_table
        if metric > state.best_metric:
            state.best_metric, state.best_epoch = metric, state.epoch
            if ctx.config.select == "best":
                state.selected_table = result.table
        if ctx.on_epoch is not None:
            ctx.on_epoch(state.epoch, result)
    best = dist.broadcast_object((state.best_metric, state.best_epoch))
    state.best_metric, state.best_epoch = best
    if ctx.config.select == "best" and state.best_epoch == state.epoch:
        state.best_weights = ({k: v.detach().cpu().clone() for k, v in
                               state.encoder.state_dict().items()},
                              state.head.weight.detach().cpu().clone())
    return result


def _selection_metric(result: EvalResult, key: str) -> float:
    """The table cell `key` that picks the best checkpoint; an empty cell ranks lowest."""
    value = table_cell(result.table, key)
    return value if math.isfinite(value) else -math.inf


def headline(result: EvalResult | None, state: TrainState, config: TrainConfig) -> str:
    """The epoch's validation metric and the best so far, in percent (rank 0 only)."""
    if result is None:
        return ""
    value = table_cell(result.table, config.metric)
    return (f"validation {config.metric} {percent(value)}% (best {percent(state.best_metric)}% "
            f"at epoch {state.best_epoch})")


def select_epoch(state: TrainState, ctx: TrainContext) -> int:
    """The epoch whose weights are the run's model (`select`), loaded into the encoder and the
    centres where it is not the last; with its validation table on rank 0 where the run has
    validation rows (scored again when a resumed run no longer holds it)."""
    config = ctx.config
    selected = state.epoch
    if config.select == "best" and 0 < state.best_epoch < state.epoch:
        selected = state.best_epoch
        weights = dist.broadcast_object(state.best_weights is not None)
        if not weights:  # a resumed run: from the best epoch's checkpoint
            saved = checkpoint_of(ctx.run, checkpoint_name(selected)) if ctx.info.is_main else None
            saved = dist.broadcast_object(saved)
            if saved is None:
                raise DataError(f"the checkpoint of the best epoch {selected} is not in run "
                                f"{ctx.run.run_id}; resume it with select=last")
            state.best_weights = (saved["state_dict"],
                                  saved["head_shards"][ctx.info.rank]["weight"])
        state.encoder.load_state_dict(state.best_weights[0])
        with torch.no_grad():
            state.head.weight.copy_(state.best_weights[1])
    # rank 0 holds the tables: every rank learns whether all of them must validate again
    again = dist.broadcast_object(ctx.data.validation is not None and state.selected_table is None)
    if again:
        validation = _validate(state, ctx)
        if validation is not None:
            state.selected_table = validation.table
            state.last_metric = _selection_metric(validation, config.metric)
    return selected
