"""``solo-deepfusion zoo``: list, inspect, download, verify and export zoo checkpoints.

    solo-deepfusion zoo list
    solo-deepfusion zoo info simclr-deepfusion-r18-cifar10-cpu
    solo-deepfusion zoo download NAME [--role backbone|full|args] [--cache-dir DIR] [--offline]
    solo-deepfusion zoo verify [NAME]
    solo-deepfusion zoo export NAME DIR     # DIR/<method>/{NAME.ckpt, args.json} for solo-learn

Every command takes ``--manifest PATH`` (default: ``$SOLO_DEEPFUSION_ZOO_MANIFEST`` or the repo's
``zoo/manifest.yaml``). Exit status: 0 done, 1 failed (unknown entry, download error, a corrupted
cached file, solo-learn missing for ``export``), 2 bad command line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from solo_deepfusion._host import host_problem
from solo_deepfusion.errors import UsageError, exit_status

from .download import check_deadline, download
from .errors import ZooError
from .manifest import ROLES, Metric, ZooEntry, get_entry, load_manifest
from .verify import verify

_KIND_LABELS = {
    "online_linear": "online",
    "offline_linear": "linear",
    "fusion_ratio": "fusion",
    "loo_1nn": "1nn",
}


def human_size(n: int) -> str:
    """``1536`` → ``'1.5 KiB'``."""
    size = float(n)
    for unit in ("B", "KiB", "MiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} GiB"


def metric_label(m: Metric) -> str:
    """``knn@200 acc1=85.3``, ``linear acc1=88.1``: the protocol's kind (and k), then the value."""
    kind = _KIND_LABELS.get(m.kind, m.kind)
    if "k" in m.protocol:
        kind += f"@{m.protocol['k']}"
    return f"{kind} {m.name}={m.value:g}"


def _row(entry: ZooEntry) -> list[str]:
    projector = entry.projector.get("name", "?")
    if entry.projector.get("preset"):
        projector += f"/{entry.projector['preset']}"
    return [
        entry.name,
        entry.method,
        projector,
        f"{entry.backbone.get('name', '?')}/{entry.backbone.get('stem', '?')}",
        entry.dataset,
        str(entry.epochs),
        ", ".join(metric_label(m) for m in entry.metrics),
        human_size(sum(f.size for f in entry.files)),
    ]


