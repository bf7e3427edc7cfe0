"""Build the model zoo: train each entry from its recipe, evaluate, export, record it.

For each entry ``zoo/recipes/<entry>.yaml``:

1. pretrain with the project's launcher (:func:`solo_deepfusion.solo.launch.run_pretrain`);
2. evaluate with :mod:`solo_deepfusion.solo.evaluate` (weighted k-NN on backbone features,
   offline linear probe with the packaged ``cifar10_linear_quick`` recipe), next to the online
   linear accuracy the run logged;
3. export the zoo files (:func:`solo_deepfusion.solo.zoo.export_checkpoint`) into
   ``<zoo>/files/<entry>/`` and measure their sizes and SHA-256;
4. write the manifest entry into ``<zoo>/manifest.yaml`` (validated, atomic), with the metrics
   and how they were measured, the preprocessing the backbone expects (solo-learn's evaluation
   transform of the dataset), parameter counts, date and ``git rev-parse HEAD``.

Usage::

    python scripts/build_zoo.py --data ~/data/cifar10      # every recipe, into zoo/
    python scripts/build_zoo.py simclr-r18-cifar10-cpu --url-base hf://org/zoo@main
    python scripts/build_zoo.py --check                     # retrain, compare, write nothing
    python scripts/build_zoo.py --smoke --work /tmp/z       # 1 epoch on 300 images, zoo in /tmp/z
    python scripts/build_zoo.py --from-bundle <dir>         # publish a GPU session's entries
    python scripts/build_zoo.py --preprocessing            # (re)record it, then the cards

``--from-bundle`` publishes what ``scripts/gpu_session.sh`` brought back (``cat bundle.tar.* |
tar -x -C <dir>``): each exported entry's full weights and args, and the record of the session's
cell that trained it. The backbone file is cut from the full one (the device returns 64 MiB at
most), the metrics are the cell's, and the code commit is the one the session ran.

``--data`` (or ``$SOLO_DEEPFUSION_DATA``) is a folder holding CIFAR-10 as ``train/`` and ``test/``
ImageFolders or as ``train.tar.gz``/``test.tar.gz`` (unpacked once into ``--work``). ``--smoke``
proves the pipeline end to end in minutes: its zoo goes to ``<work>/zoo``, never to the repo's.
Files get a relative URL (they sit next to the manifest) plus ``<url-base>/<entry>/<file>`` for
each ``--url-base``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from solo_deepfusion.atomic import write_text
from solo_deepfusion.datasets import DataPaths, prepare_data
from solo_deepfusion.errors import UsageError
from solo_deepfusion.hub import sha256_file
from solo_deepfusion.hub.publish import file_record, update_manifest
from solo_deepfusion.provenance import git_commit

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "zoo" / "recipes"
DATA_ENV = "SOLO_DEEPFUSION_DATA"
ROLES = ("backbone", "full", "args")
LINEAR_RECIPE = "cifar10_linear_quick"
KNN_K = (20, 200)
KNN_TEMPERATURE = 0.07
# Image size of datasets whose evaluation transform does not resize (solo-learn's CIFAR one).
NATIVE_SIZE = {"cifar10": 32, "cifar100": 32}
SMOKE_PER_CLASS = {"train": 30, "test": 10}
# --smoke: one epoch on the cut-down data (all of it: no fraction), validated once.
SMOKE_PRETRAIN = ["max_epochs=1", "data.fraction=-1", "check_val_every_n_epoch=1"]
SMOKE_LINEAR = ["max_epochs=1", "data.fraction=-1"]
# args.json values that only hold on the build machine -> the recipes' defaults
PORTABLE = {
    ("data", "train_path"): "datasets/cifar10/train",
    ("data", "val_path"): "datasets/cifar10/test",
    ("checkpoint", "dir"): "trained_models",
}


@dataclass
class Build:
    """What one entry's build produced."""

    name: str
    cfg: dict[str, Any]
    files: list[Path]
    metrics: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0


