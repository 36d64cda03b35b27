"""The jobs behind the `taxonclip` commands and MLproject entry points: load the inputs (so bad
input fails before any run is created), run, log, print. Each returns an exit status."""

from __future__ import annotations

import math
from pathlib import Path

from taxonclip import names
from taxonclip.config import (EVAL_PARAMS, CaptionConfig, CompareConfig, DataConfig, EvalConfig,
                              PrepareConfig, SweepConfig, TrainConfig, to_params)


def synth(out: str, **sizes: int) -> int:
    """Write a generated specimen set and print its summary."""
    from taxonclip.data.manifest import read_manifest
    from taxonclip.data.synthetic import generate

    root = generate(out, **sizes)
    print(f"wrote {root}")
    print(read_manifest(root).report.summary())
    return 0


def synth_fixture(format: str, out: str, seed: int, size: int) -> int:
    """Write the small fixture of a dataset format (its reader's fixture writer), print how to
    read it and its summary."""
    from taxonclip.data.manifest import read_manifest
    from taxonclip.data.readers.registry import reader_named

    reader = reader_named(format)
    root = reader.write_fixture(out, seed=seed, size=size)
    print(f"wrote {root}")
    data, hint = str(root), ""
    if format == "treeoflife":
        from taxonclip.data.treeoflife import fixture_patterns

        data, queries = fixture_patterns(root)
        hint = (f"read it as --data '{data}' (a seeded split by shard), or add --queries "
                f"'{queries}' --split official (the val shard as queries)")
    print(read_manifest(data).report.summary())
    if hint:
        print(hint)
    return 0


def check(data: DataConfig, workers: int) -> int:
    """Validate a manifest and print what it holds, what each level scores and trains on, and
    what the split leaks (identical images, groups on both sides); invalid input, or a split
    with nothing to score, raises a DataError. A `class_fraction` below 1 reports the seeded
    subset of species that an evaluation of that fraction scores."""
    from taxonclip.data.audit import data_report
    from taxonclip.data.manifest import load_manifest
    from taxonclip.data.splits import make_split
    from taxonclip.checks import caption_note, check_has_test_images
    from taxonclip.evaluation import with_class_fraction

    whole = load_manifest(data)
    manifest = with_class_fraction(whole, data)
    subset_note = "" if manifest is whole else (
        f"class_fraction {data.class_fraction:g} (seed {data.seed}) keeps "
        f"{manifest.table['species'].nunique()} of {whole.table['species'].nunique()} species, "
        f"{len(manifest.table)} of {len(whole.table)} rows (those eval scores and train learns): "
        f"what follows is of them")
    split = make_split(manifest.table, data)
    print(data_report(manifest, split, caption_note(manifest), subset_note)[0])
    if manifest.shards:
        from taxonclip.data.prepare import shard_note

        print(shard_note(manifest))
    else:
        _check_decodes(manifest, data.missing, workers)
    check_has_test_images(manifest, split)
    return 0


def _check_decodes(manifest, missing: str, workers: int) -> None:
    """Decode every image in full (`workers` processes) and report those that do not (a
    truncated or corrupt file); a DataError listing them unless missing=skip."""
    from taxonclip.data.integrity import undecodable_images
    from taxonclip.data.manifest import SHOWN
    from taxonclip.errors import DataError

    problems = undecodable_images(manifest.table["image_path"].tolist(), workers)
    print(f"images decoded in full: {len(manifest.table)} ({len(problems)} do not decode)")
    if not problems:
        return
    lines = [f"  {path}: {reason}" for path, reason in list(problems.items())[:SHOWN]]
    more = [f"  and {len(problems) - SHOWN} more"] if len(problems) > SHOWN else []
    text = "\n".join([f"{len(problems)} images of {manifest.report.source} do not decode:",
                      *lines, *more])
    if missing != "skip":
        raise DataError(f"{text}\nFix or remove them (missing=skip drops them from a run)")
    print(text)


