"""What a head costs (heads/cost.py): parameters and FLOPs."""

from __future__ import annotations

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
