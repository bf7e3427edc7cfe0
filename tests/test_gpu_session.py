"""The GPU session's CPU-side parts (scripts/gpu_session.py): planning, sizing, resume, packing.

What only a GPU can show is run by scripts/rehearse_gpu_session.sh (its log is committed under
benchmarks/gpu/); these tests need neither a GPU nor solo-learn.
"""

from __future__ import annotations

import importlib.util
import io
import sys
import tarfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_session.py"


@pytest.fixture(scope="module")
def session():
    spec = importlib.util.spec_from_file_location("gpu_session", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_session"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    yield module
    del sys.modules["gpu_session"]


def test_epochs_fill_the_time_left_after_overheads(session):
    scale = session.SCALES["full"]
    # 0.85 x 600 s - 30 s packing - 2 x 60 s overheads = 360 s for 2 arms at 10 s per epoch
    assert session.epochs_that_fit(600, 2, 10.0, scale) == 18
    assert session.epochs_that_fit(150, 2, 10.0, scale) == 0
    assert session.epochs_that_fit(10_000, 2, 0.1, scale) == scale.max_epochs


def test_the_control_arm_runs_only_when_every_arm_gets_enough_epochs(session):
    scale = session.SCALES["full"]
    arms, epochs = session.choose_arms(1000, 5.0, scale)  # (850 - 30 - 240) / 20
    assert [a.label for a in arms] == ["mlp", "default", "stable_bn", "mlp_bn"]
    assert epochs == 29
    arms, epochs = session.choose_arms(550, 5.0, scale)  # 4 arms: 9 epochs; 3: (467.5-210)/15
    assert [a.label for a in arms] == ["mlp", "default", "stable_bn"] and epochs == 17
    arms, epochs = session.choose_arms(540, 10.0, scale)  # 3 arms: 8 epochs; 2: 15
    assert [a.label for a in arms] == ["mlp", "default"] and epochs == 15
    arms, epochs = session.choose_arms(400, 10.0, scale)  # 2 arms: 9, under min_epochs
    assert [a.label for a in arms] == ["mlp", "default"] and epochs == 9
    arms, epochs = session.choose_arms(100, 10.0, scale)  # nothing fits: still one epoch
    assert [a.label for a in arms] == ["mlp", "default"] and epochs == 1


def test_epoch_time_comes_from_the_measured_rate_with_a_margin(session):
    assert session.epoch_seconds(50_000, 10_000) == pytest.approx(5.5)


def throughput(rates: dict[str, float]) -> dict:
    return {"arms": {label: {"images_per_s": r} for label, r in rates.items()}}


def test_the_plan_is_sized_by_the_slowest_arm_and_kept_for_a_second_call(session, tmp_path):
    scale = session.SCALES["full"]
    state = session.State(tmp_path)
    plan = session.plan_session(
        state, throughput({"mlp": 20_000, "default": 10_000}), 540, scale, "H200"
    )
    assert plan["images_per_s"] == 10_000 and plan["epochs"] == 15  # (459-30-180)/(3*5.5)
    assert plan["arms"] == ["mlp", "default", "stable_bn"]
    assert (tmp_path / "plan.json").is_file()
    # A second call (resuming after the 10-minute limit) finds the plan, whatever time is left.
    again = session.plan_session(
        session.State(tmp_path), throughput({"mlp": 1.0, "default": 1.0}), 60, scale, "H200"
    )
    assert again == plan


def test_state_is_written_whole_and_read_back(session, tmp_path):
    state = session.State(tmp_path)
    state.record("throughput", {"batch_size": 512})
    state.record("exported", ["a"])
    assert session.State(tmp_path).data == {"throughput": {"batch_size": 512}, "exported": ["a"]}
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]  # no temp file left


def test_projector_specs_become_launcher_arguments(session):
    arm = session.Arm("x", "transformer:lr_scale=0.1,mixing=mean,preset=stable_bn")
    assert session.projector_argv(arm) == [
        "--projector", "transformer", "projector.lr_scale=0.1", "projector.mixing=mean",
        "projector.preset=stable_bn",
    ]  # fmt: skip
    assert session.projector_argv(session.Arm("m", "mlp")) == ["--projector", "mlp"]


