"""Writing outputs without ever leaving a half-written file or replacing an existing one by accident."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable


def write_new_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically with ``write(tmp_path)``; refuse if ``path`` exists.

    The content goes to a temporary file in the same folder, which is then hard-linked to the final name (atomic, and
    fails if that name appeared meanwhile). A failure or interruption leaves neither a partial file nor a changed one.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another name (nothing was overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _sync(tmp)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; outputs are meant to be shared like any saved model
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} appeared while writing; nothing was overwritten") from None
        except OSError:  # file systems without hard links: rename after a last check
            if path.exists():
                raise FileExistsError(f"{path} already exists; nothing was overwritten") from None
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def write_new_directory(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create directory ``path`` from ``write(tmp_dir)`` and rename it into place; refuse if ``path`` exists."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another folder (nothing was overwritten)")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write(tmp)
        if path.exists():
            raise FileExistsError(f"{path} appeared while writing; nothing was overwritten")
        os.rename(tmp, path)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return path


def replace_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create or atomically replace ``path`` with ``write(tmp_path)`` (for files a run owns, such as its resume
    checkpoint): the old content stays intact until the new one is complete on disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _sync(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _sync(path: Path) -> None:
    """Flush a written file to disk before it is linked or renamed into place (a crash then leaves old or new
    content, never a truncated file)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
