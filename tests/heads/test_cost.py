"""What a head costs (heads/cost.py): parameters and FLOPs."""

from __future__ import annotations

import torch

from solo_deepfusion.heads import (
    build_projector,
    forward_flops,
)

TINY = {"dim": 32, "depth": 2, "heads": 4, "ffn_dim": 64}


def test_forward_flops_count_attention_quadratically():
    head = build_projector("transformer", 512, 0, 256, preset="small")
    f1, f2, f4 = (forward_flops(head, t) for t in (256, 512, 1024))
    # linear layers scale with T, attention (QK^T, AV) with T^2: differences grow 2x per step
    dim, depth = head.dim, len(head.blocks)
    attention = lambda t: depth * 4 * t * t * dim  # noqa: E731
    linear = f1 - attention(256)
    assert linear > 0
    assert f2 == 2 * linear + attention(512)
    assert f4 == 4 * linear + attention(1024)
    mlp = build_projector("mlp", 512, 2048, 256)
    assert forward_flops(mlp, 512) == 2 * 512 * (512 * 2048 + 2048 * 256)


def test_step_memory_counts_what_backward_keeps_and_time_step_times_each_call():
    import contextlib

    from solo_deepfusion.heads.cost import make_step, step_memory, time_step

    head = build_projector("mlp", 24, 32, 16)
    saved = []
    for tokens in (8, 16):
        x = torch.randn(tokens, 24, requires_grad=True)
        saved.append(step_memory(head, lambda x=x: head(x), x, contextlib.nullcontext)[0])
    assert saved[0] > 0 and saved[1] == 2 * saved[0]  # every kept activation is per token
    x = torch.randn(8, 24)
    step = make_step(head, lambda: head(x), x, contextlib.nullcontext)
    times = time_step(step, x.device, repeats=3, warmup=1)
    assert len(times) == 3 and all(t > 0 for t in times)
    assert all(p.grad is not None for p in head.parameters())
