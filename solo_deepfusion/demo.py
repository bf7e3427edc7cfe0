"""``solo-deepfusion demo``: the head on a synthetic two-view batch, with its attention summary.

The features are drawn around one centre per class. An untrained head attends about as much
to same-class samples as chance does (fusion ratio near 1): Deep Fusion is what training adds,
and ``solo-deepfusion fusion`` measures it on a trained checkpoint.
"""

from __future__ import annotations

import argparse

import torch

from solo_deepfusion.fusion import format_table, fusion_stats
from solo_deepfusion.heads import PRESETS, build_projector, count_parameters, forward_flops


def synthetic_views(
    samples: int, classes: int, dim: int, views: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """View-major ``(views * samples, dim)`` features clustered by class; ``(samples,)`` labels."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=g)
    labels = torch.arange(samples) % classes
    base = centres[labels] + 0.8 * torch.randn(samples, dim, generator=g)
    feats = torch.cat([base + 0.3 * torch.randn(samples, dim, generator=g) for _ in range(views)])
    return feats, labels


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="solo-deepfusion demo", description=__doc__)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="small")
    parser.add_argument("--mask", choices=["none", "self", "positives"], default="none")
    parser.add_argument("--samples", type=int, default=128, help="samples per view")
    parser.add_argument("--classes", type=int, default=10)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    head = build_projector("transformer", 512, 2048, 256, preset=args.preset, mask=args.mask)
    feats, labels = synthetic_views(args.samples, args.classes, 512, views=2, seed=args.seed)
    with torch.no_grad():
        out, maps = head.eval()(feats, num_views=2, return_attention=True)
    tokens = feats.shape[0]
    print(
        f"TransformerProjector preset={args.preset} mask={args.mask}: "
        f"{count_parameters(head) / 1e6:.2f}M parameters, "
        f"{forward_flops(head, tokens, num_views=2) / 1e9:.2f} GFLOPs forward at T={tokens}"
    )
    print(f"input {tuple(feats.shape)} -> output {tuple(out.shape)}; untrained head, per layer:")
    print(format_table(fusion_stats(maps, labels, num_views=2)))
    return 0
