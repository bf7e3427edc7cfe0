"""``solo-deepfusion pretrain``: argv rewriting, config, CPU settings, fits, resuming, DALI, DDP."""

from __future__ import annotations

import csv
import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from solo_deepfusion._host import host_problem

if host_problem() is not None:
    pytest.skip(host_problem(), allow_module_level=True)

import lightning.pytorch as pl
from omegaconf import OmegaConf
from solo.methods import METHODS

from solo_deepfusion import datasets
from solo_deepfusion.errors import UsageError
from solo_deepfusion.heads import list_projectors
from solo_deepfusion.solo import launch, run

pytestmark = pytest.mark.host
SMALL = ("--projector", "transformer", "projector.preset=small")


def runs(ckpt_dir: Path, method: str) -> list[Path]:
    """The run folders of ``method`` that hold a checkpoint."""
    return sorted({p.parent for p in (ckpt_dir / method).glob("*/*.ckpt")})


def read_args(run: Path) -> dict:
    return json.loads((run / "args.json").read_text())


# ---------------------------------------------------------------------------------------------
# Pure functions


@pytest.mark.parametrize(
    "argv",
    [
        ["--projector", "transformer", "a=1"],
        ["--projector=transformer", "a=1"],
        ["projector=transformer", "a=1"],
        ["+projector=transformer", "a=1"],
        ["++projector=transformer", "a=1"],
        ["a=1", "--projector", "mlp", "projector=transformer"],  # the last one wins
    ],
)
def test_rewrite_projector_args(argv):
    assert run.rewrite_projector_args(argv) == ["a=1", "+projector=transformer"]


def test_rewrite_keeps_projector_fields_and_absence():
    argv = ["projector.depth=4", "+projector.x=1", "method=simclr"]
    assert run.rewrite_projector_args(argv) == argv


@pytest.mark.parametrize("argv", [["--projector"], ["--projector="], ["projector="]])
def test_projector_needs_a_value(argv):
    with pytest.raises(UsageError, match="needs a value"):
        run.rewrite_projector_args(argv)


@pytest.mark.parametrize(
    ("devices", "accelerator", "indices", "for_lightning"),
    [
        (1, "cpu", [0], 1),
        ("1", "cpu", [0], 1),
        ([0], "cpu", [0], 1),
        (2, "cpu", [0, 1], 2),
        ("auto", "cpu", [0], 1),
        ("0,1", "gpu", [0, 1], [0, 1]),
        ([1], "gpu", [1], [1]),
        (2, "gpu", [0, 1], [0, 1]),
    ],
)
def test_devices_in_every_form(devices, accelerator, indices, for_lightning):
    assert run.device_indices(devices, accelerator) == indices
    cfg = OmegaConf.create({"devices": indices, "accelerator": accelerator})
    assert run.lightning_devices(cfg) == for_lightning


@pytest.mark.parametrize(
    ("precision", "expected"), [("16-mixed", 32), (16, 32), ("bf16-mixed", "bf16-mixed"), (32, 32)]
)
def test_cpu_settings(precision, expected):
    cfg = OmegaConf.create(
        {"accelerator": "cpu", "devices": "1", "precision": precision, "sync_batchnorm": True}
    )
    cfg = run.prepare_hardware(cfg)
    assert (cfg.precision, cfg.sync_batchnorm, list(cfg.devices)) == (expected, False, [0])


def test_archived_split_is_unpacked_once(cifar_tiny, tmp_path, monkeypatch):
    monkeypatch.setenv("SOLO_DEEPFUSION_CACHE", str(tmp_path / "cache"))
    with tarfile.open(tmp_path / "val.tar.gz", "w:gz") as tar:
        tar.add(cifar_tiny / "val", arcname="val")
    path = Path(datasets.unpacked(tmp_path / "val"))
    assert path.is_relative_to(tmp_path / "cache") and len(list(path.glob("*/*.jpg"))) == 40
    assert datasets.unpacked(str(tmp_path / "val")) == str(path)  # reused, not unpacked again
    assert len(list((tmp_path / "cache" / "datasets").iterdir())) == 1
    assert datasets.unpacked(cifar_tiny / "val") == str(cifar_tiny / "val")  # folders: as they are


# ---------------------------------------------------------------------------------------------
# Config (composed, not trained)


