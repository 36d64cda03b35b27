"""Embed images in batches, score nearest neighbours per taxa and level, build the per-taxa table.

The table has one row per (taxa, level), its levels those of the data (`names.Levels`): for a
VLM4Bio table each taxa alone at species and genus level, and `All` at species, genus and taxa
level; for BIOSCAN-5M each order at the ranks below it and `All` at every rank from phylum to
species. A row without a label at a level is left out of that level only. Queries are the test
split, the gallery the train split of the same scope, both from one split shared by every row
(seeded, or the dataset's official partitions, which also give `All:seen`/`All:unseen` rows).

Text never carries the answer into a query. A caption that is a function of the label (one text
per species, or one that names its species) may shape the gallery (`gallery_avg`), never a
query: `text`, `avg` and `concat` put each query's own caption into it, and are refused for such
captions before anything is embedded.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from taxonclip import knn, zero_shot
from taxonclip.checks import (GALLERY_TEXT_EMBEDDINGS, QUERY_TEXT_EMBEDDINGS, TEXT_EMBEDDINGS,
                              caption_gauge_refusal, caption_only_scores, caption_vectors,
                              check_no_label_in_queries, label_revealing_captions,
                              made_by_caption_command)
from taxonclip.captions.keyed import check_caption_split
from taxonclip.config import DataConfig, EvalConfig, cache_dir
from taxonclip.data.bioscan import PARTITIONS as BIOSCAN_PARTITIONS
from taxonclip.data.images import ImageDataset, collate_skipping
from taxonclip.data.shards import PREPARED_FILE, SOURCE_DIGEST_COLUMN, read_prepared_info
from taxonclip.data.streams import (Decoded, DeviceDecoder, Encoded, ShardedRows, ShardStream,
                                    collate_encoded)
from taxonclip.data.manifest import Manifest, load_manifest
from taxonclip.data.splits import (GROUP_COLUMN, PARTITION_COLUMN, QUERY_PARTITIONS,
                                   SEEN_PARTITIONS, Split, make_split, select_classes,
                                   split_roles)
from taxonclip import distributed
from taxonclip.distributed import resolve_device
from taxonclip import names
from taxonclip.errors import ConfigError, DataError, MetricNotInTable, ModelError
from taxonclip.formats import PERCENT_NOTE, percent
from taxonclip.names import ALL_TAXA, COUNT_COLUMNS, VLM4BIO_LEVELS, Levels
from taxonclip.progress import Progress

TABLE_COLUMNS = ("taxa", "level", *COUNT_COLUMNS, *knn.METRICS)


@dataclass(frozen=True)
class Seen:
    """The classes a model was trained on (a `class_fraction` below 1), at the level of its
    label, or the seen partitions of an official split (`level` is then the partition column):
    the table then gains `All:seen` and `All:unseen` rows."""

    level: str
    classes: frozenset[str]


# an official split's seen queries are those of the partitions whose species train holds
OFFICIAL_SEEN = Seen(PARTITION_COLUMN, frozenset(SEEN_PARTITIONS))


def seen_of_split(split: Split) -> Seen | None:
    """The seen/unseen rows that the split itself defines (an official one), else None."""
    return OFFICIAL_SEEN if split.protocol == "official" else None


@dataclass(frozen=True)
class Embeddings:
    """One vector per kept manifest row as a query and as a gallery item (the same tensor unless
    the gallery side is fused with text), the rows kept, and the images embedded per second."""

    queries: torch.Tensor
    gallery: torch.Tensor
    kept: np.ndarray
    img_per_s: float
    visual: torch.Tensor | None = None  # the images alone, where the caption gauge needs them


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation produced."""

    table: pd.DataFrame
    split: Split
    manifest: Manifest
    embed_seconds: float
    img_per_s: float
    class_texts: pd.DataFrame | None = None  # zero-shot: each level's classes and their texts


