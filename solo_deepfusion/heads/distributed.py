"""Autograd-aware gathering of tokens across ranks, so attention can span the global batch."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group, ``(0, 1)`` when there is none."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherWithGrad(torch.autograd.Function):
    """``all_gather`` whose backward sums every rank's gradient of this rank's slice.

    Written here rather than using ``torch.distributed.nn.functional.all_gather`` because that
    one's backward needs ``reduce_scatter``, which the ``gloo`` backend (CPU) does not have.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        rank, world = distributed_world()
        ctx.rank, ctx.rows = rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.rows : (ctx.rank + 1) * ctx.rows]


def gather_tokens(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (rows = tokens) from all ranks in rank order; identity without DDP.

    Every rank must hold the same number of rows (Lightning's training loaders drop the last
    incomplete batch, so they do).
    """
    if distributed_world()[1] == 1:
        return x
    return _GatherWithGrad.apply(x)
