"""``batchattn``: one multi-head attention layer over the batch, as a solo-deepfusion plugin.

``Linear(in_dim, hidden_dim)`` -> self-attention across every row of the call (all views of
the step: its registration asks for the joint context) with a residual and LayerNorm ->
ReLU -> ``Linear(hidden_dim, out_dim)``. Installed, it trains as ``--projector batchattn``
(``simclr_batchattn``, ...); it has no ``preset`` and no ``depth``, only ``heads``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from solo_deepfusion.heads import register_projector

__all__ = ["BatchAttentionFields", "BatchAttentionHead", "batchattn"]


@dataclass(frozen=True)
class BatchAttentionFields:
    """What a recipe may set: ``projector.heads``."""

    heads: int = 4


class BatchAttentionHead(nn.Module):
    """One attention layer whose tokens are the batch's samples (view-major rows)."""

    def __init__(self, in_dim: int, hidden_dim: int, out_dim: int, heads: int = 4) -> None:
        super().__init__()
        if isinstance(heads, bool) or not isinstance(heads, int) or heads < 1:
            raise ValueError(f"projector.heads must be an integer >= 1, got {heads!r}")
        if hidden_dim % heads:
            raise ValueError(
                f"projector.heads={heads} must divide the hidden size proj_hidden_dim={hidden_dim}"
            )
        self.in_proj = nn.Linear(in_dim, hidden_dim)
        self.attn = nn.MultiheadAttention(hidden_dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(hidden_dim)
        self.out_proj = nn.Sequential(nn.ReLU(), nn.Linear(hidden_dim, out_dim))

    def forward(self, x: torch.Tensor, *, num_views: int = 1) -> torch.Tensor:
        """``(T, in_dim) -> (T, out_dim)``; every row attends to every row of the call.

        ``num_views`` (the number of crops stacked in ``x``) is part of the contract; this head
        attends across all of them alike.
        """
        del num_views
        h = self.in_proj(x)[None]
        attended, _ = self.attn(h, h, h, need_weights=False)
        return self.out_proj(self.norm(h + attended)[0])


@register_projector("batchattn", config=BatchAttentionFields, joint_context=True)
def batchattn(in_dim: int, hidden_dim: int, out_dim: int, *, heads: int = 4) -> BatchAttentionHead:
    """The ``batchattn`` head at the recipe's ``proj_hidden_dim`` width."""
    return BatchAttentionHead(in_dim, hidden_dim, out_dim, heads)
