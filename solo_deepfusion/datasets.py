"""Image-folder splits from a folder or ``.tar.gz`` archives, whole or cut to N per class.

>>> data = prepare_data(Path("shared/data/cifar10"), Path("work"), train_per_class=200)
>>> data.train, data.val   # ImageFolders: work/data/cifar10-train-200/train, ...-val-all/val

One rule for every user (the launcher's tests, the bench, ``scripts/build_zoo.py``): a cut
keeps the first N files of each class by file name; an archive or a cut is written once under
``work/data/`` and marked complete. Host-free: the standard library only (the zoo's cache
folder is looked up only by :func:`unpacked`), so it runs on any Python >= 3.11.0.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import os
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from solo_deepfusion.errors import UsageError


def extract(
    tar: tarfile.TarFile,
    dest: str | os.PathLike,
    members: Iterable[tarfile.TarInfo] | None = None,
    *,
    use_filter: bool | None = None,
) -> None:
    """Unpack ``members`` (default: all) of ``tar`` into ``dest``: regular files and folders
    only, each inside ``dest``, else a one-line :class:`UsageError` before anything is written.

    Python >= 3.11.4 (``use_filter=None`` detects it) also applies tarfile's ``data`` filter;
    older 3.11 lacks ``filter=``, so there the permissions and owners are cleaned here the
    same way (no setuid/setgid/sticky or group/other write bits, no ownership from the archive).
    """
    members = list(tar.getmembers() if members is None else members)
    root = os.path.realpath(dest)
    for member in members:
        name = PurePosixPath(member.name)
        if not (member.isfile() or member.isdir()):
            raise UsageError(
                f"{tar.name}: {member.name} is not a regular file or folder; refusing to unpack"
            )
        inside = os.path.realpath(os.path.join(root, member.name))
        if name.is_absolute() or ".." in name.parts or os.path.commonpath([root, inside]) != root:
            raise UsageError(f"{tar.name}: {member.name} points outside the folder; refusing")
    if use_filter is None:
        use_filter = hasattr(tarfile, "data_filter")
    if use_filter:
        tar.extractall(dest, members=members, filter="data")
        return
    cleaned = []
    for member in members:
        clean = copy.copy(member)
        if clean.isdir():
            clean.mode = 0o755
        else:  # owner rw, execute only where the owner had it, no group/other write
            mode = clean.mode & 0o755 | 0o600
            clean.mode = mode if mode & 0o100 else mode & ~0o111
        clean.uid, clean.gid, clean.uname, clean.gname = os.getuid(), os.getgid(), "", ""
        cleaned.append(clean)
    tar.extractall(dest, members=cleaned)


@dataclass(frozen=True)
class DataPaths:
    train: Path
    val: Path


def _split_dir(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / n for n in names if (root / n).is_dir()), None)


def _archive(root: Path, names: Sequence[str]) -> Path | None:
    return next((root / f"{n}.tar.gz" for n in names if (root / f"{n}.tar.gz").is_file()), None)


def _pick(names: Iterator[str], per_class: int | None) -> set[str]:
    """``split/class/file`` names: the first ``per_class`` files of each class, by name."""
    by_class: dict[str, list[str]] = {}
    for name in names:
        parts = Path(name).parts
        if len(parts) == 3:
            by_class.setdefault(parts[1], []).append(name)
    return {n for files in by_class.values() for n in sorted(files)[:per_class]}


def _materialise(
    root: Path, split: str, aliases: Sequence[str], per_class: int | None, target: Path
) -> Path:
    """``target/<split>``: the split (or its first ``per_class`` images per class) from
    ``root``'s folder or ``.tar.gz`` (named ``<alias>/<class>/<file>`` inside)."""
    folder, archive = _split_dir(root, aliases), _archive(root, aliases)
    if folder is not None:
        files = (str(Path(split, *p.relative_to(folder).parts)) for p in folder.rglob("*"))
        for name in _pick(files, per_class):
            dest = target / name
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(folder / Path(name).relative_to(split), dest)
        return target / split
    if archive is None:
        raise UsageError(f"{root} holds neither {aliases[0]}/ nor {aliases[0]}.tar.gz")
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        wanted = _pick((m.name for m in members), per_class)
        chosen = [m for m in members if m.name in wanted]  # archive order: one pass
        for member in chosen:
            member.name = str(Path(split, *Path(member.name).parts[1:]))
        extract(tar, target, chosen)
    return target / split


def _prepare_split(
    source: Path, work: Path, split: str, aliases: Sequence[str], per_class: int | None
) -> Path:
    """One split as an ImageFolder: in place, or written once under ``work/data``."""
    folder = _split_dir(source, aliases)
    if per_class is None and folder is not None:
        return folder
    target = work / "data" / f"{source.name}-{split}-{per_class or 'all'}"
    if not (target / ".complete").is_file():
        shutil.rmtree(target, ignore_errors=True)
        _materialise(source, split, aliases, per_class, target)
        (target / ".complete").touch()
    return target / split


def prepare_data(
    source: Path, work: Path, train_per_class: int | None = None, val_per_class: int | None = None
) -> DataPaths:
    """``train`` and ``val`` ImageFolders from ``source`` (``train/`` + ``test/`` or ``val/``
    folders, or ``train.tar.gz`` + ``test.tar.gz``), cut to ``*_per_class`` images when given:
    the first ones of each class by file name, the same for every cell.

    Folders are used in place unless cut; archives and cuts are written once under
    ``work/data/`` (a ``.complete`` marker says a split is whole) and shared by every cell.
    """
    source = source.expanduser().resolve()
    return DataPaths(
        _prepare_split(source, work, "train", ("train",), train_per_class),
        _prepare_split(source, work, "val", ("test", "val"), val_per_class),
    )


# ---------------------------------------------------------------------------------------------
# A launcher path whose split is shipped as an archive


def unpacked(path: str | os.PathLike | None) -> str | None:
    """``path``, or, when only ``<path>.tar.gz`` exists, where that archive is unpacked.

    The archive is unpacked once, into ``<cache>/datasets/<key>/`` (the zoo's cache:
    ``$SOLO_DEEPFUSION_CACHE``, else ``~/.cache/solo-deepfusion``), and must hold a
    ``<name of path>/`` folder. Any other ``path`` is returned as it is, for solo-learn to read
    (or download into).
    """
    if path is None:
        return None
    path = str(path)
    if Path(path).exists():
        return path
    archive = Path(f"{path}.tar.gz").resolve()
    if not archive.is_file():
        return path
    from solo_deepfusion.hub.cache import resolve_cache_dir  # the hub needs more than stdlib

    stat = archive.stat()
    key = hashlib.sha256(f"{archive}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    root = resolve_cache_dir() / "datasets" / key[:16]
    if not root.is_dir():
        _unpack(archive, root)
    target = root / Path(path).name
    if not target.is_dir():
        raise FileNotFoundError(f"{archive} holds no {target.name}/ folder")
    return str(target)


def _unpack(archive: Path, root: Path) -> None:
    """Unpack into a temporary folder renamed to ``root``: never a half-unpacked ``root``."""
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=root.parent, prefix=f".{root.name}.")
    try:
        with tarfile.open(archive) as tar:
            extract(tar, tmp)
        with contextlib.suppress(OSError):  # another process (e.g. a DDP rank) was first
            os.replace(tmp, root)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