@torch.no_grad()
def embed_images(encoder: torch.nn.Module, paths: list[str], *, batch_size: int, workers: int,
                 device: torch.device, missing: str = "error",
                 progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """Embed the image files at `paths` in batches (bf16 autocast on CUDA, fp32 on CPU).

    Returns the embeddings of the images that decoded, in the order of `paths` (memory-mapped,
    see `embed_dataset`), and their row indices into `paths`; under `missing="error"` an
    undecodable image raises, naming its path.
    """
    dataset = ImageDataset(paths, encoder.eval_transform(), missing=missing)
    return embed_dataset(encoder, dataset, len(paths), batch_size=batch_size, workers=workers,
                         device=device, progress=progress)


@torch.no_grad()
def embed_dataset(encoder: torch.nn.Module, dataset, count: int, *, batch_size: int, workers: int,
                  device: torch.device, progress: bool = True, collate=collate_skipping,
                  to_device=None) -> tuple[torch.Tensor, np.ndarray]:
    """Embed a dataset of `(image, label, position)` items (positions 0..count-1, in any order;
    None for an image left out) into a memory-mapped file rather than RAM: float16 where the
    encoder runs in bf16 (CUDA: no precision is lost), float32 on the CPU. `collate` batches the
    items, and `to_device` (default: a copy to `device`) makes a batch the model's input there.

    Returns one row per position that came back, in position order, and those positions."""
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collate,
                        pin_memory=device.type == "cuda" and to_device is None,
                        persistent_workers=False)
    to_device = to_device or (lambda images: images.to(device, non_blocking=True))
    was_training = encoder.training
    encoder.eval()
    store, arrived = None, np.zeros(count, dtype=bool)
    batches = -(-count // batch_size)
    bar = Progress(batches, "embed", "batches", show=progress)
    for images, _, index in loader:
        bar.update()
        if len(index) == 0:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = encoder(to_device(images))
        if store is None:
            dtype = np.float16 if device.type == "cuda" else np.float32
            store = _scratch_memmap((count, out.shape[1]), dtype)
        store[index.numpy()] = out.float().cpu().numpy()
        arrived[index.numpy()] = True
    bar.close()
    encoder.train(was_training)
    if store is None:
        raise DataError("no image of the manifest could be decoded")
    kept = np.flatnonzero(arrived)
    return torch.from_numpy(_compacted(store, kept)), kept


def _compacted(store: np.ndarray, kept: np.ndarray, block: int = 65536) -> np.ndarray:
    """The rows `kept` (ascending) of `store`, moved to its front in place and returned as a
    view: a block at a time, never a copy of the store in memory. Row kept[i] >= i, so a block
    is read before any later write can reach it."""
    if len(kept) == len(store):
        return store
    for start in range(0, len(kept), block):
        rows = kept[start:start + block]
        store[start:start + len(rows)] = store[rows]
    return store[:len(kept)]


def _scratch_memmap(shape: tuple[int, int], dtype) -> np.memmap:
    """A writable memory-mapped array in a file of the cache folder that is gone once the array
    is (the file is unlinked at once; the mapping keeps its pages)."""
    folder = cache_dir() / "scratch"
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=folder, suffix=".f32") as file:
        return np.memmap(file.name, dtype=dtype, mode="w+", shape=shape)


def embed_visual(encoder: torch.nn.Module, manifest: Manifest, config: EvalConfig,
                 device: torch.device, spread: bool = False) -> tuple[torch.Tensor | None, np.ndarray]:
    """The visual embeddings of every manifest row, read from its files or its shards, and the
    rows they are of.

    With `spread`, called by every rank of a process group: each rank embeds its share (every
    world_size-th image, or every world_size-th shard) and rank 0 receives all of them; the
    other ranks return None for the embeddings. Every rank learns which rows were embedded, so
    a rank's failure (an unreadable image) or a missing image is raised on every rank, and none
    waits for another in vain."""
    table = manifest.table
    rank, world = (distributed.rank(), distributed.world_size()) if spread else (0, 1)
    failure = None
    try:
        vectors, kept = _embed_share(encoder, manifest, config, device, rank, world)
    except DataError as error:
        if world == 1:
            raise
        vectors, kept, failure = torch.zeros(0), np.zeros(0, dtype=np.int64), str(error)
    if world > 1:
        vectors, kept = _gathered_shares(vectors, kept, failure)
    if manifest.shards and len(kept) < len(table) and config.data.missing == "error":
        absent = np.setdiff1d(np.arange(len(table)), kept)
        shown = ", ".join(table["image_path"].iloc[absent[:5]])
        raise DataError(f"{len(absent)} of {len(table)} images of {manifest.report.source} are not "
                        f"in its shards or do not decode (e.g. {shown}); prepare the data again, "
                        f"or set missing=skip to leave them out")
    return vectors, kept


