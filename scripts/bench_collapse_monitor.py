"""What the collapse monitor (on by default) costs a training run.

Times, median of ``--repeats``, for a transformer head on ``T`` tokens of 512-d features:

* ``measure``: one :func:`~solo_deepfusion.heads.diagnostics.collapse_stats` call (the head
  once more with attention maps and logits, no gradients): what the monitor adds on a step it
  measures;
* ``head step``: the head's own forward + backward (SDPA, no maps), the smallest part of a
  training step.

The monitor measures every ``--every`` steps, so its share of a step is at most
``measure / (every x head step)``; a real step also runs the backbone, so its true share is
smaller. ::

    python scripts/bench_collapse_monitor.py                 # paper and small, T = 256, 512
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from solo_deepfusion.heads import PRESETS, build_projector
from solo_deepfusion.heads.diagnostics import collapse_stats


def median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--presets", nargs="+", default=["paper", "small"], choices=PRESETS)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print(f"| head | T | measure | head step | share of a step at every={args.every} (bound) |")
    print("|---|---|---|---|---|")
    for preset in args.presets:
        for tokens in args.tokens:
            torch.manual_seed(0)
            head = build_projector("transformer", 512, 2048, 256, preset=preset)
            x = torch.randn(tokens, 512)

            def step(head=head, x=x) -> None:
                head.zero_grad(set_to_none=True)
                head(x, num_views=2).square().mean().backward()

            def measure(head=head, x=x) -> None:
                collapse_stats(head, x, num_views=2)

            t_measure = median_seconds(measure, args.repeats)
            t_step = median_seconds(step, args.repeats)
            share = t_measure / (args.every * t_step)
            print(
                f"| {preset} | {tokens} | {t_measure * 1e3:.1f} ms | {t_step * 1e3:.1f} ms "
                f"| {share:.2%} |"
            )


if __name__ == "__main__":
    main()
