"""A relaunch is the same run or a new one, never a silent mix (the real launcher, tiny CIFAR)."""

from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest

from solo_deepfusion._host import host_problem

if host_problem() is not None:
    pytest.skip(host_problem(), allow_module_level=True)

import lightning.pytorch as pl
from filelock import FileLock
from omegaconf import OmegaConf

from solo_deepfusion.solo import launch
from solo_deepfusion.solo.checkpoints import identity_differences, lock_file

pytestmark = pytest.mark.host
METHOD = "simclr_transformer"


def argv(data: Path, ckpt: Path, *extra: str) -> list[str]:
    """One training step per epoch of the small transformer head on the tiny CIFAR folder."""
    return [
        "--config-name",
        "cifar10_quick",
        "--projector",
        "transformer",
        "projector.preset=small",
        f"data.train_path={data / 'train'}",
        f"data.val_path={data / 'val'}",
        "data.num_workers=0",
        "data.fraction=-1",
        "optimizer.batch_size=8",
        "max_epochs=1",
        f"checkpoint.dir={ckpt}",
        "++enable_progress_bar=False",
        "++enable_model_summary=False",
        "++num_sanity_val_steps=0",
        "++limit_val_batches=1",
        "++limit_train_batches=1",
        *extra,
    ]


@pytest.fixture(scope="module")
def finished(cifar_tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A ``checkpoint.dir`` holding one finished 1-epoch run."""
    ckpt = tmp_path_factory.mktemp("finished") / "ckpt"
    assert launch.pretrain(argv(cifar_tiny, ckpt)) == 0
    return ckpt


@pytest.fixture
def ckpt(finished: Path, tmp_path: Path) -> Path:
    """A copy of :func:`finished` this test may change."""
    return Path(shutil.copytree(finished, tmp_path / "ckpt"))


def run_folders(ckpt: Path) -> list[Path]:
    return sorted(p for p in (ckpt / METHOD).iterdir() if p.is_dir())


def epochs_logged(run: Path) -> list[str]:
    with open(run / "metrics.csv", newline="") as fh:
        return sorted({row["epoch"] for row in csv.DictReader(fh) if row.get("epoch")})


class FirstStep(pl.Callback):
    """Records ``(epoch, global_step)`` at the first training batch."""

    def __init__(self) -> None:
        self.seen: tuple[int, int] | None = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.seen = self.seen or (trainer.current_epoch, trainer.global_step)


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("data.train_path=<copy>", "data.train_path="),
        ("data.fraction=0.5", "data.fraction=-1 (now 0.5)"),
        ("++seed=7", "seed=5 (now 7)"),
        ("optimizer.batch_size=4", "optimizer.batch_size=8 (now 4)"),
        ("backbone.stem=cifar", "backbone.stem='imagenet' (now 'cifar')"),
        ("augmentations.0.horizontal_flip.prob=0.0", "augmentations.0.horizontal_flip.prob="),
    ],
)
def test_a_relaunch_that_trains_something_else_starts_a_new_run_and_says_so(
    cifar_tiny, ckpt, tmp_path, capsys, override, named
):
    if override == "data.train_path=<copy>":  # the same images elsewhere: still other data
        shutil.copytree(cifar_tiny / "train", tmp_path / "other")
        override = f"data.train_path={tmp_path / 'other'}"
    (old,) = run_folders(ckpt)
    capsys.readouterr()
    assert launch.pretrain(argv(cifar_tiny, ckpt, "max_epochs=2", override)) == 0
    notices = [line for line in capsys.readouterr().err.splitlines() if "auto-resume" in line]
    assert len(notices) == 1
    assert notices[0].startswith(f"auto-resume: not resuming {old}: it was trained with ")
    assert named in notices[0] and notices[0].endswith("; starting a new run folder")
    new = [run for run in run_folders(ckpt) if run != old]
    assert len(new) == 1 and epochs_logged(new[0]) == ["0", "1"]
    assert epochs_logged(old) == ["0"]  # the finished run is left as it was


def test_what_does_not_change_training_is_not_part_of_the_identity():
    args = OmegaConf.create({"method": "simclr", "max_epochs": 2, "data": {"num_workers": 4}})
    same = OmegaConf.create({"method": "simclr", "max_epochs": 5, "data": {"num_workers": 0}})
    assert identity_differences(args, same) == []
    shorter = OmegaConf.create({"method": "simclr", "max_epochs": 1})
    assert identity_differences(args, shorter) == [("max_epochs", 2, 1)]


def test_a_longer_max_epochs_resumes_the_finished_run_in_its_folder(cifar_tiny, ckpt, capsys):
    (run,) = run_folders(ckpt)
    probe = FirstStep()
    assert launch.pretrain(argv(cifar_tiny, ckpt, "max_epochs=2"), callbacks=[probe]) == 0
    assert probe.seen == (1, 1)  # epoch 1 after epoch 0's one step: resumed, not restarted
    assert "Resuming from previous checkpoint" in capsys.readouterr().out
    assert run_folders(ckpt) == [run] and epochs_logged(run) == ["0", "1"]


def test_the_same_command_on_a_finished_run_says_there_is_nothing_left(cifar_tiny, ckpt, capsys):
    (run,) = run_folders(ckpt)
    assert launch.pretrain(argv(cifar_tiny, ckpt)) == 0
    (saved,) = run.glob("*.ckpt")
    assert (
        f"auto-resume: {saved} ends epoch 0, the last of max_epochs=1: nothing left to train "
        "(raise max_epochs to train on)"
    ) in capsys.readouterr().err.splitlines()
    assert run_folders(ckpt) == [run] and epochs_logged(run) == ["0"]


def test_a_run_folder_in_use_is_refused_and_left_alone(cifar_tiny, ckpt, capsys):
    (run,) = run_folders(ckpt)
    before = sorted(p.name for p in run.iterdir())
    with FileLock(str(lock_file(run))):  # another process training in it
        assert launch.pretrain(argv(cifar_tiny, ckpt, "max_epochs=2")) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {run} is in use: another process is training in it")
    assert "refusing to train there too" in err
    assert sorted(p.name for p in run.iterdir()) == before and epochs_logged(run) == ["0"]


def test_an_explicit_resume_of_a_finished_run_with_more_epochs_trains_on(
    cifar_tiny, ckpt, tmp_path
):
    (saved,) = run_folders(ckpt)[0].glob("*.ckpt")
    probe = FirstStep()
    extra = ("max_epochs=3", f"+resume_from_checkpoint='{saved}'")
    assert launch.pretrain(argv(cifar_tiny, tmp_path / "new", *extra), callbacks=[probe]) == 0
    assert probe.seen == (1, 1)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("projector.depth=2", "is another model: its run has projector.depth=unset (now 2)"),
        ("method=simsiam", "is another model: its run has method='simclr_transformer'"),
        ("<no args.json> projector.depth=2", "does not fit the model of this command"),
    ],
)
def test_an_explicit_resume_of_another_model_is_one_line(
    cifar_tiny, ckpt, tmp_path, capsys, override, message
):
    (saved,) = run_folders(ckpt)[0].glob("*.ckpt")
    if override.startswith("<no args.json>"):
        saved = Path(shutil.copy(saved, tmp_path / "lone.ckpt"))
        override = override.split()[-1]
    extra = [override, f"+resume_from_checkpoint='{saved}'"]
    if override == "method=simsiam":
        extra.append("++method_kwargs.pred_hidden_dim=64")
    assert launch.pretrain(argv(cifar_tiny, tmp_path / "new", *extra)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith(f"error: resume_from_checkpoint={saved} ") and message in err[-1]
    assert not any("Traceback" in line for line in err)


def test_other_data_with_a_broken_image_is_read_and_its_error_shows(
    cifar_tiny, ckpt, tmp_path, capsys
):
    """It used to resume the finished run, train nothing and exit 0 without reading the data."""
    train = Path(shutil.copytree(cifar_tiny / "train", tmp_path / "other"))
    for image in train.glob("*/*.jpg"):  # whichever the one step draws
        image.write_bytes(b"\xff\xd8\xff\xe0 cut short")
    assert launch.pretrain(argv(cifar_tiny, ckpt, f"data.train_path={train}")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert any(line.startswith("auto-resume: not resuming ") for line in err)
    assert err[-1].startswith(f"error: {train}/") and "is not a readable image (" in err[-1]
