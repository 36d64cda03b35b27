"""A caption job: check everything (data, template, split, output folder, model) before anything
runs, caption this process's share in batches into part files, and merge the parts once every
share is done. The MLflow run around it is opened by `taxonclip.jobs.caption`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from taxonclip.captions import parts
from taxonclip.captions.base import Captioner, CaptionerOptions, build_captioner
from taxonclip.captions.loader import image_batches, size_order
from taxonclip.captions.prompts import Prompts, build_prompts, split_parameters
from taxonclip.captions.shares import Share, batches_of_share, from_env
from taxonclip.captions.templates import Template, load_template
from taxonclip.config import CaptionConfig
from taxonclip.data.manifest import Manifest, load_manifest
from taxonclip.errors import DataError
from taxonclip.progress import Progress

WAIT_SECONDS = 0.5  # how often the leading rank looks whether the other shares are done
SHOWN = 5


@dataclass
class CaptionJob:
    """A checked job: its data, prompts, output folder, this process's share and the batches of
    it still to caption; `captioner` is None for a merge alone."""

    config: CaptionConfig
    manifest: Manifest
    template: Template
    prompts: Prompts
    out: Path
    share: Share
    settings: dict
    metadata: dict
    pending: list[list[int]]
    done_before: set[str]
    captioner: Captioner | None = None

    @property
    def ids(self) -> list[str]:
        return self.manifest.table["image_id"].tolist()


@dataclass
class ShareStats:
    """What this process captioned: counts, generated tokens and seconds of captioning."""

    captioned: int = 0
    empty: int = 0
    undecodable: list[str] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0


def dtype_of(config: CaptionConfig, device: torch.device) -> str:
    """The dtype `auto` means on `device`: bfloat16 on CUDA, float32 on the CPU."""
    if config.dtype != "auto":
        return config.dtype
    return "bfloat16" if device.type == "cuda" else "float32"


def caption_device(config: CaptionConfig) -> torch.device:
    """The device, with each torchrun process on its own GPU."""
    from taxonclip.distributed import resolve_device

    device = resolve_device(config.device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def prepare_job(config: CaptionConfig) -> CaptionJob:
    """Load and check everything a caption job needs; a bad input raises one TaxonclipError
    before any model is loaded or any run opened."""
    out = config.out_folder()
    manifest = load_manifest(config.data)
    remote = [url for url in manifest.shards if not os.path.isfile(url)]
    if remote:  # a member is read by its key, which needs the shard's index: a local file
        raise DataError(f"{manifest.report.source}: caption reads the images of shards on this "
                        f"machine's file system, and {remote[0]} is not a local file; copy the "
                        f"shards here (or caption the dataset they were made from)")
    template = load_template(config.template, config.templates)
    prompts = build_prompts(manifest.table, template, config.name_in_prompt, config.data)
    device = caption_device(config)
    captioner = None
    if not config.merge_only:
        captioner = build_captioner(config.model, CaptionerOptions(
            device=str(device), dtype=dtype_of(config, device),
            max_new_tokens=config.max_new_tokens, trust_remote_code=config.trust_remote_code))
    if captioner is None:
        settings = parts.read_settings(out)
    else:
        settings = _settings(config, manifest, template, captioner)
        parts.check_settings(out, settings)
    metadata = {**settings, "split": split_parameters(config.data),
                "name_in_prompt": config.name_in_prompt}
    share = from_env()
    done = set(parts.read_parts(out)["image_id"])
    table = manifest.table
    order = size_order(table["image_path"].tolist(), table["image_id"].tolist())
    mine = batches_of_share(order, config.batch_size, share)
    todo = [i for batch in mine for i in batch if table["image_id"].iat[i] not in done]
    pending = [todo[s:s + config.batch_size] for s in range(0, len(todo), config.batch_size)]
    return CaptionJob(config, manifest, template, prompts, out, share, settings, metadata,
                      pending, done, captioner)


def _settings(config: CaptionConfig, manifest: Manifest, template: Template,
              captioner: Captioner) -> dict:
    """What decides the captions in a folder: a rerun must repeat them to add to it."""
    described = captioner.described
    plain = template.without_name or template
    settings = {
        "data": str(manifest.root), "model": described.model, "revision": described.revision,
        "dtype": described.dtype, "generation": described.generation,
        "template": template.name, "template_text": template.text,
        "without_name_text": plain.text if template.names_label else None,
        "name_in_prompt": config.name_in_prompt,
    }
    if template.names_label:  # which rows saw a name follows from the split
        settings["split"] = split_parameters(config.data)
    return settings


def caption_share(job: CaptionJob, show: bool = True) -> ShareStats:
    """Caption this process's pending batches into part files. An image that does not decode
    is skipped and listed (missing=skip) or stops the job naming its row, once the captions made
    so far are written."""
    table, stats = job.manifest.table, ShareStats()
    writer = parts.PartWriter(job.out, job.share.index, job.config.part_size)
    described = job.captioner.described
    progress = Progress(len(job.pending), _desc(job.share), "batches", show=show,
                        every=job.config.progress_every)
    start = time.monotonic()
    try:
        for positions, images, reasons in image_batches(table["image_path"].tolist(), job.pending,
                                                        job.config.workers):
            rows = _undecodable_rows(job, positions, images, reasons, writer, stats)
            good = [k for k, image in enumerate(images) if image is not None]
            if good:
                generated = job.captioner.caption([images[k] for k in good],
                                                  [job.prompts.text[positions[k]] for k in good])
                for k, made in zip(good, generated):
                    rows.append(_row(job, positions[k], described, made.text, made.tokens))
                    stats.captioned += 1
                    stats.empty += not made.text
                    stats.tokens += made.tokens
            writer.add(rows)
            progress.update()
            elapsed = time.monotonic() - start
            progress.note(**{"images/s": f"{stats.captioned / elapsed:.2f}",
                             "tokens/s": f"{stats.tokens / elapsed:.1f}"})
    finally:
        writer.flush()  # what was captioned is kept, whatever stopped the loop
        progress.close()
    stats.seconds = time.monotonic() - start
    return stats


def _desc(share: Share) -> str:
    return "caption" if share.count == 1 else f"caption share {share.index + 1}/{share.count}"


def _undecodable_rows(job: CaptionJob, positions, images, reasons, writer, stats) -> list[dict]:
    """The part rows of a batch's images that did not decode (missing=skip), or the error."""
    rows = []
    for position, image, reason in zip(positions, images, reasons):
        if image is not None:
            continue
        image_id = job.manifest.table["image_id"].iat[position]
        if job.config.data.missing != "skip":
            writer.flush()
            raise DataError(f"row {position + 1} ({image_id}) of {job.manifest.report.source}: "
                            f"{reason}; the captions made so far are kept in {job.out}, and a "
                            f"rerun with missing=skip captions the other images")
        stats.undecodable.append(image_id)
        rows.append({**_row(job, position, job.captioner.described, None, 0),
                     "status": parts.UNDECODABLE})
    return rows


