"""The zoo with real solo-learn: export a run, load it back, hand it to solo-learn's own loaders.

A tiny ``simclr_transformer`` (ImageNet stem on "CIFAR" data, as the zoo's CPU recipes) is fitted
one step and saved in the Checkpointer layout; its zoo files are served through a manifest next
to them (relative URLs) and downloaded into a temporary cache.
"""

from __future__ import annotations

import json
import pickle
import pickletools
import shutil
import sys
import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from solo_fixtures import HOST_PROBLEM, fit, method_cfg

if HOST_PROBLEM is not None:
    pytest.skip(HOST_PROBLEM, allow_module_level=True)

from omegaconf import OmegaConf
from solo.methods import METHODS
from solo.methods.base import BaseMethod
from torch import nn

from solo_deepfusion import hub
from solo_deepfusion.hub import cli
from solo_deepfusion.hub.backbones import build_resnet
from solo_deepfusion.hub.publish import file_record
from solo_deepfusion.solo import register
from solo_deepfusion.solo.model import build_model
from solo_deepfusion.solo.zoo import export_checkpoint, param_counts

pytestmark = pytest.mark.timeout(120)

SMALL = {"name": "transformer", "preset": "small", "depth": 2, "dim": 32, "heads": 4}
NAME = "tiny-df"
HALF_TOL = {"rtol": 2e-2, "atol": 2e-2}


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> tuple[BaseMethod, Path, Path]:
    """A fitted model and its Checkpointer-style ``(ckpt, args.json)``."""
    torch.manual_seed(0)
    cfg = method_cfg("simclr_transformer", **SMALL)
    cfg.backbone.stem = "imagenet"  # not what solo-learn picks for data.dataset=cifar10
    model = build_model(cfg)
    trainer = fit(model, steps=1)
    folder = tmp_path_factory.mktemp("trained_models") / cfg.method / "abcd1234"
    folder.mkdir(parents=True)
    ckpt = folder / "test-abcd1234-ep=0.ckpt"
    trainer.save_checkpoint(ckpt)
    args = folder / "args.json"
    args.write_text(json.dumps(OmegaConf.to_container(model.cfg)))
    return model.eval(), ckpt, args


@pytest.fixture(scope="module")
def zoo(run, tmp_path_factory) -> Path:
    """A manifest listing the run's zoo files (half precision) next to it."""
    _, ckpt, args = run
    folder = tmp_path_factory.mktemp("zoo")
    files = export_checkpoint(ckpt, args, folder / "files", name=NAME)
    roles = ("backbone", "full", "args")
    records = [
        file_record(path, role, [f"files/{path.name}"])
        for path, role in zip(files, roles, strict=True)
    ]
    entry = {
        "name": NAME,
        "method": "simclr",
        "projector": SMALL,
        "backbone": {"name": "resnet18", "kwargs": {}, "stem": "imagenet"},
        "dataset": "random",
        "epochs": 1,
        "recipe": "tests/test_zoo_solo.py",
        "metrics": [{"name": "loss", "value": 0.0, "protocol": {"kind": "online_linear"}}],
        "params": json.loads(hub.read_metadata(files[1])["params"]),
        "files": records,
        "license": "MIT",
        "date": "2026-01-31",
        "code_commit": "0123abc",
    }
    manifest = folder / "manifest.yaml"
    manifest.write_text(yaml.safe_dump({"schema_version": 1, "models": [entry]}))
    return manifest


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SOLO_DEEPFUSION_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SOLO_DEEPFUSION_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)


def images(n: int = 6) -> torch.Tensor:
    return torch.randn(n, 3, 16, 16, generator=torch.Generator().manual_seed(1))


def test_export_writes_the_zoo_files(run, tmp_path):
    model, ckpt, args = run
    files = export_checkpoint(ckpt, args, tmp_path, name="x", half=False)
    assert [p.name for p in files] == [
        "x.backbone.safetensors",
        "x.full.safetensors",
        "x.args.json",
    ]
    backbone = hub.load_state_dict(files[0])
    assert backbone.keys() == model.backbone.state_dict().keys()
    assert all(torch.equal(v, model.backbone.state_dict()[k]) for k, v in backbone.items())
    assert hub.load_state_dict(files[1]).keys() == model.state_dict().keys()
    assert json.loads(files[2].read_text()) == json.loads(args.read_text())
    meta = hub.read_metadata(files[0])
    assert meta["method"] == "simclr_transformer" and meta["projector"] == "transformer"
    assert meta["stem"] == "imagenet" and meta["role"] == "backbone"
    assert json.loads(meta["params"]) == param_counts(model)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in files)


