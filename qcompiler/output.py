"""Writing an artifact folder without ever losing a user's files.

The promises (each has a test in tests/test_reliability.py):
- The output location is checked before any work: not empty, not a symbolic link, not `.`, `/`,
  the home folder or a folder above the current one, not the model, inside it or above it, a
  legal name, its parent a folder (created if missing) where this process can write.
- `--overwrite` replaces only a folder qcompiler wrote: one holding the marker file `MARKER`,
  which lists every file of the artifact, and nothing more (`qcompiler eval` adds
  `qcompiler_eval.json`). Anything else is refused, naming what is in the way. An existing empty
  folder is used as it is.
- One writer per target: a lock file beside the target (`flock`, so a killed writer's lock is
  free again) makes a second concurrent writer fail at once; the lock file is also the journal
  of the write (target, staging and set-aside folders), so a later writer of the same parent
  folder finishes what a killed one left: it restores a set-aside old artifact whose
  replacement never landed and deletes stale staging folders.
- The artifact is built in a staging folder beside the target, then swapped in: with Linux's
  `renameat2(RENAME_EXCHANGE)` in one atomic step; where the filesystem lacks it, old aside,
  new in, old deleted, each step journaled. At no instant is neither the old nor the new
  artifact complete on disk; SIGINT and SIGTERM are held off during the swap.
- Only folders holding a qcompiler marker (or empty ones) are ever deleted.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import signal
from contextlib import contextmanager
from pathlib import Path

from qcompiler.errors import QCompilerError
from qcompiler.output_checks import MARKER, check_output, check_replaceable

STAGING_MARKER = ".qcompiler-staging"
_LOCK_PREFIX = ".qcompiler-lock-"
_AT_FDCWD = -100
_RENAME_NOREPLACE, _RENAME_EXCHANGE = 1, 2
log = logging.getLogger("qcompiler")
written: list[Path] = []  # targets committed in this process, so an interrupt after a commit is told apart


def _renameat2():
    try:
        return ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return None


RENAMEAT2 = _renameat2()  # None where libc lacks it; tests set it to None to take the portable path


def after_step(step: str) -> None:
    """A no-op between the steps of a write; tests replace it to kill the process at `step`."""


class OutputFolder:
    """A locked write of one artifact folder: `with OutputFolder(...) as out:` write into
    `out.staging`, then `out.commit()`. Leaving without a commit deletes the staging folder and
    the parent folders this write created, so an error or a signal leaves nothing behind."""

    def __init__(self, output: str | Path, overwrite: bool = False, inputs=()) -> None:
        self.output, self.overwrite, self.inputs = output, overwrite, tuple(inputs)
        self.target = check_output(output, overwrite, self.inputs)
        key = _key(self.target.name)
        self.lock_path = self.target.parent / f"{_LOCK_PREFIX}{key}"
        self.staging = self.target.parent / f".qcompiler-tmp-{key}-{os.getpid()}"
        self.aside = self.target.parent / f".qcompiler-old-{key}-{os.getpid()}"
        self._fd: int | None = None
        self._created: list[Path] = []
        self.committed = False

    def __enter__(self) -> OutputFolder:
        try:
            self._make_parents()
            self._lock()
            recover(self.target.parent)
            self.target = check_output(self.output, self.overwrite, self.inputs)  # again, under the lock
            self.staging.mkdir()
            (self.staging / STAGING_MARKER).write_text(json.dumps({"target": self.target.name, "pid": os.getpid()}))
        except OSError as exc:
            self._release()
            raise QCompilerError(f"cannot write in {self.target.parent}: {exc.strerror or exc}; choose another -o "
                                 "or fix the folder's permissions") from None
        except BaseException:
            self._release()
            raise
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self._release()

    def commit(self, files: list[str]) -> Path:
        """Swap the staging folder in as the target; `files` are the artifact's files, listed in the marker."""
        (self.staging / MARKER).write_text(json.dumps({"written_by": "qcompiler", "files": sorted(files)}, indent=1))
        (self.staging / STAGING_MARKER).unlink()
        after_step("staged")
        with _signals_held():
            if self.target.exists():
                check_replaceable(self.target, self.output, self.overwrite)  # it may have changed meanwhile
            if self.target.is_dir() and any(self.target.iterdir()):
                self._replace()
            else:
                if self.target.is_dir():
                    self.target.rmdir()  # empty
                _rename(self.staging, self.target, _RENAME_NOREPLACE)
            self.committed = True
            written.append(self.target)
        return self.target

    def _replace(self) -> None:
        if _rename(self.staging, self.target, _RENAME_EXCHANGE):
            after_step("exchanged")  # the target is the new artifact; staging holds the old one
            return
        self._journal(aside=self.aside.name)
        os.rename(self.target, self.aside)
        after_step("set-aside")
        os.rename(self.staging, self.target)
        after_step("renamed-in")
        _remove_ours(self.aside)

    def _make_parents(self) -> None:
        missing = []
        parent = self.target.parent
        while not parent.exists():
            missing.append(parent)
            parent = parent.parent
        for folder in reversed(missing):
            folder.mkdir()
            self._created.append(folder)

    def _lock(self) -> None:
        while True:
            try:
                fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
            except OSError as exc:
                if exc.errno != errno.ELOOP:
                    raise
                raise QCompilerError(f"{self.lock_path} is a symbolic link, not qcompiler's lock file: remove it or "
                                     "choose another -o") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _read_journal_fd(fd).get("pid", "?")
                os.close(fd)
                raise QCompilerError(f"another qcompiler (pid {holder}) is writing {self.output}: wait for it to "
                                     "finish, or choose another -o") from None
            if _same_file(fd, self.lock_path):
                self._fd = fd
                self._journal()
                return
            os.close(fd)  # a finishing writer removed it between open and lock: take the new one

    def _journal(self, aside: str | None = None) -> None:
        data = json.dumps({"pid": os.getpid(), "target": self.target.name, "staging": self.staging.name,
                           "aside": aside}).encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, data, 0)

    def _release(self) -> None:
        with _signals_held():
            if self._fd is not None:
                # the unfinished artifact (or after an exchange the old one) goes; an old artifact set
                # aside by a swap that did not finish comes back
                _finish(self.target.parent, self.lock_path.name, {
                    "target": self.target.name, "staging": self.staging.name, "aside": self.aside.name})
                os.unlink(self.lock_path)
                os.close(self._fd)
                self._fd = None
            if not self.committed:
                for folder in reversed(self._created):
                    try:
                        folder.rmdir()
                    except OSError:
                        break
                self._created = []


