"""A per-sample residual MLP: the default transformer head's trunk with no attention at all.

Example::

    head = ResidualMLPProjector(512, 256)      # dim 256, 10 blocks, FFN 1024, output BatchNorm
    feats = torch.randn(128, 512)              # one crop's batch
    z = head(feats)                            # (128, 256); no row sees another (in eval mode)

It exists because the controls suggest that the default head with ``mixing=none`` (no sample
sees another) gains as much over ``mlp`` as the default itself: this is that control's trunk
without its attention sublayers, so none of their weights are paid for (q and k are unused
there; v and proj are a per-token linear branch, which this head drops too).
"""

from __future__ import annotations

import torch
from torch import nn

from solo_deepfusion.heads.transformer import ACTIVATIONS, OUTPUT_NORMS, FeedForward
from solo_deepfusion.validation import check_choice, check_int, check_number


class ResidualBlock(nn.Module):
    """``x + FFN(LayerNorm(x))``: a pre-norm transformer block's feed-forward half."""

    def __init__(self, dim: int, ffn_dim: int, activation: str, dropout: float) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.ffn = FeedForward(dim, ffn_dim, activation, dropout)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.drop(self.ffn(self.norm(x)))


class ResidualMLPProjector(nn.Module):
    """``Linear(in_dim, dim)`` -> ``depth`` residual blocks -> LayerNorm -> ``Linear(dim,
    out_dim)`` -> output norm -> ``tail``; every sample on its own.

    Args:
        in_dim: feature size of the backbone.
        out_dim: output size; keep the recipe's ``proj_output_dim``.
        dim, depth, ffn_dim: width, number of blocks (``>= 0``), FFN hidden size.
        activation: FFN activation, one of ``ACTIVATIONS``.
        dropout: dropout inside the FFN and on its residual branch, in ``[0, 1)``.
        output_norm: ``"batch"``, a BatchNorm1d without affine on the output (the default
            transformer head's), or ``"none"``.
        tail: optional module applied to the output, e.g. a method's final ``BatchNorm1d``.
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        *,
        dim: int = 256,
        depth: int = 10,
        ffn_dim: int = 1024,
        activation: str = "gelu",
        dropout: float = 0.0,
        output_norm: str = "batch",
        tail: nn.Module | None = None,
    ) -> None:
        super().__init__()
        dims = (("in_dim", in_dim), ("out_dim", out_dim), ("dim", dim), ("ffn_dim", ffn_dim))
        for field, value in dims:
            check_int(field, value)  # a bool, float or string is refused, not truncated
        check_int("depth", depth, minimum=0)
        check_choice("activation", activation, tuple(ACTIVATIONS))
        check_number("dropout", dropout, "in [0, 1)", lambda v: 0.0 <= v < 1.0)
        check_choice("output_norm", output_norm, tuple(OUTPUT_NORMS))
        self.in_dim, self.out_dim, self.dim = in_dim, out_dim, dim
        self.in_proj = nn.Linear(in_dim, dim)
        self.blocks = nn.Sequential(
            *(ResidualBlock(dim, ffn_dim, activation, dropout) for _ in range(depth))
        )
        self.final_norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, out_dim)
        self.output_norm = OUTPUT_NORMS[output_norm](out_dim)
        self.tail = tail if tail is not None else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(self.in_proj(x))
        return self.tail(self.output_norm(self.out_proj(self.final_norm(h))))
