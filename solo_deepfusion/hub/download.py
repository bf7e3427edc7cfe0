"""Download zoo files into the cache: mirrors in order, resumable, atomic, verified.

>>> from solo_deepfusion.hub import download
>>> path = download("simclr-deepfusion-r18-cifar10-cpu")                # role="backbone"
>>> path = download("simclr-deepfusion-r18-cifar10-cpu", offline=True)  # cache only

A file is returned only once its SHA-256 matches the manifest; this is checked on every call, also
for files already in the cache. Data arrives in ``<target>.part`` and is renamed to ``<target>``
(``os.replace``) after the check, so ``<target>`` is always complete. An interrupted transfer
keeps its ``.part``; the next attempt (or the next call) continues with ``Range: bytes=<n>-``.
A mirror that answers 404, fails to connect, serves bytes with the wrong hash or has not
delivered the whole file within its deadline (:func:`deadline_for`) is skipped; when all fail,
:class:`DownloadError` lists each URL and why. Bytes with a wrong hash are never kept.
Concurrent calls (e.g. one per DDP rank) serialise on ``<target>.lock``.
"""

from __future__ import annotations

import http.client
import os
import re
import shutil
import sys
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from urllib.parse import urlsplit

from filelock import FileLock

from .. import __version__
from .cache import check_file, is_offline, resolve_cache_dir, safe_component, sha256_file
from .errors import DownloadError, NotCachedError
from .manifest import PathLike, ZooEntry, ZooFile, get_entry
from .urls import LOOPBACK_HOSTS, Source, check_remote_url, parse_url

TIMEOUT_S = 30.0  # per socket operation, at most: never past the mirror's deadline
DEADLINE_ENV = "SOLO_DEEPFUSION_DOWNLOAD_DEADLINE"  # seconds per mirror, as ``deadline_s``
DEADLINE_BASE_S = 120.0  # per mirror and file: this, plus the file's size at MIN_RATE
MIN_RATE = 256 * 1024  # bytes/s below which a mirror is given up for the next one
MAX_RESUMES = 5  # per mirror, each must have made progress
_CHUNK = 1 << 20
_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


class _MirrorFailed(Exception):
    """This mirror cannot deliver the file; try the next one."""


class _Interrupted(Exception):
    """The transfer stopped early; ``.part`` holds what arrived so far.

    ``progressed`` says whether this attempt changed ``.part`` (new bytes, or a reset), i.e.
    whether trying again can get further.
    """

    def __init__(self, message: str, progressed: bool) -> None:
        super().__init__(message)
        self.progressed = progressed


