"""What a head costs: parameters and forward FLOPs for ``T`` tokens."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode


def count_parameters(module: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of parameters of ``module`` (only those with ``requires_grad`` if asked)."""
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def count_flops(fn: Callable[[], Any]) -> int:
    """FLOPs (multiply-add = 2) that ``fn()`` runs, counted by ``torch.utils.flop_counter``.

    No gradients; SDPA runs on its math backend so that attention matmuls are counted on every
    device (the fused CPU kernel has no FLOP formula); the count is the same for every backend.
    """
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as fc:
        fn()
    return fc.get_total_flops()


def forward_flops(module: nn.Module, num_tokens: int, *, num_views: int = 1) -> int:
    """FLOPs (multiply-add = 2) of one forward pass of a head on ``num_tokens`` tokens.

    Counted on a real forward in eval mode (:func:`count_flops`).
    """
    in_dim = getattr(module, "in_dim", None)
    if in_dim is None:
        raise ValueError("module has no `in_dim` attribute: build it with build_projector")
    param = next(module.parameters())
    x = torch.randn(num_tokens, in_dim, device=param.device, dtype=param.dtype)
    kwargs = {"num_views": num_views} if hasattr(module, "blocks") else {}
    was_training = module.training
    module.eval()
    try:
        return count_flops(lambda: module(x, **kwargs))
    finally:
        module.train(was_training)