def test_load_backbone_gives_the_trained_features(run, zoo):
    model, _, _ = run
    backbone = hub.load_backbone(NAME, manifest=zoo, progress=False)
    assert not backbone.training
    assert type(backbone) is type(model.backbone)
    assert backbone.conv1.kernel_size == (7, 7)  # the run's stem, not solo-learn's CIFAR one
    with torch.no_grad():
        expected, got = model.backbone(images()), backbone(images())
    assert got.shape == (6, model.features_dim) and got.dtype == torch.float32
    torch.testing.assert_close(got, expected, **HALF_TOL)


@pytest.mark.parametrize(
    ("stem", "dataset", "built"),
    [
        ("auto", "cifar10", "cifar"),
        ("auto", "imagenet", "imagenet"),
        ("imagenet", "cifar10", "imagenet"),
        ("cifar", "custom", "cifar"),
    ],
)
def test_plain_pytorch_resnet_is_solo_learns(stem, dataset, built):
    """The host-free builder makes the module solo-learn makes: same modules, same shapes."""
    cfg = method_cfg("simclr")
    cfg.backbone.stem, cfg.data.dataset = stem, dataset
    solo_backbone = build_model(cfg).backbone
    plain = build_resnet("resnet18", built)
    assert str(plain) == str(solo_backbone)
    assert {k: v.shape for k, v in plain.state_dict().items()} == {
        k: v.shape for k, v in solo_backbone.state_dict().items()
    }


def test_load_model_strict_and_projector_matches(run, zoo):
    model, _, _ = run
    loaded = hub.load_model(NAME, manifest=zoo, progress=False)
    assert type(loaded) is METHODS["simclr_transformer"] and not loaded.training
    with torch.no_grad():
        expected, got = model(images()), loaded(images())
    torch.testing.assert_close(got["z"], expected["z"], **HALF_TOL)
    torch.testing.assert_close(got["feats"], expected["feats"], **HALF_TOL)


def pickled_globals(ckpt: Path) -> set[str]:
    """Every ``module.name`` the checkpoint's pickle refers to (what unpickling would import)."""
    with zipfile.ZipFile(ckpt) as archive:
        (pkl,) = [n for n in archive.namelist() if n.endswith("/data.pkl")]
        data = archive.read(pkl)
    found, strings = set(), []
    for op, arg, _ in pickletools.genops(data):
        if op.name == "GLOBAL":
            found.add(arg.replace(" ", "."))
        elif op.name == "STACK_GLOBAL":
            found.add(".".join(strings[-2:]))
        elif isinstance(arg, str):
            strings.append(arg)
    return found


def main_linear_backbone(args: dict, ckpt: Path) -> tuple[nn.Module, list[str]]:
    """What solo-learn's main_linear.py does with ``pretrained_feature_extractor=ckpt``."""
    backbone = BaseMethod._BACKBONES[args["backbone"]["name"]](
        method=args["method"], **args["backbone"]["kwargs"]
    )
    backbone.fc = nn.Identity()
    if args["data"]["dataset"] in ("cifar10", "cifar100"):
        backbone.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=2, bias=False)
        backbone.maxpool = nn.Identity()
    state = torch.load(ckpt, map_location="cpu")["state_dict"]
    for k in list(state.keys()):
        if "encoder" in k:
            state[k.replace("encoder", "backbone")] = state[k]
        if "backbone" in k:
            state[k.replace("backbone.", "")] = state[k]
        del state[k]
    result = backbone.load_state_dict(state, strict=False)
    return backbone.eval(), result.missing_keys