class _NoDowngradeRedirect(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to URLs the manifest itself could list, and never https → http."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[override]
        try:
            check_remote_url(newurl)
            if urlsplit(req.full_url).scheme == "https" and urlsplit(newurl).scheme != "https":
                raise ValueError("https must not be downgraded to http")
        except ValueError as e:
            raise urllib.error.HTTPError(
                req.full_url, code, f"refused redirect to {newurl}: {e}", headers, fp
            ) from None
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _remaining(deadline: float) -> float:
    """Seconds left before ``deadline`` (a ``time.monotonic()`` instant), at least 0."""
    return max(0.0, deadline - time.monotonic())


def _socket_timeout(deadline: float) -> float:
    """What one blocking socket operation may take: ``TIMEOUT_S``, cut at the deadline."""
    return max(0.01, min(TIMEOUT_S, _remaining(deadline)))


def _set_read_timeout(resp, seconds: float) -> None:
    """Set the timeout of the socket under an ``http.client`` response (CPython's layout:
    ``resp.fp.raw._sock``); without one the timeout given at connect time stays."""
    sock = getattr(getattr(getattr(resp, "fp", None), "raw", None), "_sock", None)
    if sock is not None:
        sock.settimeout(seconds)


def _too_slow(received: int, zf: ZooFile) -> _MirrorFailed:
    return _MirrorFailed(f"too slow: {received} of {zf.size} bytes within its deadline")


def _open(url: str, offset: int, timeout: float):
    headers = {"User-Agent": f"solo-deepfusion/{__version__}", "Accept-Encoding": "identity"}
    if offset:
        headers["Range"] = f"bytes={offset}-"
    # Loopback servers are reached directly, whatever $http_proxy says.
    proxy = urllib.request.ProxyHandler({} if urlsplit(url).hostname in LOOPBACK_HOSTS else None)
    opener = urllib.request.build_opener(proxy, _NoDowngradeRedirect())
    return opener.open(urllib.request.Request(url, headers=headers), timeout=timeout)


def _progress_bar(zf: ZooFile, label: str, initial: int, enabled: bool):
    from tqdm.auto import tqdm

    return tqdm(
        total=zf.size,
        initial=initial,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        desc=label,
        disable=not (enabled and sys.stderr.isatty()),
        leave=False,
    )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def deadline_for(size: int) -> float:
    """Seconds a mirror gets to deliver a file of ``size`` bytes, resumes included."""
    return DEADLINE_BASE_S + size / MIN_RATE


def check_deadline(deadline_s: float | str | None) -> float | None:
    """``deadline_s``, else ``$SOLO_DEEPFUSION_DOWNLOAD_DEADLINE``, as seconds > 0 (``None``: the
    default of :func:`deadline_for`); anything else is a ``ValueError`` naming it."""
    source = "deadline_s"
    if deadline_s is None:
        deadline_s, source = os.environ.get(DEADLINE_ENV) or None, DEADLINE_ENV
        if deadline_s is None:
            return None
    try:
        seconds = float(deadline_s)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise ValueError(f"{source}={deadline_s!r} is not a number of seconds > 0")
    return seconds


def _http_to_part(
    url: str, part: Path, zf: ZooFile, label: str, progress: bool, deadline: float
) -> None:
    """Fetch the rest of ``zf`` into ``part`` (continuing it if the server honours Range).

    ``deadline`` is a ``time.monotonic()`` instant: past it the mirror is given up. It holds
    while blocked too: every socket operation's timeout is cut at it (:func:`_socket_timeout`),
    so a server that stalls mid-body is left at the deadline, not a socket timeout later.
    """
    offset = _size(part)
    if _remaining(deadline) <= 0:
        raise _too_slow(offset, zf)
    try:
        resp = _open(url, offset, _socket_timeout(deadline))
    except urllib.error.HTTPError as e:
        if e.code == 416 and offset:  # our .part is not a prefix the server agrees with
            part.unlink(missing_ok=True)
            raise _Interrupted("HTTP 416 for the resumed range", progressed=True) from e
        raise _MirrorFailed(f"HTTP {e.code} {e.reason}") from e
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        if _remaining(deadline) <= 0:
            raise _too_slow(offset, zf) from e
        reason = getattr(e, "reason", e)
        raise _MirrorFailed(f"connection failed: {reason}") from e
    with resp:
        if resp.status == 206 and offset:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m[1]) != offset:
                raise _MirrorFailed(f"bad Content-Range {resp.headers.get('Content-Range')!r}")
        elif resp.status == 200:
            offset = 0  # the server sent the whole file: start over
        else:
            raise _MirrorFailed(f"unexpected HTTP status {resp.status}")
        declared = resp.headers.get("Content-Length")
        declared = int(declared) if declared and declared.isdigit() else None
        if declared is not None and offset + declared != zf.size:
            raise _MirrorFailed(f"server sends {offset + declared} bytes, manifest says {zf.size}")
        received = 0
        with (
            open(part, "ab" if offset else "wb") as fh,
            _progress_bar(zf, label, offset, progress) as bar,
        ):
            while True:
                _set_read_timeout(resp, _socket_timeout(deadline))
                try:
                    chunk = resp.read1(_CHUNK)  # what has arrived: the deadline is checked often
                except (OSError, http.client.HTTPException) as e:
                    if _remaining(deadline) <= 0:  # stalled until the deadline
                        raise _too_slow(offset + received, zf) from e
                    msg = f"connection lost after {offset + received} bytes: {e}"
                    raise _Interrupted(msg, progressed=received > 0) from e
                if not chunk:
                    break
                if _remaining(deadline) <= 0:
                    raise _too_slow(offset + received, zf)
                if offset + received + len(chunk) > zf.size:
                    fh.close()
                    part.unlink(missing_ok=True)
                    raise _MirrorFailed(f"server sent more than the expected {zf.size} bytes")
                fh.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
            fh.flush()
            os.fsync(fh.fileno())
    if offset + received < zf.size:
        msg = f"connection closed after {offset + received} of {zf.size} bytes"
        raise _Interrupted(msg, progressed=received > 0)