def prepare_size(text: str) -> int:
    """The short side that `data prepare --size` names: a number of pixels, or model names
    (comma-separated) whose largest input it is."""
    if text.strip().isdigit():
        return int(text)
    from taxonclip.errors import ConfigError, ModelError
    from taxonclip.models import get_spec

    try:
        specs = [get_spec(name.strip()) for name in text.split(",") if name.strip()]
    except ModelError as err:
        raise ConfigError(f"parameter 'size' is {text!r}: neither pixels nor model names ({err})") from None
    if not specs:
        raise ConfigError(f"parameter 'size' is {text!r}: give pixels (336) or model names")
    return max(spec.input_size for spec in specs)


def prepare(config: PrepareConfig) -> int:
    """Check a dataset as `data check` reads it, then write it as shards into `config.out`."""
    from taxonclip.data.manifest import load_manifest
    from taxonclip.data.prepare import PrepareSettings
    from taxonclip.data.prepare import prepare as prepare_shards

    settings = PrepareSettings(size=config.size, image_format=config.image_format,
                               quality=config.quality, shard_size=config.shard_size)
    manifest = load_manifest(config.data)
    print(manifest.report.summary())
    result = prepare_shards(manifest, config.out, settings, workers=config.workers or None)
    print(result.summary())
    print(f"train and eval read it as data: --data {result.folder}")
    return 0


def models() -> int:
    """Print the registry: name, source, embedding size, input size."""
    from taxonclip.models import list_models

    print(f"{'name':<26}{'source':<8}{'embed_dim':>10}{'input':>7}")
    for spec in list_models():
        print(f"{spec.name:<26}{spec.source:<8}{spec.embed_dim:>10}{spec.input_size:>7}")
    print(f"\n{_open_clip_line()}")
    print("\nA model logged by `train` is named by its URI: runs:/<run_id>/model or "
          "models:/<registered name>@champion")
    return 0


def _open_clip_line() -> str:
    try:
        import open_clip
    except ImportError:
        return "open_clip:<architecture>: install open_clip_torch for open_clip's models"
    known = open_clip.list_models()
    return (f"open_clip:<architecture>: any of open_clip's {len(known)} architectures "
            f"(open_clip.list_models()), e.g. open_clip:ViT-B-16 (BioCLIP, weights="
            f"hf-hub:imageomics/bioclip), open_clip:ViT-B-32, open_clip:ViT-L-14; weights from "
            f"a file or the Hugging Face cache")


def sync(folder: str) -> int:
    """Send what a run's spool holds (kept while the tracking server was unreachable)."""
    from taxonclip.tracking.runs import sync_spool

    run_id, count = sync_spool(Path(folder))
    print(f"sent {count} queued call(s) of run {run_id}")
    print(where_to_look(run_id))
    return 0


def evaluate(config: EvalConfig) -> int:
    """Evaluate one model on one dataset and log everything to MLflow."""
    from taxonclip.data.audit import report_for_run
    from taxonclip.distributed import resolve_device
    from taxonclip.evaluation import evaluate as run_evaluation
    from taxonclip.evaluation import prepare_evaluation
    from taxonclip.table import format_table, scored_note
    from taxonclip.tracking.models import resolve_model
    from taxonclip.tracking.runs import tracked_run
    from taxonclip.zero_shot import check_zero_shot

    manifest, split = prepare_evaluation(config)
    report = report_for_run(manifest, split)
    encoder = resolve_model(config.model, str(resolve_device(config.device)),
                            seed=config.data.seed)
    check_zero_shot(encoder, config)
    # scored before the run is created: the caption gauge's verdict needs the model's visual
    # accuracy on these rows, which is this evaluation, and a refusal must leave no run behind
    result = run_evaluation(config, encoder, manifest, split)
    with tracked_run("eval", run_name=eval_run_name(config)) as run:
        run.log_params(to_params(config, EVAL_PARAMS))
        if config.allow_label_text:
            run.set_tags({names.TAG_ALLOW_LABEL_TEXT: "true"})
        run.log_text(report, names.DATA_SUMMARY)
        log_evaluation(run, result)
    print(format_table(result.table))
    print(f"scored {scored_note(result.manifest.table, result.split)}")
    print(where_to_look(run.run_id, run.experiment_id))
    return 0


def eval_run_name(config: EvalConfig) -> str:
    """The run's name in the MLflow UI: "eval ViT-B/32 pretrained", "eval tiny weights=none
    gallery_avg zero-shot"."""
    weights = config.model.weights
    parts = ["eval", config.model.name,
             "pretrained" if weights == "pretrained" else f"weights={Path(weights).name}"]
    if config.embedding != "visual":
        parts.append(config.embedding)
    if config.zero_shot:
        parts.append("zero-shot")
    from taxonclip.data.splits import split_name_parts

    return " ".join(parts + split_name_parts(config.data))


