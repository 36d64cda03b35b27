"""Fine-tuning: margin-based softmax over PartialFC class centres, validated every few epochs.

Every choice of a training reads the validation rows only (`data.splits.validation_split`: the
val rows as queries, the other non-test rows as the gallery; no test image is embedded): the
per-epoch metrics `val/<taxa>/<level>/<score>`, the best epoch, a sweep's pruning and objective.
At the end the selected epoch's weights (`select`: the best by validation, or the last) are the
run's model: they are scored once on the test split, and that table (`eval/...` metrics, the
per-taxa table artifacts) is the run's result.

Resume: a checkpoint is written at the end of every epoch; `resume=<run_id>` restarts from the
last one into the same MLflow run, with the same step numbers and the same data order (each
epoch's order and augmentation are seeded by (seed, epoch)); steps already logged are not
logged again.

The parts are in `taxonclip.training` (the data, the loop, checkpoints, resuming, validation and
selection); this module runs them in order in one MLflow run.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from taxonclip import distributed as dist
from taxonclip import names
from taxonclip.config import CLUSTER_LABEL, TrainConfig
from taxonclip.checks import gauges_captions
from taxonclip.data.audit import report_for_run
from taxonclip.data.splits import split_name_parts
from taxonclip.diskio import scratch_folder
from taxonclip.errors import DataError
from taxonclip.evaluation import evaluate
from taxonclip.params import TRAIN_PARAMS, to_params
from taxonclip.progress import say
from taxonclip.table import EvalResult, scored_note, split_csv
from taxonclip.tracking.tables import table_counts, table_metrics
from taxonclip.training.checkpoint import checkpoint_name, prune_checkpoints, save_checkpoint
from taxonclip.training.cluster_labels import with_cluster_labels
from taxonclip.training.context import EpochCallback, TrainContext
from taxonclip.training.data import TrainData, make_loader, prepare_data
from taxonclip.training.loop import TrainState, build_state, train_epoch
from taxonclip.training.resume import resume_config, resume_state
from taxonclip.training.rng import seed_everything
from taxonclip.training.selection import headline, select_epoch, validate_epoch


@dataclass(frozen=True)
class TrainResult:
    """What a training produced: the selected model's one evaluation on the test split (None off
    rank 0), its run, the selected epoch (`select`) with its validation `metric` value and
    validation table, and where that epoch's checkpoint is kept."""

    evaluation: EvalResult | None
    run_id: str | None
    experiment_id: str | None
    metric: str
    epochs: int  # the run's own (a resume's request names none)
    selected_epoch: int
    selected_metric: float  # validation; NaN without val rows
    selected_checkpoint: str | None
    validation: pd.DataFrame | None = None  # the selected epoch's validation table
    select: str = "best"

    @property
    def table(self) -> pd.DataFrame:
        """The final per-taxa table: the selected model on the test split."""
        return self.evaluation.table


def run_name(config: TrainConfig) -> str:
    """The run's name in the MLflow UI, which tells runs apart at a glance:
    "train ViT-B/32 species lr=1e-05 m2=0.3"."""
    loss = config.loss
    parts = ["train", config.model.name, config.label, f"lr={config.lr:g}",
             f"m3={loss.m3:g}" if loss.m3 > 0 else f"m2={loss.m2:g}"]
    if config.model.weights != "pretrained":
        parts.append(f"weights={Path(config.model.weights).name}")
    if loss.sample_rate < 1:
        parts.append(f"sample_rate={loss.sample_rate:g}")
    if config.data.class_fraction < 1:
        parts.append(f"class_fraction={config.data.class_fraction:g}")
    parts += [part for part in split_name_parts(config.data) if not part.startswith("class_fraction")]
    if config.select != "best":
        parts.append(f"select={config.select}")
    return " ".join(parts)


def check_captions_before_run(config: TrainConfig, data: TrainData, encoder) -> None:
    """Refuse, before any run is created, captions that the caption gauge catches in a
    query-side text embedding: scored alone, they find the label of more validation queries
    than the starting model's images do (see `taxonclip.checks`). Without val rows the check
    scores the test split instead: a refusal chooses nothing, and nothing has been trained."""
    eval_config = config.eval_config()
    if not gauges_captions(data.manifest, eval_config):
        return
    manifest, split = data.validation or (data.manifest, data.split)
    reason = None
    try:
        evaluate(eval_config, encoder, manifest, split, seen=data.seen, spread=True)
    except DataError as error:  # raised on rank 0, which scores: every rank must stop
        reason = str(error)
    reason = dist.broadcast_object(reason)
    if reason is not None:
        raise DataError(reason)