def _embed_share(encoder: torch.nn.Module, manifest: Manifest, config: EvalConfig,
                 device: torch.device, rank: int, world: int) -> tuple[torch.Tensor, np.ndarray]:
    """The embeddings of rank `rank`'s share of the rows, and their positions."""
    table = manifest.table
    if not manifest.shards:
        if world == 1:
            return embed_images(encoder, table["image_path"].tolist(), batch_size=config.batch_size,
                                workers=config.workers, device=device, missing=config.data.missing)
        dataset = ImageDataset(table["image_path"].tolist(), encoder.eval_transform(),
                               missing=config.data.missing)
        return embed_dataset(encoder, Subset(dataset, range(rank, len(table), world)), len(table),
                             batch_size=config.batch_size, workers=config.workers, device=device,
                             progress=rank == 0)
    rows = ShardedRows.of(table, manifest.shards, np.arange(len(table)))
    shards = range(rank, len(manifest.shards), world)
    skip = config.data.missing == "skip"
    workers = min(config.workers, len(shards))
    if config.decode == "device":
        stream = ShardStream(rows, Encoded(), shards=shards, skip_undecodable=skip)
        return embed_dataset(
            encoder, stream, len(table), batch_size=config.batch_size, workers=workers,
            device=device, collate=collate_encoded, progress=rank == 0,
            to_device=DeviceDecoder(encoder.tensor_transform(train=False), device))
    stream = ShardStream(rows, Decoded(encoder.eval_transform()), shards=shards,
                         skip_undecodable=skip)
    return embed_dataset(encoder, stream, len(table), batch_size=config.batch_size,
                         workers=workers, device=device, progress=rank == 0)


def _gathered_shares(vectors: torch.Tensor, kept: np.ndarray,
                     failure: str | None) -> tuple[torch.Tensor | None, np.ndarray]:
    """Every rank's share in row order, on rank 0 (None on the others), and the rows of all
    shares on every rank; a failure of any rank raised on all."""
    outcomes = distributed.all_gather_objects((kept, failure))
    failures = [failed for _, failed in outcomes if failed is not None]
    if failures:
        raise DataError(failures[0])
    rows = np.concatenate([rows for rows, _ in outcomes])
    order = np.argsort(rows, kind="stable")
    shares = distributed.gather_objects(vectors.numpy())
    if shares is None:
        return None, rows[order]
    stacked = np.concatenate([share for share in shares if len(share)])
    return torch.from_numpy(stacked[order]), rows[order]


@torch.no_grad()
def embed_texts(encoder: torch.nn.Module, texts: list[str], *, batch_size: int,
                device: torch.device) -> torch.Tensor:
    """Embed captions with the encoder's text tower, one batch at a time."""
    if not encoder.has_text:
        raise ModelError(f"model {encoder.spec.name} has no text tower; use embedding=visual")
    out = []
    for start in range(0, len(texts), batch_size):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out.append(encoder.encode_text(texts[start:start + batch_size]).float().cpu())
    return torch.cat(out)


def fuse(visual: torch.Tensor | None, text: torch.Tensor | None, kind: str) -> torch.Tensor:
    """Combine visual and text embeddings: `visual`, `text`, `avg` (mean of the two L2-normalised
    vectors) or `concat` (the two L2-normalised vectors side by side)."""
    if kind == "visual":
        return visual
    if kind == "text":
        return text
    visual, text = F.normalize(visual.float(), dim=1), F.normalize(text.float(), dim=1)
    if kind == "avg":
        if visual.shape[1] != text.shape[1]:
            raise ModelError(f"embedding=avg needs equal sizes, got {visual.shape[1]} and {text.shape[1]}")
        return (visual + text) / 2
    return torch.cat([visual, text], dim=1)


