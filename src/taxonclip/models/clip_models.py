"""The OpenAI CLIP family (source `clip`): its architectures, towers built from the `clip`
package's modules in fp32, its tokenizer, and OpenAI's published weights.

An encoder keeps CLIP's image tower under `visual.*` (the same keys as CLIP) and its text tower
under `text.*`; `logit_scale`, used only by CLIP's contrastive pre-training, is dropped.
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch
from torch import nn

from taxonclip.models.adapter import ModelAdapter
from taxonclip.models.encoder import Encoder, ModelSpec, Tokenizer, arch_spec
from taxonclip.models.weights import CLIP_RELEASES, clip_cache_dir

with warnings.catch_warnings():
    # clip imports pkg_resources, whose deprecation notice concerns the clip package, not users.
    warnings.simplefilter("ignore", UserWarning)
    import clip
    from clip.model import CLIP

TEXT_KEYS = ("token_embedding", "positional_embedding", "transformer", "ln_final",
             "text_projection")
# Dropped from CLIP state dicts: attributes that OpenAI's TorchScript archives store beside the
# weights, and logit_scale, which only CLIP's contrastive pre-training uses.
NOT_WEIGHTS = ("input_resolution", "context_length", "vocab_size", "logit_scale")


class ClipText(nn.Module):
    """CLIP's text tower: token ids (B, context_length) -> embeddings (B, embed_dim)."""

    def __init__(self, model: CLIP) -> None:
        super().__init__()
        self.token_embedding = model.token_embedding
        self.positional_embedding = model.positional_embedding
        self.transformer = model.transformer
        self.ln_final = model.ln_final
        self.text_projection = model.text_projection
        # Rebuilt on the CPU because a model created on the meta device holds an empty mask;
        # clip's attention blocks move it to the input's device on every call.
        mask = causal_mask(model.context_length)
        for block in self.transformer.resblocks:
            block.attn_mask = mask

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.token_embedding(tokens) + self.positional_embedding
        x = self.transformer(x.permute(1, 0, 2)).permute(1, 0, 2)
        x = self.ln_final(x)
        # The end-of-text token has the largest id, so argmax finds each sequence's last token.
        last = tokens.argmax(dim=-1)
        return x[torch.arange(x.shape[0], device=x.device), last] @ self.text_projection


def causal_mask(length: int) -> torch.Tensor:
    """Additive attention mask (length, length): -inf above the diagonal, 0 elsewhere."""
    return torch.full((length, length), float("-inf"), device="cpu").triu_(1)


def clip_towers(arch: dict) -> tuple[nn.Module, ClipText]:
    """The image and text towers of a randomly initialised fp32 CLIP with hyper-parameters `arch`
    (the keyword arguments of `clip.model.CLIP`)."""
    model = CLIP(**arch)
    return model.visual, ClipText(model)


def to_encoder_keys(state_dict: dict) -> dict:
    """A CLIP state dict (OpenAI layout, or already `visual.*`/`text.*`) in the encoder's layout."""
    converted = {}
    for key, value in state_dict.items():
        if key in NOT_WEIGHTS:
            continue
        if key.split(".")[0] in TEXT_KEYS:
            key = f"text.{key}"
        converted[key] = value
    return converted


def tokenize(texts: list[str], context_length: int) -> torch.Tensor:
    """CLIP token ids (len(texts), context_length); texts that are too long are truncated."""
    return clip.tokenize(texts, context_length=context_length, truncate=True)


@dataclass(frozen=True, kw_only=True)
class ClipArch:
    """An OpenAI CLIP architecture: the keyword arguments of `clip.model.CLIP`, in its order. A
    spec's `arch` is this as a dict, as checkpoints store it, so the names stay CLIP's."""

    embed_dim: int  # of the joint image-text embedding
    image_resolution: int  # the side of the square input images
    vision_layers: int
    vision_width: int
    vision_patch_size: int
    context_length: int = 77  # text tokens
    vocab_size: int = 49408  # CLIP's byte-pair vocabulary
    transformer_width: int  # of the text tower, as are its heads and layers
    transformer_heads: int
    transformer_layers: int

    @property
    def input_size(self) -> int:
        """The side of the square images the model takes."""
        return self.image_resolution


class ClipAdapter(ModelAdapter):
    """OpenAI CLIP: `ViT-B/32` ... `ViT-L/14@336px`, OpenAI's weights from ~/.cache/clip."""

    source = "clip"
    has_text = True
    weight_words = ("pretrained", "openai")
    specs = tuple(arch_spec(name, "clip", arch) for name, arch in (
        ("ViT-B/32", ClipArch(embed_dim=512, image_resolution=224, vision_layers=12,
                              vision_width=768, vision_patch_size=32, transformer_width=512,
                              transformer_heads=8, transformer_layers=12)),
        ("ViT-B/16", ClipArch(embed_dim=512, image_resolution=224, vision_layers=12,
                              vision_width=768, vision_patch_size=16, transformer_width=512,
                              transformer_heads=8, transformer_layers=12)),
        ("ViT-L/14", ClipArch(embed_dim=768, image_resolution=224, vision_layers=24,
                              vision_width=1024, vision_patch_size=14, transformer_width=768,
                              transformer_heads=12, transformer_layers=12)),
        ("ViT-L/14@336px", ClipArch(embed_dim=768, image_resolution=336, vision_layers=24,
                                    vision_width=1024, vision_patch_size=14,
                                    transformer_width=768, transformer_heads=12,
                                    transformer_layers=12)),
    ))

    def towers(self, spec: ModelSpec) -> tuple[nn.Module, nn.Module | None]:
        return clip_towers(spec.arch)

    def tokenizer(self, spec: ModelSpec) -> Tokenizer | None:
        return functools.partial(tokenize, context_length=spec.arch["context_length"])

    def encoder_keys(self, state_dict: dict) -> dict:
        return to_encoder_keys(state_dict)

    def pretrained(self, spec: ModelSpec) -> Encoder:
        return self.load_release(spec, CLIP_RELEASES, clip_cache_dir())


ADAPTER = ClipAdapter()
