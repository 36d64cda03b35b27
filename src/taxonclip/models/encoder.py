"""What a model name stands for (`ModelSpec`) and the encoder that every model family builds
(`Encoder`): an image tower, a text tower where the family has one, and the family's tokenizer."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from taxonclip.errors import ModelError
from taxonclip.models.transforms import (CLIP_MEAN, CLIP_STD, ImageTransform, TensorTransform,
                                         eval_transform, tensor_eval_transform,
                                         tensor_train_transform, train_transform)

# Captions -> token ids (len(texts), context length) that a text tower takes.
Tokenizer = Callable[[list[str]], torch.Tensor]


@dataclass(frozen=True)
class ModelSpec:
    """What a registry name stands for. `source` names its family (the registry's key);
    `arch` rebuilds the architecture without any weights: the family's architecture dataclass as
    a dict (ClipArch, UnicomArch), or open_clip's architecture name. Checkpoints store it as is."""

    name: str
    source: str
    embed_dim: int
    input_size: int
    arch: dict = field(hash=False)
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD


def arch_spec(name: str, source: str, arch: Any) -> ModelSpec:
    """A listed model of `source`: its embedding and input sizes are those of its architecture
    (a dataclass with `embed_dim` and `input_size`), stored as a dict."""
    return ModelSpec(name, source, arch.embed_dim, arch.input_size, asdict(arch))


class Encoder(nn.Module):
    """An image encoder (`visual`), with a text tower (`text`) and its `tokenize` where the
    model has one."""

    def __init__(self, spec: ModelSpec, weights: str, visual: nn.Module,
                 text: nn.Module | None = None, tokenize: Tokenizer | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.weights = weights
        self.visual = visual
        self.text = text
        self.tokenize = tokenize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Embeddings (B, embed_dim), not normalised, of images (B, 3, input_size, input_size)."""
        return self.visual(images)

    @property
    def has_text(self) -> bool:
        """Whether `encode_text` works (the family has a text tower: CLIP, tiny, open_clip)."""
        return self.text is not None and self.tokenize is not None

    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """Embeddings (len(texts), embed_dim) of captions, tokenized as the family's text tower
        was trained; texts longer than its context are truncated."""
        if not self.has_text:
            raise ModelError(f"model {self.spec.name} has no text tower; use embedding=visual")
        tokens = self.tokenize(texts)
        return self.text(tokens.to(next(self.text.parameters()).device))

    def eval_transform(self) -> ImageTransform:
        """PIL image -> tensor for embedding: bicubic resize, centre crop, normalise."""
        return eval_transform(self.spec.input_size, self.spec.mean, self.spec.std)

    def train_transform(self) -> ImageTransform:
        """PIL image -> tensor for training: random resized crop, horizontal flip, normalise."""
        return train_transform(self.spec.input_size, self.spec.mean, self.spec.std)

    def tensor_transform(self, train: bool) -> TensorTransform:
        """The eval or train transform for a uint8 image tensor on the model's device."""
        make = tensor_train_transform if train else tensor_eval_transform
        return make(self.spec.input_size, self.spec.mean, self.spec.std)

    def config(self) -> dict:
        """JSON-serialisable description that `encoder_from_config` rebuilds the encoder from."""
        return {"spec": asdict(self.spec), "weights": self.weights}
