"""Writes that fail cleanly: a file is written under a temporary name beside its target, synced,
then renamed, so that a full disk, a read-only folder or a kill never leaves a partial file under
the target's name; and a write refused by the disk becomes one message (`DiskError`) naming the
folder, the free space there and the space the write needed, instead of a traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from taxonclip.errors import DiskError

# the errors a write meets from its disk rather than from its caller: full, over quota, refused,
# read-only, or a path through a file
DISK_ERRNOS = {errno.ENOSPC: "no space left", errno.EDQUOT: "disk quota exceeded",
               errno.EACCES: "permission denied", errno.EPERM: "operation not permitted",
               errno.EROFS: "read-only file system", errno.ENOTDIR: "a part of the path is a file",
               errno.EEXIST: "a file is in the way"}
# torch.save reports a failed write as a RuntimeError of its C++ stream, not as an OSError
_TORCH_WRITE_ERRORS = ("basic_ios::clear", "PytorchStreamWriter failed", "unexpected pos",
                       "file write failed")


def free_bytes(folder: Path) -> int | None:
    """The bytes free to this user in `folder` (or the nearest folder above it that exists)."""
    folder = Path(folder)
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return None


def size_text(count: int | None) -> str:
    """Bytes for people: 1.5 MB, 3.2 GB."""
    if count is None:
        return "unknown"
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.1f} {unit}"
    return f"{count} bytes"


def is_disk_error(error: BaseException) -> bool:
    """Whether `error` is a write refused by the disk (full, denied, read-only) rather than a
    fault of the program."""
    if isinstance(error, OSError):
        return error.errno in DISK_ERRNOS
    return isinstance(error, RuntimeError) and any(text in str(error)
                                                   for text in _TORCH_WRITE_ERRORS)


def disk_error(error: BaseException, folder: Path, needed: int | None = None,
               what: str = "a file", free: int | None = None) -> DiskError:
    """The DiskError for `error`, met writing `what` into `folder`: the folder, why, its free
    space (`free`, measured before the write, else now) and the space needed."""
    free = free_bytes(folder) if free is None else free
    why = DISK_ERRNOS.get(getattr(error, "errno", None), "the write failed")
    if isinstance(error, RuntimeError) and (free or 0) < (needed or 1):
        why = "no space left"
    need = f", {size_text(needed)} needed" if needed else ""
    advice = ("free space there" if why in ("no space left", "disk quota exceeded")
              else "make it writable")
    return DiskError(f"cannot write {what} into {folder}: {why} ({size_text(free)} free{need})"
                    f"; {advice}, or point the write elsewhere, and run again")


@contextlib.contextmanager
def atomic_path(path: Path, needed: int | None = None, what: str | None = None,
                where: Path | None = None) -> Iterator[Path]:
    """A temporary path beside `path` to write to; renamed to `path` when the block ends well,
    removed when it fails. A disk error (see `is_disk_error`) becomes a DiskError naming
    `where` (default: the folder of `path`)."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.{os.getpid()}.partial")
    free = free_bytes(path.parent)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield partial
        with contextlib.suppress(OSError):  # some writers close their file; sync what we can
            descriptor = os.open(partial, os.O_RDONLY)
            try:
                os.fsync(descriptor)
            finally:
                os.close(descriptor)
        os.replace(partial, path)
    except BaseException as error:
        with contextlib.suppress(OSError):
            if partial.is_dir():
                shutil.rmtree(partial)
            else:
                partial.unlink()
        if is_disk_error(error):
            raise disk_error(error, where or path.parent, needed, what or path.name, free) from None
        raise


def write_bytes(path: Path, data: bytes) -> None:
    """Write `data` to `path` whole or not at all."""
    with atomic_path(path, len(data)) as partial:
        partial.write_bytes(data)


@contextlib.contextmanager
def disk_errors(folder: Path, needed: int | None = None, what: str = "a file") -> Iterator[None]:
    """Turn a disk error met in the block into a DiskError naming `folder`."""
    free = free_bytes(Path(folder))
    try:
        yield
    except (OSError, RuntimeError) as error:
        if is_disk_error(error):
            raise disk_error(error, Path(folder), needed, what, free) from None
        raise


def tensor_bytes(value: Any) -> int:
    """The bytes of the tensors and arrays in `value` (nested dicts, lists, tuples): about what
    saving it takes."""
    if hasattr(value, "element_size") and hasattr(value, "numel"):
        return value.element_size() * value.numel()
    if hasattr(value, "nbytes"):
        return int(value.nbytes)
    if isinstance(value, dict):
        return sum(tensor_bytes(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def scratch_folder() -> tempfile.TemporaryDirectory:
    """A scratch folder for files on their way to or from the artifact store."""
    return tempfile.TemporaryDirectory(prefix="taxonclip-")