def embed_manifest(encoder: torch.nn.Module, manifest: Manifest, config: EvalConfig,
                   device: torch.device, spread: bool = False,
                   with_visual: bool = False) -> Embeddings | None:
    """Embeddings of every manifest row as `config.embedding` asks (images spread over the
    ranks with `spread`, see `embed_visual`: then None on every rank but 0); `with_visual`
    keeps the images' own embeddings too (embedding them for `text`)."""
    table = manifest.table
    start = time.perf_counter()
    visual, kept = None, np.arange(len(table))
    if config.embedding != "text" or with_visual:
        visual, kept = embed_visual(encoder, manifest, config, device, spread)
        if visual is None:  # another rank than 0 of a spread evaluation: it holds no share now
            return None
    img_per_s = len(kept) / max(time.perf_counter() - start, 1e-9)
    if config.embedding == "visual":
        return Embeddings(visual, visual, kept, img_per_s)
    captions = _captions(manifest, config)
    # captions often repeat (one text per species): each distinct one is embedded once
    distinct, row_caption = np.unique([captions[i] for i in kept], return_inverse=True)
    text = embed_texts(encoder, distinct.tolist(), batch_size=config.batch_size,
                       device=device)[torch.from_numpy(row_caption)]
    kept_visual = visual if with_visual else None
    if config.embedding in GALLERY_TEXT_EMBEDDINGS:
        return Embeddings(visual, fuse(visual, text, "avg"), kept, img_per_s, kept_visual)
    fused = fuse(visual, text, config.embedding)
    return Embeddings(fused, fused, kept, img_per_s, kept_visual)


def caption_note(manifest: Manifest) -> str:
    """A line on the captions for `data check`: which embeddings they serve."""
    if "caption" not in manifest.table.columns:
        return "captions: none (embedding=visual only)"
    reason = label_revealing_captions(manifest.table)
    if reason is None:
        return "captions: written per image (every embedding may use them)"
    return (f"captions: reveal the label (the caption {reason}): embedding=gallery_avg only; "
            f"text, avg and concat are refused")


def _captions(manifest: Manifest, config: EvalConfig) -> list[str]:
    if "caption" not in manifest.table.columns:
        raise DataError(f"embedding={config.embedding} needs captions: a caption column in "
                        f"{manifest.report.source} (named by caption_column if it is not 'caption'), "
                        f"or a captions file of one text per species (captions=PATH); the manifest "
                        f"has {', '.join(manifest.table.columns)}")
    return manifest.table["caption"].fillna("").astype(str).tolist()


