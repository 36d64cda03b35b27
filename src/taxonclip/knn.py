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

from taxonclip import names
from taxonclip.errors import ConfigError, DataError

METRICS = names.SCORES
TOP_K = 5
# queries compared with the whole gallery at a time: on CPUs, blocks of 512 x some thousand
# gallery items stay in the processor's cache between the passes over them, and measured faster
# than larger chunks; on GPUs the time per chunk is small either way
DEFAULT_CHUNK_SIZE = 512
_PER_QUERY = ("top1_cos", "top5_cos", "mean_cos", "top1_l2", "mean_l2", "map_at_r")
_NORM_EPS = 1e-12
# values per block when a row's nearest item is found block by block (`_first_smallest`)
_BLOCK_WIDTH = 64


def working_linear(op) -> object | None:
    """`op` if it computes `query @ gallery.T` as torch's oneDNN linear operator
    (`torch.ops.mkldnn._linear_pointwise(query, gallery, None, "none", [], "")`) does, else None.

    That operator is private: a torch release may rename it, change its arguments or drop it.
    So it is tried once on a small product with an exact answer, and anything but that answer
    (an error, another value) leaves the public `torch.matmul` in its place."""
    if op is None or not torch.backends.mkldnn.is_available():
        return None
    query = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    gallery = torch.arange(12, dtype=torch.float32).reshape(4, 3) - 5
    try:
        product = op(query, gallery, None, "none", [], "")
    except Exception:  # noqa: BLE001 - any failure of a private op means: do not use it
        return None
    exact = isinstance(product, Tensor) and product.shape == (2, 4) and torch.equal(
        product, query @ gallery.T)
    return op if exact else None


_ONEDNN_LINEAR = working_linear(getattr(torch.ops.mkldnn, "_linear_pointwise", None))


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
    inverse_norms: Tensor
    squared_norms: Tensor
    classes: Tensor
    counts: Tensor
    unit_means: Tensor
    one_hot: Tensor | None


@torch.no_grad()
def knn_metrics(query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                chunk_size: int = DEFAULT_CHUNK_SIZE, device: str | torch.device | None = None) -> KnnResult:
    """Label each query (test embedding) by its nearest gallery (train) embeddings and score it.

    Labels are int64 ids of any value. Embeddings are compared in float32, or in float64 when
    `query` is float64. `chunk_size` queries are compared with the whole gallery at a time, on
    `device` (default: the device of `query`). Memory: two `chunk_size x gallery` blocks, plus a
    `gallery x classes` one-hot on accelerators; `chunk_size` does not change the results.
    """
    _check_inputs(query, query_labels, gallery, gallery_labels, chunk_size)
    device = torch.device(device) if device is not None else query.device
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    label_ids, dense = torch.unique(torch.cat([gallery_labels.cpu(), query_labels.cpu()]),
                                    return_inverse=True)
    query_classes = dense[len(gallery_labels):]
    bank = _gallery(gallery.to(device, dtype), dense[:len(gallery_labels)].to(device), len(label_ids))
    # queries in order of the gallery size of their class: a chunk then ranks only as deep as
    # its own largest class needs for MAP@R, not as deep as the largest class of all
    order = bank.counts.cpu()[query_classes].argsort(stable=True)
    query = query.to(device, dtype)[order.to(device)]
    query_squared_norms = _squared_norms(query, "query")
    sorted_classes = query_classes[order].to(device)
    # allocated once: a fresh chunk x gallery block per chunk costs page faults on CPUs
    workspace = torch.empty(min(chunk_size, len(query)), len(gallery), device=device, dtype=dtype)
    chunks = [_chunk_outcomes(query[start:start + chunk_size], query_squared_norms[start:start + chunk_size],
                              sorted_classes[start:start + chunk_size], bank, workspace)
              for start in range(0, len(query), chunk_size)]
    outcomes = {name: _unsorted([chunk[name].cpu() for chunk in chunks], order)
                for name in (*_PER_QUERY, "prediction")}
    return _summarise(outcomes, query_classes, bank.counts.cpu(), label_ids)


