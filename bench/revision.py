"""The commit a benchmark ran from, recorded in its JSON results (shared by the bench scripts)."""

from __future__ import annotations

import os
import subprocess


def git_revision() -> str | None:
    """The checked-out commit of the repository the benchmark ran from (+ "-dirty" if cfnode/ has changes)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    try:
        rev = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True,
                             check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", root, "status", "--porcelain", "--", "cfnode"], capture_output=True,
                               text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return rev + ("-dirty" if dirty else "")
