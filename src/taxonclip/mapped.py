"""Rows of an embedding store read a chunk at a time, and the pages of a memory-mapped store that
scoring has read handed back to the system.

Each page of a file mapping that a process touches counts in its resident memory (RSS) until the
mapping goes, so scoring a store of many GB by chunks would end up resident in whole. Once a
chunk of rows is copied out, `Pages.release` drops their pages from the mapping
(madvise MADV_DONTNEED): the data stays in the file and in the system's page cache, so a later
read of the same rows costs a page fault, not a disk read. Only shared mappings of a file are
released (np.load(mmap_mode="r" or "r+"), np.memmap): there the call loses nothing, whereas
for memory of the process or a private (copy-on-write) mapping it would discard the data.
Elsewhere (other systems, tensors in memory) `pages_of` returns None and nothing is released.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from dataclasses import dataclass

import torch
from torch import Tensor

PAGE = mmap.PAGESIZE
_DONTNEED = getattr(mmap, "MADV_DONTNEED", 4)


@dataclass(frozen=True)
class Pages:
    """The mapped rows of a store: its first byte, the bytes per row and the number of rows."""

    address: int
    row_bytes: int
    rows: int

    def release(self, rows: Tensor | slice) -> None:
        """Drop the pages of these rows (indices, or a slice with a step of 1) from the mapping."""
        if isinstance(rows, slice):
            first, stop = rows.indices(self.rows)[:2]
            runs = [(first, stop)] if stop > first else []
        else:
            runs = _runs(rows, self.row_bytes)
        for first, stop in runs:
            start = (self.address + first * self.row_bytes) // PAGE * PAGE
            end = self.address + stop * self.row_bytes
            # pages shared with rows outside the run are dropped too: they fault back in if read
            _madvise(start, -(-end // PAGE) * PAGE - start)


def _runs(rows: Tensor, row_bytes: int) -> list[tuple[int, int]]:
    """(first, stop) row ranges that cover `rows`, rows a page apart or less in one range."""
    if len(rows) == 0:
        return []
    rows = rows.sort().values
    gap = max(1, PAGE // row_bytes + 1)
    breaks = torch.nonzero(rows[1:] - rows[:-1] > gap).flatten() + 1
    starts = torch.cat([rows[:1], rows[breaks]]).tolist()
    stops = (torch.cat([rows[breaks - 1], rows[-1:]]) + 1).tolist()
    return list(zip(starts, stops))


def pages_of(vectors: Tensor) -> Pages | None:
    """The pages of `vectors` if it is a contiguous CPU tensor in a shared mapping of a file."""
    if vectors.device.type != "cpu" or vectors.ndim != 2 or not vectors.is_contiguous() or len(vectors) == 0:
        return None
    address = vectors.data_ptr()
    end = address + vectors.numel() * vectors.element_size()
    if not _in_shared_file_mapping(address // PAGE * PAGE, -(-end // PAGE) * PAGE) or _libc() is None:
        return None
    return Pages(address, vectors.shape[1] * vectors.element_size(), len(vectors))


@dataclass(frozen=True)
class Source:
    """Rows of an embedding store: all of `vectors`, or those at `rows` (int64, CPU), read on
    `device` as `dtype` a few at a time; with `pages`, the pages of rows copied out are released."""

    vectors: Tensor
    rows: Tensor | None
    device: torch.device
    dtype: torch.dtype
    pages: Pages | None = None

    def __len__(self) -> int:
        return len(self.vectors) if self.rows is None else len(self.rows)

    def read(self, positions: slice | Tensor) -> Tensor:
        """The rows at these positions of the selection (a slice stays a view of the store)."""
        if self.rows is not None:
            positions = self.rows[positions]
        # index_select: a third of the time of indexing by a tensor, for the same rows
        picked = self.vectors[positions] if isinstance(positions, slice) else torch.index_select(
            self.vectors, 0, positions)
        rows = picked.to(self.device, self.dtype)
        if self.pages is not None and rows.untyped_storage().data_ptr() != self.pages.address:
            self.pages.release(positions)  # a copy: the store's pages are no longer needed
        return rows

    def release(self, start: int, stop: int) -> None:
        """Release the pages of the selection's rows start..stop-1, read and used."""
        if self.pages is not None:
            self.pages.release(slice(start, stop) if self.rows is None else self.rows[start:stop])


def blocks(source: Source, block: int):
    """(start, items) of each block of `block` rows of `source`, read into the same buffers each
    time (the store's type, then the compute type and device where they differ), or views of a
    store that needs neither a gather nor a conversion. Fresh blocks would fragment the C
    library's heap: a small tensor kept from one block lands in the hole the block left. The
    pages of a block are released once its user asks for the next."""
    raw = converted = None
    for start in range(0, len(source), block):
        stop = min(start + block, len(source))
        if source.rows is None:
            items = source.vectors[start:stop]
        else:
            if raw is None:
                raw = source.vectors.new_empty(block, source.vectors.shape[1])
            items = torch.index_select(source.vectors, 0, source.rows[start:stop], out=raw[:stop - start])
        if items.dtype != source.dtype or items.device != source.device:
            if converted is None:
                converted = torch.empty(block, items.shape[1], device=source.device, dtype=source.dtype)
            items = converted[:stop - start].copy_(items)
        yield start, items
        source.release(start, stop)


def _in_shared_file_mapping(start: int, end: int) -> bool:
    """Whether [start, end) lies in one shared mapping of a file (Linux's /proc/self/maps)."""
    try:
        with open("/proc/self/maps") as maps:
            for line in maps:
                fields = line.split()
                low, high = (int(value, 16) for value in fields[0].split("-"))
                if low <= start < high:
                    return end <= high and fields[1].endswith("s") and fields[4] != "0"
    except (OSError, ValueError, IndexError):
        return False
    return False


_LIBC = []


def _libc():
    if not _LIBC:
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
            _LIBC.append(libc)
        except (OSError, AttributeError):
            _LIBC.append(None)
    return _LIBC[0]


def _madvise(start: int, length: int) -> None:
    if length > 0 and _libc().madvise(start, length, _DONTNEED) != 0:
        raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