def test_export_solo_is_accepted_by_solo_learns_loaders(run, zoo, tmp_path):
    model, _, _ = run
    folder = hub.export_solo(NAME, tmp_path / "solo", manifest=zoo, progress=False)
    assert folder == tmp_path / "solo" / "simclr_transformer"
    assert sorted(p.name for p in folder.iterdir()) == ["args.json", f"{NAME}.ckpt"]
    ckpt = folder / f"{NAME}.ckpt"

    checkpoint = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(checkpoint) == {"state_dict", "pytorch-lightning_version"}
    assert pickled_globals(ckpt) <= {
        "collections.OrderedDict",
        "torch._utils._rebuild_tensor_v2",
        "torch.FloatStorage",
        "torch.LongStorage",
    }
    args = json.loads((folder / "args.json").read_text())
    assert args["method"] == "simclr_transformer"
    assert args["data"]["dataset"] == "custom"  # so that solo-learn builds the ImageNet stem

    backbone, missing = main_linear_backbone(args, ckpt)
    assert missing == []
    with torch.no_grad():
        torch.testing.assert_close(backbone(images()), model.backbone(images()), **HALF_TOL)

    register()
    solo_model = METHODS[args["method"]].load_from_checkpoint(
        ckpt, strict=True, cfg=OmegaConf.create(args)
    )
    with torch.no_grad():
        got = solo_model.eval()(images())["z"]
    torch.testing.assert_close(got, model(images())["z"], **HALF_TOL)

    (folder / "other.ckpt").write_bytes(b"")
    with pytest.raises(FileExistsError, match="another folder"):
        hub.export_solo(NAME, tmp_path / "solo", manifest=zoo, progress=False)


def test_cli_export(run, zoo, tmp_path, capsys):
    assert cli.main(["export", NAME, str(tmp_path), "--manifest", str(zoo)]) == 0
    assert capsys.readouterr().out == f"{tmp_path / 'simclr_transformer'}\n"


def test_fusion_analysis_takes_a_zoo_name(run, zoo, tmp_path, monkeypatch):
    from PIL import Image

    from solo_deepfusion.solo.analysis import analyse_checkpoint

    monkeypatch.setenv("SOLO_DEEPFUSION_ZOO_MANIFEST", str(zoo))
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (16, 16), (60 * i, 100 if label == "a" else 0, 0)).save(
                tmp_path / "data" / label / f"{i}.png"
            )
    result = analyse_checkpoint(
        NAME, tmp_path / "data", batch_size=8, eval_batch_sizes=(4,), out_dir=tmp_path / "out"
    )
    assert result["checkpoint"].endswith(f"{NAME}.full.safetensors")
    assert len(result["fusion_ratio"]) == 2  # the depth of SMALL
    assert (tmp_path / "out" / "heatmaps.png").is_file()

    # the command line, without --out: ./fusion/<entry>, not the download cache
    from solo_deepfusion.solo.analysis import main as fusion

    monkeypatch.chdir(tmp_path)
    argv = ["--checkpoint", NAME, "--data", str(tmp_path / "data"), "--batch-size", "8"]
    assert fusion([*argv, "--eval-batch-sizes", "4"]) == 0
    assert (tmp_path / "fusion" / NAME / "fusion.json").is_file()