def _unsorted(parts: list[Tensor], order: Tensor) -> Tensor:
    """The per-query values of `parts` (in `order`) put back in the callers' order of queries."""
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    values = torch.cat(parts)
    return torch.empty_like(values).index_copy_(0, order, values)


def _check_inputs(query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                  chunk_size: int) -> None:
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    for name, vectors, labels in (("query", query, query_labels), ("gallery", gallery, gallery_labels)):
        if vectors.ndim != 2:
            raise DataError(f"{name} embeddings must be a 2-D tensor (items x dim), "
                            f"got shape {tuple(vectors.shape)}")
        if labels.ndim != 1 or len(labels) != len(vectors):
            raise DataError(f"{name} labels must be one id per embedding: {len(vectors)} embeddings, "
                            f"labels of shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"{name} labels must be integer class ids, got {labels.dtype}")
    if len(gallery) == 0:
        raise DataError("the gallery (train split) is empty: there is nothing to label the queries by")
    if query.shape[1] != gallery.shape[1]:
        raise DataError(f"query and gallery embeddings differ in size: "
                        f"{query.shape[1]} vs {gallery.shape[1]}")


def _squared_norms(vectors: Tensor, name: str) -> Tensor:
    """Squared L2 norm of each row; also the check for NaN and infinite values, which it carries."""
    squared_norms = torch.linalg.vecdot(vectors, vectors)
    if not torch.isfinite(squared_norms).all():
        raise DataError(f"{name} embeddings contain NaN or infinite values (or values too large to square)")
    return squared_norms


def _gallery(vectors: Tensor, classes: Tensor, n_classes: int) -> _Gallery:
    squared_norms = _squared_norms(vectors, "gallery")
    norms = squared_norms.sqrt().clamp_min(_NORM_EPS)
    counts = torch.bincount(classes, minlength=n_classes)
    # index_add_ adds in a fixed order on the CPU only; elsewhere a one-hot product stays deterministic
    one_hot = None if vectors.device.type == "cpu" else F.one_hot(classes, n_classes).to(vectors.dtype)
    # the mean cosine with a class is the dot product with the mean of its L2-normalised vectors
    unit_vectors = vectors / norms[:, None]
    unit_sums = (one_hot.T @ unit_vectors if one_hot is not None else
                 unit_vectors.new_zeros(n_classes, vectors.shape[1]).index_add_(0, classes, unit_vectors))
    return _Gallery(vectors=vectors, inverse_norms=1 / norms, squared_norms=squared_norms, classes=classes,
                    counts=counts, unit_means=unit_sums / counts.clamp_min(1)[:, None], one_hot=one_hot)


def _chunk_outcomes(query: Tensor, query_squared_norms: Tensor, query_classes: Tensor,
                    gallery: _Gallery, workspace: Tensor) -> dict[str, Tensor]:
    """Per-query hits of every metric, average precision and `top1_cos` class for one chunk;
    `workspace` (chunk_size x gallery) receives the cosines."""
    relevant = gallery.counts[query_classes]
    dots = _dot_products(query, gallery.vectors)
    # ranked by cosine, the query's own norm left out: it scales its whole row alike
    cosines = torch.mul(dots, gallery.inverse_norms, out=workspace[:len(query)])
    top1_cos, top5_cos, average_precision = _ranking_outcomes(cosines, query_classes, relevant, gallery)
    # the query's own norm scales every class alike: it cannot change which class is best
    mean_cos = _best_class(_dot_products(query, gallery.unit_means), gallery.counts, largest=True)
    distances = torch.add(gallery.squared_norms, dots, alpha=-2, out=dots).add_(query_squared_norms[:, None])
    distances = distances.clamp_(min=0).sqrt_()
    top1_l2 = gallery.classes[_first_smallest(distances)]
    mean_l2 = _best_class(_sum_per_class(distances, gallery) / gallery.counts, gallery.counts, largest=False)
    return {"top1_cos": top1_cos == query_classes, "top5_cos": top5_cos,
            "mean_cos": mean_cos == query_classes, "top1_l2": top1_l2 == query_classes,
            "mean_l2": mean_l2 == query_classes, "map_at_r": average_precision, "prediction": top1_cos}


def _dot_products(query: Tensor, gallery: Tensor) -> Tensor:
    """`query @ gallery.T`. On CPUs, float32 products go through oneDNN (the linear operator that
    torch.compile uses on CPUs), which ran 2.2 times as fast as the MKL BLAS behind `torch.matmul`
    on the AMD EPYC processors we measured, in the same float32 arithmetic."""
    if _ONEDNN_LINEAR is not None and query.device.type == "cpu" and query.dtype == torch.float32:
        return _ONEDNN_LINEAR(query, gallery, None, "none", [], "")
    return query @ gallery.T


def _ranking_outcomes(cosines: Tensor, query_classes: Tensor, relevant: Tensor,
                      gallery: _Gallery) -> tuple[Tensor, Tensor, Tensor]:
    """Per row: the class of the most similar item, the `top5_cos` hit and AP@R (ranking by cosine)."""
    depth = min(cosines.shape[1], max(TOP_K, int(relevant.max())))
    # ranking tensors take about 16 times the bytes of the similarities they rank: blocks of rows
    # keep them within the size of the cosine block however deep the ranking goes (MAP@R of a
    # class holding most of the gallery)
    block = max(1, cosines.numel() // (16 * depth))
    parts = []
    for start in range(0, len(cosines), block):
        rows = slice(start, start + block)
        nearest = gallery.classes[_ranked_nearest(cosines[rows], depth)]
        hits = nearest == query_classes[rows, None]
        parts.append((nearest[:, 0], hits[:, :TOP_K].any(dim=1), _average_precision(hits, relevant[rows])))
    top1, top5, average_precision = (torch.cat(column) for column in zip(*parts))
    return top1, top5, average_precision


def _ranked_nearest(similarity: Tensor, depth: int) -> Tensor:
    """Gallery indices of the `depth` most similar items per row: most similar first, ties to the
    lower index (the first `depth` of a stable descending sort, without sorting whole rows)."""
    values, indices = similarity.topk(min(depth + 1, similarity.shape[1]), dim=1)
    # where the value at the cut is shared beyond it, topk may have kept any of the equal items
    crowded = (values[:, depth:] == values[:, depth - 1:depth]).any(dim=1)
    values, indices = values[:, :depth], indices[:, :depth]
    # topk leaves the order of equal values unspecified: in rows that hold some, order by index,
    # then stably by value
    tied = (values[:, 1:] == values[:, :-1]).any(dim=1)
    if tied.any():
        by_index, order = indices[tied].sort(dim=1)
        by_value = values[tied].gather(1, order).sort(dim=1, descending=True, stable=True).indices
        indices[tied] = by_index.gather(1, by_value)
    if crowded.any():
        indices[crowded] = similarity[crowded].sort(dim=1, descending=True, stable=True).indices[:, :depth]
    return indices


def _first_smallest(values: Tensor, width: int = _BLOCK_WIDTH) -> Tensor:
    """Per row, the index of the smallest value, the lowest index among equal ones: what
    `argmin(dim=1)` gives, in a fifth of its time on CPUs, where it does not vectorise.

    The minima of contiguous blocks of `width` values are vectorised; the first block holding
    the row's minimum holds its first occurrence, so `argmin` then runs on one block a row."""
    rows, items = values.shape
    blocks = items // width
    if blocks < 2:
        return values.argmin(dim=1)
    minima = values[:, :blocks * width].view(rows, blocks, width).amin(dim=2)
    if items > blocks * width:
        minima = torch.cat([minima, values[:, blocks * width:].amin(dim=1, keepdim=True)], dim=1)
    # the last block may be short: its index range is clamped onto its last item, whose
    # repeats come after the item itself and so never win argmin's first-occurrence rule
    block = minima.argmin(dim=1)
    candidates = (block[:, None] * width + torch.arange(width, device=values.device)).clamp_(max=items - 1)
    first = values.gather(1, candidates).argmin(dim=1, keepdim=True)
    return candidates.gather(1, first).squeeze(1)


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
