"""``solo-deepfusion linear`` and ``knn`` on a checkpoint pretrained here."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from solo_deepfusion._host import host_problem

if host_problem() is not None:
    pytest.skip(host_problem(), allow_module_level=True)

from solo_deepfusion.errors import UsageError
from solo_deepfusion.solo import launch
from solo_deepfusion.solo.checkpoints import find_run
from solo_deepfusion.solo.evaluate import knn, linear

pytestmark = pytest.mark.host


@pytest.fixture(scope="module")
def pretrained(cifar_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The run folder (args.json + ckpt) of a 2-step simclr_transformer pretraining."""
    ckpt_dir = tmp_path_factory.mktemp("pretrained")
    argv = [
        "--config-name",
        "cifar10_quick",
        "--projector",
        "transformer",
        "projector.preset=small",
        f"data.train_path={cifar_tiny / 'train'}",
        f"data.val_path={cifar_tiny / 'val'}",
        "data.num_workers=0",
        "data.fraction=-1",
        "optimizer.batch_size=8",
        "max_epochs=1",
        f"checkpoint.dir={ckpt_dir}",
        "++limit_train_batches=2",
        "++limit_val_batches=0",
        "++enable_progress_bar=False",
        "++enable_model_summary=False",
    ]
    assert launch.pretrain(argv) == 0
    (run,) = (ckpt_dir / "simclr_transformer").glob("*/args.json")
    return run.parent


def linear_args(run: Path, data: Path, out: Path, *extra: str) -> list[str]:
    """The packaged linear recipe, shrunk to two steps on the tiny folder."""
    return [
        "--config-name",
        "cifar10_linear_quick",
        f"pretrained_feature_extractor={run}",
        f"data.train_path={data / 'train'}",
        f"data.val_path={data / 'val'}",
        "data.num_workers=0",
        "data.fraction=-1",
        "optimizer.batch_size=8",
        "max_epochs=1",
        f"checkpoint.dir={out}",
        "++limit_train_batches=2",
        "++num_sanity_val_steps=0",
        "++enable_progress_bar=False",
        "++enable_model_summary=False",
        *extra,
    ]


def test_linear_prints_and_writes_accuracies(pretrained, cifar_tiny, tmp_path, capsys):
    output = tmp_path / "out" / "linear.json"
    assert linear(linear_args(pretrained, cifar_tiny, tmp_path, "--output-json", str(output))) == 0
    results = json.loads(output.read_text())
    assert results["method"] == "simclr_transformer"
    assert 0 <= results["acc1"] <= results["acc5"] <= 1
    assert f"val acc@1  {results['acc1']:.4f}" in capsys.readouterr().out
    assert list((tmp_path / "linear").glob("*/*.ckpt"))  # solo-learn's layout