def test_projector_group_and_its_overrides():
    cfg = launch.pretrain_config(
        ["--config-name", "cifar10_quick", *SMALL, "projector.depth=4", "projector.mask=positives"]
    )
    assert cfg.method == "simclr_transformer"
    assert (cfg.projector.preset, cfg.projector.depth, cfg.projector.mask) == (
        "small",
        4,
        "positives",
    )


def test_projector_transformer_alone_is_the_cosine_tied_preset_at_a_tenth_of_the_lr():
    cfg = launch.pretrain_config(["--config-name", "cifar10_quick", "--projector", "transformer"])
    assert cfg.method == "simclr_transformer"
    assert (cfg.projector.preset, cfg.projector.lr_scale) == ("cosine_tied", 0.1)
    assert cfg.projector.norm is None and cfg.projector.output_norm is None  # the preset's
    twin = launch.pretrain_config(["--config-name", "cifar10_quick", "--projector", "mlp_matched"])
    assert (twin.projector.preset, twin.projector.get("lr_scale")) == ("cosine_tied", None)


def test_projector_residual_mlp_is_the_default_trunk_at_a_tenth_of_the_lr():
    argv = ["--config-name", "cifar10_quick", "--projector", "residual_mlp", "projector.depth=4"]
    cfg = launch.pretrain_config(argv)
    assert cfg.method == "simclr_residual_mlp"
    pcfg = cfg.projector
    assert (pcfg.lr_scale, pcfg.depth, pcfg.dim, pcfg.output_norm) == (0.1, 4, 256, "batch")
    assert "preset" not in pcfg


@pytest.mark.parametrize("argv", [[], ["--projector", "mlp"]])
def test_mlp_or_no_projector_is_the_stock_method(argv):
    cfg = launch.pretrain_config(["--config-name", "cifar10_quick", *argv])
    assert (cfg.method, cfg.projector.name) == ("simclr", "mlp")


def test_a_variant_method_alone_selects_its_projector():
    cfg = launch.pretrain_config(["--config-name", "cifar10_quick", "method=simclr_transformer"])
    assert (cfg.method, cfg.projector.name) == ("simclr_transformer", "transformer")


def test_unknown_projector_lists_the_choices(capsys):
    assert launch.pretrain(["--config-name", "cifar10_quick", "--projector", "mlpp"]) == 2
    err = capsys.readouterr().err
    assert "unknown projector 'mlpp'" in err
    assert ", ".join(list_projectors()) in err


@pytest.mark.parametrize(
    ("field", "message"),
    [
        ("projector.lr_scale=0", "projector.lr_scale must be a number > 0, got 0"),
        ("projector.qk_norm=maybe", "qk_norm='maybe' is not supported; choose one of"),
        ("projector.centred_attention=1", "centred_attention=1 is not supported; choose one"),
        ("projector.input_norm=2", "input_norm=2 is not supported; choose one of"),
        ("projector.output_norm=layer", "output_norm='layer' is not supported; choose one"),
        ("projector.heads=3", "dim=256 must be divisible by heads=3"),
        ("+projector.depht=3", "unknown projector field(s) ['depht']"),
        ("projector.preset=huge", "preset='huge' is not supported; choose one of"),
        ("projector.mask=bogus", "mask='bogus' is not supported; choose one of"),
        ("projector.dropout=1.5", "dropout must be in [0, 1), got 1.5"),
        ("projector.depth=-1", "depth must be an integer >= 0, got -1"),
        ("projector.ffn_dim=0", "ffn_dim must be a positive integer, got 0"),
    ],
)
def test_bad_head_fields_are_one_line_usage_errors(field, message, capsys, tmp_path):
    (tmp_path / "class_a").mkdir()  # an image folder: the data check passes, the model fails
    argv = ["--config-name", "cifar10_quick", "--projector", "transformer", field]
    argv += [f"data.train_path={tmp_path}", "data.val_path=null"]
    assert launch.pretrain(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1] == f"error: {message}" or err[-1].startswith(f"error: {message}")
    assert not any("Traceback" in line for line in err)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["method=mae", *SMALL], "no projection head"),
        (["method=simclr_transformer", "--projector", "mlp"], "contradicts"),
        (["--bogus"], "unrecognized arguments: --bogus"),
        (["augmentations.0.num_crops=4"], "needs 2 large crops"),
    ],
)
def test_usage_errors(argv, message):
    with pytest.raises(UsageError, match=message):
        launch.pretrain_config(["--config-name", "cifar10_quick", *argv])


