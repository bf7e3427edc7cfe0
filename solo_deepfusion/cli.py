"""``solo-deepfusion <command>``: one console script for every job.

Commands that need solo-learn import it only when they run, so ``demo`` and ``zoo`` work
without the host.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any

from solo_deepfusion.errors import UsageError

# command -> (module, function taking the remaining argv, help)
HOST_COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("solo_deepfusion.solo.launch", "pretrain", "pretrain with a solo-learn recipe"),
    "linear": ("solo_deepfusion.solo.evaluate", "linear", "offline linear eval of a backbone"),
    "knn": ("solo_deepfusion.solo.evaluate", "knn", "kNN on backbone and projector features"),
    "fusion": ("solo_deepfusion.solo.analysis", "main", "Deep Fusion analysis of a checkpoint"),
    "bench": ("solo_deepfusion.solo.bench", "main", "transformer vs MLP head: a matched grid"),
}


def _demo(argv: Sequence[str]) -> int:
    from solo_deepfusion.demo import main

    return main(list(argv))


def _zoo(argv: Sequence[str]) -> int:
    from solo_deepfusion.hub.cli import main

    return main(list(argv))


def _bench_report(argv: Sequence[str]) -> int:
    from solo_deepfusion.bench.report import main

    return main(list(argv))


LOCAL_COMMANDS: dict[str, tuple[Callable[[Sequence[str]], int], str]] = {
    "demo": (_demo, "run the transformer head on a synthetic batch, print its attention"),
    "zoo": (_zoo, "list, download, verify and export pretrained checkpoints"),
    "bench-report": (_bench_report, "tables and plot of bench results (no solo-learn needed)"),
}


def exit_status(command: Callable[[], Any]) -> int:
    """Run ``command``; the one place errors become exit codes.

    2 with a one-line ``error:`` for a :class:`~solo_deepfusion.errors.UsageError` (bad
    command line, recipe or input); else the status ``command`` returned, 1 for an
    interrupted Lightning trainer, 0 otherwise.
    """
    try:
        result = command()
    except UsageError as err:
        print(f"error: {err.one_line()}", file=sys.stderr)
        return 2
    if isinstance(result, int) and not isinstance(result, bool):
        return result
    return 1 if getattr(result, "interrupted", False) else 0


def _host_command(name: str) -> Callable[[Sequence[str]], int]:
    module, function, _ = HOST_COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as error:
        raise SystemExit(f"solo-deepfusion {name}: {error}") from error


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="solo-deepfusion",
        description="Deep Fusion transformer projection heads for solo-learn.",
    )
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, _, text) in HOST_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    for name, (_, text) in LOCAL_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    rest += argv[1:]
    if args.command in LOCAL_COMMANDS:
        return LOCAL_COMMANDS[args.command][0](rest)
    return int(_host_command(args.command)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