def aligned_columns(rows: list[list[str]]) -> str:
    """Left-aligned columns separated by two spaces."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in rows
    )


def entry_document(entry: ZooEntry) -> dict[str, Any]:
    """An entry as the plain mapping ``info`` prints (manifest fields, sizes made readable, the
    model card's path where there is one)."""
    card = Path(entry.manifest_dir or ".") / "cards" / f"{entry.name}.md"
    return {
        "name": entry.name,
        "method": entry.method,
        "projector": entry.projector,
        "backbone": entry.backbone,
        "preprocessing": entry.preprocessing or "not recorded",
        "dataset": entry.dataset,
        "epochs": entry.epochs,
        "recipe": entry.recipe,
        "metrics": [
            {"name": m.name, "value": m.value, "protocol": m.protocol} for m in entry.metrics
        ],
        "params": entry.params,
        "files": [
            {
                "role": f.role,
                "filename": f.filename,
                "size": f"{f.size} ({human_size(f.size)})",
                "sha256": f.sha256,
                "urls": list(f.urls),
            }
            for f in entry.files
        ],
        "license": entry.license,
        "date": entry.date,
        "code_commit": entry.code_commit,
        **({"card": str(card)} if card.is_file() else {}),
    }


# ----------------------------------------------------------------------------- commands


def cmd_list(args: argparse.Namespace) -> int:
    entries = list(load_manifest(args.manifest).values())
    if not entries:
        print("the zoo is empty")
        return 0
    header = ["NAME", "METHOD", "PROJECTOR", "BACKBONE", "DATASET", "EPOCHS", "METRICS", "SIZE"]
    print(aligned_columns([header, *(_row(e) for e in entries)]))
    return 0


def cmd_info(args: argparse.Namespace) -> int:
    doc = entry_document(get_entry(args.name, args.manifest))
    print(yaml.safe_dump(doc, sort_keys=False, default_flow_style=None, width=100), end="")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    path = download(
        args.name,
        role=args.role,
        cache_dir=args.cache_dir,
        offline=True if args.offline else None,
        manifest=args.manifest,
        deadline_s=args.deadline,
    )
    print(path)
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    results = verify(args.name, args.cache_dir, manifest=args.manifest)
    for result in results:
        print(result)
    counts = {s: sum(r.status == s for r in results) for s in ("ok", "missing", "corrupted")}
    print(", ".join(f"{n} {s}" for s, n in counts.items()))
    return 1 if counts["corrupted"] else 0


def cmd_export(args: argparse.Namespace) -> int:
    problem = host_problem()
    if problem is not None:
        print(f"error: `zoo export` needs solo-learn. {problem}", file=sys.stderr)
        return 1
    from solo_deepfusion.solo.zoo import export_solo

    folder = export_solo(
        args.name,
        args.dir,
        cache_dir=args.cache_dir,
        offline=True if args.offline else None,
        manifest=args.manifest,
    )
    print(folder)
    return 0


def _seconds(text: str) -> float:
    """``--deadline``: a number of seconds > 0."""
    try:
        return check_deadline(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds > 0, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    """The ``solo-deepfusion zoo`` argument parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--manifest", type=Path, help="manifest.yaml to read")
    cache = argparse.ArgumentParser(add_help=False)
    cache.add_argument("--cache-dir", type=Path, help="default: $SOLO_DEEPFUSION_CACHE or ~/.cache")
    offline = argparse.ArgumentParser(add_help=False)
    offline.add_argument("--offline", action="store_true", help="use the cache only")

    parser = argparse.ArgumentParser(
        prog="solo-deepfusion zoo", description="Pretrained checkpoints of the solo-deepfusion zoo."
    )
    sub = parser.add_subparsers(dest="command", metavar="<command>", required=True)
    p = sub.add_parser("list", parents=[common], help="one line per entry")
    p.set_defaults(func=cmd_list)
    p = sub.add_parser("info", parents=[common], help="everything the manifest says of an entry")
    p.add_argument("name")
    p.set_defaults(func=cmd_info)
    p = sub.add_parser(
        "download", parents=[common, cache, offline], help="fetch and verify a file, print its path"
    )
    p.add_argument("name")
    p.add_argument("--role", choices=ROLES, default="backbone")
    p.add_argument(
        "--deadline",
        type=_seconds,
        metavar="SECONDS",
        help="wall-clock time per mirror, stalls included, before the next one is tried "
        "(default: $SOLO_DEEPFUSION_DOWNLOAD_DEADLINE, else 120 s + 4 s per MiB)",
    )
    p.set_defaults(func=cmd_download)
    p = sub.add_parser(
        "verify", parents=[common, cache], help="check cached files: ok / missing / corrupted"
    )
    p.add_argument("name", nargs="?")
    p.set_defaults(func=cmd_verify)
    p = sub.add_parser(
        "export",
        parents=[common, cache, offline],
        help="write DIR/<method>/{NAME.ckpt, args.json} for solo-learn's main_linear / main_knn",
    )
    p.add_argument("name")
    p.add_argument("dir", type=Path)
    p.set_defaults(func=cmd_export)
    return parser


def _folder_problem(args: argparse.Namespace) -> str | None:
    """Why a folder named on the command line cannot be one (it is a file), or ``None``."""
    for option, path in (
        ("--cache-dir", getattr(args, "cache_dir", None)),
        ("DIR", getattr(args, "dir", None)),
    ):
        if path is not None and path.exists() and not path.is_dir():
            return f"{option} {path} is a file, not a folder"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``solo-deepfusion zoo <argv>``; returns the exit status."""
    parser = build_parser()
    try:
        args = parser.parse_args(sys.argv[1:] if argv is None else list(argv))
    except SystemExit as exit_:  # --help, or a usage error argparse already printed
        return 0 if exit_.code is None else int(exit_.code)
    return exit_status(lambda: _run(parser, args))


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    """A bad folder argument is a usage error (2); a zoo, file or disk failure returns 1."""
    problem = _folder_problem(args)
    if problem is not None:
        raise UsageError(f"{parser.prog}: {problem}")
    try:
        return args.func(args)
    except (ZooError, ValueError, OSError) as err:  # OSError: FileExistsError, a full disk ...
        print(f"error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
