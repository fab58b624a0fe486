"""Vision Transformers (Dosovitskiy et al. 2021), written so that ``state_dict()`` keys and
shapes equal torchvision's ``VisionTransformer``.

Equal keys mean torchvision's published weights load here with ``strict=True``; attention
uses ``nn.MultiheadAttention`` (``in_proj_weight``/``in_proj_bias``/``out_proj``) for that
reason. ``image_size`` sets the length of the position embedding, so a model built for
small inputs (say 32 px with 16 px patches) runs fast, but only loads weights of its size.
"""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from torch import nn

import zoo


class MLPBlock(nn.Sequential):
    """Linear, GELU, dropout, linear, dropout: keys ``mlp.0`` and ``mlp.3`` as torchvision."""

    def __init__(self, dim: int, mlp_dim: int, dropout: float) -> None:
        super().__init__(nn.Linear(dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, dim), nn.Dropout(dropout))
        for m in self:
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.normal_(m.bias, std=1e-6)


class EncoderBlock(nn.Module):
    """Pre-norm transformer block: x + attention(ln_1(x)), then + mlp(ln_2(x))."""

    def __init__(self, num_heads: int, dim: int, mlp_dim: int, dropout: float,
                 attention_dropout: float) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(dim, num_heads, dropout=attention_dropout,
                                                    batch_first=True)
        self.dropout = nn.Dropout(dropout)
        self.ln_2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = MLPBlock(dim, mlp_dim, dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.ln_1(x)
        y, _ = self.self_attention(y, y, y, need_weights=False)
        x = x + self.dropout(y)
        return x + self.mlp(self.ln_2(x))


class Encoder(nn.Module):
    """Position embedding, the stack of blocks (``layers.encoder_layer_{i}``), final ``ln``."""

    def __init__(self, seq_length: int, num_layers: int, num_heads: int, dim: int,
                 mlp_dim: int, dropout: float, attention_dropout: float) -> None:
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, dim).normal_(std=0.02))
        self.dropout = nn.Dropout(dropout)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}",
             EncoderBlock(num_heads, dim, mlp_dim, dropout, attention_dropout))
            for i in range(num_layers)
        ))
        self.ln = nn.LayerNorm(dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.ln(self.layers(self.dropout(x + self.pos_embedding)))


class VisionTransformer(nn.Module):
    """Patchify with ``conv_proj``, prepend ``class_token``, encode, classify the class token."""

    def __init__(self, *, image_size: int, patch_size: int, num_layers: int, num_heads: int,
                 hidden_dim: int, mlp_dim: int, num_classes: int = 1000,
                 dropout: float = 0.0, attention_dropout: float = 0.0) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(
                f"image_size {image_size} is not a multiple of the patch size {patch_size}"
            )
        self.image_size = image_size
        self.patch_size = patch_size
        self.hidden_dim = hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, kernel_size=patch_size, stride=patch_size)
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        seq_length = (image_size // patch_size) ** 2 + 1
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim,
                               dropout, attention_dropout)
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, num_classes)))

        # torchvision's initialisation: LeCun-normal patch embedding, zero classifier.
        fan_in = 3 * patch_size * patch_size
        nn.init.trunc_normal_(self.conv_proj.weight, std=math.sqrt(1 / fan_in))
        nn.init.zeros_(self.conv_proj.bias)
        nn.init.zeros_(self.heads.head.weight)
        nn.init.zeros_(self.heads.head.bias)

    def forward_embed(self, x: torch.Tensor) -> torch.Tensor:
        """Group ``embed``: images (n, 3, h, w) to tokens (n, 1 + patches, hidden) + positions."""
        n, _, h, w = x.shape
        if h != self.image_size or w != self.image_size:
            raise ValueError(
                f"expected {self.image_size}x{self.image_size} images, got {h}x{w}; build the "
                f"model with image_size={h} to use this size"
            )
        x = self.conv_proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.class_token.expand(n, -1, -1), x], dim=1)
        return self.encoder.dropout(x + self.encoder.pos_embedding)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Group ``head``: classify the class token."""
        return self.heads(x[:, 0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.forward_embed(x)
        x = self.encoder.ln(self.encoder.layers(x))
        return self.forward_head(x)


def stages(model: VisionTransformer) -> list[zoo.Stage]:
    """One stage per layer group (``encoder.ln`` runs with the last block, as its group says)."""
    blocks = list(model.encoder.layers)
    last = blocks[-1]

    def last_block(x: torch.Tensor) -> torch.Tensor:
        return model.encoder.ln(last(x))

    return [
        zoo.Stage(("embed",), model.forward_embed),
        *(zoo.Stage((f"encoder_layer_{i}",), block) for i, block in enumerate(blocks[:-1])),
        zoo.Stage((f"encoder_layer_{len(blocks) - 1}",), last_block),
        zoo.Stage(("head",), model.forward_head),
    ]


def vit_b_16(*, num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """ViT-B/16: 12 layers, 12 heads, width 768, 16 px patches."""
    return VisionTransformer(image_size=image_size, patch_size=16, num_layers=12, num_heads=12,
                             hidden_dim=768, mlp_dim=3072, num_classes=num_classes)


def vit_b_32(*, num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """ViT-B/32: 12 layers, 12 heads, width 768, 32 px patches."""
    return VisionTransformer(image_size=image_size, patch_size=32, num_layers=12, num_heads=12,
                             hidden_dim=768, mlp_dim=3072, num_classes=num_classes)


def vit_l_16(*, num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """ViT-L/16: 24 layers, 16 heads, width 1024, 16 px patches."""
    return VisionTransformer(image_size=image_size, patch_size=16, num_layers=24, num_heads=16,
                             hidden_dim=1024, mlp_dim=4096, num_classes=num_classes)


def vit_l_32(*, num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """ViT-L/32: 24 layers, 16 heads, width 1024, 32 px patches."""
    return VisionTransformer(image_size=image_size, patch_size=32, num_layers=24, num_heads=16,
                             hidden_dim=1024, mlp_dim=4096, num_classes=num_classes)


def vit_h_14(*, num_classes: int = 1000, image_size: int = 224) -> VisionTransformer:
    """ViT-H/14: 32 layers, 16 heads, width 1280, 14 px patches."""
    return VisionTransformer(image_size=image_size, patch_size=14, num_layers=32, num_heads=16,
                             hidden_dim=1280, mlp_dim=5120, num_classes=num_classes)