def test_linear_trains_from_a_cpu_dali_pipeline(pretrained, cifar_tiny, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    dali = ("data.dataset=custom", "data.format=dali", "++dali.device=cpu", "++limit_val_batches=1")
    assert linear(linear_args(pretrained, cifar_tiny, tmp_path, *dali)) == 0
    assert list((tmp_path / "linear").glob("*/*.ckpt"))


def test_knn_on_backbone_and_projector(pretrained, tmp_path, capsys):
    output = tmp_path / "knn.json"
    argv = [
        "--checkpoint-dir",
        str(pretrained),
        "--k",
        "1",
        "5",
        "1000",  # more than the 80 training images: clamped, and reported as the k used
        "--distance-function",
        "cosine",
        "euclidean",
        "--batch-size",
        "16",
        "--num-workers",
        "0",
        "--device",
        "cpu",
        "--output-json",
        str(output),
    ]
    assert knn(argv) == 0
    results = json.loads(output.read_text())
    rows = results["results"]
    # 2 features x (cosine: 3 k x 1 T + euclidean: 3 k)
    assert len(rows) == 12
    assert {row["feature"] for row in rows} == {"backbone", "projector"}
    assert all(0 <= row["acc1"] <= row["acc5"] <= 1 for row in rows)
    assert (results["train_images"], results["val_images"]) == (80, 40)  # paths from args.json
    assert {(row["k_requested"], row["k"]) for row in rows} == {(1, 1), (5, 5), (1000, 80)}
    assert results["notes"][0] == "k=1000 is more than the 80 training images: k=80 is used"
    assert "batch" in results["notes"][1]  # transformer projector features are batch-dependent
    out = capsys.readouterr().out
    assert "projector  euclidean" in out and "note: k=1000 is more than" in out


def test_find_run_needs_args_json(pretrained, tmp_path):
    checkpoint = next(pretrained.glob("*.ckpt"))
    assert find_run(checkpoint).checkpoint == find_run(pretrained).checkpoint == checkpoint
    lone = tmp_path / "lone.ckpt"
    lone.write_bytes(checkpoint.read_bytes())
    with pytest.raises(UsageError, match=r"args\.json"):
        find_run(lone)


def test_knn_reports_a_missing_run(tmp_path, capsys):
    assert knn(["--checkpoint-dir", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


class RunsAShellCommand:
    """What a hostile ``.ckpt`` holds: unpickling it would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_tools_refuse_a_checkpoint_that_would_run_code(pretrained, cifar_tiny, tmp_path, capsys):
    """knn, linear and fusion read checkpoints with weights_only=True: one line, exit 2."""
    from solo_deepfusion.solo.analysis import main as fusion

    marker = tmp_path / "ran"
    run = tmp_path / "run"
    run.mkdir()
    (run / "args.json").write_bytes((pretrained / "args.json").read_bytes())
    evil = run / "evil-ep=0.ckpt"
    torch.save({"state_dict": {}, "x": RunsAShellCommand(marker)}, evil)
    data = ["--train-path", str(cifar_tiny / "train"), "--val-path", str(cifar_tiny / "val")]
    commands = {
        "knn": lambda: knn(["--checkpoint-dir", str(run), *data]),
        "linear": lambda: linear(linear_args(run, cifar_tiny, tmp_path / "out")),
        "fusion": lambda: fusion(
            ["--checkpoint", str(evil), "--data", str(cifar_tiny / "val"), "--out", str(tmp_path)]
        ),
    }
    for name, command in commands.items():
        assert command() == 2, name
        err = capsys.readouterr().err.strip().splitlines()
        assert "refused, it holds more than weights" in err[-1], name
    assert not marker.exists()


def test_knn_refuses_a_missing_train_path_instead_of_downloading(pretrained, tmp_path, capsys):
    missing = tmp_path / "no" / "train"
    assert knn(["--checkpoint-dir", str(pretrained), "--train-path", str(missing)]) == 2
    assert f"error: --train-path={missing} does not exist" in capsys.readouterr().err
    assert not (tmp_path / "no").exists()


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--k", "0"], "argument --k: must be > 0, got 0"),
        (["--temperature", "0"], "argument --temperature: must be a finite number >= 0.0125"),
        (["--temperature", "-1"], "argument --temperature: must be a finite number >= 0.0125"),
        (["--temperature", "inf"], "argument --temperature: must be a finite number >= 0.0125"),
        (["--temperature", "nan"], "argument --temperature: must be a finite number >= 0.0125"),
        # exp(1/T) would overflow float32: every neighbour's weight inf, chance-level accuracy
        (["--temperature", "1e-30"], "argument --temperature: must be a finite number >= 0.0125"),
        (["--batch-size", "0"], "argument --batch-size/--batch_size: must be > 0, got 0"),
    ],
)
def test_knn_settings_that_mean_nothing_are_usage_errors(tmp_path, capsys, option, message):
    assert knn(["--checkpoint-dir", str(tmp_path), *option]) == 2
    assert capsys.readouterr().err.strip().startswith(f"error: solo-deepfusion knn: {message}")


@pytest.mark.parametrize(("distance", "temperature"), [("cosine", 0.07), ("euclidean", None)])
def test_knn_classifier_built_for_any_torchmetrics_matches_solo_learns(distance, temperature):
    """The plugin builds solo-learn's classifier without the ``compute_on_step`` argument that
    torchmetrics >= 0.12 refuses; under CI's torchmetrics 0.11 both spellings give the same."""
    from solo.utils.knn import WeightedKNNClassifier

    from solo_deepfusion.solo.evaluate import WeightedKNN

    g = torch.Generator().manual_seed(0)
    banks = dict(
        train_features=torch.randn(60, 8, generator=g),
        train_targets=torch.randint(0, 3, (60,), generator=g),
        test_features=torch.randn(20, 8, generator=g),
        test_targets=torch.randint(0, 3, (20,), generator=g),
    )
    ours, theirs = (
        cls(k=5, T=temperature, distance_fx=distance)
        for cls in (WeightedKNN, WeightedKNNClassifier)
    )
    for classifier in (ours, theirs):
        classifier.update(**banks)
    assert ours.compute() == theirs.compute()
    assert "compute_on_step" not in vars(ours)