# ----------------------------------------------------------------------------- data


# ----------------------------------------------------------------------------- steps


def pretrain(entry: str, data: DataPaths, run_dir: Path, smoke: bool) -> tuple[Path, float | None]:
    """Train ``entry``'s recipe; the last checkpoint and the final online linear acc@1 (%)."""
    from solo.utils.checkpointer import Checkpointer

    from solo_deepfusion.solo.launch import run_pretrain

    argv = [
        "--config-path", str(RECIPES), "--config-name", entry,
        f"data.train_path={data.train}", f"data.val_path={data.val}",
        f"checkpoint.dir={run_dir}", "auto_resume.enabled=False", "wandb.enabled=False",
        *(SMOKE_PRETRAIN if smoke else []),
    ]  # fmt: skip
    trainer = run_pretrain(argv)
    if trainer.interrupted:
        raise SystemExit(f"{entry}: training was interrupted")
    (checkpointer,) = [c for c in trainer.callbacks if isinstance(c, Checkpointer)]
    online = trainer.callback_metrics.get("val_acc1")
    return Path(checkpointer.last_ckpt), None if online is None else float(online)


def knn_metrics(run: Path, data: DataPaths) -> list[dict[str, Any]]:
    """Weighted k-NN acc@1 (%) of the backbone features, test split, one metric per k."""
    from solo_deepfusion.solo.evaluate import run_knn

    argv = [
        "--checkpoint-dir", str(run),
        "--train-path", str(data.train), "--val-path", str(data.val),
        "--k", *map(str, KNN_K), "--temperature", str(KNN_TEMPERATURE),
        "--feature-type", "backbone", "--device", "cpu", "--num-workers", "2",
    ]  # fmt: skip
    results = run_knn(argv)
    return [
        metric(
            "acc1",
            row["acc1"],
            kind="knn",
            k=row["k"],
            temperature=row["temperature"],
            distance=row["distance"],
            feature=row["feature"],
            split="test",
            train_images=results["train_images"],
        )
        for row in results["results"]
    ]


def linear_metrics(run: Path, data: DataPaths, work: Path, smoke: bool) -> list[dict[str, Any]]:
    """Offline linear probe acc@1 (%) on the frozen backbone, packaged ``cifar10_linear_quick``."""
    from solo_deepfusion.solo.evaluate import run_linear

    argv = [
        "--config-name", LINEAR_RECIPE, f"pretrained_feature_extractor={run}",
        f"data.train_path={data.train}", f"data.val_path={data.val}",
        f"checkpoint.dir={work}", "auto_resume.enabled=False",
        *(SMOKE_LINEAR if smoke else []),
    ]  # fmt: skip
    results = run_linear(argv)
    return [
        metric(
            "acc1",
            results["acc1"],
            kind="offline_linear",
            epochs=results["epochs"],
            recipe=f"solo_deepfusion/configs/recipes/{LINEAR_RECIPE}.yaml",
            split="test",
        )
    ]


def metric(name: str, fraction: float, **protocol: Any) -> dict[str, Any]:
    """A manifest metric: the value in percent, the protocol without ``None`` fields."""
    clean = {k: v for k, v in protocol.items() if v is not None}
    return {"name": name, "value": round(100 * float(fraction), 2), "protocol": clean}


def evaluate(run: Path, data: DataPaths, work: Path, smoke: bool) -> list[dict[str, Any]]:
    """k-NN and linear metrics, or none (with a note) when the evaluation module is missing."""
    try:
        import solo_deepfusion.solo.evaluate  # noqa: F401
    except ImportError as err:
        print(f"note: skipping offline evaluation ({err})")
        return []
    return [*knn_metrics(run, data), *linear_metrics(run, data, work / "linear", smoke)]


