"""Pages of a memory-mapped store released once read: only for shared mappings of a file."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from taxonclip import mapped

linux = pytest.mark.skipif(not os.path.exists("/proc/self/smaps"),
                           reason="reads Linux's /proc/self/smaps")


def _resident_kb(address: int) -> int:
    """The resident kB of the mapping that holds `address` (/proc/self/smaps)."""
    with open("/proc/self/smaps") as smaps:
        inside = False
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                low, high = (int(value, 16) for value in head.split("-"))
                inside = low <= address < high
            elif inside and head == "Rss:":
                return int(line.split()[1])
    raise AssertionError("no mapping holds the address")


def _store(tmp_path, rows: int = 4000):
    store = np.lib.format.open_memmap(tmp_path / "store.npy", mode="w+", dtype=np.float32, shape=(rows, 256))
    store[:] = np.random.default_rng(0).standard_normal((rows, 256), dtype=np.float32)
    store.flush()
    del store
    return tmp_path / "store.npy"


@linux
def test_released_pages_leave_the_resident_memory_and_the_data_stays(tmp_path):
    array = np.load(_store(tmp_path), mmap_mode="r+")
    vectors = torch.from_numpy(array)
    expected = vectors.sum(dim=1)  # reads every page
    pages = mapped.pages_of(vectors)
    before = _resident_kb(vectors.data_ptr())

    pages.release(torch.tensor([5, 6, 7, 3000, 3001]))
    pages.release(slice(0, 2000))
    after_some = _resident_kb(vectors.data_ptr())
    pages.release(slice(0, len(vectors)))

    assert before >= 3900 and before - after_some >= 1900  # 4,000 rows of 1 kB; then half gone
    assert _resident_kb(vectors.data_ptr()) <= 8
    assert torch.equal(vectors.sum(dim=1), expected)  # read again from the page cache


def test_memory_of_the_process_and_private_mappings_are_never_released(tmp_path):
    path = _store(tmp_path, rows=64)

    assert mapped.pages_of(torch.randn(64, 256)) is None
    assert mapped.pages_of(torch.from_numpy(np.load(path, mmap_mode="c"))) is None  # copy-on-write
    assert mapped.pages_of(torch.from_numpy(np.load(path, mmap_mode="r+"))[:, :8]) is None  # not contiguous


def test_runs_cover_every_row_and_join_rows_a_page_apart():
    rows = torch.tensor([40, 3, 4, 900, 5, 41])

    runs = mapped._runs(rows, row_bytes=1024)

    assert runs == [(3, 6), (40, 42), (900, 901)]
