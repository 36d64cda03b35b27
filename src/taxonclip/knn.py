"""Nearest-neighbour metrics: every test embedding labelled by the train embeddings of one scope.

The research group's four metrics (`top1_cos`, `mean_cos`, `top1_l2`, `mean_l2`) and those the
field also reports (`top3_cos`, `top5_cos`, `macro_top1_cos`, `macro_top5_cos`, `map_at_r`),
computed with matrix products of chunks of queries with blocks of gallery items, so memory grows
with `chunk x block`, never with `test x train` nor with the size of the embedding store.

Queries and gallery items may be rows of a larger (memory-mapped) store, picked by index: each
chunk and block is read when needed, as float32 (a float16 store too); nothing else is copied.

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

from taxonclip import knn_scan, names
from taxonclip.errors import ConfigError, DataError
from taxonclip.mapped import Source, blocks, pages_of
from taxonclip.products import block_products, dot_products

METRICS = names.SCORES
TOP_K = 5
# similarities of one chunk of queries (or of one piece of it, where knn_scan scans products
# torch makes) with one block of gallery items: about this many float32 values, 16 MB (two
# pieces' at once where torch makes them; every thread's share where knn_scan does), and the
# block of gallery items are alive at once; larger blocks measured no faster. A gallery within
# one block (8,192 items for chunks of 512, 20,164 for knn_scan's pieces) is read once
BLOCK_ELEMENTS = 1 << 22
# values the ranking of one chunk keeps per query and gallery block (MAP@R of a class that holds
# most of the gallery ranks deep: such queries go in smaller chunks)
RANK_ELEMENTS = 1 << 23
_PER_QUERY = ("top1_cos", "top3_cos", "top5_cos", "mean_cos", "top1_l2", "mean_l2", "map_at_r")
_NORM_EPS = 1e-12
# the metrics of knn_scan.Outcomes.hits, column by column
_SCANNED_HITS = ("top1_cos", "top3_cos", "top5_cos", "mean_cos", "top1_l2", "mean_l2")
_BLOCK_WIDTH = 64  # values per block when a row's nearest item is found (`_first_smallest`)
_GROUP_WIDTH = 16  # items per group whose maximum screens a row before ranking (`_ranked`)


@dataclass(frozen=True)
class KnnResult:
    """Metrics of one scope and level.

    `metrics` holds every name in `METRICS` as a float in [0, 1], NaN when no query is valid.
    `n_test` counts the queries given; `n_lone` those whose label has no gallery item;
    `n_classes` the distinct labels among the other (valid) queries, the classes that the
    macro metrics average over. `predictions` holds the `top1_cos` label of every query,
    lone ones included, for confusion analysis.
    """

    metrics: dict[str, float]
    n_test: int
    n_classes: int
    n_lone: int
    predictions: Tensor | None = None


@dataclass(frozen=True)
class _Gallery:
    """What every chunk of queries needs of the gallery: per item its class, squared norm and
    inverse norm; per class its count and, where knn_scan does not sum each query's cosines per
    class, the mean of its L2-normalised items; and the items themselves, kept on the device
    when they fit in one block, else read block by block."""

    source: Source
    block: int
    classes: Tensor
    squared_norms: Tensor
    inverse_norms: Tensor
    counts: Tensor
    unit_means: Tensor | None
    resident: Tensor | None

    def blocks(self):
        """(start, items) of each block of the gallery, in the order of the gallery."""
        if self.resident is not None:
            return iter([(0, self.resident)])
        return blocks(self.source, self.block)


@dataclass(frozen=True)
class _Workspace:
    """Memory every chunk reuses: its cosines with a block, and its distance sums per class."""

    cosines: Tensor
    distance_sums: Tensor

    def take(self, name: str, rows: int, columns: int) -> Tensor:
        """The first rows x columns values of a buffer, as a matrix."""
        return getattr(self, name)[:rows * columns].view(rows, columns)


@torch.no_grad()
def knn_metrics(query: Tensor, query_labels: Tensor, gallery: Tensor, gallery_labels: Tensor,
                chunk_size: int, device: str | torch.device | None = None, *,
                query_rows: Tensor | None = None, gallery_rows: Tensor | None = None) -> KnnResult:
    """Label each query (test embedding) by its nearest gallery (train) embeddings and score it.

    Labels are int64 ids of any value, one per query and gallery item. The queries are the rows
    `query_rows` of `query` (default: all), the gallery items the rows `gallery_rows` of
    `gallery`: either may be a memory-mapped store, of which only the chunk or block at hand is
    read. Embeddings are compared in float32 (float16 ones too), or in float64 when `query` is
    float64. `chunk_size` queries (EvalConfig.chunk_size) are compared with a block of the gallery
    at a time, on `device` (default: the device of `query`); neither size changes the results.
    """
    device = torch.device(device) if device is not None else query.device
    dtype = torch.float64 if query.dtype == torch.float64 else torch.float32
    queries = Source(query, _rows(query_rows), device, dtype, pages_of(query))
    items = Source(gallery, _rows(gallery_rows), device, dtype, pages_of(gallery))
    _check_inputs(query, queries, query_labels, gallery, items, gallery_labels, chunk_size)
    label_ids, dense = torch.unique(torch.cat([gallery_labels.cpu(), query_labels.cpu()]),
                                    return_inverse=True)
    query_classes = dense[len(gallery_labels):]
    scanning = knn_scan.supports(device, dtype)
    # queries whose products with a block are alive at once: the chunk's, or knn_scan's pieces'
    # where it scans products that torch makes
    torch_products = scanning and knn_scan.gemm(dtype) is None
    at_once = min(chunk_size, knn_scan.PIECE_ROWS) if torch_products else chunk_size
    bank = _gallery(items, dense[:len(gallery_labels)].to(device), len(label_ids),
                    max(1, BLOCK_ELEMENTS // at_once), unit_means=not scanning)
    # queries in order of the gallery size of their class: a chunk then ranks only as deep as
    # its own largest class needs for MAP@R, not as deep as the largest class of all
    counts = bank.counts.cpu()
    order = counts[query_classes].argsort(stable=True)
    # allocated once: fresh blocks of this size, on every chunk, fragment the C library's heap
    rows, block = min(chunk_size, len(queries)), min(bank.block, len(items))
    if scanning:
        depth = _depth(counts[query_classes].max(), len(bank.classes)) if len(queries) else TOP_K
        workspace = knn_scan.buffers(rows, depth, len(label_ids), block, dtype)
    else:
        workspace = _Workspace(torch.empty(rows * block, device=device, dtype=dtype),
                               torch.empty(rows * len(label_ids), device=device, dtype=dtype))
    chunks = [_chunk_outcomes(queries.read(order[chunk]), query_classes[order[chunk]].to(device), bank,
                              workspace)
              for chunk in _chunks(counts[query_classes[order]], chunk_size, len(bank.classes))]
    outcomes = {name: _unsorted([chunk[name].cpu() for chunk in chunks], order)
                for name in (*_PER_QUERY, "prediction")}
    return _summarise(outcomes, query_classes, counts, label_ids)


def _rows(rows) -> Tensor | None:
    return None if rows is None else torch.as_tensor(rows, dtype=torch.int64).cpu()


def _chunks(relevant: Tensor, chunk_size: int, gallery_size: int) -> list[Tensor]:
    """Positions of each chunk of the sorted queries: `chunk_size` of them, fewer where their
    ranking must go deep (`relevant`, ascending, is each query's number of relevant items)."""
    chunks, start = [], 0
    while start < len(relevant):
        size = min(chunk_size, len(relevant) - start)
        depth = _depth(relevant[start + size - 1], gallery_size)
        size = max(1, min(size, RANK_ELEMENTS // (2 * depth)))
        chunks.append(torch.arange(start, start + size))
        start += size
    return chunks


def _depth(relevant, gallery_size: int) -> int:
    """How many of the nearest items a ranking keeps: enough for top-5 and MAP@R."""
    return min(gallery_size, max(TOP_K, int(relevant)))


def _unsorted(parts: list[Tensor], order: Tensor) -> Tensor:
    """The per-query values of `parts` (in `order`) put back in the callers' order of queries."""
    if not parts:
        return torch.empty(0, dtype=torch.int64)
    values = torch.cat(parts)
    return torch.empty_like(values).index_copy_(0, order, values)


def _check_inputs(query: Tensor, queries: Source, query_labels: Tensor, gallery: Tensor,
                  items: Source, gallery_labels: Tensor, chunk_size: int) -> None:
    if chunk_size < 1:
        raise ConfigError(f"chunk_size must be at least 1, got {chunk_size}")
    for name, vectors, source, labels in (("query", query, queries, query_labels),
                                          ("gallery", gallery, items, gallery_labels)):
        if vectors.ndim != 2:
            raise DataError(f"{name} embeddings must be a 2-D tensor (items x dim), "
                            f"got shape {tuple(vectors.shape)}")
        if labels.ndim != 1 or len(labels) != len(source):
            raise DataError(f"{name} labels must be one id per embedding: {len(source)} embeddings, "
                            f"labels of shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise DataError(f"{name} labels must be integer class ids, got {labels.dtype}")
        if source.rows is not None and len(source.rows) and (
                int(source.rows.min()) < 0 or int(source.rows.max()) >= len(vectors)):
            raise DataError(f"{name} rows must lie in 0..{len(vectors) - 1}")
    if len(items) == 0:
        raise DataError("the gallery (train split) is empty: there is nothing to label the queries by")
    if query.shape[1] != gallery.shape[1]:
        raise DataError(f"query and gallery embeddings differ in size: "
                        f"{query.shape[1]} vs {gallery.shape[1]}")


def _squared_norms(vectors: Tensor, name: str) -> Tensor:
    """Squared L2 norm of each row; also the check for NaN and infinite values, which it carries."""
    squared_norms = _squares(vectors)
    if not torch.isfinite(squared_norms).all():
        raise DataError(f"{name} embeddings contain NaN or infinite values (or values too large to square)")
    return squared_norms


def _squares(vectors: Tensor, out: Tensor | None = None) -> Tensor:
    """Squared L2 norm of each row: by knn_scan's C loop where it has one (torch's took 1.7 ms
    for 8,000 x 512 values on one thread), else by torch."""
    if knn_scan.supports(vectors.device, vectors.dtype):
        return knn_scan.squared_norms(vectors, out)
    return torch.linalg.vecdot(vectors, vectors, out=out)


def _gallery(source: Source, classes: Tensor, n_classes: int, block: int, unit_means: bool) -> _Gallery:
    """The gallery's statistics, from one pass over its blocks (the classes' means of unit
    vectors only where `unit_means`)."""
    squared_norms = torch.empty(len(source), device=source.device, dtype=source.dtype)
    unit_sums = torch.zeros(n_classes, source.vectors.shape[1], device=source.device,
                            dtype=source.dtype) if unit_means else None
    resident = source.read(slice(0, len(source))) if len(source) <= block else None
    unit = None
    for start, vectors in ([(0, resident)] if resident is not None else blocks(source, block)):
        stop = start + len(vectors)
        norms = _squares(vectors, out=squared_norms[start:stop])
        if not torch.isfinite(norms).all():
            raise DataError("gallery embeddings contain NaN or infinite values (or values too large to square)")
        if unit_sums is None:
            continue
        # the mean cosine with a class is the dot product with the mean of its L2-normalised vectors
        unit = vectors.new_empty(vectors.shape) if unit is None else unit[:len(vectors)]
        torch.div(vectors, norms.sqrt().clamp_min(_NORM_EPS)[:, None], out=unit)
        _add_class_vectors(unit_sums, unit, classes[start:stop])
    counts = torch.bincount(classes, minlength=n_classes)
    return _Gallery(source=source, block=block, classes=classes, squared_norms=squared_norms,
                    inverse_norms=1 / squared_norms.sqrt().clamp_min(_NORM_EPS), counts=counts,
                    unit_means=None if unit_sums is None else unit_sums / counts.clamp_min(1)[:, None],
                    resident=resident)


def _chunk_outcomes(query: Tensor, query_classes: Tensor, gallery: _Gallery,
                    workspace: _Workspace | knn_scan.Buffers) -> dict[str, Tensor]:
    """Per-query hits of every metric, average precision and `top1_cos` class for one chunk,
    the gallery taken block by block (by knn_scan's kernel, with its buffers, where the gallery
    holds no unit means)."""
    query_squared_norms = _squared_norms(query, "query")
    relevant = gallery.counts[query_classes]
    depth = _depth(relevant.max(), len(gallery.classes))
    if gallery.unit_means is None:
        found = _scanned(query, query_squared_norms, query_classes, gallery, depth, workspace)
        hits = dict(zip(_SCANNED_HITS, found.hits.bool().unbind(dim=1)))
        return {**hits, "map_at_r": found.precision, "prediction": found.prediction}
    ranked, nearest_l2, distance_sums = _passes(query, query_squared_norms, gallery, depth, workspace)
    nearest = gallery.classes[ranked[1]]
    hits = nearest == query_classes[:, None]
    # the query's own norm scales every class alike: it cannot change which class is best
    mean_cos = _best_class(dot_products(query, gallery.unit_means), gallery.counts, largest=True)
    mean_l2 = _best_class(distance_sums.div_(gallery.counts), gallery.counts, largest=False)
    return {"top1_cos": hits[:, 0], "top3_cos": hits[:, :3].any(dim=1),
            "top5_cos": hits[:, :TOP_K].any(dim=1), "mean_cos": mean_cos == query_classes,
            "top1_l2": gallery.classes[nearest_l2[1]] == query_classes,
            "mean_l2": mean_l2 == query_classes,
            "map_at_r": _average_precision(hits, relevant), "prediction": nearest[:, 0]}


def _passes(query: Tensor, query_squared_norms: Tensor, gallery: _Gallery, depth: int,
            workspace: _Workspace) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor], Tensor]:
    """Each query's `depth` most similar items, nearest item and distance sums per class, in
    torch operations block by block (on GPUs, or where `knn_scan` has no kernel)."""
    ranked = nearest_l2 = None
    distance_sums = workspace.take("distance_sums", len(query), len(gallery.counts)).zero_()
    for start, items in gallery.blocks():
        stop = start + len(items)
        dots = dot_products(query, items)
        # ranked by cosine, the query's own norm left out: it scales its whole row alike
        cosines = torch.mul(dots, gallery.inverse_norms[start:stop],
                            out=workspace.take("cosines", len(query), stop - start))
        ranked = _merged(ranked, _ranked(cosines, min(depth, stop - start)), start, depth)
        del cosines
        distances = torch.add(gallery.squared_norms[start:stop], dots, alpha=-2, out=dots)
        distances = distances.add_(query_squared_norms[:, None]).clamp_(min=0).sqrt_()
        nearest_l2 = _nearer(nearest_l2, distances, start)
        _add_per_class(distance_sums, distances, gallery.classes[start:stop])
        del dots, distances  # freed before the next block's products are allocated
    return ranked, nearest_l2, distance_sums


def _scanned(query: Tensor, query_squared_norms: Tensor, query_classes: Tensor, gallery: _Gallery,
             depth: int, buffers: knn_scan.Buffers) -> knn_scan.Outcomes:
    """Each query's outcomes, from one pass of `knn_scan`'s kernel over each block's products,
    which it makes itself where it has a BLAS (`knn_scan.fused`), else torch."""
    state = knn_scan.start(buffers, query_squared_norms, depth, query_classes, gallery.classes, gallery.counts)
    for start, items in gallery.blocks():
        stop = start + len(items)
        block = knn_scan.block(start, gallery.squared_norms[start:stop], gallery.inverse_norms[start:stop],
                               gallery.classes[start:stop], last=stop == len(gallery.classes))
        if knn_scan.gemm(query.dtype) is not None:
            knn_scan.fused(state, knn_scan.padded(query), items, block)
            continue
        pieces = []
        for piece in block_products(query, items):
            pieces.append(piece)
            if len(pieces) == knn_scan.PIECES_TOGETHER:
                knn_scan.scan(state, pieces, block)
                pieces = []
        if pieces:
            knn_scan.scan(state, pieces, block)
    return state.found


def _merged(ranked: tuple[Tensor, Tensor] | None, block: tuple[Tensor, Tensor], start: int,
            depth: int) -> tuple[Tensor, Tensor]:
    """The `depth` nearest of the items ranked so far and of a later block (indices from
    `start`): a stable sort keeps equal values in gallery order, as earlier blocks come first."""
    values, indices = block[0], block[1] + start
    if ranked is None:
        return values, indices
    values, indices = torch.cat([ranked[0], values], dim=1), torch.cat([ranked[1], indices], dim=1)
    order = values.sort(dim=1, descending=True, stable=True).indices[:, :depth]
    return values.gather(1, order), indices.gather(1, order)


def _ranked(similarity: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """Values and indices of the `depth` most similar items per row: most similar first, ties
    to the lower index (the first `depth` of a stable descending sort, without sorting rows).

    Rows are first screened by the maxima of `_GROUP_WIDTH` groups: of G = items // width
    groups, group g holds the items g, g + G, g + 2G, ... (strided, so that their maxima are
    taken over contiguous rows of G values, which vectorises), and the last items % width
    items are candidates in any case. The groups of the `depth` largest maxima hold `depth`
    items at least as similar as any item outside them, so only those groups are ranked; where
    a group left out has a maximum equal to the smallest one kept, an item outside could tie
    with one kept and come first by index: those rows are ranked whole."""
    rows, items = similarity.shape
    groups = items // _GROUP_WIDTH
    if groups < 4 * depth or rows == 0:
        return _ranked_exactly(similarity, depth)
    full = groups * _GROUP_WIDTH
    maxima = similarity[:, :full].view(rows, _GROUP_WIDTH, groups).amax(dim=1)
    bounds, chosen = maxima.topk(depth, dim=1, sorted=False)
    # candidates in gallery order (layer by layer of ascending groups, then the tail), so that
    # ranking them exactly breaks ties by gallery index
    chosen = chosen.sort(dim=1).values
    layers = torch.arange(_GROUP_WIDTH, device=similarity.device)[None, :, None] * groups
    candidates = torch.cat([(chosen[:, None, :] + layers).view(rows, -1),
                            torch.arange(full, items, device=similarity.device).expand(rows, -1)], dim=1)
    values, positions = _ranked_exactly(similarity.gather(1, candidates), depth)
    indices = candidates.gather(1, positions)
    unsure = (maxima >= bounds.amin(dim=1, keepdim=True)).sum(dim=1) > depth
    if unsure.any():
        values[unsure], indices[unsure] = _ranked_exactly(similarity[unsure], depth)
    return values, indices


def _ranked_exactly(similarity: Tensor, depth: int) -> tuple[Tensor, Tensor]:
    """`_ranked` by `topk` over whole rows."""
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
        indices[tied] = by_index.gather(1, by_value)  # the values keep their (sorted) order
    if crowded.any():
        order = similarity[crowded].sort(dim=1, descending=True, stable=True).indices[:, :depth]
        indices[crowded] = order
        values[crowded] = similarity[crowded].gather(1, order)
    return values, indices


def _nearer(nearest: tuple[Tensor, Tensor] | None, distances: Tensor,
            start: int) -> tuple[Tensor, Tensor]:
    """The smallest distance and its item per row, over the blocks so far and this one (from
    `start`); an equal distance of a later block does not displace an earlier item."""
    index = _first_smallest(distances)
    value = distances.gather(1, index[:, None]).squeeze(1)
    if nearest is None:
        return value, index + start
    closer = value < nearest[0]
    return torch.where(closer, value, nearest[0]), torch.where(closer, index + start, nearest[1])


def _first_smallest(values: Tensor, width: int = _BLOCK_WIDTH) -> Tensor:
    """Per row, the index of the smallest value, the lowest index among equal ones: what
    `argmin(dim=1)` gives, faster on CPUs. Of strided groups as in `_ranked` (their minima),
    where one group holds the smallest value, `argmin` runs on its `width` items, then on the
    last items % width items; rows where several groups hold it are searched whole."""
    rows, items = values.shape
    groups = items // width
    if groups < 2:
        return values.argmin(dim=1)
    full = groups * width
    minima = values[:, :full].view(rows, width, groups).amin(dim=1)
    group = minima.argmin(dim=1, keepdim=True)
    smallest = minima.gather(1, group)
    candidates = group + torch.arange(width, device=values.device) * groups
    first = candidates.gather(1, values.gather(1, candidates).argmin(dim=1, keepdim=True)).squeeze(1)
    if full < items:
        tail, position = values[:, full:].min(dim=1)
        first = torch.where(tail < smallest.squeeze(1), position + full, first)
    tied = (minima == smallest).sum(dim=1) > 1
    if tied.any():
        first[tied] = values[tied].argmin(dim=1)
    return first


def _add_per_class(sums: Tensor, values: Tensor, classes: Tensor) -> Tensor:
    """`sums` (rows x classes) plus the row sums of `values` (rows x items) over the items of
    each class. On the CPU, index_add_ adds item after item, so a gallery taken in blocks gives
    the sums of one block exactly; elsewhere (where index_add_ adds in no fixed order) a
    product with the classes' one-hot matrix stays deterministic."""
    if values.device.type != "cpu":
        return sums.add_(values @ F.one_hot(classes, sums.shape[1]).to(values.dtype))
    return sums.index_add_(1, classes, values)


def _add_class_vectors(sums: Tensor, vectors: Tensor, classes: Tensor) -> Tensor:
    """`sums` (classes x dim) plus the sum of the vectors (items x dim) of each class."""
    if vectors.device.type != "cpu":
        return sums.add_(F.one_hot(classes, len(sums)).to(vectors.dtype).T @ vectors)
    return sums.index_add_(0, classes, vectors)


def _best_class(scores: Tensor, counts: Tensor, largest: bool) -> Tensor:
    """Best-scoring class per row among classes with gallery items; ties to the lowest class id.
    `scores` (a temporary) is overwritten."""
    if largest:
        return scores.masked_fill_(counts == 0, float("-inf")).argmax(dim=1)
    return scores.masked_fill_(counts == 0, float("inf")).argmin(dim=1)


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
    present = per_class_queries > 0
    for name, per_query in (("macro_top1_cos", "top1_cos"), ("macro_top5_cos", "top5_cos")):
        per_class_hits = torch.bincount(classes, weights=outcomes[per_query][valid].to(torch.float64),
                                        minlength=len(counts))
        metrics[name] = _mean(per_class_hits[present] / per_class_queries[present])
    return KnnResult(metrics={name: metrics[name] for name in METRICS}, n_test=len(query_classes),
                     n_classes=int(present.sum()), n_lone=int((~valid).sum()),
                     predictions=label_ids[outcomes["prediction"]])


def _mean(values: Tensor) -> float:
    return float(values.to(torch.float64).mean()) if len(values) else float("nan")