def _copy_to_part(src: Path, part: Path, zf: ZooFile) -> None:
    """Copy a local mirror file into ``part`` (always from the start)."""
    if not src.is_file():
        raise _MirrorFailed(f"no such file: {src}")
    if src.stat().st_size != zf.size:
        raise _MirrorFailed(f"size {src.stat().st_size} bytes, expected {zf.size}")
    with open(src, "rb") as fin, open(part, "wb") as fout:
        shutil.copyfileobj(fin, fout, _CHUNK)
        fout.flush()
        os.fsync(fout.fileno())


def _fetch(
    src: Source,
    base_dir: Path | None,
    part: Path,
    zf: ZooFile,
    label: str,
    progress: bool,
    deadline_s: float,
) -> None:
    """Leave a complete ``part`` whose SHA-256 matches, or raise :class:`_MirrorFailed`."""
    deadline = time.monotonic() + deadline_s
    if _size(part) > zf.size:
        part.unlink()
    inherited = _size(part) > 0  # bytes from an earlier attempt, maybe from another mirror
    resumes = 0
    while True:
        try:
            if src.kind in ("file", "relative"):
                _copy_to_part(src.local_path(base_dir), part, zf)
            elif _size(part) < zf.size:
                _http_to_part(src.http_url(), part, zf, label, progress, deadline)
        except _Interrupted as e:
            resumes += 1
            if not e.progressed or resumes > MAX_RESUMES:
                raise _MirrorFailed(str(e)) from e
            if _remaining(deadline) <= 0:
                raise _too_slow(_size(part), zf) from e
            continue
        digest = sha256_file(part)
        if digest == zf.sha256:
            return
        part.unlink(missing_ok=True)
        if inherited:  # the old prefix may be the culprit: one clean try with this mirror
            inherited = False
            continue
        raise _MirrorFailed(f"sha256 mismatch: got {digest}, expected {zf.sha256}")


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def download(
    name_or_entry: str | ZooEntry,
    *,
    role: str = "backbone",
    cache_dir: PathLike | None = None,
    offline: bool | None = None,
    progress: bool = True,
    manifest: PathLike | None = None,
    deadline_s: float | None = None,
) -> Path:
    """Path of the verified cached file ``role`` of a zoo entry, downloading it if needed.

    ``offline=None`` follows ``$SOLO_DEEPFUSION_OFFLINE`` / ``$HF_HUB_OFFLINE``; offline, only the
    cache is used and a missing file raises :class:`NotCachedError`. ``manifest`` overrides the
    manifest used to look ``name_or_entry`` up. ``deadline_s`` is the wall-clock time each
    mirror gets to deliver the file, stalls included (default: ``$SOLO_DEEPFUSION_DOWNLOAD_
    DEADLINE``, else :func:`deadline_for` its size); then the next mirror is tried.
    """
    deadline_s = check_deadline(deadline_s)
    entry = (
        name_or_entry if isinstance(name_or_entry, ZooEntry) else get_entry(name_or_entry, manifest)
    )
    zf = entry.file(role)
    root = resolve_cache_dir(cache_dir)
    target = (
        root / safe_component(entry.name, "entry name") / safe_component(zf.filename, "filename")
    )
    label = f"{entry.name}/{zf.filename}"

    state = check_file(target, zf)
    if state.status == "ok":
        return target
    if is_offline(offline):
        what = "is not cached" if state.status == "missing" else f"is corrupted ({state.detail})"
        raise NotCachedError(
            f"offline mode: zoo file {label} {what} in the cache {root}; run once online "
            f"(unset SOLO_DEEPFUSION_OFFLINE / HF_HUB_OFFLINE) or copy the file to {target}"
        )

    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(target.name + ".part")
    with FileLock(str(target.with_name(target.name + ".lock"))):
        state = check_file(target, zf)  # another process may have finished meanwhile
        if state.status == "ok":
            return target
        if state.status == "corrupted":
            warnings.warn(
                f"cached {target} is corrupted ({state.detail}); re-downloading", stacklevel=2
            )
            target.unlink()
        failures: list[tuple[str, str]] = []
        per_mirror = deadline_for(zf.size) if deadline_s is None else deadline_s
        for url in zf.urls:
            try:
                _fetch(parse_url(url), entry.manifest_dir, part, zf, label, progress, per_mirror)
            except (_MirrorFailed, ValueError) as e:
                failures.append((url, str(e)))
                continue
            os.replace(part, target)
            _fsync_dir(target.parent)
            return target
    kept = f"; {_size(part)} bytes kept in {part} for resuming" if _size(part) else ""
    raise DownloadError(
        f"could not download zoo file {label} from any of its {len(zf.urls)} URL(s){kept}:",
        failures,
    )
