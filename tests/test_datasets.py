"""Archive unpacking: the same checks with and without tarfile's ``filter=`` (Python < 3.11.4)."""

from __future__ import annotations

import io
import stat
import tarfile
from pathlib import Path

import pytest

from solo_deepfusion.datasets import extract, prepare_data
from solo_deepfusion.errors import UsageError

# Python >= 3.11.4 has tarfile's data filter; older ones are tested by hand only (CI also runs
# the suite under Debian's 3.11.2, where a skip would fail the run).
MODES = [True, False] if hasattr(tarfile, "data_filter") else [False]
BOTH = pytest.mark.parametrize("use_filter", MODES, ids=lambda on: "filter" if on else "by-hand")


def _add(tar: tarfile.TarFile, name: str, kind: bytes = tarfile.REGTYPE, **fields: object) -> None:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    data = b"x" if kind == tarfile.REGTYPE else b""
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _archive(path: Path, *entries: tuple) -> Path:
    with tarfile.open(path, "w:gz") as tar:
        for entry in entries:
            _add(tar, *entry[:2], **(entry[2] if len(entry) > 2 else {}))
    return path


def _tree(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): stat.S_IMODE(p.stat().st_mode) for p in root.rglob("*")}


@BOTH
def test_unpacks_files_and_folders_with_clean_modes(tmp_path: Path, use_filter: bool) -> None:
    archive = _archive(
        tmp_path / "a.tar.gz",
        ("train", tarfile.DIRTYPE, {"mode": 0o777}),
        ("train/cat/1.jpg", tarfile.REGTYPE, {"mode": 0o4777}),
        ("train/cat/2.jpg", tarfile.REGTYPE, {"mode": 0o666}),
    )
    with tarfile.open(archive) as tar:
        extract(tar, tmp_path / "out", use_filter=use_filter)
    modes = _tree(tmp_path / "out")
    assert modes["train/cat/1.jpg"] == 0o755  # setuid and group/other write dropped
    assert modes["train/cat/2.jpg"] == 0o644
    assert (tmp_path / "out/train/cat/1.jpg").read_bytes() == b"x"


@BOTH
def test_file_modes_are_the_data_filters(tmp_path: Path, use_filter: bool) -> None:
    archive = _archive(
        tmp_path / "a.tar.gz",
        ("d/x.jpg", tarfile.REGTYPE, {"mode": 0o2775}),
        ("d/y.jpg", tarfile.REGTYPE, {"mode": 0o400}),
    )
    with tarfile.open(archive) as tar:
        extract(tar, tmp_path / "out", use_filter=use_filter)
    modes = _tree(tmp_path / "out")
    assert (modes["d/x.jpg"], modes["d/y.jpg"]) == (0o755, 0o600)


@BOTH
@pytest.mark.parametrize(
    ("entry", "words"),
    [
        (("../evil.jpg",), "outside"),
        (("a/../../evil.jpg",), "outside"),
        (("/tmp/evil.jpg",), "outside"),
        (("link", tarfile.SYMTYPE, {"linkname": "/etc/passwd"}), "not a regular file"),
        (("hard", tarfile.LNKTYPE, {"linkname": "/etc/passwd"}), "not a regular file"),
        (("fifo", tarfile.FIFOTYPE), "not a regular file"),
    ],
    ids=["dotdot", "nested-dotdot", "absolute", "symlink", "hardlink", "fifo"],
)
def test_refuses_unsafe_members_before_writing(
    tmp_path: Path, use_filter: bool, entry: tuple, words: str
) -> None:
    archive = _archive(tmp_path / "a.tar.gz", ("ok.jpg",), entry)
    with tarfile.open(archive) as tar, pytest.raises(UsageError, match=words) as err:
        extract(tar, tmp_path / "out", use_filter=use_filter)
    assert "\n" not in err.value.one_line()
    assert not (tmp_path / "out").exists()
    assert not (tmp_path / "evil.jpg").exists()


def test_prepare_data_without_the_filter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What Python 3.11.0-3.11.3 gives: no ``tarfile.data_filter``, no ``filter=``."""
    monkeypatch.delattr(tarfile, "data_filter", raising=False)
    source = tmp_path / "cifar"
    source.mkdir()
    for split in ("train", "test"):
        _archive(
            source / f"{split}.tar.gz",
            *[(f"{split}/c{k}/{i}.jpg",) for k in range(2) for i in range(3)],
        )
    data = prepare_data(source, tmp_path / "work", train_per_class=2)
    assert sorted(p.name for p in (data.train / "c0").iterdir()) == ["0.jpg", "1.jpg"]
    assert len(list(data.val.rglob("*.jpg"))) == 6
