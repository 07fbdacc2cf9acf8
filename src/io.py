"""Atomic file writes: the one place biaslens writes a file so that no reader ever sees half of it.

A file is written to a per-process temporary name beside it (``.NAME.tmp-PID-XXXX``, the pattern
:mod:`biaslens.outdir` recognises and cleans up after an interrupted run) and renamed into place
with ``os.replace``, atomic on POSIX and Windows within one folder. On any exception, Ctrl-C
included, the temporary file is removed and the target is untouched. Processes sharing a folder
(e.g. the key-statistics cache of :mod:`biaslens.edit.covariance`) never see or remove each
other's half-written files.

Output *folders* (``--out DIR``: checks before work, staging, the ``.biaslens`` marker,
``--force``) are :mod:`biaslens.outdir`'s, built on these helpers (docs/architecture.md).
Standard library only: importing this module is instant.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

__all__ = ["atomic_path", "write_text", "write_bytes", "public_mode", "publish_modes", "remove"]


def public_mode(path: str | os.PathLike, mode: int) -> None:
    """``chmod`` ``path`` to ``mode`` less the process umask (what ``open`` would have given it;
    ``mkstemp``/``mkdtemp`` make private entries). Best effort: a failure is ignored."""
    mask = os.umask(0)
    os.umask(mask)
    try:
        Path(path).chmod(mode & ~mask)
    except OSError:
        pass


def publish_modes(folder: str | os.PathLike) -> None:
    """Give a folder made by ``mkdtemp`` and its entries the modes of ordinary ones (umask
    applied): folders 0o777, files 0o666."""
    folder = Path(folder)
    public_mode(folder, 0o777)
    for entry in folder.iterdir():
        public_mode(entry, 0o777 if entry.is_dir() else 0o666)


def remove(path: str | os.PathLike) -> None:
    """Remove a file, a link or a whole folder (not what a link points to); best effort."""
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
        return
    try:
        path.unlink()
    except OSError:
        pass


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, mode: int = 0o666) -> Iterator[Path]:
    """``with atomic_path(p) as tmp:`` write the whole file at ``tmp``; on success it replaces
    ``p`` (mode ``mode`` less the umask), on any exception it is removed and ``p`` is untouched.
    ``p``'s folder must exist."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.tmp-{os.getpid()}-", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        public_mode(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        remove(tmp)
        raise


def write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically (:func:`atomic_path`); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (:func:`atomic_path`); returns the path."""
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)
    return path
