"""A small Vision Transformer (Dosovitskiy et al. 2021) for small images (Fashion-MNIST).

timm's layout: a patch-embedding conv, a class token, learned position embeddings, pre-norm
blocks (fused ``qkv``, ``softmax(q·kᵀ)·v`` written as matmuls, GELU MLP), a final LayerNorm and
a linear head on the class token. Names follow the registry's convention: the patch embedding
is ``stem.0`` (the first conv), the head ``fc``.
"""

from __future__ import annotations

import torch
from torch import nn

from qat.models.layers import check_common, check_positive_int
from qat.models.registry import register_model

__all__ = ["VisionTransformer", "vit"]


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = ((q * self.scale) @ k.transpose(-2, -1)).softmax(dim=-1)
        return self.proj((attn @ v).transpose(1, 2).reshape(b, n, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    def __init__(self, dim: int, num_heads: int, mlp_ratio: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, num_heads)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, dim * mlp_ratio)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class VisionTransformer(nn.Module):
    """ViT classifier.

    Args:
        num_classes: output classes.
        in_channels: image channels.
        image_size: input height = width; must be divisible by ``patch_size``.
        patch_size: side of the square patches.
        dim: token width (divisible by ``num_heads``).
        depth: transformer blocks.
        num_heads: attention heads.
        mlp_ratio: MLP hidden width over ``dim``.
    """

    first_conv_name = "stem.0"
    classifier_name = "fc"

    def __init__(
        self,
        num_classes: int = 10,
        in_channels: int = 1,
        image_size: int = 28,
        patch_size: int = 4,
        dim: int = 64,
        depth: int = 4,
        num_heads: int = 4,
        mlp_ratio: int = 2,
    ) -> None:
        super().__init__()
        check_common(num_classes, in_channels, image_size, min_size=patch_size)
        for name, value in (("patch_size", patch_size), ("dim", dim), ("depth", depth)):
            check_positive_int(name, value)
        check_positive_int("num_heads", num_heads)
        check_positive_int("mlp_ratio", mlp_ratio)
        if image_size % patch_size:
            raise ValueError(
                f"image_size={image_size} must be divisible by patch_size={patch_size}"
            )
        if dim % num_heads:
            raise ValueError(f"dim={dim} must be divisible by num_heads={num_heads}")
        self.num_classes, self.in_channels, self.image_size = num_classes, in_channels, image_size
        tokens = (image_size // patch_size) ** 2 + 1
        self.stem = nn.Sequential(nn.Conv2d(in_channels, dim, patch_size, stride=patch_size))
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.blocks = nn.Sequential(*[Block(dim, num_heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x).flatten(2).transpose(1, 2)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = self.blocks(x + self.pos_embed)
        return self.fc(self.norm(x)[:, 0])


@register_model
def vit(
    num_classes: int = 10,
    in_channels: int = 1,
    image_size: int = 28,
    patch_size: int = 4,
    dim: int = 64,
    depth: int = 4,
    num_heads: int = 4,
    mlp_ratio: int = 2,
) -> VisionTransformer:
    """:class:`VisionTransformer`; defaults fit Fashion-MNIST (28x28, 7x7 patches of 4)."""
    return VisionTransformer(
        num_classes, in_channels, image_size, patch_size, dim, depth, num_heads, mlp_ratio
    )