def portable_args(run_args: Path, out: Path) -> Path:
    """The run's ``args.json`` without machine-specific values, written to ``out``.

    Data and checkpoint paths become the recipes' defaults and the run id is dropped, so a rebuild
    from the same recipe and commit gives byte-identical zoo files.
    """
    cfg = json.loads(run_args.read_text())
    for (section, key), value in PORTABLE.items():
        if key in (cfg.get(section) or {}):
            cfg[section][key] = value
    cfg.pop("wandb_run_id", None)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


# ----------------------------------------------------------------------------- manifest entry


def backbone_record(cfg: dict[str, Any]) -> dict[str, Any]:
    stem = cfg["backbone"].get("stem", "auto")
    if stem == "auto":  # solo-learn's own choice
        stem = "cifar" if cfg["data"]["dataset"] in ("cifar10", "cifar100") else "imagenet"
    return {"name": cfg["backbone"]["name"], "kwargs": cfg["backbone"]["kwargs"], "stem": stem}


def preprocessing_record(cfg: dict[str, Any]) -> dict[str, Any]:
    """What the backbone saw at evaluation: solo-learn's validation transform of the dataset
    (its last resize or crop, else the images' own size) and the backbone's stem."""
    from solo.data.classification_dataloader import prepare_transforms
    from torchvision import transforms

    dataset = cfg["data"]["dataset"]
    steps = prepare_transforms(dataset)[1].transforms
    (normalize,) = (t for t in steps if isinstance(t, transforms.Normalize))
    sized = [t.size for t in steps if isinstance(t, transforms.Resize | transforms.CenterCrop)]
    size = sized[-1] if sized else NATIVE_SIZE[dataset]
    height, width = (size, size) if isinstance(size, int) else size
    resizes = [t for t in steps if isinstance(t, transforms.Resize)]
    return {
        "input_size": [3, height, width],
        "mean": [float(v) for v in normalize.mean],
        "std": [float(v) for v in normalize.std],
        "interpolation": resizes[0].interpolation.value if resizes else "bilinear",
        "stem": backbone_record(cfg)["stem"],
    }


def record_preprocessing(manifest: Path) -> None:
    """(Re)write every entry's ``preprocessing`` from the config in its ``args`` file."""
    doc = yaml.safe_load(manifest.read_text())
    for entry in doc["models"]:
        args = next(f for f in entry["files"] if f["role"] == "args")
        cfg = json.loads((manifest.parent / args["urls"][0]).read_text())
        record = {k: v for k, v in entry.items() if k != "preprocessing"}
        at = list(record).index("backbone") + 1  # where manifest_entry puts it
        items = list(record.items())
        items.insert(at, ("preprocessing", preprocessing_record(cfg)))
        update_manifest(manifest, dict(items))
        print(f"recorded the preprocessing of {entry['name']} in {manifest}")


def dataset_label(cfg: dict[str, Any]) -> str:
    """``cifar10``, or ``cifar10 (20%)`` when the recipe trains on a fraction."""
    fraction = cfg["data"].get("fraction", -1)
    dataset = cfg["data"]["dataset"]
    return f"{dataset} ({fraction:.0%})" if 0 < fraction < 1 else dataset


