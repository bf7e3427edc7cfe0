"""Zoo entries' preprocessing (``pretrained_cfg``, ``eval_transform``), the installed copy of the
manifest and mirrors from ``$SOLO_DEEPFUSION_ZOO_MIRRORS``: host-free."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
import yaml
from loopback import RecordingServer, serving
from PIL import Image
from torchvision.transforms import functional as F

from solo_deepfusion import hub
from solo_deepfusion.cli import main as top_main
from solo_deepfusion.hub import manifest as manifest_module

REPO = Path(__file__).resolve().parents[2]
ZOO = REPO / "zoo"
CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)  # solo-learn's


@pytest.fixture
def zoo_files_server() -> Iterator[RecordingServer]:
    """The checkout's ``zoo/files`` over loopback HTTP: a mirror of the ``files/`` layout."""
    with serving(ZOO / "files") as server:
        yield server


def installed_zoo(root: Path) -> Path:
    """What setup.py copies into a wheel: manifest, schema and cards, no weights."""
    target = root / "zoo"
    target.mkdir(parents=True)
    for name in ("manifest.yaml", "manifest.schema.json"):
        shutil.copy2(ZOO / name, target / name)
    shutil.copytree(ZOO / "cards", target / "cards")
    return target


def test_every_entry_records_its_preprocessing_and_the_backbone_carries_it(tmp_path):
    for name in hub.list_models(ZOO / "manifest.yaml"):
        entry = hub.get_entry(name, ZOO / "manifest.yaml")
        assert entry.preprocessing == {
            "input_size": [3, 32, 32],
            "mean": list(CIFAR_MEAN),
            "std": list(CIFAR_STD),
            "interpolation": "bilinear",
            "stem": entry.backbone["stem"],
        }
    backbone = hub.load_backbone(name, cache_dir=tmp_path, progress=False)
    cfg = backbone.pretrained_cfg
    assert cfg["input_size"] == (3, 32, 32) and cfg["mean"] == CIFAR_MEAN
    stem = entry.backbone["stem"]
    assert (cfg["std"], cfg["interpolation"], cfg["stem"]) == (CIFAR_STD, "bilinear", stem)
    assert (cfg["architecture"], cfg["tag"], cfg["num_classes"]) == ("resnet18", name, 0)


def test_eval_transform_is_the_recorded_preprocessing():
    transform = hub.eval_transform("simclr-r18-cifar10-cpu")
    pixels = torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8, generator=torch.Generator())
    image = Image.fromarray(pixels.numpy())
    expected = F.normalize(F.to_tensor(image), CIFAR_MEAN, CIFAR_STD)  # solo-learn's CIFAR eval
    assert torch.equal(transform(image), expected)
    assert transform(Image.new("RGB", (64, 40))).shape == (3, 32, 32)  # shorter side, centre crop


def write_entry(folder: Path, **changes: object) -> Path:
    """The zoo's manifest reduced to its first entry, with ``changes`` applied."""
    doc = yaml.safe_load((ZOO / "manifest.yaml").read_text())
    doc["models"] = [{**doc["models"][0], **changes}]
    doc["models"][0] = {k: v for k, v in doc["models"][0].items() if v is not None}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "manifest.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    return folder / "manifest.yaml"


def test_preprocessing_is_checked_against_the_entry(tmp_path):
    good = hub.get_entry("simclr-r18-cifar10-cpu").preprocessing
    bad = {
        "mean": ([0.5, 0.5], r"field 'preprocessing.mean': needs 3 values \(input_size\[0\]\)"),
        "stem": ("cifar", r"field 'preprocessing.stem': 'cifar' differs from backbone.stem"),
        "interpolation": ("lanczos", r"field 'preprocessing.interpolation': 'lanczos' is not"),
    }
    for key, (value, message) in bad.items():
        path = write_entry(tmp_path / key, preprocessing={**good, key: value})
        with pytest.raises(hub.ManifestError, match=message):
            hub.load_manifest(path)
    unrecorded = write_entry(tmp_path / "none", preprocessing=None)  # optional in the schema
    (name,) = hub.list_models(unrecorded)
    assert "input_size" not in hub.get_entry(name, unrecorded).pretrained_cfg
    with pytest.raises(ValueError, match=f"zoo entry '{name}' records no preprocessing"):
        hub.eval_transform(name, manifest=unrecorded)


def test_outside_a_checkout_the_installed_copy_is_the_zoo(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv(manifest_module.ENV_MANIFEST, raising=False)
    monkeypatch.setattr(manifest_module, "REPO_ZOO_DIR", tmp_path / "no-checkout" / "zoo")
    monkeypatch.setattr(manifest_module, "PACKAGED_ZOO_DIR", installed_zoo(tmp_path / "site"))
    assert hub.list_models() == hub.list_models(ZOO / "manifest.yaml")
    assert top_main(["zoo", "info", "simclr-r18-cifar10-cpu"]) == 0
    out = capsys.readouterr().out
    assert "preprocessing:\n  input_size: [3, 32, 32]" in out
    assert f"card: {tmp_path / 'site' / 'zoo' / 'cards' / 'simclr-r18-cifar10-cpu.md'}" in out
    monkeypatch.setattr(manifest_module, "PACKAGED_ZOO_DIR", tmp_path / "site" / "nothing")
    with pytest.raises(hub.ManifestError, match=r"no zoo manifest at .*reinstall") as err:
        hub.list_models()
    assert "\n" not in str(err.value)


def test_the_installed_zoo_downloads_from_a_loopback_mirror(
    tmp_path, monkeypatch, zoo_files_server
):
    """No weights next to the installed manifest: the relative URL fails, the mirror serves."""
    monkeypatch.delenv(manifest_module.ENV_MANIFEST, raising=False)
    monkeypatch.setattr(manifest_module, "REPO_ZOO_DIR", tmp_path / "no-checkout" / "zoo")
    monkeypatch.setattr(manifest_module, "PACKAGED_ZOO_DIR", installed_zoo(tmp_path / "site"))
    monkeypatch.setenv(manifest_module.ENV_MIRRORS, zoo_files_server.url + "/")
    name = "simclr-r18-cifar10-cpu"
    entry = hub.get_entry(name)
    assert entry.file().urls[-1] == f"{zoo_files_server.url}/{name}/{entry.file().filename}"
    backbone = hub.load_backbone(name, cache_dir=tmp_path / "cache", progress=False)
    assert zoo_files_server.paths == [f"/{name}/{entry.file().filename}"]
    assert backbone.pretrained_cfg["tag"] == name
    assert hub.load_backbone(name, cache_dir=tmp_path / "cache", offline=True).training is False


@pytest.mark.parametrize(
    ("mirrors", "message"),
    [
        ("files", r"\$SOLO_DEEPFUSION_ZOO_MIRRORS: 'files' is relative; give https://"),
        ("http://example.com/zoo", r"\$SOLO_DEEPFUSION_ZOO_MIRRORS: plain http:// is only"),
    ],
)
def test_bad_mirrors_are_one_line_errors(mirrors, message, monkeypatch):
    monkeypatch.setenv(manifest_module.ENV_MIRRORS, mirrors)
    with pytest.raises(hub.ManifestError, match=message) as err:
        hub.list_models(ZOO / "manifest.yaml")
    assert "\n" not in str(err.value)
