"""The UNICOM vision transformer.

Differs from CLIP's ViT: the patch projection has a bias, the position embedding covers the
patches only (no class token), the MLP uses ReLU6, and the embedding is read from *all* patch
tokens through a head of two Linear + BatchNorm1d pairs. Parameter names follow the published
`FP16-ViT-*.pt` checkpoints so that they load strictly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from taxonclip.errors import ModelError

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