def tampered_zoo(zoo: Path, role: str, data: bytes, folder: Path) -> Path:
    """A copy of ``zoo`` whose ``role`` file is ``data``, its size and hash updated to match."""
    import hashlib
    import shutil

    shutil.copytree(zoo.parent, folder)
    doc = yaml.safe_load((folder / "manifest.yaml").read_text())
    record = next(f for f in doc["models"][0]["files"] if f["role"] == role)
    (folder / record["urls"][0]).write_bytes(data)
    record.update(size=len(data), sha256=hashlib.sha256(data).hexdigest())
    (folder / "manifest.yaml").write_text(yaml.safe_dump(doc))
    return folder / "manifest.yaml"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"method": "../../../escaped"}, "method='../../../escaped' is not one of solo-learn's"),
        ({"method": "simclr_typo"}, "method='simclr_typo' is not one of solo-learn's"),
        ([1, 2], "holds a JSON list, not an object"),
    ],
)
def test_cli_export_refuses_bad_args_json_and_writes_nothing(zoo, tmp_path, capsys, args, message):
    manifest = tampered_zoo(zoo, "args", json.dumps(args).encode(), tmp_path / "zoo")
    out = tmp_path / "a" / "b" / "c" / "export"
    assert cli.main(["export", NAME, str(out), "--manifest", str(manifest)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and NAME in err and "\n" not in err
    assert not (tmp_path / "a").exists() and not (tmp_path / "escaped").exists()


def test_cli_export_refuses_a_pickle_disguised_as_safetensors(zoo, tmp_path, capsys):
    payload = pickle.dumps({"state_dict": {}})
    manifest = tampered_zoo(zoo, "full", payload, tmp_path / "zoo")
    assert cli.main(["export", NAME, str(tmp_path / "out"), "--manifest", str(manifest)]) == 1
    err = capsys.readouterr().err.strip()
    assert "is not a valid safetensors file" in err and "\n" not in err
    assert not list((tmp_path / "out").rglob("*.ckpt"))


def test_build_zoo_publishes_a_gpu_session_bundle(run, tmp_path, monkeypatch):
    """``build_zoo.py --from-bundle``: the device returns full weights, args and the cell's
    record; the backbone file is cut from the full one and the entry loads back."""
    import importlib.util

    script = Path(__file__).resolve().parents[2] / "scripts" / "build_zoo.py"
    spec = importlib.util.spec_from_file_location("build_zoo", script)
    build_zoo = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "build_zoo", build_zoo)  # its dataclasses look it up
    spec.loader.exec_module(build_zoo)

    model, ckpt, args = run
    entry = "simclr-deepfusion-r18-cifar10-gpu"  # a recipe the manifest entry can name
    folder = tmp_path / "bundle" / "export" / entry
    export_checkpoint(ckpt, args, folder, name=entry)
    (folder / f"{entry}.backbone.safetensors").unlink()  # the device does not send it
    record = {
        "metrics": {"online_linear_acc1": 0.5, "knn_k20_acc1": 0.25, "feature_linear_acc1": 0.4},
        "budget": {"epochs": 3},
        "cost": {"train_seconds": 12.0},
        "env": {"commit": "0123abc"},
    }
    (folder / "cell.json").write_text(json.dumps(record))
    zoo_dir = tmp_path / "zoo"
    assert build_zoo.publish_bundle(tmp_path / "bundle", zoo_dir, [], tmp_path / "work") == 0

    (published,) = yaml.safe_load((zoo_dir / "manifest.yaml").read_text())["models"]
    assert published["code_commit"] == "0123abc" and published["epochs"] == model.cfg.max_epochs
    values = {
        (m["protocol"]["kind"], m["protocol"].get("k")): m["value"] for m in published["metrics"]
    }
    assert values == {
        ("online_linear", None): 50.0,
        ("knn", 20): 25.0,
        ("feature_linear", None): 40.0,
    }
    args_json = json.loads((zoo_dir / "files" / entry / f"{entry}.args.json").read_text())
    assert args_json["data"]["train_path"] == "datasets/cifar10/train"  # no machine path
    backbone = hub.load_backbone(entry, manifest=zoo_dir / "manifest.yaml", progress=False)
    with torch.no_grad():
        torch.testing.assert_close(backbone(images()), model.backbone(images()), **HALF_TOL)
    assert (zoo_dir / "cards" / f"{entry}.md").is_file()


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("../../a/b/m.safetensors", "fusion/m"),
        ("/abs/olute/m.safetensors", "fusion/m"),
        ("link.safetensors", "fusion/link"),  # a symlink: its own stem, not its target's path
        ("tiny-df", "fusion/tiny-df"),  # a zoo entry
        ("../evil", "fusion/evil"),  # a zoo name is only ever a name
        ("..", "fusion/checkpoint"),
    ],
)
def test_fusion_default_out_is_a_sanitised_name_under_fusion(
    tmp_path, monkeypatch, given, expected
):
    from solo_deepfusion.solo.analysis import default_out_dir

    monkeypatch.chdir(tmp_path)
    (tmp_path / "target.safetensors").write_bytes(b"x")
    (tmp_path / "link.safetensors").symlink_to(tmp_path / "target.safetensors")
    weights = Path(given) if given.endswith(".safetensors") else tmp_path / "c" / "x.safetensors"
    out = default_out_dir(given, weights)
    assert out == Path(expected)
    assert (tmp_path / out).resolve().is_relative_to(tmp_path / "fusion")


