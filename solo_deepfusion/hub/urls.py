"""Mirror URLs of zoo files: which forms are allowed and where each one points.

Allowed forms (anything else is rejected, and ``https`` never falls back to ``http``)::

    https://host/path                      any host except Google Drive
    hf://<repo_id>@<revision>/<path>       a Hugging Face model repo, revision required
    file:///absolute/path                  a local mirror
    relative/path                          relative to the manifest's folder (small repo files)
    http://127.0.0.1:<port>/path           plain http only for loopback hosts (tests)

>>> parse_url("hf://org/repo@0123abc/dir/backbone.safetensors").hf_repo
'org/repo'
>>> parse_url("http://example.com/x")
Traceback (most recent call last):
...
ValueError: plain http:// is only allowed for 127.0.0.1/localhost; use https://
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Literal
from urllib.parse import unquote, urlsplit

LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_BLOCKED_HOSTS = frozenset({"drive.google.com", "docs.google.com", "drive.usercontent.google.com"})
_HF_RE = re.compile(
    r"^hf://(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)"
    r"@(?P<rev>[^/@\s]+)/(?P<path>\S+)$"
)
_SCHEME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")

Kind = Literal["http", "hf", "file", "relative"]


@dataclass(frozen=True)
class Source:
    """A parsed mirror URL. ``http`` covers https and loopback http."""

    url: str
    kind: Kind
    path: str = ""  # local path (file/relative) or repo file path (hf)
    hf_repo: str = ""
    hf_revision: str = ""

    def http_url(self) -> str:
        """The URL to GET for ``http``/``hf`` sources.

        ``hf://`` resolves with ``huggingface_hub.hf_hub_url`` (honouring ``$HF_ENDPOINT``).
        """
        if self.kind == "http":
            return self.url
        if self.kind == "hf":
            from huggingface_hub import hf_hub_url  # lazy: only needed for hf:// mirrors

            endpoint = os.environ.get("HF_ENDPOINT", "").rstrip("/") or None  # read per call
            url = hf_hub_url(self.hf_repo, self.path, revision=self.hf_revision, endpoint=endpoint)
            check_remote_url(url)
            return url
        raise ValueError(f"{self.url!r} is not a remote URL")

    def local_path(self, base_dir: Path | None) -> Path:
        """The file a ``file``/``relative`` source points at (relative ones need ``base_dir``)."""
        if self.kind == "file":
            return Path(self.path)
        if self.kind == "relative":
            if base_dir is None:
                raise ValueError(f"relative URL {self.url!r} needs the manifest's folder")
            return Path(base_dir) / self.path
        raise ValueError(f"{self.url!r} is not a local path")


def _check_rel_parts(path: str, what: str) -> None:
    if not path or "\\" in path or "\x00" in path:
        raise ValueError(f"{what} must be a non-empty POSIX path: {path!r}")
    pp = PurePosixPath(path)
    if pp.is_absolute():
        raise ValueError(f"{what} must be relative: {path!r}")
    if any(part in ("..", "") for part in path.split("/")):
        raise ValueError(f"{what} must not contain '..' or empty segments: {path!r}")


def check_remote_url(url: str) -> None:
    """Raise ``ValueError`` unless ``url`` is https (not Google Drive) or loopback http."""
    parts = urlsplit(url)
    scheme, host = parts.scheme.lower(), (parts.hostname or "").lower()
    if scheme == "https":
        if not host:
            raise ValueError(f"https URL without a host: {url!r}")
        if host in _BLOCKED_HOSTS:
            raise ValueError(
                f"Google Drive URLs are not allowed (quota/permission failures): {url!r}"
            )
        return
    if scheme == "http":
        if host in LOOPBACK_HOSTS:
            return
        raise ValueError("plain http:// is only allowed for 127.0.0.1/localhost; use https://")
    raise ValueError(f"unsupported URL scheme {scheme!r} in {url!r}")


def parse_url(url: str) -> Source:
    """Classify a mirror URL; ``ValueError`` says why a URL is not allowed."""
    if not isinstance(url, str) or not url.strip() or url != url.strip():
        raise ValueError(f"URL must be a non-empty string without surrounding spaces: {url!r}")
    if url.startswith("hf://"):
        m = _HF_RE.match(url)
        if not m:
            raise ValueError(
                f"expected hf://<repo_id>@<revision>/<path> (revision required): {url!r}"
            )
        _check_rel_parts(m["path"], "hf:// file path")
        return Source(url, "hf", path=m["path"], hf_repo=m["repo"], hf_revision=m["rev"])
    if url.lower().startswith("file:"):
        parts = urlsplit(url)
        if parts.netloc not in ("", "localhost") or not parts.path.startswith("/"):
            raise ValueError(f"file URLs must be absolute, file:///path: {url!r}")
        return Source(url, "file", path=unquote(parts.path))
    if _SCHEME_RE.match(url):  # data:, javascript:, ftp://, ... are no relative paths
        check_remote_url(url)
        return Source(url, "http")
    _check_rel_parts(url, "relative URL")
    return Source(url, "relative", path=url)
