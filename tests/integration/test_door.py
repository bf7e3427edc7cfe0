"""Validation at the door: bad settings are one line, before any folder is made or data read."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from solo_deepfusion._host import host_problem

if host_problem() is not None:
    pytest.skip(host_problem(), allow_module_level=True)

from solo_deepfusion.errors import UsageError
from solo_deepfusion.solo import launch

pytestmark = pytest.mark.host
SMALL = ("--projector", "transformer", "projector.preset=small")


def one_error_line(capsys) -> str:
    """The last stderr line, after checking that no traceback was printed."""
    err = capsys.readouterr().err.strip().splitlines()
    assert not any("Traceback" in line for line in err)
    return err[-1]


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("optimizer.batch_size=0", "optimizer.batch_size must be a positive integer, got 0"),
        ("optimizer.batch_size=-1", "optimizer.batch_size must be a positive integer, got -1"),
        ("optimizer.lr=-1", "optimizer.lr must be a number > 0, got -1"),
        ("data.fraction=2", "data.fraction must be -1 (all) or in (0, 1], got 2"),
        ("max_epochs=0", "max_epochs must be a positive integer, got 0"),
        ("max_epochs=-1", "max_epochs must be a positive integer, got -1"),
        ("projector.depth=abc", "depth must be an integer >= 0, got 'abc'"),
        ("projector.heads=abc", "heads must be a positive integer, got 'abc'"),
        ("projector.heads=true", "heads must be a positive integer, got True"),
        ("projector.dropout=abc", "dropout must be in [0, 1), got 'abc'"),
        ("projector.ffn_dim=1.5", "ffn_dim must be a positive integer, got 1.5"),
        ("+max_epoch=3", "unknown top-level key(s) ['max_epoch'] (did you mean max_epochs?)"),
        ("+foo=1", "unknown top-level key(s) ['foo']: neither solo-learn, Lightning's Trainer"),
        ("method=byol", "method=byol_transformer needs momentum, which the recipe lacks"),
        (
            "+resume_from_checkpoint=/r/x-ep=0.ckpt",
            "cannot parse the override '+resume_from_checkpoint=/r/x-ep=0.ckpt': mismatched "
            "input '=' expecting <EOF>; its value holds '=': quote it for Hydra, e.g. "
            "\"+resume_from_checkpoint='/r/x-ep=0.ckpt'\"",
        ),
    ],
)
def test_bad_settings_are_one_line_and_make_no_folder(
    quick_args, tmp_path, capsys, override, message
):
    assert launch.pretrain(quick_args(*SMALL, override)) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"error: {message}")
    assert not (tmp_path / "ckpt").exists()  # checkpoint.dir: nothing made, no orphan run


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible here")
def test_accelerator_gpu_without_a_gpu_is_one_line(quick_args, tmp_path, capsys):
    assert launch.pretrain(quick_args(*SMALL, "accelerator=gpu")) == 2
    assert one_error_line(capsys) == (
        "error: accelerator=gpu: no CUDA GPU is visible here; use accelerator=cpu or "
        "accelerator=auto"
    )
    assert not (tmp_path / "ckpt").exists()


def test_an_unknown_recipe_lists_the_recipes(capsys):
    assert launch.pretrain(["--config-name", "nope"]) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: --config-name nope: no such recipe in ")
    assert line.endswith("choose from: cifar10_linear_quick, cifar10_quick")


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_a_checkpoint_dir_that_cannot_be_a_folder_is_one_line(quick_args, tmp_path, capsys, where):
    taken = tmp_path / "taken"
    taken.write_text("mine")
    given = taken if where == "file" else taken / "ckpt"
    assert launch.pretrain(quick_args(*SMALL, f"checkpoint.dir={given}")) == 2
    assert one_error_line(capsys) == (
        f"error: checkpoint.dir={given} cannot be a folder: {taken} is a file"
    )
    assert taken.read_text() == "mine"


def test_a_read_only_checkpoint_dir_is_one_line(quick_args, capsys):
    given = "/proc/solo-deepfusion-test"  # read-only for everyone, root included
    argv = quick_args(*SMALL, f"checkpoint.dir={given}", "++limit_train_batches=1")
    assert launch.pretrain(argv) == 2
    line = one_error_line(capsys)
    assert line.startswith("error: ") and given in line


def test_a_folder_without_write_permission_is_refused_at_the_door(quick_args, tmp_path, capsys):
    """Checked as an unprivileged user: root writes in a read-only folder (CI runs as root, so
    the check runs in a child that drops to ``nobody`` there)."""
    shared = Path(tempfile.mkdtemp(prefix="sdf-door-"))  # traversable by nobody, unlike tmp_path
    try:
        shared.chmod(0o755)
        locked = shared / "locked"
        locked.mkdir(mode=0o555)
        given = f"{locked}/ckpt"
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: unprivileged, reports the door's message through the pipe
            try:
                if os.geteuid() == 0:
                    os.setgid(65534)
                    os.setuid(65534)
                launch.check_writable_dir("checkpoint.dir", given)
                os.write(write, b"accepted")
            except UsageError as err:
                os.write(write, str(err).encode())
            finally:
                os._exit(0)
        os.close(write)
        os.waitpid(pid, 0)
        with os.fdopen(read) as pipe:
            message = pipe.read()
    finally:
        shutil.rmtree(shared, ignore_errors=True)
    assert message == f"checkpoint.dir={given} is not writable ({locked} is read-only here)"


def test_class_folders_without_images_are_one_line(quick_args, cifar_tiny, tmp_path, capsys):
    train = tmp_path / "train"
    shutil.copytree(cifar_tiny / "train", train)
    for image in (train / "cat").iterdir():
        image.unlink()
    (train / "dog" / "notes.txt").write_text("no image here")
    for image in (train / "dog").glob("*.jpg"):
        image.unlink()
    assert launch.pretrain(quick_args(*SMALL, f"data.train_path={train}")) == 2
    assert one_error_line(capsys).startswith(
        f"error: data.train_path={train}: class folder(s) cat, dog hold no image (.jpg, "
    )
    assert not (tmp_path / "ckpt").exists()


def test_a_full_disk_while_saving_is_one_line_and_keeps_no_torn_file(quick_args, tmp_path):
    """Writes past 1 MiB fail (``RLIMIT_FSIZE``: ``EFBIG``, the path a full disk's ``ENOSPC``
    takes); the launcher, in a subprocess, reports the checkpoint it could not write."""
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))\n"
        "from solo_deepfusion.solo.launch import pretrain\n"
        "sys.exit(pretrain(sys.argv[1:]))\n"
    )
    argv = quick_args(*SMALL, "++limit_train_batches=1")
    proc = subprocess.run(
        [sys.executable, "-W", "ignore", "-c", script, *argv],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    line = proc.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: cannot write the checkpoint {tmp_path / 'ckpt'}")
    assert line.endswith(": File too large")
    assert not list((tmp_path / "ckpt").rglob("*.ckpt")) and not list(
        (tmp_path / "ckpt").rglob("*.tmp")
    )


def test_an_unread_top_level_key_in_the_recipe_file_is_only_warned_about(tmp_path, capsys):
    """solo-learn's own ImageNet-100 SimSiam recipe carries ``augmentations_cfg``: not refused."""
    from solo_deepfusion.solo.run import RECIPES_DIR

    recipe = tmp_path / "mine.yaml"
    recipe.write_text((RECIPES_DIR / "cifar10_quick.yaml").read_text() + "\nextra_cfg: 1\n")
    launch.pretrain_config(["--config-path", str(tmp_path), "--config-name", "mine", *SMALL])
    assert (
        "warning: the recipe's top-level key(s) ['extra_cfg'] are read by nothing"
        in capsys.readouterr().err.splitlines()
    )
