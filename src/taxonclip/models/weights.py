"""Where weights come from: the published files, their cache folders, reading weights files, and
checking a state dict against a model before loading it.

Published weights are downloaded once into a cache folder. Where there is no network, the error
names the file to place in that folder and the `weights=/path/to/file` alternative.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import re
import warnings
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Any, Mapping
from urllib.request import urlopen

import torch
from tqdm import tqdm

from taxonclip.errors import ModelError

# Seconds without an answer before a download is given up: offline machines fail fast, not hang.
DOWNLOAD_TIMEOUT_S = 20
CHUNK_BYTES = 1 << 20
# What `weights=` reads, named where a file is refused.
WEIGHTS_FILE_KINDS = ("a plain state dict or a taxonclip checkpoint saved with torch.save, or an "
                      "OpenAI TorchScript archive")


@dataclass(frozen=True)
class Release:
    """A published weights file: its name in the cache folder, where to get it, its checksum."""

    file: str
    url: str
    sha256: str


_OPENAI = "https://openaipublic.azureedge.net/clip/models"
_UNICOM = "https://github.com/deepglint/unicom/releases/download"
_CLIP_SHA256 = {
    "ViT-B/32": ("ViT-B-32.pt", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af"),
    "ViT-B/16": ("ViT-B-16.pt", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f"),
    "ViT-L/14": ("ViT-L-14.pt", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836"),
    "ViT-L/14@336px": ("ViT-L-14-336px.pt",
                       "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02"),
}
CLIP_RELEASES = {name: Release(file, f"{_OPENAI}/{sha}/{file}", sha)
                 for name, (file, sha) in _CLIP_SHA256.items()}
UNICOM_RELEASES = {
    "unicom:ViT-B/32": Release("FP16-ViT-B-32.pt", f"{_UNICOM}/b32/FP16-ViT-B-32.pt",
                               "f9d5696a9b58dbbbefee2d31615ca59084f2895a0fdd2ca4c235e0f9b2793f7a"),
    "unicom:ViT-B/16": Release("FP16-ViT-B-16.pt", f"{_UNICOM}/b16/FP16-ViT-B-16.pt",
                               "c04f324f7c3b4435667236ec6c0eca1cd62f9d64fbfc2d06f8e8e60e6497edef"),
    "unicom:ViT-L/14": Release("FP16-ViT-L-14.pt", f"{_UNICOM}/l14/FP16-ViT-L-14.pt",
                               "ff3ab62ff782876460099e6e0ee17b73a7c01109de2fffd595f16f4129404bbd"),
    "unicom:ViT-L/14@336px": Release(
        "FP16-ViT-L-14-336px.pt", f"{_UNICOM}/l14_336px/FP16-ViT-L-14-336px.pt",
        "3916ab5aed3b522fc90345be8b4457fe5dad60801ad2af5a6871c0c096e8d7ea"),
}


def clip_cache_dir() -> Path:
    """OpenAI CLIP's own cache folder, ~/.cache/clip (shared with the `clip` package)."""
    return Path.home() / ".cache" / "clip"


def unicom_cache_dir() -> Path:
    """Folder of the UNICOM `FP16-ViT-*.pt` files: `$UNICOM_CACHE` or ~/.cache/unicom."""
    return Path(os.environ.get("UNICOM_CACHE", Path.home() / ".cache" / "unicom"))


def cached_release(model: str, release: Release, folder: Path) -> Path:
    """The path of `release` in `folder`, downloading it first if it is not there."""
    target = folder / release.file
    if target.is_file():
        return target
    try:
        folder.mkdir(parents=True, exist_ok=True)
        download(release, target)
    except (OSError, HTTPException) as error:
        raise ModelError(
            f"{model}: weights file {release.file} is not in {folder} and cannot be downloaded "
            f"({error}). Place {release.file} (from {release.url}) in {folder}, "
            f"or pass weights=/path/to/file.") from None
    return target


