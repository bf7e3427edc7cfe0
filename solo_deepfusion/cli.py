"""``solo-deepfusion <command>``: one console script for every job.

Commands that need solo-learn import it only when they run, so ``demo``, ``zoo``,
``bench-report``, ``--version`` and the help of ``pretrain`` and ``linear`` work without the
host (and in about a second). Errors become exit codes in :func:`~solo_deepfusion.errors.
exit_status`, which the commands call themselves; no command module imports this one.
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap
import warnings
from collections.abc import Callable, Sequence

from solo_deepfusion import __version__
from solo_deepfusion.errors import UsageError, exit_status

# command -> (module, function taking the remaining argv, help)
HOST_COMMANDS: dict[str, tuple[str, str, str]] = {
    "pretrain": ("solo_deepfusion.solo.launch", "pretrain", "pretrain with a solo-learn recipe"),
    "linear": ("solo_deepfusion.solo.evaluate", "linear", "offline linear eval of a backbone"),
    "knn": ("solo_deepfusion.solo.evaluate", "knn", "kNN on backbone and projector features"),
    "fusion": ("solo_deepfusion.solo.analysis", "main", "Deep Fusion analysis of a checkpoint"),
    "bench": ("solo_deepfusion.solo.bench", "main", "transformer vs MLP head: a matched grid"),
}

#: Warnings that solo-learn's dependencies raise on import and a user can do nothing about:
#: (category, message regex, module regex of where it is raised; "" = any).
THIRD_PARTY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # setuptools, imported by lightning and torchmetrics
    (UserWarning, r"pkg_resources is deprecated as an API", ""),
    (DeprecationWarning, r"pkg_resources is deprecated as an API", ""),
    # timm's moved modules, imported by solo-learn
    (FutureWarning, r"Importing from timm\.", r"timm\."),
    # solo-learn re-registers timm's convnext_* and poolformer_* models
    (UserWarning, r"Overwriting \w+ in registry", r"solo\.backbones\."),
    # torch.cuda.amp.custom_fwd in solo-learn's whitening layers
    (FutureWarning, r"`torch\.cuda\.amp\.custom_(fwd|bwd)\(args\.\.\.\)` is deprecated", r"solo\."),
)


def quiet_third_party_warnings() -> None:
    """Ignore :data:`THIRD_PARTY_WARNINGS`, each by category, message and module; every other
    warning, this project's own included, is shown as before."""
    for category, message, module in THIRD_PARTY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)


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


# ---------------------------------------------------------------------------------------------
# Help of the Hydra-style launchers, without importing solo-learn

_OVERRIDES = """\
overrides: any recipe key as key=value (Hydra syntax), after the options, e.g.
  optimizer.batch_size=128 max_epochs=20 data.train_path=/data/cifar10/train
  ++key=value adds a key the recipe lacks; ~key deletes one."""


def _projector_lines() -> str:
    """The registered heads and the transformer's presets (imports torch, not solo-learn)."""
    from solo_deepfusion.heads import DEFAULT_PRESET, PRESETS, list_projectors

    presets = [
        f"{DEFAULT_PRESET} (the default; cosine_tied under SimCLR, stable_centred under VICReg)"
    ]
    presets += [name for name in PRESETS if name != DEFAULT_PRESET]
    lines = [
        f"heads (--projector): {', '.join(list_projectors())}",
        f"transformer presets (projector.preset=NAME): {', '.join(presets)}",
        "head fields: projector.<field>=value, e.g. projector.depth=6 projector.lr_scale=0.1",
    ]
    return "\n".join(textwrap.fill(line, 88, subsequent_indent="  ") for line in lines)


