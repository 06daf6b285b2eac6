"""Which code produced a benchmark figure: the short git commit of this checkout."""

from __future__ import annotations

import subprocess
from pathlib import Path


def git_commit() -> str | None:
    """Short HEAD commit of the checkout holding this package, or None outside a git checkout."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).parent, timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None
