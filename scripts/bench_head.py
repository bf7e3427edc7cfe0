"""Benchmark the Deep Fusion transformer head against solo-learn's MLP head and a ResNet-18 step.

For every token count ``T`` (= rows of the batch fed to the projector: 2 views x T/2 samples)
this measures one training step (forward + backward, median over ``--repeats`` after
``--warmup``) and its memory for:

* ``resnet18``: a torchvision ResNet-18 on ``T`` images (2 views x T/2 samples; the stem is
  solo-learn's CIFAR one by default: 3x3 stride-1 ``conv1`` with padding 2, no max-pool, ``fc``
  removed, 32x32 inputs; ``--stem imagenet`` keeps the 7x7 stem and uses 224x224 inputs;
  ``--image-size 32`` with it is the authors' CIFAR setting and the CPU studies');
* ``mlp``: solo-learn's SimCLR projector ``Linear(512, 2048)-ReLU-Linear(2048, 256)`` (the
  widths: ``--hidden-dim``, ``--out-dim``; ``512 128`` is ``cifar10_quick``'s);
* ``transformer[preset]``: ``build_projector("transformer", 512, 2048, 256, preset=...)`` with
  ``num_views=2`` and no attention maps (SDPA), and, for contrast, ``...+maps`` with
  ``return_attention=True``, which materialises the ``(heads, T, T)`` maps of every layer;
* ``--heads``: any registered head, ``name`` or ``name:key=value,...`` (``residual_mlp``,
  ``residual_mlp:depth=4``), built as ``build_projector(name, 512, 2048, 256, **fields)``. A head
  whose forward takes ``num_views`` gets ``num_views=2``; a per-sample one runs on all ``T`` rows.

``x mlp`` is each row's step time over the ``mlp`` row's at the same ``T``, measured in the same
run. The last column is what swapping the MLP for the head adds to a step of backbone + MLP
head: ``(t_head - t_mlp) / (t_resnet + t_mlp)``.

Memory is, on CUDA, ``torch.cuda.max_memory_allocated`` during the step minus what was allocated
before it (parameters and inputs); on CPU it is the activation memory saved for backward: the
bytes of the unique storages that autograd saves during the forward (found with
``torch.autograd.graph.saved_tensors_hooks``), parameters and the input excluded. Linear growth in
``T`` shows as a constant "MB per token" and a log-log slope of 1 in the footer.

Usage::

    python scripts/bench_head.py                                  # CPU-sized defaults
    python scripts/bench_head.py --device cuda --dtype bfloat16 --json bench.json
    python scripts/bench_head.py --tokens 512 --presets paper --repeats 10 --skip-resnet
    python scripts/bench_head.py --tokens 256 --presets stable_bn --heads residual_mlp --skip-resnet

On CPU the ResNet step is run on at most ``--resnet-max-batch`` images (default 256; no limit on
CUDA) and its time and memory are scaled linearly to ``T`` images; such rows are marked ``*``.
The ``+maps`` rows run only for ``T <= --maps-max-tokens`` (default 1024 on CPU, all on CUDA).
Per-row progress, with the load average (other processes skew CPU timings), goes to stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from solo_deepfusion.atomic import write_json
from solo_deepfusion.devices import resolve_device
from solo_deepfusion.errors import UsageError
from solo_deepfusion.heads import (
    PRESETS,
    build_projector,
    count_flops,
    count_parameters,
    forward_flops,
    list_projectors,
)
from solo_deepfusion.heads.cost import (
    Forward,
    make_step,
    meta_copy,
    step_memory,
    takes_num_views,
    time_step,
)
from solo_deepfusion.hub.backbones import build_resnet

IN_DIM, NUM_VIEWS = 512, 2
CPU_RESNET_MAX_BATCH = 256
CPU_MAPS_MAX_TOKENS = 1024
MB = 1024**2


@dataclass
class Row:
    """One line of the table."""

    tokens: int
    head: str
    params: int
    fwd_flops: int
    ms: float
    mem_bytes: int
    ms_min: float | None = None
    pct: float | None = None
    vs_mlp: float | None = None  # ms / the mlp row's ms at the same T
    images: int | None = None  # ResNet only: images per step
    scaled_from: int | None = None  # ResNet only: the images actually run, when scaled


@dataclass(frozen=True)
class HeadSpec:
    """A ``--heads`` entry: its text (the row's label), the registered head and its fields."""

    label: str
    name: str
    fields: dict[str, Any]


def head_spec(text: str) -> HeadSpec:
    """``name`` or ``name:key=value,...``; a value is read as JSON where it parses (``4``,
    ``0.1``, ``true``), else kept as text (``batch``)."""
    name, _, rest = text.partition(":")
    if name not in list_projectors():
        raise argparse.ArgumentTypeError(f"unknown head {name!r}; choose from {list_projectors()}")
    fields: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise argparse.ArgumentTypeError(f"{item!r} in {text!r}: expected key=value")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError:
            fields[key] = value
    return HeadSpec(text, name, fields)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, nargs="+", default=[256, 512, 1024, 2048, 4096])
    p.add_argument("--presets", nargs="+", default=["paper", "small"], choices=sorted(PRESETS))
    p.add_argument(
        "--heads",
        nargs="+",
        type=head_spec,
        default=[],
        help="registered heads to add, NAME or NAME:key=value,... (e.g. residual_mlp:depth=4)",
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument(
        "--resnet-batch",
        type=int,
        default=None,
        help="samples per ResNet step, each with 2 views (default T/2, i.e. T images)",
    )
    p.add_argument(
        "--resnet-max-batch",
        type=int,
        default=None,
        help=f"run at most this many images and scale linearly "
        f"(default {CPU_RESNET_MAX_BATCH} on CPU, no limit on CUDA; 0 = no limit)",
    )
    p.add_argument(
        "--maps-max-tokens",
        type=int,
        default=None,
        help=f"largest T for the return_attention=True rows "
        f"(default {CPU_MAPS_MAX_TOKENS} on CPU, no limit on CUDA; 0 = skip them)",
    )
    p.add_argument("--stem", default="cifar", choices=["cifar", "imagenet"])
    p.add_argument("--image-size", type=int, help="ResNet input size (default: the stem's own)")
    p.add_argument(
        "--hidden-dim", type=int, default=2048, help="the recipe's proj_hidden_dim (mlp's width)"
    )
    p.add_argument("--out-dim", type=int, default=256, help="the recipe's proj_output_dim")
    p.add_argument("--skip-resnet", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        p.error("--repeats must be >= 1 and --warmup >= 0")
    if any(t < NUM_VIEWS or t % NUM_VIEWS for t in args.tokens):
        p.error(f"every --tokens value must be a positive multiple of {NUM_VIEWS}")
    return args


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def autocast(device: torch.device, dtype: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` for ``--dtype bfloat16``; parameters stay float32."""
    if dtype == "bfloat16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def input_size(stem: str, size: int | None = None) -> int:
    """The ResNet input: ``size`` px, else the stem's own (224 ``imagenet``, 32 ``cifar``)."""
    return size or (224 if stem == "imagenet" else 32)


def resnet18(stem: str, size: int | None = None) -> tuple[nn.Module, int]:
    """solo-learn's ResNet-18 backbone (512-d features) and its input size."""
    return build_resnet("resnet18", stem), input_size(stem, size)


def head_flops(head: nn.Module, tokens: int) -> int:
    try:
        return forward_flops(meta_copy(head), tokens, num_views=NUM_VIEWS)
    except (RuntimeError, NotImplementedError):
        return forward_flops(head, tokens, num_views=NUM_VIEWS)


def resnet_flops(model: nn.Module, images: int, size: int) -> int:
    clone = meta_copy(model)
    return count_flops(lambda: clone(torch.empty(images, 3, size, size, device="meta")))


def measure(
    module: nn.Module,
    forward: Forward,
    inputs: torch.Tensor,
    args: argparse.Namespace,
    device: torch.device,
) -> tuple[float, float, int]:
    """``(median ms, min ms, memory bytes)`` of fwd+bwd; memory is the CUDA peak on GPU and the
    activations saved for backward on CPU."""
    amp = functools.partial(autocast, device, args.dtype)
    saved, peak = step_memory(module, forward, inputs, amp)
    times = time_step(make_step(module, forward, inputs, amp), device, args.repeats, args.warmup)
    return statistics.median(times), min(times), peak if device.type == "cuda" else saved


def bench_resnet(
    tokens: int, args: argparse.Namespace, device: torch.device, cache: dict[int, Row]
) -> Row:
    """ResNet-18 step on ``tokens`` images (run on at most ``--resnet-max-batch``, scaled)."""
    images = NUM_VIEWS * args.resnet_batch if args.resnet_batch else tokens
    cap = args.resnet_max_batch
    run = min(images, cap) if cap else images
    if run not in cache:
        model, size = resnet18(args.stem, args.image_size)
        model = model.to(device).train()
        x = torch.randn(run, 3, size, size, device=device, requires_grad=False)
        ms, ms_min, mem = measure(model, lambda: model(x), x, args, device)
        flops = resnet_flops(model, run, size)
        cache[run] = Row(run, "resnet18", count_parameters(model), flops, ms, mem, ms_min)
        del model, x
    base = cache[run]
    scale = images / run
    return Row(
        tokens,
        "resnet18",
        base.params,
        round(base.fwd_flops * scale),
        base.ms * scale,
        round(base.mem_bytes * scale),
        ms_min=base.ms_min * scale if base.ms_min is not None else None,
        images=images,
        scaled_from=run if run != images else None,
    )


def head_forward(head: nn.Module, x: torch.Tensor, maps: bool) -> Forward:
    """The head's forward on ``x``: 2 views for a head that takes them, maps dropped after use."""

    def forward() -> torch.Tensor:
        if not takes_num_views(head):
            return head(x)
        if maps:
            return head(x, num_views=NUM_VIEWS, return_attention=True)[0]
        return head(x, num_views=NUM_VIEWS)

    return forward


def bench_head(
    name: str,
    head: nn.Module,
    tokens: int,
    args: argparse.Namespace,
    device: torch.device,
    maps: bool = False,
) -> Row:
    """A head's step on ``tokens`` random 512-d features (view-major, 2 views)."""
    head = head.to(device).train()
    x = torch.randn(tokens, IN_DIM, device=device, requires_grad=True)
    ms, ms_min, mem = measure(head, head_forward(head, x, maps), x, args, device)
    label = f"{name}+maps" if maps else name
    flops = head_flops(head, tokens)
    return Row(tokens, label, count_parameters(head), flops, ms, mem, ms_min)


def added_fraction(row: Row, mlp: Row, resnet: Row | None) -> float | None:
    """``(t_head - t_mlp) / (t_resnet + t_mlp)``; for the MLP row itself ``t_mlp / t_resnet``."""
    if resnet is None:
        return None
    if row is mlp:
        return mlp.ms / resnet.ms
    return (row.ms - mlp.ms) / (resnet.ms + mlp.ms)


def bench_tokens(
    tokens: int,
    args: argparse.Namespace,
    device: torch.device,
    cache: dict[int, Row],
    started: float,
) -> list[Row]:
    """Every row for one ``T``: resnet18, mlp, each preset without and with maps, then each of
    ``--heads``."""
    torch.manual_seed(0)
    rows: list[Row] = []

    def add(row: Row) -> Row:
        rows.append(row)
        progress(row, started)
        return row

    resnet = None if args.skip_resnet else add(bench_resnet(tokens, args, device, cache))
    dims = IN_DIM, args.hidden_dim, args.out_dim
    mlp_head = build_projector("mlp", *dims)
    mlp = add(bench_head("mlp", mlp_head, tokens, args, device))
    for preset in args.presets:
        head = build_projector("transformer", *dims, preset=preset)
        name = f"transformer[{preset}]"
        add(bench_head(name, head, tokens, args, device))
        if args.maps_max_tokens and tokens <= args.maps_max_tokens:
            add(bench_head(name, head, tokens, args, device, maps=True))
        del head
    for spec in args.heads:
        head = build_projector(spec.name, *dims, **spec.fields)
        add(bench_head(spec.label, head, tokens, args, device))
        del head
    for row in rows:
        if row is not resnet:
            row.pct = added_fraction(row, mlp, resnet)
            row.vs_mlp = row.ms / mlp.ms
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return rows


def loglog_slope(points: list[tuple[int, float]]) -> float | None:
    """Least-squares slope of log(y) against log(T): 1 = linear, 2 = quadratic."""
    pts = [(math.log(t), math.log(y)) for t, y in points if y > 0]
    if len(pts) < 2:
        return None
    mx = statistics.fmean(p[0] for p in pts)
    my = statistics.fmean(p[1] for p in pts)
    var = sum((x - mx) ** 2 for x, _ in pts)
    return sum((x - mx) * (y - my) for x, y in pts) / var if var else None


def load_average() -> str:
    """The 1-minute load average and CPU count: other processes skew CPU timings."""
    try:
        return f"{os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs"
    except OSError:
        return "n/a"


def progress(row: Row, started: float) -> None:
    print(
        f"#   T={row.tokens} {row.head}: {row.ms:.1f} ms, {row.mem_bytes / MB:.1f} MB "
        f"({time.perf_counter() - started:.0f} s, load {load_average()})",
        file=sys.stderr,
        flush=True,
    )


def header(args: argparse.Namespace, device: torch.device) -> str:
    return (
        f"device={device.type} ({device_name(device)}), dtype={args.dtype}"
        f"{' (autocast)' if args.dtype == 'bfloat16' else ''}, torch {torch.__version__}, "
        f"torchvision {torchvision.__version__}, threads={torch.get_num_threads()}, "
        f"repeats={args.repeats} (median), warmup={args.warmup}, stem={args.stem}, "
        f"image size {input_size(args.stem, args.image_size)}, "
        f"load average {load_average()}"
    )


def format_row(row: Row) -> str:
    star = "*" if row.scaled_from else ""
    pct = "—" if row.pct is None else f"{100 * row.pct:+.2f}%"
    if row.head == "mlp" and row.pct is not None:
        pct = f"({100 * row.pct:.2f}%)"
    cells = [
        str(row.tokens),
        row.head + star,
        f"{row.params / 1e6:.2f}",
        f"{row.fwd_flops / 1e9:.2f}",
        f"{row.ms:.1f}{star}",
        "—" if row.vs_mlp is None else f"{row.vs_mlp:.2f}",
        f"{row.mem_bytes / MB:.1f}{star}",
        f"{row.mem_bytes / MB / row.tokens:.4f}",
        pct,
    ]
    return "| " + " | ".join(cells) + " |"


def table(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    cols = ["T", "head", "params (M)", "fwd GFLOPs", "fwd+bwd ms", "x mlp", "saved/peak MB"]
    cols.append("MB per token")
    cols.append("% of ResNet-18 step")
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += [format_row(r) for r in rows]
    return "\n".join(lines)


def footer(rows: list[Row], args: argparse.Namespace, device: torch.device) -> str:
    images = f"2 x {args.resnet_batch} images (--resnet-batch)" if args.resnet_batch else "T images"
    if args.skip_resnet:
        images = "nothing (--skip-resnet)"
    notes = [
        f"T = tokens = 2 views x T/2 samples; resnet18 on {images}.",
        "x mlp: fwd+bwd time over the mlp row's at the same T, in this run.",
        "% of ResNet-18 step: head rows = (t_head - t_mlp) / (t_resnet18 + t_mlp), what "
        "replacing the MLP adds to a step; mlp row in brackets = t_mlp / t_resnet18.",
    ]
    if device.type == "cuda":
        notes.append(
            "saved/peak MB = peak: torch.cuda.max_memory_allocated during fwd+bwd minus the "
            "allocation before it (params, inputs); includes parameter gradients and transients."
        )
    else:
        notes.append(
            "saved/peak MB = saved: activation memory saved for backward, i.e. unique storages "
            "packed by autograd (saved_tensors_hooks), params and input features excluded; "
            "transient buffers are not counted."
        )
    scaled = sorted({r.scaled_from for r in rows if r.scaled_from})
    if scaled:
        per = next(r for r in rows if r.scaled_from)
        per_img = per.ms / (per.images or per.tokens)
        notes.append(
            f"* resnet18 run on {', '.join(map(str, scaled))} images (--resnet-max-batch) and "
            f"time, memory, FLOPs scaled linearly to the step's images ({per_img:.2f} ms/image)."
        )
    if args.maps_max_tokens:
        notes.append(
            f"+maps = return_attention=True (materialises (heads,T,T) per layer); "
            f"run for T <= {args.maps_max_tokens} (--maps-max-tokens)."
        )
    slopes = []
    for head in dict.fromkeys(r.head for r in rows):
        pts = [(r.tokens, r.mem_bytes) for r in rows if r.head == head]
        slope = loglog_slope(pts)
        if slope is not None:
            slopes.append(f"{head} {slope:.2f}")
    for head in dict.fromkeys(r.head for r in rows if r.head.endswith("+maps")):
        plain = {r.tokens: r.mem_bytes for r in rows if r.head == head.removesuffix("+maps")}
        extra = [(r.tokens, r.mem_bytes - plain[r.tokens]) for r in rows if r.head == head]
        slope = loglog_slope(extra)
        if slope is not None:
            slopes.append(f"{head} minus {head.removesuffix('+maps')} {slope:.2f}")
    if slopes:
        notes.append(
            "memory growth, log-log slope vs T (1 = linear, 2 = quadratic): " + ", ".join(slopes)
        )
    return "\n".join(f"- {n}" for n in notes)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = resolve_device(args.device)
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None
    cpu = device.type == "cpu"
    if args.resnet_max_batch is None:
        args.resnet_max_batch = CPU_RESNET_MAX_BATCH if cpu else 0
    if args.maps_max_tokens is None:
        args.maps_max_tokens = CPU_MAPS_MAX_TOKENS if cpu else max(args.tokens)
    print(f"# bench_head: {header(args, device)}", flush=True)
    cache: dict[int, Row] = {}
    rows: list[Row] = []
    started = time.perf_counter()
    for tokens in sorted(args.tokens):
        rows += bench_tokens(tokens, args, device, cache, started)
    print()
    print(table(rows, args, device))
    print()
    print(footer(rows, args, device))
    elapsed = time.perf_counter() - started
    print(f"- load average at the end: {load_average()}; wall time {elapsed:.0f} s")
    if args.json:
        payload = {
            "header": header(args, device),
            "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "memory": "cuda_peak" if device.type == "cuda" else "saved_for_backward",
            "rows": [asdict(r) for r in rows],
        }
        write_json(args.json, payload)
        print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
