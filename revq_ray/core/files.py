"""File modes that follow the user's umask.

``safetensors`` writes its files with mode 0600 and :func:`tempfile.mkdtemp` makes 0700 folders, whatever
the umask says; an export written that way cannot be read by teammates who share the run folder. Everything a
run writes follows the umask instead (the process's, as ``open()`` would): nothing we write is a secret.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["follow_umask"]


def _umask() -> int:
    mask = os.umask(0)  # the only portable way to read it: set and restore at once
    os.umask(mask)
    return mask


def follow_umask(*paths: str | os.PathLike) -> None:
    """Give each path, and everything under the folders among them, the mode a plain ``open()`` /
    ``mkdir()`` would have given it: files ``0o666 & ~umask``, folders ``0o777 & ~umask``."""
    mask = _umask()
    for top in map(Path, paths):
        items = [top, *top.rglob("*")] if top.is_dir() else [top]
        for p in items:
            if p.is_symlink() or not p.exists():
                continue
            os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~mask)