def manifest_entry(
    build: Build, zoo_dir: Path, url_bases: Sequence[str], commit: str | None = None
) -> dict[str, Any]:
    """The manifest record of ``build`` (files measured now); ``commit`` defaults to HEAD."""
    from solo_deepfusion.hub import read_metadata
    from solo_deepfusion.solo import base_method

    cfg = build.cfg
    commit = commit or git_commit(REPO)
    if commit is None:
        raise SystemExit("no git commit to record: run from a git checkout of solo-deepfusion")
    files = []
    for path, role in zip(build.files, ROLES, strict=True):
        urls = [path.relative_to(zoo_dir).as_posix()] if path.is_relative_to(zoo_dir) else []
        urls += [f"{base.rstrip('/')}/{build.name}/{path.name}" for base in url_bases]
        files.append(file_record(path, role, urls))
    projector = {k: v for k, v in cfg.get("projector", {"name": "mlp"}).items() if v is not None}
    return {
        "name": build.name,
        "method": base_method(cfg["method"]),
        "projector": projector,
        "backbone": backbone_record(cfg),
        "preprocessing": preprocessing_record(cfg),
        "dataset": dataset_label(cfg),
        "epochs": cfg["max_epochs"],
        "recipe": (RECIPES / f"{build.name}.yaml").relative_to(REPO).as_posix(),
        "metrics": build.metrics,
        "params": json.loads(read_metadata(build.files[1])["params"]),
        "files": files,
        "license": "MIT",
        "date": dt.datetime.now(dt.UTC).date().isoformat(),
        "code_commit": commit,
    }


# ----------------------------------------------------------------------------- GPU bundles


def cell_metrics(record: dict[str, Any]) -> list[dict[str, Any]]:
    """Manifest metrics of a ``solo-deepfusion bench`` cell: online linear, k-NN on backbone
    features and the cached-feature linear probe, all on the full test split."""
    values, epochs = record["metrics"], record["budget"]["epochs"]
    metrics = []
    if values.get("online_linear_acc1") is not None:
        online = values["online_linear_acc1"]
        metrics.append(metric("acc1", online, kind="online_linear", epochs=epochs, split="test"))
    for k in KNN_K:
        if values.get(f"knn_k{k}_acc1") is not None:
            metrics.append(
                metric(
                    "acc1",
                    values[f"knn_k{k}_acc1"],
                    kind="knn",
                    k=k,
                    temperature=KNN_TEMPERATURE,
                    feature="backbone",
                    split="test",
                )
            )
    if values.get("feature_linear_acc1") is not None:
        metrics.append(
            metric(
                "acc1",
                values["feature_linear_acc1"],
                kind="feature_linear",
                feature="backbone",
                split="test",
            )
        )
    return metrics


def bundle_build(folder: Path, files_dir: Path, work: Path) -> tuple[Build, str | None]:
    """The zoo files of the entry exported into ``folder`` by a GPU session, and its commit.

    The full file is copied, the backbone file cut from it (float16, the full file's header with
    ``role: backbone``) and ``args.json`` made portable.
    """
    from solo_deepfusion.hub.weights import load_state_dict, read_metadata, save_state_dict
    from solo_deepfusion.solo.zoo import BACKBONE_PREFIX, zoo_filenames

    entry = folder.name
    names = zoo_filenames(entry)
    record = json.loads((folder / "cell.json").read_text())
    full = folder / names["full"]
    out = files_dir / entry
    out.mkdir(parents=True, exist_ok=True)
    header = read_metadata(full)
    state = load_state_dict(full)
    backbone = {
        k.removeprefix(BACKBONE_PREFIX): v
        for k, v in state.items()
        if k.startswith(BACKBONE_PREFIX)
    }
    metadata = {**{k: header[k] for k in header if k != "params"}, "role": "backbone"}
    metadata["params"] = json.loads(header["params"])
    paths = [
        save_state_dict(backbone, out / names["backbone"], metadata, half=True),
        out / names["full"],
        portable_args(folder / names["args"], out / names["args"]),
    ]
    write_bytes = paths[1].with_suffix(".tmp")
    write_bytes.write_bytes(full.read_bytes())
    write_bytes.replace(paths[1])
    cfg = json.loads(paths[2].read_text())
    seconds = float(record["cost"].get("train_seconds") or 0.0)
    return Build(entry, cfg, paths, cell_metrics(record), seconds), record["env"].get("commit")


