"""Embed images in batches, score nearest neighbours per taxa and level, build the per-taxa table.

The table has one row per (taxa, level): each taxa alone at species and genus level, and `All`
at species, genus and taxa level. Queries are the test split, the gallery the train split of the
same scope, both from one seeded split shared by every row.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader
from tqdm import tqdm

from taxonclip import knn
from taxonclip.config import EvalConfig, cache_dir
from taxonclip.data.images import ImageDataset, collate_skipping
from taxonclip.data.manifest import Manifest, load_manifest
from taxonclip.data.splits import Split, select_classes, split_manifest
from taxonclip.distributed import resolve_device
from taxonclip.errors import DataError, ModelError
from taxonclip.names import ALL_TAXA, COUNT_COLUMNS

TABLE_COLUMNS = ("taxa", "level", *COUNT_COLUMNS, *knn.METRICS)
SCOPE_LEVELS = ("species", "genus")
# The similarity blocks of one chunk of queries stay under this, however large the gallery.
BLOCK_BYTES = 1 << 30
ALL_LEVELS = ("species", "genus", "taxa")


@dataclass(frozen=True)
class EvalResult:
    """What one evaluation produced."""

    table: pd.DataFrame
    split: Split
    manifest: Manifest
    embed_seconds: float
    img_per_s: float


@torch.no_grad()
def embed_images(encoder: torch.nn.Module, paths: list[str], *, batch_size: int, workers: int,
                 device: torch.device, missing: str = "error",
                 progress: bool = True) -> tuple[torch.Tensor, np.ndarray]:
    """Embed images in batches (bf16 autocast on CUDA, fp32 on CPU).

    Returns the embeddings of the images that decoded and their row indices into `paths`; under
    `missing="error"` an undecodable image raises, naming its path.
    """
    dataset = ImageDataset(paths, encoder.eval_transform(), missing=missing)
    loader = DataLoader(dataset, batch_size=batch_size, num_workers=workers,
                        collate_fn=collate_skipping, pin_memory=device.type == "cuda",
                        persistent_workers=False)
    was_training = encoder.training
    encoder.eval()
    vectors, kept = [], []
    for images, _, index in tqdm(loader, desc="embed", unit="batch", disable=None if progress else True):
        if len(index) == 0:
            continue
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            out = encoder(images.to(device, non_blocking=True))
        vectors.append(out.float().cpu())
        kept.append(index.numpy())
    encoder.train(was_training)
    if not vectors:
        raise DataError("no image of the manifest could be decoded")
    return torch.cat(vectors), np.concatenate(kept)


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
    visual, text = F.normalize(visual, dim=1), F.normalize(text, dim=1)
    if kind == "avg":
        if visual.shape[1] != text.shape[1]:
            raise ModelError(f"embedding=avg needs equal sizes, got {visual.shape[1]} and {text.shape[1]}")
        return (visual + text) / 2
    return torch.cat([visual, text], dim=1)


def embed_manifest(encoder: torch.nn.Module, manifest: Manifest, config: EvalConfig,
                   device: torch.device) -> tuple[torch.Tensor, np.ndarray, float]:
    """Embeddings of every manifest row as `config.embedding` asks, the rows kept, and images/s."""
    table = manifest.table
    start = time.perf_counter()
    visual, kept = None, np.arange(len(table))
    if config.embedding != "text":
        visual, kept = embed_images(encoder, table["image_path"].tolist(), batch_size=config.batch_size,
                                    workers=config.workers, device=device, missing=config.data.missing)
    seconds = time.perf_counter() - start
    text = None
    if config.embedding != "visual":
        captions = _captions(manifest, config)
        # captions often repeat (one text per species): each distinct one is embedded once
        distinct, row_caption = np.unique([captions[i] for i in kept], return_inverse=True)
        text = embed_texts(encoder, distinct.tolist(), batch_size=config.batch_size,
                           device=device)[torch.from_numpy(row_caption)]
    return fuse(visual, text, config.embedding), kept, len(kept) / max(seconds, 1e-9)


def _captions(manifest: Manifest, config: EvalConfig) -> list[str]:
    if "caption" not in manifest.table.columns:
        raise DataError(f"embedding={config.embedding} needs captions: a caption column in "
                        f"{manifest.report.source} (named by caption_column if it is not 'caption'), "
                        f"or a captions file of one text per species (captions=PATH); the manifest "
                        f"has {', '.join(manifest.table.columns)}")
    return manifest.table["caption"].fillna("").astype(str).tolist()


def evaluation_table(vectors: torch.Tensor, table: pd.DataFrame, split: Split, *,
                     chunk_size: int = knn.DEFAULT_CHUNK_SIZE, device: torch.device | str = "cpu",
                     seen_species: set[str] | None = None) -> pd.DataFrame:
    """The per-taxa table for embeddings whose rows follow `table`.

    With `seen_species` (training on a fraction of the classes), `All:seen` and `All:unseen`
    rows restrict the queries to test images of species seen or not seen in training; the
    gallery stays the whole train split.
    """
    is_train = np.zeros(len(table), bool)
    is_train[split.train] = True
    is_test = np.zeros(len(table), bool)
    is_test[split.test] = True
    rows = []
    for scope in [*sorted(table["taxa"].unique()), ALL_TAXA]:
        in_scope = np.ones(len(table), bool) if scope == ALL_TAXA else (table["taxa"] == scope).to_numpy()
        for level in ALL_LEVELS if scope == ALL_TAXA else SCOPE_LEVELS:
            rows.append(_row(scope, level, vectors, table[level], in_scope & is_train,
                             in_scope & is_test, chunk_size, device))
    if seen_species is not None:
        seen = table["species"].isin(seen_species).to_numpy()
        for name, queries in (("seen", seen), ("unseen", ~seen)):
            for level in SCOPE_LEVELS:
                rows.append(_row(f"{ALL_TAXA}:{name}", level, vectors, table[level], is_train,
                                 is_test & queries, chunk_size, device))
    return pd.DataFrame(rows, columns=list(TABLE_COLUMNS))


def _row(scope: str, level: str, vectors: torch.Tensor, labels: pd.Series, gallery: np.ndarray,
         queries: np.ndarray, chunk_size: int, device) -> dict:
    known = labels.notna().to_numpy()
    codes = torch.as_tensor(pd.factorize(labels)[0], dtype=torch.long)
    gallery, queries = np.flatnonzero(gallery & known), np.flatnonzero(queries & known)
    chunk_size = max(1, min(chunk_size, BLOCK_BYTES // (8 * max(len(gallery), 1))))
    result = knn.knn_metrics(vectors[queries], codes[queries], vectors[gallery], codes[gallery],
                             chunk_size=chunk_size, device=device)
    return {"taxa": scope, "level": level, "n_test": result.n_test, "n_classes": result.n_classes,
            "n_lone": result.n_lone, **result.metrics}


def evaluate(config: EvalConfig, encoder: torch.nn.Module, manifest: Manifest | None = None,
             split: Split | None = None, seen_species: set[str] | None = None) -> EvalResult:
    """Embed the manifest (or reuse cached embeddings) and compute the per-taxa table.

    `class_fraction` < 1 evaluates a seeded subset of the species, unless `seen_species` is given
    (after training on a subset, every species is evaluated and the table splits seen/unseen)."""
    device = resolve_device(config.device)
    manifest = manifest or load_manifest(config.data)
    if config.data.class_fraction < 1.0 and seen_species is None:
        manifest = _with_species(manifest, select_classes(manifest.table, config.data.class_fraction,
                                                          config.data.seed))
    split = split or split_manifest(manifest.table, config.data.test_size, config.data.seed)
    encoder = encoder.to(device)
    vectors, kept, img_per_s = _cached_embeddings(encoder, manifest, config, device)
    if len(kept) < len(manifest.table):
        manifest, split = _keep_rows(manifest, split, kept)
    start = time.perf_counter()
    table = evaluation_table(vectors, manifest.table, split, chunk_size=config.chunk_size,
                             device=device, seen_species=seen_species)
    return EvalResult(table, split, manifest, time.perf_counter() - start, img_per_s)


def _with_species(manifest: Manifest, species: list[str]) -> Manifest:
    """Only the rows of the given species (`class_fraction` of an evaluation)."""
    table = manifest.table[manifest.table["species"].isin(species)].reset_index(drop=True)
    return replace(manifest, table=table)


def _keep_rows(manifest: Manifest, split: Split, kept: np.ndarray) -> tuple[Manifest, Split]:
    """Drop rows whose image failed to decode (policy `skip`), renumbering the split."""
    position = np.full(len(manifest.table), -1)
    position[kept] = np.arange(len(kept))
    remap = lambda rows: np.sort(position[rows][position[rows] >= 0])  # noqa: E731
    table = manifest.table.iloc[kept].reset_index(drop=True)
    return (replace(manifest, table=table),
            Split(remap(split.train), remap(split.test), split.train_only, split.seed, split.test_size))


def _cached_embeddings(encoder, manifest: Manifest, config: EvalConfig,
                       device: torch.device) -> tuple[torch.Tensor, np.ndarray, float]:
    key = _cache_key(encoder, manifest, config)
    if key is None:
        return embed_manifest(encoder, manifest, config, device)
    folder = cache_dir() / "embeddings"
    vectors_file, kept_file = folder / f"{key}.npy", folder / f"{key}.kept.npy"
    if vectors_file.exists() and kept_file.exists():
        return torch.from_numpy(np.load(vectors_file)), np.load(kept_file), float("nan")
    vectors, kept, img_per_s = embed_manifest(encoder, manifest, config, device)
    folder.mkdir(parents=True, exist_ok=True)
    _save_atomic(vectors_file, vectors.numpy())
    _save_atomic(kept_file, kept)
    return vectors, kept, img_per_s


def _cache_key(encoder, manifest: Manifest, config: EvalConfig) -> str | None:
    """Embeddings are reusable when the same weights embed the same images the same way; random
    weights (`none`) and models under training are never cached."""
    weights = getattr(encoder, "weights", None)
    if not config.cache_embeddings or weights in (None, "none"):
        return None
    digest = hashlib.sha256()
    captions = _captions(manifest, config) if config.embedding != "visual" else []
    for part in (encoder.spec.name, _weights_identity(weights), config.embedding,
                 *manifest.table["image_path"], *captions):
        digest.update(str(part).encode() + b"\0")
    return digest.hexdigest()[:24]


def _weights_identity(weights: str) -> str:
    path = Path(weights)
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return weights


def _save_atomic(path: Path, array: np.ndarray) -> None:
    partial = path.with_suffix(".partial.npy")
    np.save(partial, array)
    partial.replace(path)


def split_csv(result: EvalResult) -> str:
    """The split as CSV (`image_id,split`), so any row of the table can be reproduced."""
    table = result.manifest.table
    lines = ["image_id,split"]
    lines += [f"{table.at[i, 'image_id']},train" for i in result.split.train]
    lines += [f"{table.at[i, 'image_id']},test" for i in result.split.test]
    return "\n".join(lines) + "\n"


def format_table(table: pd.DataFrame) -> str:
    """The table aligned for a terminal, accuracies as percentages with two decimals."""
    shown = table.copy()
    for column in knn.METRICS:
        shown[column] = shown[column].map(lambda v: "-" if pd.isna(v) else f"{100 * v:6.2f}")
    return shown.to_string(index=False)