def test_wmse_variants_keep_the_wmse_crop_rule():
    cfg = launch.pretrain_config(
        ["--config-name", "cifar10_quick", "method=wmse", *SMALL, "augmentations.0.num_crops=4"]
    )
    assert (cfg.method, cfg.data.num_large_crops) == ("wmse_transformer", 4)


# ---------------------------------------------------------------------------------------------
# Fits


def test_pretrain_writes_args_and_checkpoint(quick_args, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert launch.pretrain(quick_args(*SMALL, "++limit_train_batches=2")) == 0
    (run,) = runs(tmp_path / "ckpt", "simclr_transformer")
    args = read_args(run)
    assert (args["method"], args["projector"]["preset"]) == ("simclr_transformer", "small")
    assert args["data"]["train_path"].endswith("train")  # interpolations resolved
    assert (run / "metrics.csv").is_file()  # the CSV log sits with the checkpoint
    assert not (tmp_path / "lightning_logs").exists()
    checkpoint = torch.load(next(run.glob("*.ckpt")), map_location="cpu", weights_only=True)
    assert any(k.startswith("projector.head.") for k in checkpoint["state_dict"])


def test_bf16_mixed_training_feeds_the_collapse_monitor_its_float32_head(quick_args, tmp_path):
    """Under bf16 autocast the backbone's pooled features are bf16; the collapse monitor runs
    the float32 head on them outside the step's autocast (the GPU session's precision)."""
    argv = quick_args(
        *SMALL,
        "precision=bf16-mixed",
        "++limit_train_batches=2",
        "projector.collapse_monitor_every=1",
    )
    assert launch.pretrain(argv) == 0
    (run,) = runs(tmp_path / "ckpt", "simclr_transformer")
    rows = [
        r for r in csv.DictReader((run / "metrics.csv").open()) if r.get("collapse/output_rank")
    ]
    assert [r["step"] for r in rows] == ["0", "1"]
    assert all(float(r["collapse/output_rank"]) > 0 for r in rows)


def test_fusion_monitor_from_the_recipe_logs_per_layer_numbers(quick_args, tmp_path):
    argv = quick_args(
        *SMALL,
        "++limit_train_batches=1",
        "max_epochs=2",
        "projector.fusion_monitor=true",
        "projector.fusion_monitor_samples=20",
    )
    assert launch.pretrain(argv) == 0
    (run,) = runs(tmp_path / "ckpt", "simclr_transformer")
    lines = [json.loads(line) for line in (run / "fusion.jsonl").read_text().splitlines()]
    assert [line["epoch"] for line in lines] == [0, 1]
    assert all(len(line["layers"]) == 4 for line in lines)  # the small preset's depth
    assert "fusion/layer4/fusion_ratio" in (run / "metrics.csv").read_text()


def test_mlp_projector_trains_the_stock_method(quick_args, tmp_path):
    trainer = launch.run_pretrain(quick_args("--projector", "mlp", "++limit_train_batches=1"))
    assert type(trainer.lightning_module) is METHODS["simclr"]
    (run,) = runs(tmp_path / "ckpt", "simclr")
    assert read_args(run)["method"] == "simclr"


def test_mlp_with_an_output_batchnorm_trains_its_own_variant(quick_args, tmp_path):
    argv = quick_args(
        "--projector", "mlp", "projector.output_norm=batch", "++limit_train_batches=1"
    )
    trainer = launch.run_pretrain(argv)
    model = trainer.lightning_module
    assert type(model) is METHODS["simclr_mlp"]
    assert isinstance(model.projector.head[-1], torch.nn.BatchNorm1d)
    (run,) = runs(tmp_path / "ckpt", "simclr_mlp")  # never mixed with a stock run's folder
    assert read_args(run)["projector"]["output_norm"] == "batch"


class RunsAShellCommand:
    """What a hostile ``.ckpt`` holds: unpickling it would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


class CrashAt(pl.Callback):
    """Stands for a killed job: raises at ``batch`` of ``epoch``."""

    def __init__(self, epoch: int, batch: int) -> None:
        self.epoch, self.batch = epoch, batch

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if (trainer.current_epoch, batch_idx) == (self.epoch, self.batch):
            raise RuntimeError("killed")


class FirstStep(pl.Callback):
    """Records ``(epoch, global_step)`` at the first training batch."""

    def __init__(self) -> None:
        self.seen: tuple[int, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen = self.seen or (trainer.current_epoch, trainer.global_step)


def test_killed_run_resumes_from_its_checkpoint(quick_args, tmp_path, capsys):
    """Relaunched, a killed run continues from its last complete checkpoint, in its folder."""
    # SimSiam: solo-learn keeps a functools.partial in its scheduler (see solo/checkpoints.py).
    argv = quick_args(
        *SMALL,
        "method=simsiam",
        "++method_kwargs.pred_hidden_dim=64",
        "max_epochs=2",
        "++limit_train_batches=3",
    )
    with pytest.raises(RuntimeError, match="killed"):
        launch.pretrain(argv, callbacks=[CrashAt(epoch=1, batch=1)])
    (run,) = runs(tmp_path / "ckpt", "simsiam_transformer")
    (saved,) = run.glob("*-ep=0.ckpt")
    # what a kill in the middle of a (non-atomic) write would have left: a torn newer file
    torn = saved.with_name(saved.name.replace("ep=0", "ep=1"))
    torn.write_bytes(saved.read_bytes()[:1000])
    capsys.readouterr()

    probe = FirstStep()
    assert launch.pretrain(argv, callbacks=[probe]) == 0
    assert probe.seen == (1, 3)  # epoch 1 from global step 3: epoch 0's checkpoint was resumed
    assert f"auto-resume: skipping {torn}: " in capsys.readouterr().err
    assert runs(tmp_path / "ckpt", "simsiam_transformer") == [run]  # one folder, one history
    checkpoint = torch.load(torn, map_location="cpu", weights_only=True)  # rewritten whole
    assert (checkpoint["epoch"], checkpoint["global_step"]) == (1, 6)
    with open(run / "metrics.csv", newline="") as fh:
        epochs = {row["epoch"] for row in csv.DictReader(fh) if row.get("epoch")}
    assert epochs == {"0", "1"}


def test_a_checkpoint_that_runs_code_is_never_resumed(quick_args, tmp_path, capsys):
    marker = tmp_path / "ran"
    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": RunsAShellCommand(marker)}, evil)
    argv = quick_args(*SMALL, f"++resume_from_checkpoint={evil}")
    assert launch.pretrain(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: resume_from_checkpoint={evil}: refused")
    assert not marker.exists()


def test_dali_cpu_pipeline_trains_an_epoch(quick_args, tmp_path):
    pytest.importorskip("nvidia.dali", reason="NVIDIA DALI is not installed")
    # DeepClusterV2 also needs the data module's dataset size (the Lightning 1.x API it reads).
    argv = quick_args(
        *SMALL,
        "method=deepclusterv2",
        "++method_kwargs.num_prototypes=[10,10]",
        "data.dataset=custom",
        "data.format=dali",
        "data.val_path=null",
        "++dali.device=cpu",
        "++dali.encode_indexes_into_labels=True",
    )
    trainer = launch.run_pretrain(argv)
    assert trainer.global_step == 10  # 80 images, batches of 8
    assert runs(tmp_path / "ckpt", "deepclusterv2_transformer")


def test_ddp_on_two_cpu_processes(quick_args, tmp_path):
    # Lightning's DDP re-runs the command in a second process, so this runs as a command.
    argv = quick_args(*SMALL, "strategy=ddp", "devices=2", "++limit_train_batches=2")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    done = subprocess.run(
        [sys.executable, "-m", "solo_deepfusion.solo.launch", *argv],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-4000:]
    (run,) = runs(tmp_path / "ckpt", "simclr_transformer")
    args = read_args(run)
    assert (args["devices"], args["strategy"]) == ([0, 1], "ddp")
    checkpoint = torch.load(next(run.glob("*.ckpt")), map_location="cpu", weights_only=True)
    assert checkpoint["global_step"] == 2


# ---------------------------------------------------------------------------------------------
# Every stock CIFAR recipe of solo-learn, with the transformer head


def _stock_recipes() -> list[Path]:
    import solo

    default = Path(solo.__file__).resolve().parents[1] / "scripts"
    folder = Path(os.environ.get("SOLO_LEARN_SCRIPTS", default)) / "pretrain" / "cifar"
    return sorted(folder.glob("*.yaml"))


# What a fit on batches of 4 needs besides the recipe (W-MSE whitens a batch: dims < samples).
_TINY = {
    "deepclusterv2": ["method_kwargs.num_prototypes=[10,10,10]"],
    "wmse": ["method_kwargs.whitening_size=4", "method_kwargs.proj_output_dim=2"],
}


@pytest.mark.slow
@pytest.mark.parametrize("recipe", _stock_recipes() or [None], ids=lambda p: p and p.stem)
def test_stock_cifar_recipe_with_transformer_head(recipe, cifar_tiny, tmp_path):
    if recipe is None:
        pytest.skip("solo-learn's scripts/ not found; set SOLO_LEARN_SCRIPTS")
    method = OmegaConf.load(recipe).method
    argv = [
        f"--config-path={recipe.parent}",
        f"--config-name={recipe.name}",
        *SMALL,
        f"data.train_path={cifar_tiny / 'train'}",
        f"data.val_path={cifar_tiny / 'val'}",
        "data.num_workers=0",
        "optimizer.batch_size=4",
        "max_epochs=1",
        "accelerator=cpu",
        "devices=1",
        "wandb.enabled=False",
        "auto_resume.enabled=False",
        f"checkpoint.dir={tmp_path}",
        "++backbone.stem=imagenet",  # ~8x cheaper than the recipes' CIFAR stem at 32 px
        "++limit_train_batches=2",
        "++limit_val_batches=1",
        "++num_sanity_val_steps=0",
        "++enable_progress_bar=False",
        "++enable_model_summary=False",
        *_TINY.get(method, []),
    ]
    if method == "mae":  # a ViT without projection head: no variant, and a clear message
        with pytest.raises(UsageError, match="no projection head"):
            launch.pretrain_config(argv)
        return
    trainer = launch.run_pretrain(argv)
    assert trainer.global_step == 2
    assert runs(tmp_path, f"{method}_transformer")


def test_a_data_path_typo_is_refused_and_nothing_is_downloaded(quick_args, tmp_path, capsys):
    missing = tmp_path / "nonexistent" / "cifar"
    argv = quick_args(f"data.train_path={missing}/train")
    assert launch.pretrain(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: data.train_path={missing}/train does not exist: no cifar10")
    assert "++data.download=true" in err
    assert not (tmp_path / "nonexistent").exists()
    # the config itself composes; opting in hands the path to torchvision, as solo-learn does
    cfg = launch.pretrain_config([*argv, "++data.download=true"])
    assert cfg.data.train_path == f"{missing}/train" and cfg.data.download


def test_images_without_class_folders_are_refused(quick_args, cifar_tiny, tmp_path, capsys):
    flat = tmp_path / "flat"
    flat.mkdir()
    for image in list((cifar_tiny / "train").glob("*/*.jpg"))[:4]:
        (flat / image.name).write_bytes(image.read_bytes())
    assert launch.pretrain(quick_args(f"data.train_path={flat}")) == 2
    assert "holds no class sub-folders" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("content", "workers"), [(b"", 0), (b"GIF89a not really", 0), (b"\xff\xd8\xff\xe0", 1)]
)
def test_an_unreadable_image_is_a_one_line_error(
    quick_args, cifar_tiny, tmp_path, capsys, content, workers
):
    train = tmp_path / "train"
    shutil.copytree(cifar_tiny / "train", train)
    bad = next(train.glob("airplane/*.jpg"))
    bad.write_bytes(content)
    argv = quick_args(*SMALL, f"data.train_path={train}", f"data.num_workers={workers}")
    assert launch.pretrain(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {bad} is not a readable image (")


def test_a_batch_larger_than_the_data_is_refused(quick_args, capsys):
    assert launch.pretrain(quick_args(*SMALL, "optimizer.batch_size=81")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err == (
        "error: optimizer.batch_size=81 is larger than the training set (80 images): "
        "not one batch to train on"
    )