def evaluation_table(vectors: torch.Tensor, table: pd.DataFrame, split: Split, *,
                     chunk_size: int = EvalConfig.chunk_size, device: torch.device | str = "cpu",
                     seen: Seen | None = None, gallery_vectors: torch.Tensor | None = None,
                     levels: Levels = VLM4BIO_LEVELS) -> pd.DataFrame:
    """The per-taxa table for embeddings whose rows follow `table`: `vectors` as queries and
    `gallery_vectors` (default: `vectors`) as gallery items, at the table's `levels` (each a
    column of `table`).

    With `seen` (training on a fraction of the classes), `All:seen` and `All:unseen` rows
    restrict the queries to test images of classes seen or not seen in training; the gallery
    stays the whole train split.
    """
    both = (vectors, vectors if gallery_vectors is None else gallery_vectors)
    is_train = np.zeros(len(table), bool)
    is_train[split.train] = True
    is_test = np.zeros(len(table), bool)
    is_test[split.test] = True
    is_seen = None if seen is None else table[seen.level].isin(seen.classes).to_numpy()
    rows = []
    for scope, level in table_cells(table["taxa"].unique(), seen is not None, levels):
        gallery, queries = _scope(scope, table, is_seen)
        rows.append(_row(scope, level, both, table[level], gallery & is_train, queries & is_test,
                         chunk_size, device))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _scope(scope: str, table: pd.DataFrame, is_seen: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """The rows that the gallery and the queries of one table row are drawn from."""
    everything = np.ones(len(table), bool)
    if scope == ALL_TAXA:
        return everything, everything
    if scope == f"{ALL_TAXA}:seen":
        return everything, is_seen
    if scope == f"{ALL_TAXA}:unseen":
        return everything, ~is_seen
    in_taxa = (table["taxa"] == scope).to_numpy()
    return in_taxa, in_taxa


def table_cells(taxa, with_seen: bool,
                levels: Levels = VLM4BIO_LEVELS) -> list[tuple[str, str]]:
    """The (taxa, level) rows of the table, in order: each taxa at the levels within a taxa
    (species and genus for VLM4Bio), `All` at every level, then `All:seen` and `All:unseen` at
    every rank the data has (`levels.labels`: BIOSCAN-5M's from phylum, order included) when
    training used a fraction of the classes or the split is official."""
    cells = [(scope, level) for scope in sorted(taxa) for level in levels.within_taxa]
    cells += [(ALL_TAXA, level) for level in levels.scored]
    if with_seen:
        cells += [(f"{ALL_TAXA}:{name}", level) for name in ("seen", "unseen")
                  for level in levels.labels]
    return cells


def check_metric_cell(key: str, taxa, with_seen: bool, levels: Levels = VLM4BIO_LEVELS) -> None:
    """Raise MetricNotInTable unless `key` (`<taxa>/<level>/<score>`) names a cell that the
    table of these taxa and levels will have."""
    available = [names.table_key(scope, level, "")
                 for scope, level in table_cells(taxa, with_seen, levels)]
    if key.rsplit("/", 1)[0] + "/" not in available:
        shown = ", ".join(cell.rstrip("/") for cell in available)
        raise MetricNotInTable(f"metric {key!r}: the evaluation table has no such row "
                               f"(rows: {shown})")


def table_cell(table: pd.DataFrame, key: str) -> float:
    """The cell `<taxa>/<level>/<score>` of a per-taxa table (NaN where it is empty)."""
    score = key.rsplit("/", 1)[1]
    for row in table.itertuples(index=False):
        if names.table_key(row.taxa, row.level, score) == key:
            return float(getattr(row, score))
    cells = ", ".join(f"{row.taxa}/{row.level}" for row in table.itertuples(index=False))
    raise MetricNotInTable(f"metric {key!r}: the evaluation table has no such row (rows: {cells})")


def _row(scope: str, level: str, vectors: tuple[torch.Tensor, torch.Tensor], labels: pd.Series,
         gallery: np.ndarray, queries: np.ndarray, chunk_size: int, device) -> dict:
    query_vectors, gallery_vectors = vectors
    known = labels.notna().to_numpy()
    codes = torch.as_tensor(pd.factorize(labels)[0], dtype=torch.long)
    gallery, queries = np.flatnonzero(gallery & known), np.flatnonzero(queries & known)
    if len(gallery) == 0:  # no gallery image named at this level (genus-only rows at species)
        return {"taxa": scope, "level": level, "n_test": len(queries), "n_classes": 0,
                "n_lone": len(queries), **dict.fromkeys(knn.METRICS, float("nan"))}
    # rows of the (memory-mapped) embeddings, read a chunk at a time: never a copy of the store
    result = knn.knn_metrics(query_vectors, codes[queries], gallery_vectors, codes[gallery],
                             chunk_size=chunk_size, device=device,
                             query_rows=torch.from_numpy(queries), gallery_rows=torch.from_numpy(gallery))
    return {"taxa": scope, "level": level, "n_test": result.n_test, "n_classes": result.n_classes,
            "n_lone": result.n_lone, **result.metrics}


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


def check_decoder(manifest: Manifest, decode: str) -> None:
    """Refuse decode=device for images that are files: it reads prepared shards."""
    if decode == "device" and not manifest.shards:
        raise ConfigError(f"decode=device decodes the JPEGs of prepared shards on the model's "
                          f"device; {manifest.report.source} is image files: prepare it first "
                          f"(taxonclip data prepare ... --out DIR, then data=DIR), or use "
                          f"decode=workers")


def check_has_test_images(manifest: Manifest, split: Split) -> None:
    """Refuse a split that gives the table no test image to score."""
    if len(split.test) == 0 and split.protocol == "official":
        raise DataError(f"{manifest.report.source}: no row of the query partitions "
                        f"({', '.join(QUERY_PARTITIONS)}) in column {PARTITION_COLUMN!r}")
    if len(split.test) == 0:
        grouped = " or one group" if GROUP_COLUMN in manifest.table.columns else ""
        raise DataError(f"{manifest.report.source}: the split has no test image to score: every "
                        f"class of its {len(manifest.table)} rows has a single image{grouped}, "
                        f"and a class needs one image in train and one in test")


def gauges_captions(manifest: Manifest, config: EvalConfig) -> bool:
    """Whether the caption gauge may refuse this evaluation's captions: query-side text, not
    from `taxonclip caption`, and not allowed by `allow_label_text`."""
    return (config.embedding in QUERY_TEXT_EMBEDDINGS and not config.allow_label_text
            and "caption" in manifest.table.columns
            and not made_by_caption_command(manifest.table))


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
        embeddings = _cached_embeddings(encoder, manifest, config, device)
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
        prototypes = _class_prototypes(encoder, texts, config.batch_size, device)
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


def check_zero_shot(encoder: torch.nn.Module, config: EvalConfig) -> None:
    """Refuse zero-shot scoring with a model that has no text tower."""
    if config.zero_shot and not encoder.has_text:
        raise ModelError(f"zero_shot=true needs class texts embedded by a text tower, and model "
                         f"{encoder.spec.name} has none (UNICOM models are image encoders only); "
                         f"use a CLIP model or leave zero_shot out")


def zero_shot_texts(table: pd.DataFrame, levels: Levels) -> pd.DataFrame:
    """Every class of every scored level and its texts: columns level, class, text."""
    rows = [(level, name, text) for level in levels.scored
            for name, texts in zero_shot.class_texts(table, level).items() for text in texts]
    return pd.DataFrame(rows, columns=["level", "class", "text"])


def _class_prototypes(encoder, texts: pd.DataFrame, batch_size: int,
                      device: torch.device) -> dict[str, tuple[torch.Tensor, dict[str, int]]]:
    """Per level: the prototype of each class (rows in class order) and each class's row."""
    embedded = embed_texts(encoder, texts["text"].tolist(), batch_size=batch_size, device=device)
    prototypes = {}
    for level, group in texts.groupby("level", sort=False):
        index = {name: i for i, name in enumerate(dict.fromkeys(group["class"]))}
        owners = group["class"].map(index).to_numpy()
        # copied: pandas hands out read-only arrays, which torch warns about when it wraps them
        rows = torch.tensor(group.index.to_numpy())
        prototypes[level] = (zero_shot.prototypes(embedded[rows], owners, len(index)), index)
    return prototypes


def zero_shot_table(table: pd.DataFrame, queries: torch.Tensor, rows: pd.DataFrame, split: Split,
                    prototypes: dict, seen: Seen | None) -> pd.DataFrame:
    """The per-taxa `table` with `zs_top1` and `zs_top5`: the test images of each row's scope
    labelled by the nearest class text among the classes of that scope."""
    is_test = np.zeros(len(rows), bool)
    is_test[split.test] = True
    is_seen = None if seen is None else rows[seen.level].isin(seen.classes).to_numpy()
    scores = []
    for scope, level in zip(table["taxa"], table["level"]):
        class_prototypes, index = prototypes[level]
        in_scope, query_scope = _scope(scope, rows, is_seen)
        labelled = rows[level].notna().to_numpy()
        picked = np.flatnonzero(query_scope & is_test & labelled)
        candidates = torch.tensor(sorted(index[name] for name in rows[level][in_scope & labelled].unique()))
        labels = torch.tensor([index[name] for name in rows[level].iloc[picked]], dtype=torch.long)
        top1, top5 = zero_shot.zero_shot_hits(queries[picked], labels, class_prototypes, candidates)
        scores.append((_mean_hit(top1), _mean_hit(top5)))
    return table.assign(**dict(zip(names.ZERO_SHOT_SCORES, map(list, zip(*scores)))))


def scored_note(table: pd.DataFrame, split: Split) -> str:
    """Which rows a table scored: under an official split the data's own partitions of its
    queries and gallery (in the data's order of partitions), else the seeded test split."""
    if split.protocol != "official" or PARTITION_COLUMN not in table.columns:
        return (f"queries: the seeded test split ({len(split.test)} rows, test_size "
                f"{split.test_size:g}, seed {split.seed}); gallery: the rest")
    partitions = table[PARTITION_COLUMN].astype(str)
    known = {name: i for i, name in enumerate(BIOSCAN_PARTITIONS)}

    def named(rows: np.ndarray) -> str:
        found = sorted(set(partitions.iloc[rows]), key=lambda p: (known.get(p, len(known)), p))
        return " + ".join(found) or "none"

    return (f"queries: {named(split.test)} ({len(split.test)} rows); gallery: "
            f"{named(split.train)} ({len(split.train)} rows); the data's own partitions")


def _mean_hit(hits: torch.Tensor) -> float:
    return float(hits.double().mean()) if len(hits) else float("nan")


def with_class_fraction(manifest: Manifest, data: DataConfig) -> Manifest:
    """Only the rows of the seeded subset of species that `data.class_fraction` keeps (all of
    them at 1): the classes an evaluation scores."""
    if data.class_fraction >= 1.0:
        return manifest
    species = select_classes(manifest.table, data.class_fraction, data.seed)
    table = manifest.table[manifest.table["species"].isin(species)].reset_index(drop=True)
    return replace(manifest, table=table)


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


def _cached_embeddings(encoder, manifest: Manifest, config: EvalConfig,
                       device: torch.device) -> Embeddings:
    """Embeddings from the cache when the same weights embedded the same rows the same way
    (images/s is then NaN), else embedded now and cached."""
    key = _cache_key(encoder, manifest, config)
    if key is None:
        return embed_manifest(encoder, manifest, config, device)
    folder = cache_dir() / "embeddings"
    files = {part: folder / f"{key}.{part}.npy" for part in ("queries", "gallery", "kept")}
    if all(path.exists() for path in files.values()):
        # copy-on-write maps: read from disk as needed, never written back
        queries, gallery, kept = (np.load(files[part], mmap_mode="c")
                                  for part in ("queries", "gallery", "kept"))
        return Embeddings(torch.from_numpy(queries), torch.from_numpy(gallery), kept, float("nan"))
    embeddings = embed_manifest(encoder, manifest, config, device)
    folder.mkdir(parents=True, exist_ok=True)
    _save_atomic(files["queries"], embeddings.queries.numpy())
    _save_atomic(files["gallery"], embeddings.gallery.numpy())
    _save_atomic(files["kept"], embeddings.kept)
    return embeddings


def _cache_key(encoder, manifest: Manifest, config: EvalConfig) -> str | None:
    """Embeddings are reusable when the same weights embed the same images the same way; random
    weights (`none`) and models under training are never cached."""
    weights = getattr(encoder, "weights", None)
    if not config.cache_embeddings or weights in (None, "none"):
        return None
    # a shard's name says nothing of its content: prepared rows carry their source's digest
    contents = manifest.table.get(SOURCE_DIGEST_COLUMN)
    if manifest.shards and contents is None:
        return None
    digest = hashlib.sha256()
    captions = _captions(manifest, config) if config.embedding != "visual" else []
    for part in (encoder.spec.name, _weights_identity(weights), config.embedding,
                 *manifest.table["image_path"], *([] if contents is None else contents),
                 *_prepared_settings(manifest), *captions):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()[:24]


def _prepared_settings(manifest: Manifest) -> list[str]:
    """How a prepared folder's images were resized and encoded (part of what was embedded)."""
    record = manifest.root / PREPARED_FILE
    if not manifest.shards or not record.is_file():
        return []
    return [json.dumps(read_prepared_info(manifest.root)["settings"], sort_keys=True)]


def _weights_identity(weights: str) -> str:
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return weights


def _save_atomic(path: Path, array: np.ndarray) -> None:
    import sys

    from taxonclip.diskio import atomic_path
    from taxonclip.errors import DiskError

    try:
        with atomic_path(path, array.nbytes, "cached embeddings") as partial:
            with open(partial, "wb") as file:  # np.save would add .npy to a path
                np.save(file, array)
    except DiskError as error:  # a cache that cannot be written costs a later run time only
        print(f"warning: {error}; the embeddings are not cached", file=sys.stderr)


def split_csv(result: EvalResult) -> str:
    """The split as CSV (`image_id,split`, the role of each row train, val or test, and `group`
    when the split kept groups together), so any row of the table can be reproduced."""
    table = result.manifest.table
    order, roles = split_roles(result.split)
    frame = table.iloc[order][["image_id"]].assign(split=roles)
    if GROUP_COLUMN in table.columns:
        frame[GROUP_COLUMN] = table[GROUP_COLUMN].iloc[order].to_numpy()
    return frame.to_csv(index=False)


def format_table(table: pd.DataFrame) -> str:
    """The table aligned for a terminal, accuracies as percentages with two decimals, and a
    line that says so."""
    shown = table.copy()
    for column in [c for c in (*knn.METRICS, *names.ZERO_SHOT_SCORES, names.CAPTION_ONLY_TOP1)
                   if c in shown.columns]:
        shown[column] = shown[column].map(percent)
    return f"{shown.to_string(index=False)}\n({PERCENT_NOTE})"
