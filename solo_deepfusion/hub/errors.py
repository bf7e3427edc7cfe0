"""Exceptions of the zoo client.

Catch :class:`ZooError` for any of them::

    try:
        path = download("simclr-deepfusion-r18-cifar10-cpu")
    except NotCachedError:  # offline and not in the cache
        ...
    except DownloadError as err:  # every mirror failed
        for url, why in err.failures:
            print(url, why)
"""

from __future__ import annotations


class ZooError(Exception):
    """Base class of the zoo client's errors."""


class ManifestError(ZooError, ValueError):
    """The manifest is missing or invalid. ``errors`` holds one line per problem."""

    def __init__(self, message: str, errors: list[str] | None = None) -> None:
        self.errors = list(errors or [])
        if self.errors:
            message = message + "\n" + "\n".join(f"  - {e}" for e in self.errors)
        super().__init__(message)


class UnknownModelError(ZooError, KeyError):
    """No manifest entry has this name."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0]) if self.args else ""


class DownloadError(ZooError):
    """A zoo file could not be obtained. ``failures`` lists ``(url, reason)`` per mirror tried."""

    def __init__(self, message: str, failures: list[tuple[str, str]] | None = None) -> None:
        self.failures = list(failures or [])
        if self.failures:
            message = message + "\n" + "\n".join(f"  - {u}: {why}" for u, why in self.failures)
        super().__init__(message)


class NotCachedError(DownloadError):
    """Offline mode is on and the file is not (or not intact) in the cache."""
