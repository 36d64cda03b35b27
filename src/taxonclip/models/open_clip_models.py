"""open_clip models, named `open_clip:<architecture>` for any name of `open_clip.list_models()`
(BioCLIP is `open_clip:ViT-B-16`): built by open_clip itself, with their weights from a file or
from a Hugging Face hub cache folder (`hf-hub:imageomics/bioclip`), never downloaded here.

The encoder keeps open_clip's image tower as `visual` and the rest of the model (token
embedding, text transformer, projection) as `text.model`, so a state dict of the whole open_clip
model maps onto the encoder by prefixing its non-visual keys.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from taxonclip.errors import ModelError

PREFIX = "open_clip:"
HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("open_clip_pytorch_model.bin", "open_clip_model.safetensors")
TEXT_PREFIX = "text.model."


class OpenClipText(nn.Module):
    """The text half of an open_clip model: tokens -> text embeddings."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        model.visual = nn.Identity()
        self.model = model

    @property
    def text_projection(self) -> torch.Tensor:
        """The projection of the text features (its device is the tower's)."""
        return self.model.text_projection

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model.encode_text(tokens)


def _open_clip():
    try:
        import open_clip
    except ImportError:
        raise ModelError("open_clip models need the open_clip_torch package "
                         "(pip install open_clip_torch)") from None
    return open_clip


def architecture(name: str) -> str:
    """The open_clip architecture of `open_clip:<architecture>`, checked to be one open_clip has."""
    arch = name.removeprefix(PREFIX)
    known = _open_clip().list_models()
    if arch not in known:
        raise ModelError(f"unknown open_clip architecture {arch!r}; open_clip.list_models() has "
                         f"{len(known)}, e.g. {', '.join(known[:8])}")
    return arch


def facts(arch: str) -> dict:
    """Embedding size, input size, text context length, mean and std of an architecture."""
    config = _open_clip().get_model_config(arch)
    size = config["vision_cfg"].get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    text = config.get("text_cfg", {})
    from taxonclip.models.transforms import CLIP_MEAN, CLIP_STD

    mean = tuple(config.get("preprocess_cfg", {}).get("mean", CLIP_MEAN))
    std = tuple(config.get("preprocess_cfg", {}).get("std", CLIP_STD))
    return {"embed_dim": int(config["embed_dim"]), "input_size": int(size),
            "context_length": int(text.get("context_length", 77)), "mean": mean, "std": std}


def towers(arch: str) -> tuple[nn.Module, nn.Module]:
    """The image tower and the text half of a randomly initialised open_clip model."""
    model = _open_clip().create_model(arch, pretrained=None)
    visual = model.visual
    return visual, OpenClipText(model)


def to_encoder_keys(state_dict: dict) -> dict:
    """An open_clip state dict (of the whole model) in the encoder's key layout."""
    return {key if key.startswith("visual.") else f"{TEXT_PREFIX}{key}": value
            for key, value in state_dict.items()}


def hub_file(reference: str) -> Path:
    """The weights file of `hf-hub:<org>/<name>` in the local Hugging Face cache, or a
    ModelError saying what to place where."""
    repo = reference.removeprefix(HUB_PREFIX).strip("/")
    cache = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get(
        "HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    folder = cache / f"models--{repo.replace('/', '--')}"
    found = sorted(p for name in WEIGHT_FILES for p in folder.glob(f"snapshots/*/{name}"))
    if not found:
        raise ModelError(
            f"weights {reference}: no {' or '.join(WEIGHT_FILES)} under {folder} (the Hugging "
            f"Face cache; this machine downloads nothing). On a machine online run `hf download "
            f"{repo}` and copy its {folder.name} folder into {cache}, or pass weights=<path of "
            f"{WEIGHT_FILES[0]}>")
    return found[-1]


def read_weights(path: Path) -> dict:
    """The state dict in an open_clip weights file (`.safetensors`, or a torch file read
    without pickle)."""
    from taxonclip.models.weights import unreadable_weights

    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path))
        stored = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # safetensors and torch report a damaged file under many types
        raise unreadable_weights(path, error) from None
    return stored.get("state_dict", stored) if isinstance(stored, dict) else stored
