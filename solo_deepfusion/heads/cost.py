"""What a head costs: parameters, forward FLOPs, and a training step's time and memory.

>>> count_parameters(head), forward_flops(head, 512, num_views=2)
>>> step = make_step(head, lambda: head(x, num_views=2), x, contextlib.nullcontext)
>>> times_ms = time_step(step, x.device, repeats=5, warmup=1)
>>> saved, cuda_peak = step_memory(head, lambda: head(x, num_views=2), x, contextlib.nullcontext)
"""

from __future__ import annotations

import copy
import inspect
import time
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


def takes_num_views(module: nn.Module) -> bool:
    """Whether ``module``'s forward declares ``num_views`` (a head that mixes the views); a
    per-sample head (``mlp``, ``residual_mlp``) is called as ``head(x)``."""
    return "num_views" in inspect.signature(module.forward).parameters


def forward_flops(module: nn.Module, num_tokens: int, *, num_views: int = 1) -> int:
    """FLOPs (multiply-add = 2) of one forward pass of a head on ``num_tokens`` tokens.

    Counted on a real forward in eval mode (:func:`count_flops`); ``num_views`` is passed
    only to a head that takes it (:func:`takes_num_views`).
    """
    in_dim = getattr(module, "in_dim", None)
    if in_dim is None:
        raise ValueError("module has no `in_dim` attribute: build it with build_projector")
    param = next(module.parameters())
    x = torch.randn(num_tokens, in_dim, device=param.device, dtype=param.dtype)
    kwargs = {"num_views": num_views} if takes_num_views(module) else {}
    was_training = module.training
    module.eval()
    try:
        return count_flops(lambda: module(x, **kwargs))
    finally:
        module.train(was_training)


# ---------------------------------------------------------------------------------------------
# A training step's time and memory (scripts/bench_head.py)

Forward = Callable[[], torch.Tensor]
Step = Callable[[], None]


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(module: nn.Module, forward: Forward, inputs: torch.Tensor, amp: Callable) -> Step:
    """One training step without an optimizer: clear grads, forward under ``amp``, backward."""

    def step() -> None:
        module.zero_grad(set_to_none=True)
        inputs.grad = None
        with amp():
            out = forward()
        out.float().sum().backward()

    return step


def time_step(step: Step, device: torch.device, repeats: int, warmup: int) -> list[float]:
    """Wall times of ``repeats`` calls of ``step`` in milliseconds, after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
    return [1e3 * t for t in times]


def storage_key(t: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = t.untyped_storage()
    except (RuntimeError, NotImplementedError):
        return None
    return storage.data_ptr(), storage.nbytes()


def step_memory(
    module: nn.Module, forward: Forward, inputs: torch.Tensor, amp: Callable
) -> tuple[int, int]:
    """``(saved_bytes, cuda_peak_bytes)`` of one step; the peak is 0 off CUDA.

    ``saved_bytes`` sums the unique storages saved for backward during the forward, leaving out
    the parameters and ``inputs`` (they exist whether or not the step runs).
    """
    exclude = {storage_key(p) for p in module.parameters()} | {storage_key(inputs)}
    saved: set[tuple[int, int]] = set()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = storage_key(t)
        if key is not None and key not in exclude:
            saved.add(key)
        return t

    module.zero_grad(set_to_none=True)
    inputs.grad = None
    cuda = inputs.device.type == "cuda"
    if cuda:
        sync(inputs.device)
        torch.cuda.reset_peak_memory_stats(inputs.device)
        base = torch.cuda.memory_allocated(inputs.device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), amp():
        out = forward()
    out.float().sum().backward()
    del out
    peak = 0
    if cuda:
        sync(inputs.device)
        peak = torch.cuda.max_memory_allocated(inputs.device) - base
    return sum(nbytes for _, nbytes in saved), peak


def meta_copy(module: nn.Module) -> nn.Module:
    """A parameter-free copy on the meta device, for counting FLOPs without running them."""
    clone = copy.deepcopy(module).to("meta")
    if hasattr(clone, "check_inputs"):
        clone.check_inputs = False  # its finiteness check cannot run on meta tensors
    return clone