def log_evaluation(run, result) -> None:
    """Log a final evaluation: the table and its metrics, the split, the embedding speed."""
    from taxonclip.data.splits import split_fingerprint
    from taxonclip.table import scored_note, split_csv

    run.log_eval_metrics(result.table)
    computed = math.isfinite(result.img_per_s)
    split_text = split_csv(result)
    run.set_tags({names.TAG_EMBEDDINGS: "computed" if computed else "cache",
                  names.TAG_SPLIT_FINGERPRINT: split_fingerprint(split_text),
                  names.TAG_SCORED: scored_note(result.manifest.table, result.split)})
    if computed:
        run.log_metrics({names.EVAL_EMBED_IMG_PER_S: result.img_per_s})
    run.log_eval_table(result.table)
    run.log_text(split_text, names.SPLIT_ARTIFACT)
    if result.class_texts is not None:
        run.log_text(result.class_texts.to_csv(index=False), names.ZERO_SHOT_TEXTS)


def where_to_look(run_id: str | None, experiment_id: str | None = None) -> str:
    """Where to see a run in the MLflow UI, and the saved view of its experiment's runs."""
    from taxonclip.tracking.experiments import view_link
    from taxonclip.tracking.connection import redacted_uri, tracking_uri

    uri = redacted_uri(tracking_uri())
    remote = uri.startswith("http")
    server = uri if remote else LOCAL_UI
    if experiment_id is None:
        page = f"open {server} and pick the run to see it"
    else:
        page = (f"{server}/#/experiments/{experiment_id}/runs/{run_id}\nits experiment's runs, "
                f"by {names.HEADLINE_METRIC}: {view_link(server, experiment_id)}")
    if remote:
        return f"MLflow run {run_id}: {page}"
    return (f"MLflow run {run_id} in {uri}: see it with `mlflow ui --backend-store-uri {uri}` "
            f"(or `make server`), then {page}")


LOCAL_UI = "http://127.0.0.1:5000"  # where `mlflow ui` and `make server` serve the UI


def train(config: TrainConfig) -> int:
    """Fine-tune, evaluate and log one model (`torchrun` starts one process per GPU)."""
    from taxonclip.table import format_table, scored_note, table_cell
    from taxonclip.formats import percent
    from taxonclip.train import run_training

    outcome = run_training(config)
    if outcome.evaluation is None:  # ranks other than 0 evaluate nothing
        return 0

    print(format_table(outcome.table))
    print(f"scored {scored_note(outcome.evaluation.manifest.table, outcome.evaluation.split)}")
    how = ("the best validation" if outcome.select == "best" else "the last epoch; validation")
    print(f"the model: epoch {outcome.selected_epoch} of {outcome.epochs} (select="
          f"{outcome.select}: {how} {outcome.metric} "
          f"{percent(outcome.selected_metric)}%), its checkpoint: {outcome.selected_checkpoint}")
    print(f"test (scored once, the table above): {outcome.metric} "
          f"{percent(table_cell(outcome.table, outcome.metric))}%")
    print(f"the model: runs:/{outcome.run_id}/{names.MODEL_ARTIFACT}"
          + (f" (registered as {config.register_as})" if config.register_as else ""))
    print(where_to_look(outcome.run_id, outcome.experiment_id))
    return 0


def sweep(config: SweepConfig) -> int:
    """Run (or continue) an Optuna study of training runs."""
    from taxonclip.sweep.run import run_sweep

    run_sweep(config)
    return 0


def compare(config: CompareConfig) -> int:
    """Rank the runs that carry a per-taxa table and write the report."""
    from taxonclip.compare.run import run_compare

    report = run_compare(config)
    print(f"report: {Path(report).resolve()}")
    return 0