def run_training(config: TrainConfig, parent_run_id: str | None = None,
                 on_epoch: EpochCallback | None = None, run_tags: dict | None = None) -> TrainResult:
    """Train and evaluate one model, logging to MLflow from rank 0; returns the final evaluation
    with its run and best epoch.

    `on_epoch(epoch, result)` is called on rank 0 after each evaluation (a sweep reports to its
    pruner there; raising `tracking.runs.RunKilled` ends the run as KILLED). With
    `config.resume`, the run's own parameters are used (see `resume_config`).
    """
    from taxonclip.tracking.models import resolve_model
    from taxonclip.tracking.runs import tracked_run

    info = dist.init_from_env(config.device)
    try:
        if config.resume:
            config = dist.broadcast_object(resume_config(config) if info.is_main else None)
        data = prepare_data(config, info.world_size)
        # a resumed run logged its data report when it started
        fresh_run = info.is_main and not config.resume
        report = report_for_run(data.manifest, data.split) if fresh_run else ""
        encoder = resolve_model(config.model, str(info.device), seed=config.data.seed)
        if not config.resume:  # a resumed run passed the check when it started
            check_captions_before_run(config, data, encoder)
        with tracked_run("train", main=info.is_main, resume_run_id=config.resume,
                         parent_run_id=parent_run_id, tags=run_tags,
                         run_name=run_name(config)) as run:
            if not config.resume:
                # the first thing a new run holds, in one call: a run is resumable once it has them
                run.log_params(to_params(config, TRAIN_PARAMS))
                run.log_text(report, names.DATA_SUMMARY)
            context = TrainContext(config, data, run, info, on_epoch)
            return _train_in_run(context, encoder)
    finally:
        dist.shutdown()


def _train_in_run(ctx: TrainContext, encoder) -> TrainResult:
    """The training in its run: the epochs from the start (or the checkpoint a resume loads),
    each validated every `eval_every` epochs and checkpointed, then the selected epoch scored on
    the test split and the run finished."""
    config = ctx.config
    seed_everything(config.data.seed)
    if config.label == CLUSTER_LABEL:
        ctx = replace(ctx, data=with_cluster_labels(ctx, encoder))
    loader = make_loader(ctx.data, encoder, config, ctx.info)
    state = build_state(encoder, len(ctx.data.classes), config, sum(ctx.data.epoch_steps), ctx.device)
    forward = torch.compile(state.replica) if config.compile else state.replica
    ctx = replace(ctx, logged=resume_state(state, ctx))
    if state.epoch == 0:
        ctx.run.log_params({**to_params(config, TRAIN_PARAMS), **_sizes(state, ctx.data)})
    while state.epoch < config.epochs:
        summary = train_epoch(state, loader, forward, ctx)
        if ctx.data.validation is not None and (state.epoch % config.eval_every == 0
                                                or state.epoch == config.epochs):
            result = validate_epoch(state, ctx)
            summary = f"{summary}; {headline(result, state, config)}"
        if ctx.info.is_main:
            say(f"epoch {state.epoch}/{config.epochs}: {summary}")
        save_checkpoint(state, ctx)
    selected = select_epoch(state, ctx)
    # the selected model scored once on the test split: the run's result
    result = evaluate(config.eval_config(), state.encoder, ctx.data.manifest, ctx.data.split,
                      seen=ctx.data.seen, spread=True, refuse_label_text=False)
    _finish(state, ctx, result, selected)
    checkpoint = ctx.run.artifact_location(f"{names.CHECKPOINT_DIR}/{checkpoint_name(selected)}")
    metric = state.best_metric if config.select == "best" else state.last_metric
    return TrainResult(result, ctx.run.run_id, ctx.run.experiment_id, config.metric, config.epochs,
                       selected, metric, checkpoint, state.selected_table, config.select)


def _sizes(state: TrainState, data: TrainData) -> dict:
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    return {"params_backbone": count(state.encoder.visual), "params_centres": count(state.head),
            "num_classes": len(data.classes), "train_images": len(data.rows)}


def _finish(state: TrainState, ctx: TrainContext, result: EvalResult, selected: int) -> None:
    """The selected model's test table (the run's result: its `eval/` metrics and table
    artifacts), the validation table of its epoch, the split and its fingerprint, centroids with
    their class order, and the model (registered if asked); each written so that a resume after
    a kill in the middle of it leaves no duplicate."""
    from taxonclip.data.splits import split_fingerprint

    centres = state.head.full_centres().detach().cpu().numpy()
    if not ctx.info.is_main:
        return
    run, data = ctx.run, ctx.data
    if not ctx.logged.has_test_metrics:
        run.log_metrics({**table_metrics(result.table),
                         names.EVAL_EMBED_IMG_PER_S: result.img_per_s})
    run.log_params(table_counts(result.table))
    run.log_eval_table(result.table)
    if state.selected_table is not None:
        run.log_text(state.selected_table.to_csv(index=False), names.VAL_TABLE_CSV)
    split_text = split_csv(result)
    run.log_text(split_text, names.SPLIT_ARTIFACT)
    run.set_tags({names.TAG_SPLIT_FINGERPRINT: split_fingerprint(split_text),
                  names.TAG_SELECTED_EPOCH: selected,
                  names.TAG_SCORED: scored_note(result.manifest.table, result.split),
                  **({names.TAG_ALLOW_LABEL_TEXT: "true"} if ctx.config.allow_label_text else {})})
    with scratch_folder() as folder:
        centroids, classes = Path(folder, names.CENTROIDS), Path(folder, names.CENTROID_CLASSES)
        centroids.parent.mkdir(parents=True)
        np.save(centroids, centres)
        pd.DataFrame({"row": range(len(data.classes)), ctx.config.label: data.classes}).to_csv(
            classes, index=False)
        for path, artifact in ((centroids, names.CENTROIDS), (classes, names.CENTROID_CLASSES)):
            run.log_artifact(path, Path(artifact).parent.as_posix())
    prune_checkpoints(state, ctx)
    if not ctx.logged.has_model:
        state.encoder.weights = f"runs:/{run.run_id}/{names.MODEL_ARTIFACT}"
        run.log_model(state.encoder, register_as=ctx.config.register_as)