def test_fusion_of_a_weights_file_up_the_tree_writes_under_fusion(run, zoo, tmp_path, monkeypatch):
    """``fusion --checkpoint ../../a/b/m.safetensors`` without ``--out``: ``./fusion/m/``."""
    from PIL import Image

    from solo_deepfusion.solo.analysis import main as fusion

    folder = tmp_path / "a" / "b"
    folder.mkdir(parents=True)
    shutil.copy(zoo.parent / "files" / f"{NAME}.full.safetensors", folder / "m.safetensors")
    shutil.copy(run[2], folder / "args.json")
    for label in ("a", "b"):
        (tmp_path / "data" / label).mkdir(parents=True)
        for i in range(2):
            Image.new("RGB", (16, 16), (90 * i, 0, 0)).save(tmp_path / "data" / label / f"{i}.png")
    work = tmp_path / "w" / "x"
    work.mkdir(parents=True)
    monkeypatch.chdir(work)
    argv = ["--checkpoint", "../../a/b/m.safetensors", "--data", str(tmp_path / "data")]
    assert fusion([*argv, "--batch-size", "4", "--eval-batch-sizes", "2"]) == 0
    assert (work / "fusion" / "m" / "fusion.json").is_file()
    assert sorted(p.name for p in folder.iterdir()) == ["args.json", "m.safetensors"]


def test_fusion_out_that_is_a_file_is_one_line(run, tmp_path, capsys):
    from solo_deepfusion.solo.analysis import main as fusion

    taken = tmp_path / "taken"
    taken.write_text("mine")
    for out, message in [
        (taken, f"error: --out {taken} is a file, not a folder"),
        (taken / "sub", f"error: --out {taken} is a file, not a folder (--out {taken / 'sub'}"),
    ]:
        argv = ["--checkpoint", str(run[1]), "--data", str(tmp_path), "--out", str(out)]
        assert fusion(argv) == 2
        assert capsys.readouterr().err.strip().startswith(message)
    assert taken.read_text() == "mine"


def test_fusion_of_a_zoo_entry_offline_with_an_empty_cache_is_one_line(
    zoo, tmp_path, monkeypatch, capsys
):
    from solo_deepfusion.solo.analysis import main as fusion

    monkeypatch.setenv("SOLO_DEEPFUSION_ZOO_MANIFEST", str(zoo))
    monkeypatch.setenv("SOLO_DEEPFUSION_OFFLINE", "1")
    assert fusion(["--checkpoint", NAME, "--data", str(tmp_path)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: offline mode: zoo file {NAME}/")


def test_cli_export_refuses_weights_that_do_not_load_and_writes_nothing(run, zoo, tmp_path, capsys):
    from safetensors.torch import save

    model = run[0]
    state = {k: v.clone() for k, v in model.state_dict().items()}
    state["projector.extra.weight"] = torch.zeros(2)  # a key the model does not have
    del state["backbone.conv1.weight"]  # and one it needs
    manifest = tampered_zoo(zoo, "full", save(state), tmp_path / "zoo")
    out = tmp_path / "out"
    assert cli.main(["export", NAME, str(out), "--manifest", str(manifest)]) == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: {NAME}: its full weights do not load into the ")
    assert "backbone.conv1.weight" in err and err.endswith("not exported") and "\n" not in err
    assert not out.exists()


def test_cli_export_refuses_an_args_json_of_another_method(run, zoo, tmp_path, capsys):
    args = json.loads(run[2].read_text())
    args["method"] = "byol_transformer"
    manifest = tampered_zoo(zoo, "args", json.dumps(args).encode(), tmp_path / "zoo")
    out = tmp_path / "out"
    assert cli.main(["export", NAME, str(out), "--manifest", str(manifest)]) == 1
    assert capsys.readouterr().err.strip() == (
        f"error: {NAME}: its args.json trains method=byol_transformer, the manifest says "
        "simclr_transformer (method=simclr, projector=transformer); not exported"
    )
    assert not out.exists()