def caption(config: "CaptionConfig") -> int:  # noqa: F821 (config.CaptionConfig)
    """Caption every image of a dataset (this process's share of them under torchrun or a SLURM
    array) into part files, merge them into captions.parquet, and log the job as an MLflow run."""
    from taxonclip.captions import job as captions
    from taxonclip.captions.shares import SLURM_ARRAY
    from taxonclip.progress import say

    job = captions.prepare_job(config)
    if config.merge_only:
        missing = captions.missing_ids(job)
        if missing:  # refused before a run is opened
            captions.merge_job(job)
        return _log_merge(job, None)
    if job.captioner.described.note:
        say(job.captioner.described.note)
    if not job.share.leads:
        stats = captions.caption_share(job)
        say(f"share {job.share.index + 1} of {job.share.count}: {stats.captioned} captioned, "
            f"{len(stats.undecodable)} undecodable, in {stats.seconds:.1f} s")
        if job.share.kind == SLURM_ARRAY and not captions.missing_ids(job):
            return _log_merge(job, None)  # the last task to finish merges
        return 0
    return _log_merge(job, captions.caption_share)


def _log_merge(job, caption_share) -> int:
    """Open the caption run; caption this share first where `caption_share` is given (waiting
    for the other torchrun ranks), then merge and log the file, its counts and a sample."""
    import json
    import time

    from taxonclip.captions import job as captions
    from taxonclip.captions import parts
    from taxonclip.config import CAPTION_PARAMS
    from taxonclip.progress import say
    from taxonclip.tracking.runs import tracked_run

    config = job.config
    name = f"caption {job.settings['model']} {job.settings['template']}"
    if config.name_in_prompt != "none":
        name += f" name_in_prompt={config.name_in_prompt}"
    with tracked_run("caption", run_name=name) as run:
        run.log_params({**to_params(config, CAPTION_PARAMS), **_caption_params(job)})
        run.log_text(json.dumps(job.metadata, indent=2, sort_keys=True), names.CAPTION_SETTINGS)
        if caption_share is not None:
            start = time.monotonic()
            stats = caption_share(job)
            if job.share.count > 1:
                captions.wait_for_shares(job)
            run.log_metrics(_speed(job, time.monotonic() - start))
            if stats.undecodable:
                run.log_text("image_id\n" + "\n".join(stats.undecodable) + "\n",
                             names.CAPTION_UNDECODABLE)
        merged = captions.merge_job(job)
        run.log_metrics(captions.summary_metrics(merged, job))
        run.log_named_table(captions.sample_table(merged, job.manifest), names.CAPTION_SAMPLE)
        note = captions.empty_note(merged)
        if note:
            say(f"warning: {note}")
            empty = merged.loc[merged["caption"] == "", ["image_id"]]
            run.log_text(empty.to_csv(index=False), names.CAPTION_EMPTY)
        run.log_artifact(job.out / parts.CAPTIONS_FILE, names.CAPTION_ARTIFACT_DIR)
    file = job.out / parts.CAPTIONS_FILE
    print(f"wrote {file}: {len(merged)} captions of {len(job.ids)} images "
          f"({len(job.ids) - len(job.done_before)} captioned now)")
    print(f"use it: taxonclip eval --embedding avg --captions {file} --data {config.data.data}")
    print(where_to_look(run.run_id, run.experiment_id))
    return 0


def _caption_params(job) -> dict:
    """What the run records beside its parameters: the resolved model, the prompt's text, the
    generation settings, the split and how the rows were shared."""
    import json

    described = job.settings
    split = {f"split.{key}": value for key, value in job.metadata["split"].items()}
    return {"revision": described["revision"], "dtype_used": described["dtype"],
            "template_text": described["template_text"],
            "without_name_text": described["without_name_text"],
            "generation": json.dumps(described["generation"], sort_keys=True),
            "shares": job.share.count, "launcher": job.share.kind, **split}


def _speed(job, seconds: float) -> dict[str, float]:
    """Images and generated tokens per second of this invocation (every share's new rows over
    the leading process's time from its start to the last share's end)."""
    from taxonclip.captions import parts

    done = parts.read_parts(job.out)
    new = done[~done["image_id"].isin(job.done_before) & (done["status"] != parts.UNDECODABLE)]
    return {"caption/images_per_s": len(new) / seconds if seconds > 0 else 0.0,
            "caption/tokens_per_s": float(new["tokens"].sum()) / seconds if seconds > 0 else 0.0,
            "caption/seconds": seconds, "caption/captioned_now": float(len(new))}
