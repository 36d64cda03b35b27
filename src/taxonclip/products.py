"""Matrix products of queries with gallery items, the way knn computes them: on CPUs in float32
through oneDNN's linear operator where it passes a check, and, where knn_scan scans them, item by
item in pieces of queries."""

from __future__ import annotations

import torch
from torch import Tensor

from taxonclip import knn_scan


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


def block_products(query: Tensor, items: Tensor):
    """(first query, products) of a chunk of queries with a block of gallery items, as
    knn.knn_metrics computes them. Where knn_scan scans them (float, CPU): items x queries, for the
    `knn_scan.pieces` of the `knn_scan.padded` queries one at a time, each product of a piece
    still in the processor's cache when scanned. Elsewhere: queries x items, at once."""
    if not knn_scan.supports(query.device, query.dtype):
        yield 0, dot_products(query, items)
        return
    strips = knn_scan.padded(query)
    for first, rows in knn_scan.pieces(len(strips)):
        yield first, dot_products(items, strips[first:first + rows])


def dot_products(query: Tensor, gallery: Tensor) -> Tensor:
    """`query @ gallery.T`. On CPUs, float32 products go through oneDNN (the linear operator that
    torch.compile uses on CPUs), which ran 2.2 times as fast as the MKL BLAS behind `torch.matmul`
    on the AMD EPYC processors we measured, in the same float32 arithmetic."""
    if _ONEDNN_LINEAR is not None and query.device.type == "cpu" and query.dtype == torch.float32:
        return _ONEDNN_LINEAR(query, gallery, None, "none", [], "")
    return query @ gallery.T
