"""Where a result came from: the code's git commit."""

from __future__ import annotations

import subprocess
from pathlib import Path

from solo_deepfusion.atomic import PathLike

CHECKOUT = Path(__file__).resolve().parents[1]  # the repository, in a source checkout


def git_commit(repo: PathLike | None = None) -> str | None:
    """``git rev-parse HEAD`` of ``repo`` (default: this package's checkout), or ``None``."""
    folder = Path(repo) if repo is not None else CHECKOUT
    try:
        out = subprocess.run(
            ["git", "-C", str(folder), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None