def recover(parent: Path) -> list[str]:
    """Finish the writes of dead processes in `parent`: restore a set-aside artifact whose
    replacement never landed, delete stale staging folders. Returns what was done."""
    done = []
    for lock in sorted(parent.glob(f"{_LOCK_PREFIX}*")):
        try:
            fd = os.open(lock, os.O_RDWR | os.O_NOFOLLOW)
        except OSError:
            continue
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                continue  # a live writer (perhaps this process)
            if not _same_file(fd, lock):
                continue
            done += _finish(parent, lock.name, _read_journal_fd(fd))
            os.unlink(lock)
        finally:
            os.close(fd)
    for line in done:
        log.warning("%s", line)
    return done


def _finish(parent: Path, lock_name: str, journal: dict) -> list[str]:
    """Act on a dead writer's journal, only within `parent` and only on names of that writer's own
    shape (the target whose key names the lock, staging and set-aside folders with that key)."""
    key = lock_name[len(_LOCK_PREFIX):]
    names = {k: journal.get(k) for k in ("target", "staging", "aside")}
    if not all(v is None or (isinstance(v, str) and v and "/" not in v and v not in (".", ".."))
               for v in names.values()):
        return []
    target = parent / names["target"] if names["target"] and _key(names["target"]) == key else None
    staging = parent / names["staging"] if (names["staging"] or "").startswith(f".qcompiler-tmp-{key}-") else None
    aside = parent / names["aside"] if (names["aside"] or "").startswith(f".qcompiler-old-{key}-") else None
    done = []
    if aside is not None and target is not None and aside.is_dir() and not aside.is_symlink():
        if not os.path.lexists(target):  # the new artifact never landed: the old one comes back
            if (aside / MARKER).is_file():
                os.rename(aside, target)
                done.append(f"restored {target} from a write that was interrupted")
        elif _remove_ours(aside):  # the new artifact landed: the old one goes
            done.append(f"removed {aside.name}, left by a write that was interrupted")
    if staging is not None and staging.is_dir() and _remove_ours(staging):
        done.append(f"removed {staging.name}, left by a write that was interrupted")
    return done


def _key(name: str) -> str:
    return hashlib.sha1(os.fsencode(name)).hexdigest()[:12]


def _remove_ours(folder: Path) -> bool:
    """Delete `folder` if qcompiler wrote it (a marker inside) or it is empty; never anything else.
    The markers go last, so a removal cut short is still recognised and finished by a later run."""
    if folder.is_symlink() or not folder.is_dir():
        return False
    markers = [folder / m for m in (STAGING_MARKER, MARKER) if (folder / m).is_file()]
    if not markers and any(folder.iterdir()):
        log.warning("left %s in place: it holds no qcompiler marker", folder)
        return False
    for entry in folder.iterdir():
        if entry not in markers:
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    for marker in markers:
        marker.unlink()
    folder.rmdir()
    return True


def _rename(src: Path, dst: Path, flags: int) -> bool:
    """renameat2 with `flags`; False where the system cannot (then the caller takes another way),
    except that a plain rename stands in for RENAME_NOREPLACE (the target is absent or empty)."""
    if RENAMEAT2 is not None:
        if RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), flags) == 0:
            return True
        err = ctypes.get_errno()
        if err not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(err, os.strerror(err), str(dst))
    if flags == _RENAME_EXCHANGE:
        return False
    os.rename(src, dst)
    return True


def _same_file(fd: int, path: Path) -> bool:
    try:
        st = os.stat(path)
    except FileNotFoundError:
        return False
    own = os.fstat(fd)
    return (own.st_dev, own.st_ino) == (st.st_dev, st.st_ino)


def _read_journal_fd(fd: int) -> dict:
    try:
        value = json.loads(os.pread(fd, 65536, 0) or b"{}")
    except (ValueError, RecursionError):
        return {}
    return value if isinstance(value, dict) else {}


@contextmanager
def _signals_held():
    """SIGINT, SIGTERM and SIGHUP wait until the block is done (a swap or a clean-up is never cut in
    half): their handlers are swapped for one that only records them, then the first recorded one
    is delivered to the handler that was in place. Python runs handlers in the main thread whichever
    thread the signal hit, so this holds them off for the whole process; off the main thread (an
    embedding program's worker) handlers cannot be changed and the block runs as it is."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    pending: list[int] = []
    previous = {}
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        previous[signum] = signal.signal(signum, lambda n, frame: pending.append(n))
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        if pending:
            handler = previous[pending[0]]
            if callable(handler):
                handler(pending[0], None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(pending[0])