def write(path: Path, size: int, fill: bytes = b"x") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(fill * size)
    return path


def test_the_bundle_lists_results_first_and_only_published_arms_weights(session, tmp_path):
    for name in ("results.jsonl", "report.md", "plan.json", "session.log"):
        write(tmp_path / name, 10)
    for entry in ("simclr-r18-cifar10-gpu", "simclr-deepfusion-r18-cifar10-gpu"):
        write(tmp_path / "export" / entry / f"{entry}.full.safetensors", 10)
        write(tmp_path / "export" / entry / f"{entry}.args.json", 10)
        write(tmp_path / "export" / entry / "cell.json", 10)
    names = [p.name for p in session.bundle_members(tmp_path, session.ARMS)]
    assert names == [
        "plan.json", "results.jsonl", "report.md", "session.log",
        "cell.json", "simclr-deepfusion-r18-cifar10-gpu.args.json",
        "simclr-deepfusion-r18-cifar10-gpu.full.safetensors",
        "cell.json", "simclr-r18-cifar10-gpu.args.json",
        "simclr-r18-cifar10-gpu.full.safetensors",
    ]  # fmt: skip
    # a second call sends the results again, not the entry the first call returned
    again = session.bundle_members(
        tmp_path, session.ARMS, ["export/simclr-deepfusion-r18-cifar10-gpu"]
    )
    assert [p.name for p in again][-3:] == [
        "cell.json",
        "simclr-r18-cifar10-gpu.args.json",
        "simclr-r18-cifar10-gpu.full.safetensors",
    ]
    assert "simclr-deepfusion-r18-cifar10-gpu.args.json" not in [p.name for p in again]


def test_pack_splits_into_parts_the_device_tool_returns_and_they_restore(session, tmp_path):
    work, out = tmp_path / "work", tmp_path / "out"
    mib = session.MIB
    members = [
        write(work / "results.jsonl", 1000, b"r"),
        write(work / "export" / "a" / "a.full.safetensors", 23 * mib, b"a"),
        write(work / "export" / "b" / "b.full.safetensors", 30 * mib, b"b"),
        write(work / "export" / "c" / "c.full.safetensors", 10 * mib, b"c"),  # does not fit
        write(work / "report.md", 500, b"m"),  # after a member that did not fit: still in
    ]
    parts, left_out = session.pack(members, work, out)
    assert left_out == [members[3]]
    assert [p.name for p in parts] == [f"bundle.tar.{i:03d}" for i in range(len(parts))]
    assert len(parts) <= 4 and all(p.stat().st_size <= session.PART_BYTES for p in parts)
    assert sum(p.stat().st_size for p in parts) <= session.MAX_BUNDLE_BYTES
    joined = b"".join(p.read_bytes() for p in parts)
    with tarfile.open(fileobj=io.BytesIO(joined)) as tar:
        names = tar.getnames()
        assert names == [
            "results.jsonl", "export/a/a.full.safetensors", "export/b/b.full.safetensors",
            "report.md",
        ]  # fmt: skip
        assert tar.extractfile("export/b/b.full.safetensors").read() == b"b" * 30 * mib


def test_dry_run_prints_wheels_plan_and_time_per_part(session, tmp_path, capsys):
    write(tmp_path / "whl" / "solo_learn-1.0.6-py3-none-any.whl", 2 * session.MIB)
    assert session.main(["--dry-run", "--wheels", str(tmp_path / "whl")]) == 0
    text = capsys.readouterr().out
    assert "wheels (1, 2.0 MiB)" in text and "solo_learn-1.0.6-py3-none-any.whl" in text
    assert "train+eval mlp" in text and "train+eval default" in text
    assert "sized again from the throughput measured" in text


def test_an_entry_counts_as_returned_only_once_its_weights_went_back(session, tmp_path):
    entry = tmp_path / "export" / "e"
    record, weights = entry / "cell.json", entry / "e.full.safetensors"
    first = session.returned_entries([record, weights], [weights], tmp_path, [])
    assert first == []  # the record went back, the weights did not fit: the next call sends them
    assert session.returned_entries([record, weights], [], tmp_path, first) == ["export/e"]