def _row(job: CaptionJob, position: int, described, text: str | None, tokens: int) -> dict:
    status = parts.OK if text else parts.EMPTY
    return {"image_id": job.manifest.table["image_id"].iat[position], "caption": text or "",
            "template": job.prompts.template[position], "model": described.model,
            "revision": described.revision, "saw_name": bool(job.prompts.saw_name[position]),
            "prompt": job.prompts.text[position], "tokens": int(tokens), "status": status}


def missing_ids(job: CaptionJob) -> list[str]:
    """Image ids of the job that no part file holds yet."""
    done = set(parts.read_parts(job.out)["image_id"])
    return [image_id for image_id in job.ids if image_id not in done]


def wait_for_shares(job: CaptionJob) -> None:
    """Wait until the parts hold every row (the other torchrun ranks run at the same time)."""
    while missing_ids(job):
        time.sleep(WAIT_SECONDS)


def merge_job(job: CaptionJob) -> pd.DataFrame:
    """Merge the parts into captions.parquet; refused while rows are not captioned yet."""
    missing = missing_ids(job)
    if missing:
        raise DataError(f"{job.out}: {len(missing)} of {len(job.ids)} images are not captioned "
                        f"yet (e.g. {', '.join(missing[:SHOWN])}); run the caption job (every "
                        f"share of it) to finish them, then merge")
    return parts.merge(job.out, job.metadata, job.ids)


def summary_metrics(merged: pd.DataFrame, job: CaptionJob) -> dict[str, float]:
    """Counts and caption lengths of the merged file."""
    all_parts = parts.read_parts(job.out).drop_duplicates("image_id")
    tokens = merged["tokens"].to_numpy()
    words = merged["caption"].str.split().str.len().fillna(0).to_numpy()
    metrics = {"caption/rows": len(job.ids), "caption/captions": len(merged),
               "caption/empty": int((merged["caption"] == "").sum()),
               "caption/undecodable": int((all_parts["status"] == parts.UNDECODABLE).sum()),
               "caption/saw_name": int(merged["saw_name"].sum())}
    for q in (5, 50, 95):
        metrics[f"caption/tokens_p{q}"] = float(np.percentile(tokens, q)) if len(tokens) else 0.0
        metrics[f"caption/words_p{q}"] = float(np.percentile(words, q)) if len(words) else 0.0
    return metrics


def sample_table(merged: pd.DataFrame, manifest: Manifest, rows: int = 50) -> pd.DataFrame:
    """Up to `rows` captions, evenly spread over the file, with each image's species."""
    picked = merged.iloc[np.unique(np.linspace(0, len(merged) - 1, min(rows, len(merged)),
                                               dtype=int))] if len(merged) else merged
    species = manifest.table.set_index("image_id")["scientific_name"]
    return pd.DataFrame({"image_id": picked["image_id"].to_numpy(),
                         "species": picked["image_id"].map(species).to_numpy(),
                         "caption": picked["caption"].to_numpy()})


def empty_note(merged: pd.DataFrame) -> str | None:
    """A line on the empty captions, if any: they are kept, counted and listed, never hidden."""
    empty = merged.loc[merged["caption"] == "", "image_id"].tolist()
    if not empty:
        return None
    return (f"{len(empty)} of {len(merged)} captions are empty (the model stopped at once), e.g. "
            f"{', '.join(empty[:SHOWN])}: they are kept as empty texts, counted in caption/empty "
            f"and listed in caption/empty.csv")
