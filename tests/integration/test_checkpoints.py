"""Checkpoints: atomic writes, weights-only reads, and which one a relaunched run resumes."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from solo_fixtures import HOST_PROBLEM, fit, method_cfg

if HOST_PROBLEM is not None:
    pytest.skip(HOST_PROBLEM, allow_module_level=True)

from omegaconf import OmegaConf

from solo_deepfusion.solo.checkpoints import (
    SoloCheckpointIO,
    find_resumable,
    read_checkpoint,
    unreadable,
)
from solo_deepfusion.solo.model import build_model

SMALL = {"name": "transformer", "preset": "small", "depth": 1, "dim": 32, "heads": 4}


class RunsAShellCommand:
    """What a hostile ``.ckpt`` holds: unpickling it would run ``touch <marker>``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def simsiam_ckpt(tmp_path_factory) -> Path:
    """A SimSiam checkpoint as solo-learn's main_pretrain saves it: with the static_lr partial."""
    torch.manual_seed(0)
    cfg = method_cfg("simsiam")
    cfg.scheduler = {"name": "warmup_cosine", "warmup_epochs": 0, "interval": "step"}
    trainer = fit(build_model(cfg), steps=1)
    path = tmp_path_factory.mktemp("solo") / "simsiam-ep=0.ckpt"
    trainer.save_checkpoint(path)  # Lightning's own writer: the partial stays in
    return path


def test_solo_learns_static_lr_partial_is_read_as_inert_and_dropped(simsiam_ckpt):
    assert "functools.partial" in torch.serialization.get_unsafe_globals_in_checkpoint(simsiam_ckpt)
    checkpoint = read_checkpoint(simsiam_ckpt)
    assert all("get_lr" not in state for state in checkpoint["lr_schedulers"])
    model = build_model(method_cfg("simsiam"))
    model.load_state_dict(checkpoint["state_dict"], strict=True)
    assert unreadable(simsiam_ckpt) is None


def test_a_checkpoint_that_would_run_code_is_refused_and_runs_nothing(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil-ep=0.ckpt"
    torch.save({"state_dict": {}, "hook": RunsAShellCommand(marker)}, path)
    with pytest.raises(ValueError, match=r"evil-ep=0\.ckpt: refused, it holds more than weights"):
        read_checkpoint(path)
    assert "refused" in unreadable(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 cut short", b"not a checkpoint at all"])
def test_a_torn_or_foreign_file_is_a_one_line_error(tmp_path, content):
    path = tmp_path / "x-ep=1.ckpt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"x-ep=1\.ckpt is not a readable checkpoint") as err:
        read_checkpoint(path)
    assert "\n" not in str(err.value)


def test_a_kill_while_saving_leaves_the_previous_checkpoint_whole(tmp_path):
    """SIGKILL a process in the middle of writing a large checkpoint over a small one."""
    path = tmp_path / "run-ep=0.ckpt"
    script = f"""
import torch
from solo_deepfusion.solo.checkpoints import SoloCheckpointIO
io = SoloCheckpointIO()
io.save_checkpoint({{"epoch": 0, "state_dict": {{"w": torch.ones(3)}}}}, {str(path)!r})
print("first", flush=True)
while True:  # rewrite it, big, until killed
    io.save_checkpoint({{"epoch": 1, "state_dict": {{"w": torch.ones(2**28)}}}}, {str(path)!r})
"""
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "first"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:  # until a temporary file is being written
            partial = [p for p in tmp_path.glob(".*.tmp") if p.stat().st_size > 2**20]
            if partial:
                break
            time.sleep(0.001)
        assert partial, "never saw the checkpoint being written"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    checkpoint = read_checkpoint(path)  # the file under the real name is always whole
    assert checkpoint["epoch"] in (0, 1) and len(checkpoint["state_dict"]["w"]) in (3, 2**28)
    assert sorted(p.name for p in tmp_path.glob("*.ckpt")) == ["run-ep=0.ckpt"]


def write_run(folder: Path, args: dict | None, checkpoints: dict[str, bytes | dict]) -> None:
    folder.mkdir(parents=True)
    if args is not None:
        (folder / "args.json").write_text(json.dumps(args))
    for name, content in checkpoints.items():
        if isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            SoloCheckpointIO().save_checkpoint(content, folder / name)


def test_auto_resume_takes_the_last_complete_checkpoint_and_says_what_it_skipped(tmp_path, capsys):
    args = {"method": "simclr_transformer", "projector": {"name": "transformer", "depth": 4}}
    cfg = OmegaConf.create(args)
    good = {"epoch": 0, "state_dict": {}}
    whole = tmp_path / "good.ckpt"
    SoloCheckpointIO().save_checkpoint({"epoch": 1, "state_dict": {}}, whole)
    torn = whole.read_bytes()[: whole.stat().st_size // 2]
    logdir = tmp_path / "simclr_transformer"
    write_run(logdir / "v1", args, {"r-v1-ep=0.ckpt": good, "r-v1-ep=1.ckpt": torn})
    write_run(logdir / "v2", None, {"r-v2-ep=5.ckpt": good})  # orphan: no args.json
    deeper = {**args, "projector": {"name": "transformer", "depth": 6}}
    write_run(logdir / "v3", deeper, {"r-v3-ep=9.ckpt": good})  # another projector

    path, run_id = find_resumable(logdir, cfg, max_hours=36)
    assert path == logdir / "v1" / "r-v1-ep=0.ckpt" and run_id is None
    notices = capsys.readouterr().err.strip().splitlines()
    assert len(notices) == 2
    assert notices[0].startswith(f"auto-resume: skipping {logdir / 'v1' / 'r-v1-ep=1.ckpt'}: ")
    assert notices[1] == (
        f"auto-resume: skipping {logdir / 'v2'}: no readable args.json beside its checkpoints"
    )
    assert find_resumable(logdir, OmegaConf.create(deeper), 36)[0] == (
        logdir / "v3" / "r-v3-ep=9.ckpt"
    )
    assert find_resumable(tmp_path / "none", cfg, 36) == (None, None)


def test_find_run_takes_the_highest_epoch_and_names_what_is_missing(tmp_path):
    from solo_deepfusion.errors import UsageError
    from solo_deepfusion.solo.checkpoints import find_run

    run = tmp_path / "run"
    write_run(run, {"method": "simclr"}, {"r-ep=10.ckpt": b"x", "r-ep=2.ckpt": b"y"})
    os.utime(run / "r-ep=10.ckpt", (1, 1))  # older file, higher epoch: the epoch decides
    assert find_run(run).checkpoint == run / "r-ep=10.ckpt"
    assert find_run(run / "r-ep=2.ckpt").cfg.method == "simclr"
    (run / "args.json").write_text('{"method": "../escape"}')
    with pytest.raises(UsageError, match=r"method='../escape' is not one of solo-learn's"):
        find_run(run)
    with pytest.raises(
        UsageError, match=r"no-such does not exist: no such checkpoint file, run folder or zoo"
    ):
        find_run(tmp_path / "no-such")
