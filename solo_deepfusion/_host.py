"""Is the host framework (solo-learn >= 1.0.6) installed? Answered without importing it."""

from __future__ import annotations

import importlib.metadata

MIN_SOLO_VERSION = (1, 0, 6)
INSTALL_HINT = (
    "solo-learn >= 1.0.6 is only in its GitHub repository (PyPI stops at 1.0.2). Install it with "
    "`PIP_CONSTRAINT=<file holding 'setuptools<81'> pip install "
    "'solo-learn @ git+https://github.com/vturrisi/solo-learn.git'` "
    "(or `pip install -e '.[solo]'` from a checkout of solo-deepfusion)."
)


def solo_version() -> tuple[int, ...] | None:
    """The installed solo-learn version, or ``None`` when it is absent."""
    try:
        version = importlib.metadata.version("solo-learn")
    except importlib.metadata.PackageNotFoundError:
        return None
    return tuple(int(part) for part in version.split(".")[:3] if part.isdigit())


def host_problem() -> str | None:
    """Why solo-learn can't be used here, or ``None`` when it can."""
    version = solo_version()
    if version is None:
        return f"solo-learn is not installed. {INSTALL_HINT}"
    if version < MIN_SOLO_VERSION:
        found = ".".join(map(str, version))
        return f"solo-learn {found} is too old. {INSTALL_HINT}"
    return None
