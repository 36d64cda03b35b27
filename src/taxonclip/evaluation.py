"""One evaluation: check the request, embed the manifest (or reuse cached embeddings), build the
per-taxa table, with the captions' own gauge and zero-shot scores where asked.

Text never carries the answer into a query. A caption that is a function of the label (one text
per species, or one that names its species) may shape the gallery (`gallery_avg`), never a
query: `text`, `avg` and `concat` put each query's own caption into it, and are refused for such
captions before anything is embedded.
"""

from __future__ import annotations

import time
from dataclasses import replace

import numpy as np
import pandas as pd
import torch

from taxonclip import names
from taxonclip.captions.keyed import check_caption_split
from taxonclip.checks import (TEXT_EMBEDDINGS, caption_gauge_refusal, caption_only_scores,
                              caption_vectors, check_decoder, check_has_test_images,
                              check_no_label_in_queries, gauges_captions)
from taxonclip.config import DataConfig, EvalConfig
from taxonclip.data.manifest import Manifest, load_manifest
from taxonclip.data.splits import Split, make_split
from taxonclip.data.subset import class_subset
from taxonclip.distributed import resolve_device
from taxonclip.embed import cached_embeddings, embed_manifest
from taxonclip.errors import DataError
from taxonclip.table import EvalResult, Seen, evaluation_table, seen_of_split
from taxonclip.zero_shot import level_prototypes, zero_shot_table, zero_shot_texts


def prepare_evaluation(config: EvalConfig) -> tuple[Manifest, Split]:
    """The manifest (a `class_fraction` below 1 keeps a seeded subset of the species) and its
    split, checked so that nothing is embedded for a request that cannot give a sound table: a
    caption that would carry the label into a query, or a split with no test image."""
    manifest = load_manifest(config.data)
    check_no_label_in_queries(manifest, config.embedding, config.allow_label_text)
    check_decoder(manifest, config.decode)
    manifest = with_class_fraction(manifest, config.data)
    split = make_split(manifest.table, config.data)
    check_has_test_images(manifest, split)
    check_caption_split(manifest.table, split, config.data)
    return manifest, split


def evaluate(config: EvalConfig, encoder: torch.nn.Module, manifest: Manifest | None = None,
             split: Split | None = None, seen: Seen | None = None,
             spread: bool = False, refuse_label_text: bool = True) -> EvalResult | None:
    """Embed the manifest (or reuse cached embeddings) and compute the per-taxa table.

    Without `manifest` and `split`, they come from `prepare_evaluation`. After training on a
    subset of the classes, `seen` names them: every class is evaluated and the table gains
    seen/unseen rows, as it does for an official split's seen and unseen partitions. With
    `spread`, every rank of a process group calls it and embeds its share of the images; rank 0
    scores and returns the result, the other ranks return None.

    A text embedding adds the column `caption_only_top1` (the captions alone, see
    `taxonclip.checks`); with `refuse_label_text`, captions that the gauge catches (they alone
    beat the images alone on these rows) raise DataError, naming both figures."""
    device = resolve_device(config.device)
    if manifest is None or split is None:
        manifest, split = prepare_evaluation(config)
    check_no_label_in_queries(manifest, config.embedding, config.allow_label_text)
    encoder = encoder.to(device)
    gauged = refuse_label_text and gauges_captions(manifest, config)
    if spread or gauged:  # a training's evaluation, or one that needs the images alone too
        embeddings = embed_manifest(encoder, manifest, config, device, spread=spread,
                                    with_visual=gauged)
        if embeddings is None:
            return None
    else:
        embeddings = cached_embeddings(encoder, manifest, config, device)
    if len(embeddings.kept) < len(manifest.table):
        manifest, split = _keep_rows(manifest, split, embeddings.kept)
    start = time.perf_counter()
    seen = seen or seen_of_split(split)
    table = evaluation_table(embeddings.queries, manifest.table, split, chunk_size=config.chunk_size,
                             device=device, seen=seen, gallery_vectors=embeddings.gallery,
                             levels=manifest.levels)
    if config.embedding in TEXT_EMBEDDINGS:
        table = _with_caption_gauge(table, manifest, split, seen, config, device,
                                    embeddings.visual if gauged else None)
    texts = None
    if config.zero_shot:
        texts = zero_shot_texts(manifest.table, manifest.levels)
        prototypes = level_prototypes(encoder, texts, config.batch_size, device)
        table = zero_shot_table(table, embeddings.queries, manifest.table, split, prototypes, seen)
    return EvalResult(table, split, manifest, time.perf_counter() - start, embeddings.img_per_s,
                      texts)


def _with_caption_gauge(table: pd.DataFrame, manifest: Manifest, split: Split, seen: Seen | None,
                        config: EvalConfig, device, visual: torch.Tensor | None) -> pd.DataFrame:
    """The table with `caption_only_top1`; refused (DataError) where `visual` is given and the
    captions alone beat the images alone."""
    rows = manifest.table
    alone = evaluation_table(caption_vectors(rows["caption"].fillna("").astype(str).tolist()),
                             rows, split, chunk_size=config.chunk_size, device=device, seen=seen,
                             levels=manifest.levels)
    scores = caption_only_scores(table, alone)
    table = table.assign(**{names.CAPTION_ONLY_TOP1: scores})
    if visual is not None:
        images = evaluation_table(visual, rows, split, chunk_size=config.chunk_size, device=device,
                                  seen=seen, levels=manifest.levels)
        reason = caption_gauge_refusal(table, images, config.embedding, manifest.report.source,
                                       manifest.levels)
        if reason is not None:
            raise DataError(reason)
    return table


def with_class_fraction(manifest: Manifest, data: DataConfig) -> Manifest:
    """Only the rows of the seeded subset of species that `data.class_fraction` keeps (all of
    them at 1): the classes an evaluation scores."""
    subset = class_subset(manifest.table, data, "species")
    if subset is None:
        return manifest
    return replace(manifest, table=manifest.table[subset.rows].reset_index(drop=True))


def _keep_rows(manifest: Manifest, split: Split, kept: np.ndarray) -> tuple[Manifest, Split]:
    """Drop rows whose image failed to decode (policy `skip`), renumbering the split."""
    position = np.full(len(manifest.table), -1)
    position[kept] = np.arange(len(kept))
    remap = lambda rows: np.sort(position[rows][position[rows] >= 0])  # noqa: E731
    table = manifest.table.iloc[kept].reset_index(drop=True)
    trainable = None if split.trainable is None else remap(split.trainable)
    return (replace(manifest, table=table), replace(split, train=remap(split.train),
                                                    test=remap(split.test), trainable=trainable,
                                                    val=remap(split.val)))
