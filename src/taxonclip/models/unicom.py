"""The UNICOM family (source `unicom`): its vision transformer, which has no text tower, and the
published `FP16-ViT-*.pt` weights from ~/.cache/unicom (or `$UNICOM_CACHE`).

The UNICOM vision transformer differs from CLIP's ViT: the patch projection has a bias, the
position embedding covers the patches only (no class token), the MLP uses ReLU6, and the
embedding is read from *all* patch tokens through a head of two Linear + BatchNorm1d pairs.
Parameter names follow the published `FP16-ViT-*.pt` checkpoints so that they load strictly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from taxonclip.errors import ModelError
from taxonclip.models.adapter import ModelAdapter
from taxonclip.models.encoder import Encoder, ModelSpec, Tokenizer, arch_spec
from taxonclip.models.weights import UNICOM_RELEASES, unicom_cache_dir

HEAD_BATCHNORM_EPS = 2e-5


class PatchEmbed(nn.Module):
    """Images (B, 3, H, W) -> patch tokens (B, patches, width), patches in row-major order."""

    def __init__(self, patch_size: int, width: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(3, width, kernel_size=patch_size, stride=patch_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    """Multi-head self-attention; qkv has no bias and orders its outputs (q|k|v, head, dim)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width, bias=False)
        self.proj = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, tokens, width = x.shape
        qkv = self.qkv(x).view(batch, tokens, 3, self.heads, width // self.heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        attended = F.scaled_dot_product_attention(q, k, v)
        return self.proj(attended.transpose(1, 2).reshape(batch, tokens, width))


class Mlp(nn.Module):
    """Linear -> ReLU6 -> Linear."""

    def __init__(self, width: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, hidden)
        self.fc2 = nn.Linear(hidden, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu6(self.fc1(x)))


class Block(nn.Module):
    """Pre-LayerNorm transformer block."""

    def __init__(self, width: int, heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(width)
        self.norm2 = nn.LayerNorm(width)
        self.attn = Attention(width, heads)
        self.mlp = Mlp(width, width * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class UnicomViT(nn.Module):
    """UNICOM image encoder: images (B, 3, image_size, image_size) -> embeddings (B, embed_dim)."""

    def __init__(self, image_size: int, patch_size: int, width: int, layers: int, heads: int,
                 embed_dim: int, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.image_size = image_size
        patches = (image_size // patch_size) ** 2
        self.patch_embed = PatchEmbed(patch_size, width)
        self.pos_embed = nn.Parameter(torch.empty(1, patches, width))
        self.blocks = nn.ModuleList(Block(width, heads, mlp_ratio) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        # The head sees every patch token at its position, which ties the model to image_size.
        self.feature = nn.Sequential(
            nn.Linear(patches * width, width, bias=False),
            nn.BatchNorm1d(width, eps=HEAD_BATCHNORM_EPS),
            nn.Linear(width, embed_dim, bias=False),
            nn.BatchNorm1d(embed_dim, eps=HEAD_BATCHNORM_EPS),
        )
        nn.init.trunc_normal_(self.pos_embed, std=0.02)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != (self.image_size, self.image_size):
            raise ModelError(f"this UNICOM model takes {self.image_size}x{self.image_size} images, "
                             f"got {images.shape[-2]}x{images.shape[-1]}")
        x = self.patch_embed(images) + self.pos_embed
        for block in self.blocks:
            x = block(x)
        return self.feature(self.norm(x).flatten(1))


@dataclass(frozen=True, kw_only=True)
class UnicomArch:
    """A UNICOM vision transformer: the keyword arguments of `UnicomViT`, in its order (a spec's
    `arch` is this as a dict, as checkpoints store it)."""

    image_size: int  # the side of the square input images (the head is tied to it)
    patch_size: int
    width: int
    layers: int
    heads: int
    embed_dim: int

    @property
    def input_size(self) -> int:
        """The side of the square images the model takes."""
        return self.image_size


class UnicomAdapter(ModelAdapter):
    """UNICOM: `unicom:ViT-B/32` ... `unicom:ViT-L/14@336px`, image tower only."""

    source = "unicom"
    has_text = False
    weight_words = ("pretrained", "unicom")
    # per the published checkpoints' head shapes, only UNICOM's B/32 embeds in 512 dimensions
    specs = tuple(arch_spec(name, "unicom", arch) for name, arch in (
        ("unicom:ViT-B/32", UnicomArch(image_size=224, patch_size=32, width=768, layers=12,
                                       heads=12, embed_dim=512)),
        ("unicom:ViT-B/16", UnicomArch(image_size=224, patch_size=16, width=768, layers=12,
                                       heads=12, embed_dim=768)),
        ("unicom:ViT-L/14", UnicomArch(image_size=224, patch_size=14, width=1024, layers=24,
                                       heads=16, embed_dim=768)),
        ("unicom:ViT-L/14@336px", UnicomArch(image_size=336, patch_size=14, width=1024,
                                             layers=24, heads=16, embed_dim=768)),
    ))

    def towers(self, spec: ModelSpec) -> tuple[nn.Module, nn.Module | None]:
        return UnicomViT(**spec.arch), None

    def tokenizer(self, spec: ModelSpec) -> Tokenizer | None:
        return None

    def encoder_keys(self, state_dict: dict) -> dict:
        # the published files hold the image tower alone, under its own names
        return {key if key.startswith("visual.") else f"visual.{key}": value
                for key, value in state_dict.items()}

    def pretrained(self, spec: ModelSpec) -> Encoder:
        return self.load_release(spec, UNICOM_RELEASES, unicom_cache_dir())


ADAPTER = UnicomAdapter()
