"""The open_clip family (source `open_clip`): models named `open_clip:<architecture>` for any
name of `open_clip.list_models()` (BioCLIP is `open_clip:ViT-B-16`), built by open_clip itself,
with their weights from a file or from a Hugging Face hub cache folder
(`hf-hub:imageomics/bioclip`), never downloaded here, and open_clip's tokenizer of each.

The encoder keeps open_clip's image tower as `visual` and the rest of the model (token
embedding, text transformer, projection) as `text.model`, so a state dict of the whole open_clip
model maps onto the encoder by prefixing its non-visual keys.
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch
from torch import nn

from taxonclip.errors import ModelError
from taxonclip.models.adapter import ModelAdapter
from taxonclip.models.encoder import Encoder, ModelSpec, Tokenizer

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


def tokenize(texts: list[str], arch: str, context_length: int) -> torch.Tensor:
    """Token ids (len(texts), context_length) of open_clip's tokenizer for `arch` (CLIP's
    byte-pair encoding for BioCLIP); texts that are too long are truncated."""
    return _tokenizer(arch, context_length)(texts)


@functools.lru_cache(maxsize=None)
def _tokenizer(arch: str, context_length: int):
    try:
        return _open_clip().get_tokenizer(arch, context_length=context_length)
    except (OSError, ValueError, RuntimeError) as error:
        # a tokenizer of the Hugging Face hub is looked up in its cache, never downloaded here
        raise ModelError(f"the tokenizer of open_clip:{arch} is not available on this machine: "
                         f"{type(error).__name__}: {error}") from None


class OpenClipAdapter(ModelAdapter):
    """open_clip: any `open_clip:<architecture>`, its weights from a file or the hub cache."""

    source = "open_clip"
    has_text = True
    weight_words = ("pretrained",)
    specs = ()  # none listed: every architecture of open_clip.list_models() is one
    weights_help = (f", or hf-hub:<org>/<name> of the Hugging Face cache (BioCLIP: weights="
                    f"hf-hub:imageomics/bioclip, or the path of its {WEIGHT_FILES[0]})")
    # open_clip keeps buffers outside the state dict (the text attention mask), which an
    # allocation without initialisation would leave as garbage
    loads_uninitialised = False

    def spec_of(self, name: str) -> ModelSpec | None:
        """The spec of `open_clip:<architecture>`, its sizes and normalisation open_clip's."""
        if not name.startswith(PREFIX):
            return None
        arch = architecture(name)
        found = facts(arch)
        return ModelSpec(f"{PREFIX}{arch}", self.source, found["embed_dim"], found["input_size"],
                         {"architecture": arch, "context_length": found["context_length"]},
                         mean=found["mean"], std=found["std"])

    def towers(self, spec: ModelSpec) -> tuple[nn.Module, nn.Module | None]:
        return towers(spec.arch["architecture"])

    def tokenizer(self, spec: ModelSpec) -> Tokenizer | None:
        return functools.partial(tokenize, arch=spec.arch["architecture"],
                                 context_length=spec.arch["context_length"])

    def encoder_keys(self, state_dict: dict) -> dict:
        return to_encoder_keys(state_dict)

    def referenced_file(self, weights: str) -> Path | None:
        return hub_file(weights) if weights.startswith(HUB_PREFIX) else None

    def pretrained(self, spec: ModelSpec) -> Encoder:
        raise ModelError(f"{spec.name}: open_clip weights come from a file or the Hugging Face "
                         f"cache: weights=/path/{WEIGHT_FILES[0]} or "
                         f"weights=hf-hub:<org>/<name> (BioCLIP: hf-hub:imageomics/bioclip)")


ADAPTER = OpenClipAdapter()