def publish_bundle(bundle: Path, zoo_dir: Path, url_bases: Sequence[str], work: Path) -> int:
    """Publish every entry a GPU session exported into ``bundle/export``."""
    from solo_deepfusion.hub import load_backbone

    manifest = zoo_dir / "manifest.yaml"
    folders = sorted(p for p in (bundle / "export").iterdir() if (p / "cell.json").is_file())
    if not folders:
        raise SystemExit(f"--from-bundle: no exported entry in {bundle / 'export'}")
    for folder in folders:
        build, commit = bundle_build(folder, zoo_dir / "files", work)
        update_manifest(manifest, manifest_entry(build, zoo_dir, url_bases, commit))
        load_backbone(build.name, manifest=manifest, cache_dir=work / "cache", progress=False)
        print(f"wrote {build.name} to {manifest}: {build.metrics}; it loads back")
    write_cards(manifest)
    return 0


# ----------------------------------------------------------------------------- driver


def build_entry(
    entry: str, data: DataPaths, work: Path, files_dir: Path, args: argparse.Namespace
) -> Build:
    """Train, evaluate and export one entry; its files land in ``files_dir/<entry>``."""
    from solo_deepfusion.solo.zoo import export_checkpoint

    start = time.monotonic()
    ckpt, online = pretrain(entry, data, work / "runs", args.smoke)
    seconds = time.monotonic() - start
    run = ckpt.parent
    cfg = json.loads((run / "args.json").read_text())
    metrics = []
    if online is not None:
        epochs = cfg["max_epochs"]
        metrics.append(
            metric("acc1", online / 100, kind="online_linear", epochs=epochs, split="test")
        )
    if not args.no_eval:
        metrics += evaluate(run, data, work, args.smoke)
    files = export_checkpoint(
        ckpt,
        portable_args(run / "args.json", work / "args" / f"{entry}.json"),
        files_dir / entry,
        name=entry,
        half=not args.full_precision,
    )
    return Build(entry, cfg, files, metrics, seconds)


def _metric_key(m: dict[str, Any]) -> tuple:
    p = m["protocol"]
    return m["name"], p["kind"], p.get("k"), p.get("feature")


def compare(build: Build, old: dict[str, Any], tolerance: float, exact: bool) -> bool:
    """Print how a rebuild differs from the manifest entry; whether it is within tolerance."""
    ok = True
    new_files = {f.name: f for f in build.files}
    for rec in old["files"]:
        path = new_files.get(rec["filename"])
        digest = sha256_file(path) if path else None
        same = digest == rec["sha256"]
        ok &= same or not exact
        print(f"  {'same' if same else 'DIFFERENT':<9} sha256 of {rec['filename']}")
    old_metrics = {_metric_key(m): m["value"] for m in old["metrics"]}
    for m in build.metrics:
        before = old_metrics.get(_metric_key(m))
        if before is None:
            print(f"  new       {m['name']} {m['protocol']['kind']}: {m['value']}")
            continue
        within = abs(m["value"] - before) <= tolerance
        ok &= within
        verdict = "ok" if within else "OFF"
        print(f"  {verdict:<9} {m['name']} {m['protocol']}: {m['value']} (manifest {before})")
    return ok


SHORT_SCHEDULE = """\
- A short schedule ({epochs} epochs on {dataset}), far from the 1000-epoch recipes behind
  solo-learn's published numbers; use it to compare heads and to test pipelines, not as a
  strong feature extractor."""
JPEG_DATA = """\
- The data is the JPEG (quality 75) copy of CIFAR-10 shared with this project: accuracies are
  not the same measurement as published CIFAR-10 numbers (lossless images)."""
IMAGENET_STEM = """\
- ResNet-18 with the ImageNet stem at 32 px (the Deep Fusion authors' setting): solo-learn's own
  `main_linear.py` builds the CIFAR stem for `cifar10`, so use this project's `linear`/`knn`
  commands, or `zoo export` (which records `data.dataset: custom`) for `main_knn.py`."""
