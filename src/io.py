"""Files and folders biaslens writes: atomic file writes and the one output-folder policy.

**Files.** The one place biaslens writes a file so that no reader ever sees half of it.

A file is written to a per-process temporary name beside it (``.NAME.tmp-PID-XXXX``, the pattern
:func:`is_stale_name` recognises and cleans up after an interrupted run) and renamed into place
with ``os.replace``, atomic on POSIX and Windows within one folder. On any exception, Ctrl-C
included, the temporary file is removed and the target is untouched. Processes sharing a folder
(e.g. the key-statistics cache of :mod:`biaslens.edit.covariance`) never see or remove each
other's half-written files.

Standard library only (plus biaslens.errors): importing this module is instant.

**Folders.** One output-folder policy for every command that writes a folder (``--out DIR``).

* :func:`prepare` runs before any model loads and refuses, in one line that says what to do: a
  path that is a file or a symbolic link; the current folder or one that holds it; a non-empty
  folder without ``force``; with ``force``, any folder that holds something biaslens did not
  write; a place where no file can be created (tested by really creating and removing one).
* :func:`staging` writes into a fresh hidden folder beside the target
  (``.NAME.tmp-PID-XXXX``), unique per process, and renames it into place at the end. On an
  exception, Ctrl-C or SIGTERM the hidden folder is removed. With ``force`` the old folder is
  moved aside and deleted only after the new one is in place.

**The marker.** Every folder published here holds ``.biaslens``, a small JSON file naming the
command, the version and every file written (relative paths). ``--force`` replaces a folder
only if its marker lists every file in it: a folder without a marker (written by the user, or by
an older biaslens) or one the user added files to is refused, so nothing the user wrote is
ever deleted. Stale hidden entries of interrupted runs (``.NAME.tmp-*``,
``.NAME.old-*``) never count as content; those beside the target that are older than this
process, and whose process is gone, are removed.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

from biaslens.errors import ExportError

__all__ = ["atomic_path", "write_text", "write_bytes", "public_mode", "publish_modes", "remove",
           "MARKER", "OutputError", "is_stale_name", "clean_stale", "read_marker", "foreign_files",
           "probe_writable", "prepare", "FILE_MARKS", "written_by_biaslens", "mark_html",
           "check_file", "Terminated", "staging"]


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


MARKER = ".biaslens"
_IMPORTED = time.time()
# ``.NAME.tmp-…`` / ``.NAME.old-…``: hidden entries biaslens makes while writing NAME
_STALE = re.compile(r"^\..+\.(?:tmp|old)-(?:(?P<pid>\d+)-)?[A-Za-z0-9_]+$")


class OutputError(ExportError):
    """An output path that cannot be used; the message says what to do instead."""


# ------------------------------------------------------------------------- helpers


def is_stale_name(name: str) -> bool:
    """Whether ``name`` looks like a temporary entry biaslens makes while writing a folder."""
    return bool(_STALE.match(name))


def _process_start() -> float:
    """This process's start time (Linux ``/proc``; else when this module was imported)."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        with open("/proc/stat") as f:
            btime = next(int(ln.split()[1]) for ln in f if ln.startswith("btime"))
        return min(_IMPORTED, btime + int(fields[19]) / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def clean_stale(parent: Path, name: str) -> None:
    """Remove ``parent/.name.tmp-*`` and ``.name.old-*`` left by runs that ended before this
    process started (and whose process, when the name records it, is gone)."""
    start = _process_start()
    try:
        entries = list(parent.iterdir())
    except OSError:
        return
    for e in entries:
        m = _STALE.match(e.name)
        if not m or not (e.name.startswith(f".{name}.tmp-") or e.name.startswith(f".{name}.old-")):
            continue
        pid = m.group("pid")
        try:
            old = e.lstat().st_mtime < start
        except OSError:
            continue
        if old and not (pid and _alive(int(pid))):
            remove(e)


def _content(folder: Path) -> list[str]:
    """Names in ``folder`` that count as content (not the stale temporary entries)."""
    return sorted(e.name for e in folder.iterdir() if not is_stale_name(e.name))


def _files(folder: Path) -> list[str]:
    """Every file and link under ``folder`` as a relative POSIX path, leaving out the marker and
    stale temporary entries."""
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        dirs[:] = [d for d in dirs if not is_stale_name(d)]
        links = [d for d in dirs if os.path.islink(os.path.join(root, d))]
        for f in files + links:
            if is_stale_name(f) or (rel == Path(".") and f == MARKER):
                continue
            out.append((rel / f).as_posix())
    return sorted(out)


def read_marker(folder: str | os.PathLike) -> dict | None:
    """The marker of a folder biaslens wrote, or ``None``."""
    try:
        d = json.loads((Path(folder) / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(d, dict) or d.get("written_by") != "biaslens" or not isinstance(d.get("files"), list):
        return None
    return d


def foreign_files(folder: str | os.PathLike) -> list[str]:
    """What in ``folder`` biaslens did not write: everything, without a valid marker."""
    folder = Path(folder)
    mark = read_marker(folder)
    if mark is None:
        return _content(folder)
    known = set(map(str, mark["files"]))
    return [f for f in _files(folder) if f not in known]


def _shown(names: list[str], k: int = 3) -> str:
    s = ", ".join(names[:k])
    return s + (f" and {len(names) - k} more" if len(names) > k else "")


def _check_target(out: Path, force: bool, label: str | None = None) -> None:
    """Refuse ``out`` as it is now (a file, a link, non-empty without force, foreign); messages
    name it as ``label`` (default: the path)."""
    shown = label or str(out)
    if out.is_symlink():
        raise OutputError(f"output path '{shown}' is a symbolic link; give the real folder, or a new "
                          "folder name, with --out")
    if out.exists() and not out.is_dir():
        raise OutputError(f"output path '{shown}' exists and is a file; choose a folder name with --out")
    if not out.is_dir():
        return
    try:
        content = _content(out)
    except OSError as exc:
        raise OutputError(f"cannot read output folder '{shown}' ({exc.strerror}); choose another --out") from None
    if not content:
        return
    if not force:
        raise OutputError(f"output folder '{shown}' exists and is not empty; choose another --out or "
                          "pass --force to replace it")
    foreign = foreign_files(out)
    if foreign:
        raise OutputError(
            f"output folder '{shown}' holds files biaslens did not write ({_shown(foreign)}); --force "
            "only replaces a folder biaslens wrote: move them away or choose another --out")


def probe_writable(folder: Path, what: str = "--out", name: str = "biaslens") -> None:
    """Create and remove a uniquely named file in ``folder`` (named like a temporary entry for
    ``name``, so one left by a killed process is cleaned up later); refuse in one line if that
    fails."""
    try:
        fd, probe = tempfile.mkstemp(prefix=f".{name}.tmp-{os.getpid()}-", dir=folder)
    except OSError as exc:
        raise OutputError(f"cannot write in '{folder}' ({exc.strerror or exc}); choose a writable "
                          f"place for {what}") from None
    os.close(fd)
    try:
        os.unlink(probe)
    except OSError:
        pass


# --------------------------------------------------------------------------- prepare


def prepare(out: str | os.PathLike, force: bool = False) -> Path:
    """Check an output folder before any work; return its absolute path.

    Refuses (:class:`OutputError`, one line) what :mod:`biaslens.io` describes; creates a
    missing parent folder and removes stale temporary entries of interrupted runs beside it.
    """
    raw = Path(out).expanduser()
    path = Path(os.path.abspath(raw))
    if str(raw) in ("", ".") or path.parent == path:
        raise OutputError(f"--out '{out}' is the current folder or holds it; name a new subfolder "
                          "instead, e.g. --out results")
    here = Path.cwd().resolve()
    real = path.parent.resolve() / path.name
    if real == here or real in here.parents:
        raise OutputError(f"--out '{out}' is the current folder or holds it; name a new subfolder "
                          "instead, e.g. --out results")
    _check_target(path, force, str(raw))
    parent = path.parent
    if parent.exists() and not parent.is_dir():
        raise OutputError(f"cannot create '{path}': '{parent}' is a file; choose another --out")
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise OutputError(f"cannot create '{parent}': part of that path is a file; choose another "
                          "--out") from None
    except OSError as exc:
        raise OutputError(f"cannot create '{parent}' ({exc.strerror or exc}); choose a writable "
                          "place for --out") from None
    probe_writable(parent, name=path.name)
    clean_stale(parent, path.name)
    return path


#: the mark a biaslens output *file* carries in its first bytes (JSON key / HTML meta tag)
FILE_MARKS = (b'"written_by": "biaslens"', b'<meta name="generator" content="biaslens">')


def written_by_biaslens(path: Path) -> bool:
    """Whether a file carries biaslens's mark in its first 64 KiB (see :data:`FILE_MARKS`)."""
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError:
        return False
    return any(m in head for m in FILE_MARKS)


def mark_html(text: str) -> str:
    """An HTML page with biaslens's generator meta tag (so ``--force`` may replace it later)."""
    tag = FILE_MARKS[1].decode()
    return text.replace("<head>", "<head>" + tag, 1) if "<head>" in text else tag + text


def check_file(path: str | os.PathLike | None, force: bool = False, what: str = "--json") -> Path | None:
    """Check an output *file* before any work: its folder exists and is writable, it is not a
    folder, and it does not exist unless ``force`` — and even then only a file biaslens wrote
    (:func:`written_by_biaslens`) is replaced. Returns the path (``None`` stays ``None``)."""
    if path is None or str(path) == "":
        return None
    p = Path(path).expanduser()
    if p.is_dir():
        raise OutputError(f"{what} '{p}' is a folder; give a file name, e.g. {p / 'results.json'}")
    if p.exists() and not force:
        raise OutputError(f"'{p}' exists; choose another file or pass --force to overwrite it")
    if p.exists() and not written_by_biaslens(p):
        raise OutputError(f"'{p}' was not written by biaslens; --force replaces only biaslens output "
                          "files: choose another file name")
    parent = Path(os.path.abspath(p)).parent
    if not parent.is_dir():
        raise OutputError(f"folder '{parent}' for {what} does not exist; create it first or choose "
                          "another path")
    probe_writable(parent, what, p.name)
    return p


# --------------------------------------------------------------------------- staging


class Terminated(SystemExit):
    """Raised in the main thread on SIGTERM while a folder is being written (exit code 143)."""


class staging:
    """``with staging(out, force) as tmp:`` write into ``tmp``; on success it becomes ``out``.

    ``out`` is checked again on entry (:func:`prepare`) and before publishing. On any exception,
    KeyboardInterrupt or SIGTERM (a handler raising :class:`Terminated` is installed in the main
    thread and the previous one restored afterwards) ``tmp`` is removed and ``out`` is untouched.
    The marker (:data:`MARKER`) listing every file is written last.
    """

    def __init__(self, out: str | os.PathLike, force: bool = False, command: str | None = None):
        self.out, self.force, self.command = Path(out), force, command
        self.tmp: Path | None = None
        self._prev = None
        self._installed = False
        self._hold = False
        self._pending: int | None = None

    # signals
    def _on_term(self, signum, frame):
        if self._hold:  # renaming or cleaning up: finish first, then act on it
            self._pending = signum
            return
        raise Terminated(128 + signum)

    def _install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        try:
            self._prev = signal.signal(signal.SIGTERM, self._on_term)
            self._installed = True
        except (ValueError, OSError):
            pass

    def _restore(self) -> None:
        if self._installed:
            signal.signal(signal.SIGTERM, self._prev if self._prev is not None else signal.SIG_DFL)
            self._installed = False

    def __enter__(self) -> Path:
        self.out = prepare(self.out, self.force)
        self._install()
        try:
            self.tmp = Path(tempfile.mkdtemp(prefix=f".{self.out.name}.tmp-{os.getpid()}-",
                                             dir=self.out.parent))
        except BaseException:
            self._restore()
            raise
        return self.tmp

    def __exit__(self, et, ev, tb) -> bool:
        try:
            if et is None:
                self._publish()
        finally:
            self._hold = True
            try:
                if self.tmp is not None and self.tmp.exists():
                    shutil.rmtree(self.tmp, ignore_errors=True)
            finally:
                self._hold = False
                self._restore()
        if self._pending is not None:  # a SIGTERM came while renaming: act on it now
            raise Terminated(128 + self._pending)
        return False

    def _publish(self) -> None:
        import biaslens

        assert self.tmp is not None
        out, tmp = self.out, self.tmp
        marker = {"written_by": "biaslens", "version": biaslens.__version__, "command": self.command,
                  "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "files": _files(tmp)}
        (tmp / MARKER).write_text(json.dumps(marker, indent=1) + "\n", encoding="utf-8")
        public_mode(tmp, 0o777)  # mkdtemp makes a private folder
        _check_target(out, self.force)  # it may have changed while we worked
        self._hold = True
        try:
            if os.path.lexists(out):
                trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
                trash.rmdir()  # a unique name (it holds our pid) in the same parent
                os.rename(out, trash)
                try:
                    os.rename(tmp, out)
                except BaseException:
                    os.rename(trash, out)
                    raise
                shutil.rmtree(trash, ignore_errors=True)
            else:
                try:
                    os.rename(tmp, out)
                except OSError as exc:
                    if exc.errno in (errno.ENOTEMPTY, errno.EEXIST):
                        raise OutputError(f"output folder '{out}' appeared while biaslens was writing "
                                          "it; choose another --out or pass --force") from None
                    raise
        finally:
            self._hold = False
