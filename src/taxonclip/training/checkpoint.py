"""Checkpoints: what one holds (the model, this rank's shard of the centres with their moments,
optimiser, scheduler, counters, random states), loading one back into a state, and the run's
checkpoint files: one written at the end of every epoch, all but the last `keep_checkpoints`
and the best pruned, and read back from the run's spool or its artifact store."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import torch

from taxonclip import distributed as dist
from taxonclip import names
from taxonclip.config import TrainConfig
from taxonclip.diskio import scratch_folder, tensor_bytes
from taxonclip.errors import ConfigError
from taxonclip.params import TRAIN_PARAMS, to_params
from taxonclip.training.context import TrainContext
from taxonclip.training.loop import TrainState
from taxonclip.training.rng import rng_states, set_rng_states


def checkpoint(state: TrainState, config: TrainConfig, classes: list[str]) -> dict:
    """The checkpoint of `state` (gathered on every rank: the centres are sharded)."""
    head_shards = dist.all_gather_objects(
        {"weight": state.head.weight.detach().cpu(),
         "moments": {k: v.cpu() for k, v in state.optimizer.state.get(state.head.weight, {}).items()},
         "rng": rng_states()})
    return {"model": state.encoder.config(), "state_dict": state.encoder.state_dict(),
            "head_shards": head_shards, "optimizer": _optimizer_without_head(state),
            "scheduler": state.scheduler.state_dict(), "step": state.step, "epoch": state.epoch,
            "best_metric": state.best_metric, "best_epoch": state.best_epoch,
            "classes": classes, "train_params": to_params(config, TRAIN_PARAMS)}


def _optimizer_without_head(state: TrainState) -> dict:
    saved = state.optimizer.state_dict()
    head_index = len(state.optimizer.param_groups[0]["params"])
    saved["state"] = {k: v for k, v in saved["state"].items() if k != head_index}
    return saved


def restore(state: TrainState, saved: dict, info: dist.DistInfo) -> None:
    """Load a checkpoint into `state` (this rank's shard of the centres and their moments)."""
    if len(saved["head_shards"]) != info.world_size:
        raise ConfigError(f"the checkpoint was written by {len(saved['head_shards'])} processes; "
                          f"resume with the same number (now {info.world_size})")
    state.encoder.load_state_dict(saved["state_dict"])
    shard = saved["head_shards"][info.rank]
    with torch.no_grad():
        state.head.weight.copy_(shard["weight"])
    state.optimizer.load_state_dict(saved["optimizer"])
    if shard["moments"]:
        device = state.head.weight.device
        state.optimizer.state[state.head.weight] = {k: v.to(device) for k, v in shard["moments"].items()}
    state.scheduler.load_state_dict(saved["scheduler"])
    state.step, state.epoch = saved["step"], saved["epoch"]
    state.best_metric, state.best_epoch = saved["best_metric"], saved["best_epoch"]
    set_rng_states(shard["rng"])


def checkpoint_name(epoch: int) -> str:
    """The file name of epoch `epoch`'s checkpoint in the run's checkpoint folder."""
    return f"epoch_{epoch:03d}.pt"


def save_checkpoint(state: TrainState, ctx: TrainContext) -> None:
    """Write the epoch's checkpoint into the run (gathered on every rank, written by rank 0),
    then prune the older ones."""
    saved = checkpoint(state, ctx.config, ctx.data.classes)
    if not ctx.info.is_main:
        return
    # written to the run's spool first: the local copy stays until its upload succeeds; whole
    # or not at all, a full disk stopping the run resumably (tracked_run)
    path = ctx.run.stage(checkpoint_name(state.epoch), lambda partial: torch.save(saved, partial),
                         tensor_bytes(saved))
    ctx.run.log_artifact(path, names.CHECKPOINT_DIR)
    prune_checkpoints(state, ctx)


def prune_checkpoints(state: TrainState, ctx: TrainContext) -> None:
    """Delete every checkpoint but the last `keep_checkpoints` and the best."""
    keep = {checkpoint_name(state.best_epoch)}
    keep |= {checkpoint_name(e) for e in
             range(state.epoch - ctx.config.keep_checkpoints + 1, state.epoch + 1)}
    ctx.run.prune_artifacts(names.CHECKPOINT_DIR, keep)


def checkpoint_of(run, name: str) -> dict | None:
    """The run's checkpoint `name`, None when the run does not hold it: the copy in the run's
    spool while its upload waits for the server, else the one in the artifact store."""
    local = run.local_copy(name)
    if local is not None:
        return torch.load(local, map_location="cpu", weights_only=True)
    if name not in {Path(p).name for p in run.list_artifacts(names.CHECKPOINT_DIR)}:
        return None
    with scratch_folder() as folder:
        path = run.download(f"{names.CHECKPOINT_DIR}/{name}", folder)
        return torch.load(path, map_location="cpu", weights_only=True)


def last_checkpoint(run) -> dict | None:
    """The newest checkpoint that loads; one that does not (a truncated upload) is passed over
    with a warning for the one before it."""
    files = sorted(Path(p).name for p in run.list_artifacts(names.CHECKPOINT_DIR))
    for name in reversed(files):
        with scratch_folder() as folder:
            path = run.download(f"{names.CHECKPOINT_DIR}/{name}", folder)
            try:
                return torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, OSError, ValueError, pickle.UnpicklingError) as error:
                print(f"warning: checkpoint {name} of run {run.run_id} cannot be read "
                      f"({type(error).__name__}: {error}); resuming from the one before it",
                      file=sys.stderr)
    return None
