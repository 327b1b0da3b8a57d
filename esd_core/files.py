"""Writing outputs without ever leaving a half-written file or replacing an existing one by accident, and output
names that cannot leave their folder.

Every writer of the pack goes through `write_new_file`, `write_new_directory` or `replace_file`; a failure to write
(a full disk, a read-only folder) is an `OutputWriteError` that says which and leaves no partial file behind.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Iterator

from .errors import ConfigError, OutputWriteError

#: Names Windows reserves in every folder, with or without an extension (``con.txt`` too).
WINDOWS_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10)),
                    "com\u00b9", "com\u00b2", "com\u00b3", "lpt\u00b9", "lpt\u00b2", "lpt\u00b3"}
#: Characters Windows file names cannot hold (besides control characters); ``/`` separates folders.
WINDOWS_FORBIDDEN = set('<>:"|?*\\')
MAX_NAME_CHARS = 200


def check_output_name(name: str) -> str:
    """``name`` (a file name prefix, optionally in subfolders separated by ``/``) as a clean relative POSIX path
    that stays inside the folder it is joined to on every OS; a `ConfigError` naming what is wrong otherwise:
    empty, absolute, ``..`` or ``.`` parts, backslashes, characters or names Windows refuses (``CON``, ``aux.txt``,
    ``a:b``), trailing dots or spaces, control characters, or more than `MAX_NAME_CHARS` characters."""
    if not isinstance(name, str) or not name.strip():
        raise ConfigError("the file name is empty; give a name such as 'van_gogh'")
    hint = "; use a plain name such as 'van_gogh' (subfolders as 'styles/van_gogh')"
    if len(name) > MAX_NAME_CHARS:
        raise ConfigError(f"the file name is {len(name)} characters long (at most {MAX_NAME_CHARS}){hint}")
    bad = next((c for c in name if not c.isprintable() or c in WINDOWS_FORBIDDEN), None)
    if bad is not None:
        raise ConfigError(f"the file name {name!r} contains {bad!r}, which file names cannot hold on every "
                          f"system{hint}")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise ConfigError(f"the file name {name!r} is an absolute path; names are relative to the output "
                          f"folder{hint}")
    parts = name.strip().split("/")
    for part in parts:
        if part in ("", ".", ".."):
            raise ConfigError(f"the file name {name!r} has an empty, '.' or '..' part; names cannot leave or "
                              f"skip folders{hint}")
        if part != part.rstrip(". "):
            raise ConfigError(f"the file name {name!r} has a part ending in a dot or a space, which Windows "
                              f"drops{hint}")
        if part.split(".")[0].strip().lower() in WINDOWS_RESERVED:
            raise ConfigError(f"the file name {name!r} uses {part!r}, a name Windows reserves for a device{hint}")
    return "/".join(parts)


def check_inside(root: str | os.PathLike, path: str | os.PathLike) -> Path:
    """``path`` if it resolves (symlinks followed) inside ``root``, else a `ConfigError`: a symlinked subfolder
    must not carry a file outside the folder it is saved in."""
    real_root, real = Path(os.path.realpath(root)), Path(os.path.realpath(path))
    if real != real_root and real_root not in real.parents:
        raise ConfigError(f"{path} leads outside {root} (through a symbolic link); files are only written inside "
                          "it: remove the link or choose another name")
    return Path(path)


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """Turn an operating-system failure to write ``path`` into an `OutputWriteError` saying what to do."""
    try:
        yield
    except FileExistsError:
        raise
    except OSError as e:
        folder = path.parent
        if e.errno == errno.ENOSPC or e.errno == getattr(errno, "EDQUOT", None):
            reason = f"the disk holding {folder} is full: free some space or choose another folder"
        elif e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
            reason = f"{folder} is read-only or not writable: choose a folder you can write to"
        else:
            reason = f"{e.strerror or e}"
        raise OutputWriteError(f"could not write {path}: {reason} (nothing was written)") from None


def write_new_file(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create ``path`` atomically with ``write(tmp_path)``; refuse if ``path`` exists.

    The content goes to a temporary file in the same folder, which is then hard-linked to the final name (atomic, and
    fails if that name appeared meanwhile). A failure or interruption leaves neither a partial file nor a changed one.
    """
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another name (nothing was overwritten)")
    with _writing(path):
        return _write_new_file(path, write)


@contextlib.contextmanager
def _complete_temporary(path: Path, write: Callable[[Path], None]) -> Iterator[Path]:
    """A temporary file beside ``path`` holding ``write(tmp)``'s complete content, flushed to disk and readable by
    all (mkstemp makes 0600; outputs are meant to be shared like any saved model); removed on exit unless the body
    moved it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        _sync(tmp)
        os.chmod(tmp, 0o644)
        yield tmp
    finally:
        tmp.unlink(missing_ok=True)


def _write_new_file(path: Path, write: Callable[[Path], None]) -> Path:
    with _complete_temporary(path, write) as tmp:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise FileExistsError(f"{path} appeared while writing; nothing was overwritten") from None
        except OSError:  # file systems without hard links: rename after a last check
            if path.exists():
                raise FileExistsError(f"{path} already exists; nothing was overwritten") from None
            os.replace(tmp, path)
    return path


def write_new_directory(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Create directory ``path`` from ``write(tmp_dir)`` and rename it into place; refuse if ``path`` exists."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists; choose another folder (nothing was overwritten)")
    with _writing(path):
        return _write_new_directory(path, write)


def _write_new_directory(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        write(tmp)
        for f in tmp.rglob("*"):
            if f.is_file():
                _sync(f)
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
    with _writing(path):
        return _replace_file(path, write)


def _replace_file(path: Path, write: Callable[[Path], None]) -> Path:
    with _complete_temporary(path, write) as tmp:
        os.replace(tmp, path)
    return path


def _sync(path: Path) -> None:
    """Flush a written file to disk before it is linked or renamed into place (a crash then leaves old or new
    content, never a truncated file)."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())