def download(release: Release, target: Path) -> None:
    """Download `release` to `target` and check its SHA-256; on failure `target` is not written."""
    partial = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    try:
        with urlopen(release.url, timeout=DOWNLOAD_TIMEOUT_S) as source, open(partial, "wb") as out:
            total = int(source.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=release.file) as progress:
                while chunk := source.read(CHUNK_BYTES):
                    digest.update(chunk)
                    out.write(chunk)
                    progress.update(len(chunk))
        if digest.hexdigest() != release.sha256:
            raise ModelError(f"download of {release.url} is corrupt (SHA-256 {digest.hexdigest()}, "
                             f"expected {release.sha256}); try again")
        partial.replace(target)
    finally:
        partial.unlink(missing_ok=True)


def read_weights_file(path: Path) -> dict[str, Any]:
    """The dict stored in a weights file: the state dict of a TorchScript archive (OpenAI's CLIP
    files), or whatever `torch.save` wrote (a plain state dict or a taxonclip checkpoint)."""
    try:
        if is_torchscript(path):
            with warnings.catch_warnings():
                # OpenAI's files are TorchScript archives; its deprecation notice is not for users.
                warnings.simplefilter("ignore", FutureWarning)
                return dict(torch.jit.load(str(path), map_location="cpu").state_dict())
        with warnings.catch_warnings():
            # torch warns of a pickle protocol it does not expect before its own refusal of the
            # file, which the message below says in our words
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # torch.load reports a damaged file under many exception types
        raise unreadable_weights(path, error) from None
    if not isinstance(loaded, dict):
        raise ModelError(f"weights file {path} holds a {type(loaded).__name__}, not a state dict")
    return loaded


def unreadable_weights(path: Path | str, error: Exception,
                       accepted: str = WEIGHTS_FILE_KINDS) -> ModelError:
    """The ModelError for a weights file that torch cannot load, saying which files are `accepted`.

    Where torch's weights-only unpickler refused the file, its own text advises loading it with
    `weights_only=False`, which would run whatever code the file carries: the message says in our
    words what the file holds instead."""
    text = str(error)
    if not (isinstance(error, pickle.UnpicklingError) and "weights_only" in text):
        return ModelError(f"cannot read weights file {path}: {type(error).__name__}: {error}")
    refused = re.search(r"Unsupported global: GLOBAL (\S+)", text)
    if refused:
        return ModelError(f"weights file {path} holds pickled Python objects ({refused[1]}), "
                          f"which taxonclip does not load, as unpickling them can run any code; "
                          f"it loads {accepted}")
    found = re.search(r"WeightsUnpickler error:\s*([^\n]+)", text)
    detail = found[1].strip() if found else "not only tensors and plain values"
    return ModelError(f"cannot read weights file {path}: it is not a file of tensors written by "
                      f"torch.save ({detail}); taxonclip loads {accepted}")


def is_torchscript(path: Path) -> bool:
    """Whether `path` is a TorchScript archive (a zip with constants.pkl), not a torch.save file."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name.endswith("/constants.pkl") for name in archive.namelist())


def is_checkpoint(stored: Mapping[str, Any]) -> bool:
    """Whether a loaded file is a taxonclip checkpoint, `{"model": config, "state_dict": ...}`."""
    return isinstance(stored.get("model"), dict) and isinstance(stored.get("state_dict"), dict)


def check_state_dict(expected: Mapping[str, torch.Tensor], given: Mapping[str, Any],
                     origin: str, model: str) -> None:
    """Raise a ModelError naming the keys of `given` that are missing, unexpected or of the wrong
    shape for a model whose own state dict is `expected`."""
    missing = [key for key in expected if key not in given]
    unexpected = [key for key in given if key not in expected]
    wrong_shape = [f"{key} {_shape(given[key])} (model has {_shape(value)})"
                   for key, value in expected.items()
                   if key in given and _shape(given[key]) != _shape(value)]
    problems = [f"{label}: {_some(keys)}" for label, keys in
                (("missing keys", missing), ("unexpected keys", unexpected),
                 ("wrong shapes", wrong_shape)) if keys]
    if problems:
        raise ModelError(f"{origin} does not fit model {model}: " + "; ".join(problems))


def _shape(value: Any) -> tuple[int, ...]:
    return tuple(getattr(value, "shape", ()))


def _some(items: list[str], shown: int = 3) -> str:
    more = f" and {len(items) - shown} more" if len(items) > shown else ""
    return ", ".join(items[:shown]) + more