BATCH_DEPENDENT = """\
- Projector outputs of a transformer head depend on the other samples of the batch; the
  backbone features (what the metrics below use, except where the protocol says otherwise)
  do not."""


def limits(entry: dict[str, Any]) -> str:
    """The card's limits of ``entry``: its schedule, the data, its stem where it misleads."""
    items = [SHORT_SCHEDULE.format(epochs=entry["epochs"], dataset=entry["dataset"]), JPEG_DATA]
    if entry["backbone"].get("stem") == "imagenet":
        items.append(IMAGENET_STEM)
    items.append(BATCH_DEPENDENT)
    return "\n".join(items) + "\n"


def recipe_notes(recipe: Path) -> str:
    """The recipe's leading comment block, without the ``#`` marks."""
    lines = []
    for line in recipe.read_text().splitlines():
        if not line.startswith("#"):
            break
        lines.append(line[1:].removeprefix(" "))
    return "\n".join(lines).strip()


def model_card(entry: dict[str, Any]) -> str:
    """A markdown model card for a manifest entry: how trained, how evaluated, numbers, limits."""
    name, params = entry["name"], entry["params"]
    metrics = "\n".join(
        f"| {m['name']} | {m['value']:.2f} | "
        + ", ".join(f"{k}={v}" for k, v in m["protocol"].items())
        + " |"
        for m in entry["metrics"]
    )
    files = "\n".join(
        f"| `{f['filename']}` | {f['role']} | {f['size'] / 2**20:.1f} MiB | `{f['sha256']}` |"
        for f in entry["files"]
    )
    counts = ", ".join(f"{k} {v / 1e6:.2f}M" for k, v in params.items())
    return f"""# {name}

{recipe_notes(REPO / entry["recipe"])}

| | |
|---|---|
| method | {entry["method"]} |
| projector | {", ".join(f"{k}={v}" for k, v in entry["projector"].items())} |
| backbone | {", ".join(f"{k}={v}" for k, v in entry["backbone"].items())} |
| preprocessing | {", ".join(f"{k}={v}" for k, v in entry.get("preprocessing", {}).items())} |
| dataset | {entry["dataset"]} |
| epochs | {entry["epochs"]} |
| parameters | {counts} |
| recipe | [`{entry["recipe"]}`](../../{entry["recipe"]}) |
| code commit | `{entry["code_commit"]}` |
| date, license | {entry["date"]}, {entry["license"]} |

## Metrics (%)

| metric | value | protocol |
|---|---|---|
{metrics}

## Files

| file | role | size | SHA-256 |
|---|---|---|---|
{files}

## Use

```python
from solo_deepfusion.hub import eval_transform, load_backbone

backbone = load_backbone("{name}")  # verified download; images -> 512-d
transform = eval_transform("{name}")  # the preprocessing above
features = backbone(transform(image)[None])
```

`backbone.pretrained_cfg` carries the preprocessing above (timm's convention).

`solo-deepfusion zoo download {name}`, `... zoo verify {name}`, `... zoo export {name} DIR`
(a solo-learn checkpoint folder). Rebuild from scratch and compare with
`python scripts/build_zoo.py {name} --check --data <cifar10 folder>`.

## Limits

{limits(entry)}"""


