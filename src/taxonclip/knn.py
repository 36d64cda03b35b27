"""Nearest-neighbour metrics: every test embedding labelled by the train embeddings of one scope.

The research group's four metrics (`top1_cos`, `mean_cos`, `top1_l2`, `mean_l2`) and three the field
also reports (`top5_cos`, `macro_top1_cos`, `map_at_r`), computed with matrix products over chunks
of queries, so memory grows with `chunk_size x gallery`, never with `test x train`.

Conventions:
- Cosine metrics compare L2-normalised embeddings; Euclidean metrics compare the embeddings as
  given, so `top1_l2` can differ from `top1_cos` when norms differ.
- A query whose label has no gallery item ("lone") is counted in `n_lone` and excluded from every
  metric. Labels present only in the gallery compete as predictions like any other.
- Ties go to the lowest gallery index (nearest items) and to the lowest label id (class means).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from taxonclip.errors import ConfigError, DataError

METRICS = ("top1_cos", "top5_cos", "mean_cos", "top1_l2", "mean_l2", "macro_top1_cos", "map_at_r")
TOP_K = 5
_PER_QUERY = ("top1_cos", "top5_cos", "mean_cos", "top1_l2", "mean_l2", "map_at_r")
_NORM_EPS = 1e-12


@dataclass(frozen=True)
class KnnResult:
    """Metrics of one scope and level.

    `metrics` holds every name in `METRICS` as a float in [0, 1], NaN when no query is valid.
    `n_test` counts the queries given; `n_lone` those whose label has no gallery item;
    `n_classes` the distinct labels among the other (valid) queries, the classes that
    `macro_top1_cos` averages over. `predictions` holds the `top1_cos` label of every query,
    lone ones included, for confusion analysis.
    """

    metrics: dict[str, float]
    n_test: int
    n_classes: int
    n_lone: int
    predictions: Tensor | None = None


@dataclass(frozen=True)
class _Gallery:
    """The gallery on the compute device, with what every chunk of queries needs from it."""

    vectors: Tensor
    norms: Tensor
    squared_norms: Tensor
    classes: Tensor
    counts: Tensor
    one_hot: Tensor | None


@torch.no_grad()
def knn_metrics(query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                chunk_size: int = 4096, device: str | torch.device | None = None) -> KnnResult:
    """Label each query (test embedding) by its nearest gallery (train) embeddings and score it.

    Labels are int64 ids of any value. Embeddings are compared in float32, or in float64 when
    `query` is float64. `chunk_size` queries are compared with the whole gallery at a time, on
    `device` (default: the device of `query`). Results do not depend on `chunk_size`.
    """
    _check_inputs(query, query_labels, gallery, gallery_labels, chunk_size)
    device = torch.device(device) if device is not None else query.device
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    label_ids, dense = torch.unique(torch.cat([gallery_labels.cpu(), query_labels.cpu()]),
                                    return_inverse=True)
    query_classes = dense[len(gallery_labels):]
    bank = _gallery(gallery.to(device, dtype), dense[:len(gallery_labels)].to(device), len(label_ids))
    # the two chunk x gallery blocks are allocated once: fresh ones per chunk cost page faults on CPUs
    workspace = torch.empty(2, min(chunk_size, len(query)), len(gallery), device=device, dtype=dtype)
    chunks = [_chunk_outcomes(query[start:start + chunk_size].to(device, dtype),
                              query_classes[start:start + chunk_size].to(device), bank, workspace)
              for start in range(0, len(query), chunk_size)]
    outcomes = {name: torch.cat([chunk[name].cpu() for chunk in chunks]) if chunks else
                torch.empty(0, dtype=torch.int64) for name in (*_PER_QUERY, "prediction")}
    return _summarise(outcomes, query_classes, bank.counts.cpu(), label_ids)


def _check_inputs(query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                  chunk_size: int) -> None:
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    for name, vectors, labels in (("query", query, query_labels), ("gallery", gallery, gallery_labels)):
        if vectors.ndim != 2:
            raise DataError(f"{name} embeddings must be a 2-D tensor (items x dim), got shape {tuple(vectors.shape)}")
        if labels.ndim != 1 or len(labels) != len(vectors):
            raise DataError(f"{name} labels must be one id per embedding: {len(vectors)} embeddings, "
                            f"labels of shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"{name} labels must be integer class ids, got {labels.dtype}")
        if not torch.isfinite(vectors).all():
            raise DataError(f"{name} embeddings contain NaN or infinite values")
    if len(gallery) == 0:
        raise DataError("the gallery (train split) is empty: there is nothing to label the queries by")
    if query.shape[1] != gallery.shape[1]:
        raise DataError(f"query and gallery embeddings differ in size: {query.shape[1]} vs {gallery.shape[1]}")


def _gallery(vectors: Tensor, classes: Tensor, n_classes: int) -> _Gallery:
    squared_norms = vectors.square().sum(dim=1)
    # index_add_ adds in a fixed order on the CPU only; elsewhere a one-hot product stays deterministic
    one_hot = None if vectors.device.type == "cpu" else F.one_hot(classes, n_classes).to(vectors.dtype)
    return _Gallery(vectors=vectors, norms=squared_norms.sqrt().clamp_min(_NORM_EPS),
                    squared_norms=squared_norms, classes=classes,
                    counts=torch.bincount(classes, minlength=n_classes), one_hot=one_hot)


def _chunk_outcomes(query: Tensor, query_classes: Tensor, gallery: _Gallery,
                    workspace: Tensor) -> dict[str, Tensor]:
    """Per-query hits of every metric, average precision and `top1_cos` class for one chunk;
    `workspace` (2 x chunk_size x gallery) holds the dot products and the cosines."""
    relevant = gallery.counts[query_classes]
    depth = min(len(gallery.classes), max(TOP_K, int(relevant.max())))
    query_squared_norms = query.square().sum(dim=1)
    dots, cosines = workspace[0, :len(query)], workspace[1, :len(query)]
    torch.matmul(query, gallery.vectors.T, out=dots)
    torch.div(dots, query_squared_norms.sqrt().clamp_min(_NORM_EPS)[:, None], out=cosines)
    cosines.div_(gallery.norms)
    nearest_classes = gallery.classes[_ranked_nearest(cosines, depth)]
    hits = nearest_classes == query_classes[:, None]
    mean_cos = _best_class(_sum_per_class(cosines, gallery) / gallery.counts, gallery.counts, largest=True)
    distances = dots.mul_(-2).add_(query_squared_norms[:, None]).add_(gallery.squared_norms)
    distances = distances.clamp_(min=0).sqrt_()
    top1_l2 = gallery.classes[distances.argmin(dim=1)]
    mean_l2 = _best_class(_sum_per_class(distances, gallery) / gallery.counts, gallery.counts, largest=False)
    return {"top1_cos": hits[:, 0], "top5_cos": hits[:, :TOP_K].any(dim=1),
            "mean_cos": mean_cos == query_classes, "top1_l2": top1_l2 == query_classes,
            "mean_l2": mean_l2 == query_classes, "map_at_r": _average_precision(hits, relevant),
            "prediction": nearest_classes[:, 0]}


def _ranked_nearest(similarity: Tensor, depth: int) -> Tensor:
    """Gallery indices of the `depth` most similar items per row: most similar first, ties to the
    lower index (the first `depth` of a stable descending sort, without sorting whole rows)."""
    values, indices = similarity.topk(min(depth + 1, similarity.shape[1]), dim=1)
    # where the value at the cut is shared beyond it, topk may have kept any of the equal items
    crowded = (values[:, depth:] == values[:, depth - 1:depth]).any(dim=1)
    values, indices = values[:, :depth], indices[:, :depth]
    # topk leaves the order of equal values unspecified: order by index, then stably by value
    indices, by_index = indices.sort(dim=1)
    by_value = values.gather(1, by_index).sort(dim=1, descending=True, stable=True).indices
    indices = indices.gather(1, by_value)
    if crowded.any():
        indices[crowded] = similarity[crowded].sort(dim=1, descending=True, stable=True).indices[:, :depth]
    return indices


def _sum_per_class(values: Tensor, gallery: _Gallery) -> Tensor:
    """Row sums of `values` (chunk x gallery) over the gallery items of each class: chunk x classes."""
    if gallery.one_hot is not None:
        return values @ gallery.one_hot
    sums = values.new_zeros(values.shape[0], len(gallery.counts))
    return sums.index_add_(1, gallery.classes, values)


def _best_class(scores: Tensor, counts: Tensor, largest: bool) -> Tensor:
    """Best-scoring class per row among classes with gallery items; ties to the lowest class id."""
    if largest:
        return scores.masked_fill(counts == 0, float("-inf")).argmax(dim=1)
    return scores.masked_fill(counts == 0, float("inf")).argmin(dim=1)


def _average_precision(hits: Tensor, relevant: Tensor) -> Tensor:
    """AP@R per query: precision at each hit among the R nearest, summed and divided by R, where
    R is the number of gallery items of the query's class (NaN where R is 0)."""
    positions = torch.arange(1, hits.shape[1] + 1, device=hits.device, dtype=torch.float64)
    counted = hits & (positions[None, :] <= relevant[:, None])
    precision = counted.cumsum(dim=1) / positions
    return (precision * counted).sum(dim=1) / relevant.to(torch.float64)


def _summarise(outcomes: dict[str, Tensor], query_classes: Tensor, counts: Tensor,
               label_ids: Tensor) -> KnnResult:
    valid = counts[query_classes] > 0
    metrics = {name: _mean(outcomes[name][valid]) for name in _PER_QUERY}
    classes = query_classes[valid]
    per_class_queries = torch.bincount(classes, minlength=len(counts))
    per_class_hits = torch.bincount(classes, weights=outcomes["top1_cos"][valid].to(torch.float64),
                                    minlength=len(counts))
    present = per_class_queries > 0
    metrics["macro_top1_cos"] = _mean(per_class_hits[present] / per_class_queries[present])
    return KnnResult(metrics={name: metrics[name] for name in METRICS}, n_test=len(query_classes),
                     n_classes=int(present.sum()), n_lone=int((~valid).sum()),
                     predictions=label_ids[outcomes["prediction"]])


def _mean(values: Tensor) -> float:
    return float(values.to(torch.float64).mean()) if len(values) else float("nan")