def _help_parser(command: str, usage: str, description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=f"solo-deepfusion {command}",
        usage=f"%(prog)s {usage}",
        description=textwrap.fill(description, 88, break_on_hyphens=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add = parser.add_argument
    add("--config-path", "-cp", metavar="DIR", help="recipe folder (default: the packaged ones)")
    add("--config-name", "-cn", metavar="NAME", help="recipe in that folder, e.g. simclr.yaml")
    return parser


def _cfg_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cfg", metavar="job", help="print the composed config and exit")


def launcher_help(command: str) -> str:
    """``--help`` of ``pretrain`` or ``linear``."""
    if command == "pretrain":
        parser = _help_parser(
            command,
            "[--config-path DIR] --config-name NAME [--projector HEAD] [--cfg job] [key=value ...]",
            "Pretrain with a solo-learn recipe, its projection head replaced by HEAD. Packaged "
            "recipe: cifar10_quick (SimCLR, sized for a CPU); solo-learn's own recipes are in "
            "<solo-learn>/scripts/pretrain/.",
        )
        parser.add_argument(
            "--projector",
            metavar="HEAD",
            help="the head (below); also projector=HEAD. Default: the recipe's, else mlp "
            "(the stock method)",
        )
        _cfg_option(parser)
        parser.epilog = (
            f"{_projector_lines()}\n{_OVERRIDES}\n\nexamples:\n"
            "  SOLO_DEEPFUSION_DATA=<cifar10 folder> solo-deepfusion pretrain \\\n"
            "      --config-name cifar10_quick --projector transformer\n"
            "  solo-deepfusion pretrain --config-path <solo-learn>/scripts/pretrain/cifar \\\n"
            "      --config-name byol.yaml --projector transformer projector.depth=6 \\\n"
            "      data.train_path=<folder> data.val_path=<folder>\n\n"
            "A run ends by printing its folder and the knn, linear and fusion commands for it."
        )
        return parser.format_help()
    parser = _help_parser(
        command,
        "[--config-path DIR] --config-name NAME pretrained_feature_extractor=RUN "
        "[--cfg job] [key=value ...]",
        "Offline linear evaluation: a linear classifier on the frozen backbone of a pretraining "
        "run (RUN: its folder, or one .ckpt in it); the backbone comes from the run's "
        "args.json. Packaged recipe: cifar10_linear_quick; solo-learn's own recipes are in "
        "<solo-learn>/scripts/linear/.",
    )
    parser.add_argument("--output-json", metavar="FILE", help="also write the results here")
    _cfg_option(parser)
    parser.epilog = (
        f"{_OVERRIDES}\n\nexamples:\n"
        "  SOLO_DEEPFUSION_DATA=<cifar10 folder> solo-deepfusion linear \\\n"
        "      --config-name cifar10_linear_quick \\\n"
        "      pretrained_feature_extractor=trained_models/simclr_transformer/<version>\n"
        "  solo-deepfusion linear --config-name cifar10_linear_quick \\\n"
        "      pretrained_feature_extractor=<run> max_epochs=20 --output-json linear.json"
    )
    return parser.format_help()


def _wants_help(argv: Sequence[str]) -> bool:
    return any(arg in ("-h", "--help") for arg in argv)


def split_cfg_job(argv: Sequence[str]) -> tuple[bool, list[str]]:
    """``argv`` without Hydra's ``--cfg job`` (also ``--cfg=job``, ``-c job``); whether it was
    there. Hydra's other ``--cfg`` values are a :class:`UsageError`."""
    rest: list[str] = []
    found = False
    args = iter(argv)
    for arg in args:
        if arg in ("--cfg", "-c"):
            value = next(args, "")
        elif arg.startswith("--cfg="):
            value = arg.removeprefix("--cfg=")
        else:
            rest.append(arg)
            continue
        if value != "job":
            raise UsageError(f"--cfg {value or '(no value)'}: only --cfg job is supported")
        found = True
    return found, rest


def _print_config(command: str, argv: Sequence[str]) -> None:
    """Compose ``command``'s config as a run would, and print it (nothing is trained)."""
    from omegaconf import OmegaConf

    if command == "pretrain":
        from solo_deepfusion.solo.launch import pretrain_config

        cfg = pretrain_config(argv)
    else:
        from solo_deepfusion.solo.evaluate import linear_config

        cfg = linear_config(argv)[0]
    print(OmegaConf.to_yaml(cfg), end="")


def _host_command(name: str) -> Callable[[Sequence[str]], int]:
    module, function, _ = HOST_COMMANDS[name]
    try:
        return getattr(importlib.import_module(module), function)
    except ImportError as error:
        raise SystemExit(f"solo-deepfusion {name}: {error}") from error


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    quiet_third_party_warnings()
    parser = argparse.ArgumentParser(
        prog="solo-deepfusion",
        description="Deep Fusion transformer projection heads for solo-learn.",
        epilog="`solo-deepfusion <command> --help` shows a command's options and examples.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    for name, (_, _, text) in HOST_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    for name, (_, text) in LOCAL_COMMANDS.items():
        commands.add_parser(name, help=text, add_help=False)
    args, rest = parser.parse_known_args(argv[:1])
    rest += argv[1:]
    if args.command in LOCAL_COMMANDS:
        return LOCAL_COMMANDS[args.command][0](rest)
    if args.command in ("pretrain", "linear"):
        if _wants_help(rest):
            print(launcher_help(args.command), end="")
            return 0

        def run() -> int:
            cfg_job, options = split_cfg_job(rest)
            if not cfg_job:
                return _host_command(args.command)(options)
            _print_config(args.command, options)
            return 0

        return exit_status(run)
    return int(_host_command(args.command)(rest) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
