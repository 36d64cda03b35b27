"""Embed a manifest's rows in batches: images (from files or prepared shards, spread over the
ranks of a process group), captions with the text tower, and their fusion as each `embedding`
asks; embeddings of fixed weights are cached by what was embedded.

Text never carries the answer into a query: `gallery_avg` fuses a caption into the gallery side
only, while `text`, `avg` and `concat` put each query's own caption into it (refused beforehand
for captions that reveal the label, see `taxonclip.checks`).
"""

from __future__ import annotations

import hashlib
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Subset

from taxonclip import distributed
from taxonclip.checks import GALLERY_TEXT_EMBEDDINGS
from taxonclip.config import DataConfig, EvalConfig, cache_dir
from taxonclip.data.images import ImageDataset, collate_skipping
from taxonclip.data.manifest import Manifest
from taxonclip.data.shards import PREPARED_FILE, read_prepared_info
from taxonclip.data.streams import (Decoded, DeviceDecoder, Encoded, ShardedRows, ShardStream,
                                    collate_encoded)
from taxonclip.errors import DataError, ModelError
from taxonclip.names import SOURCE_DIGEST_COLUMN
from taxonclip.progress import Progress


@dataclass(frozen=True)
class Embeddings:
    """One vector per kept manifest row as a query and as a gallery item (the same tensor unless
    the gallery side is fused with text), the rows kept, and the images embedded per second."""

    queries: torch.Tensor
    gallery: torch.Tensor
    kept: np.ndarray
    img_per_s: float
    visual: torch.Tensor | None = None  # the images alone, where the caption gauge needs them


@torch.no_grad()
def embed_images(encoder: torch.nn.Module, paths: list[str], *, batch_size: int, workers: int,
                 device: torch.device, missing: str = DataConfig.missing,
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


def _captions(manifest: Manifest, config: EvalConfig) -> list[str]:
    if "caption" not in manifest.table.columns:
        raise DataError(f"embedding={config.embedding} needs captions: a caption column in "
                        f"{manifest.report.source} (named by caption_column if it is not 'caption'), "
                        f"or a captions file of one text per species (captions=PATH); the manifest "
                        f"has {', '.join(manifest.table.columns)}")
    return manifest.table["caption"].fillna("").astype(str).tolist()


def cached_embeddings(encoder, manifest: Manifest, config: EvalConfig,
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
