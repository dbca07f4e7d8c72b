"""File modes that follow the user's umask.

Some writers (safetensors through ``save_pretrained``, ``tempfile``) create files 0600 whatever the
umask; everything EdgeRazor leaves behind gets the modes a plain ``open`` / ``mkdir`` would give.
"""

from __future__ import annotations

import os
from pathlib import Path


def current_umask() -> int:
    """The process umask (reading it means setting it: it is restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def apply_umask(path: Path) -> None:
    """Give ``path`` (and everything under a directory) the modes a plain ``open`` / ``mkdir`` would."""
    mask = current_umask()
    paths = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for p in paths:
        if not p.is_symlink():
            p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)