def write_cards(manifest: Path) -> None:
    """(Re)write ``<zoo>/cards/<name>.md`` for every entry of ``manifest``."""
    for entry in yaml.safe_load(manifest.read_text())["models"]:
        card = manifest.parent / "cards" / f"{entry['name']}.md"
        write_text(card, model_card(entry))
        print(f"wrote {card}")


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("entries", nargs="*", help="recipe names (default: every zoo/recipes/*)")
    parser.add_argument("--data", type=Path, help=f"CIFAR-10 folder (default: ${DATA_ENV})")
    parser.add_argument("--work", type=Path, help="runs, unpacked data (default: a temp folder)")
    parser.add_argument("--zoo", type=Path, help="manifest folder (default: zoo/, --smoke: work)")
    parser.add_argument("--url-base", action="append", default=[], help="mirror prefix")
    parser.add_argument("--smoke", action="store_true", help="1 epoch on 300 images")
    parser.add_argument("--check", action="store_true", help="rebuild and compare, write nothing")
    parser.add_argument("--tolerance", type=float, default=1.0, help="--check: metric points")
    parser.add_argument("--exact", action="store_true", help="--check: hashes must match too")
    parser.add_argument("--no-eval", action="store_true", help="online linear accuracy only")
    parser.add_argument("--full-precision", action="store_true", help="float32 weight files")
    parser.add_argument("--cards", action="store_true", help="only (re)write the model cards")
    parser.add_argument(
        "--from-bundle", type=Path, help="publish a GPU session's unpacked bundle folder"
    )
    parser.add_argument(
        "--preprocessing",
        action="store_true",
        help="only (re)record every entry's preprocessing from its args file, then the cards",
    )
    return parser.parse_args(list(argv))


def main(argv: Sequence[str] | None = None) -> int:
    """Build (or ``--check``) the requested entries; the exit status."""
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cards or args.preprocessing:
        manifest = (args.zoo or REPO / "zoo").resolve() / "manifest.yaml"
        if args.preprocessing:
            record_preprocessing(manifest)
        write_cards(manifest)
        return 0
    if args.from_bundle:
        work = (args.work or Path(tempfile.mkdtemp(prefix="build_zoo-"))).resolve()
        zoo_dir = (args.zoo or REPO / "zoo").resolve()
        return publish_bundle(args.from_bundle.resolve(), zoo_dir, args.url_base, work)
    from solo_deepfusion.hub import load_backbone

    source = args.data or (Path(os.environ[DATA_ENV]) if os.environ.get(DATA_ENV) else None)
    if source is None:
        raise SystemExit(f"give --data or set ${DATA_ENV} to a CIFAR-10 folder")
    entries = args.entries or sorted(p.stem for p in RECIPES.glob("*.yaml"))
    unknown = [e for e in entries if not (RECIPES / f"{e}.yaml").is_file()]
    if unknown:
        raise SystemExit(f"no recipe zoo/recipes/<name>.yaml for {unknown}")
    work = (args.work or Path(tempfile.mkdtemp(prefix="build_zoo-"))).resolve()
    source = source.expanduser().resolve()
    cut = (SMOKE_PER_CLASS["train"], SMOKE_PER_CLASS["test"]) if args.smoke else (None, None)
    try:
        data = prepare_data(source, work, *cut)
    except UsageError as err:
        raise SystemExit(f"error: {err}") from None
    zoo_dir = (args.zoo or (work / "zoo" if args.smoke else REPO / "zoo")).resolve()
    manifest = zoo_dir / "manifest.yaml"
    files_dir = work / "check" if args.check else zoo_dir / "files"

    recorded = {}
    if args.check:
        if not manifest.is_file():
            raise SystemExit(f"--check: no manifest at {manifest}")
        recorded = {m["name"]: m for m in yaml.safe_load(manifest.read_text())["models"]}
        missing = [e for e in entries if e not in recorded]
        if missing:
            raise SystemExit(f"--check: {missing} not in {manifest}")

    ok = True
    for entry in entries:
        print(f"=== {entry}")
        build = build_entry(entry, data, work, files_dir, args)
        print(f"trained in {build.seconds / 60:.1f} min; metrics: {build.metrics}")
        if args.check:
            ok &= compare(build, recorded[entry], args.tolerance, args.exact)
            continue
        update_manifest(manifest, manifest_entry(build, zoo_dir, args.url_base))
        load_backbone(entry, manifest=manifest, cache_dir=work / "cache", progress=False)
        print(f"wrote {entry} to {manifest} (files in {files_dir / entry}); it loads back")
    if not args.check:
        write_cards(manifest)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
