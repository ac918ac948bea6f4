"""Checks on an output location before anything is written, and what a failed write means.

`check_output` refuses a location that would lose a user's files (see `qcompiler.output` for the
promises); `foreign_files` tells a folder qcompiler wrote from any other by its marker;
`write_error` turns a failed write into one line, recognising a full disk however a runtime
words it.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

from qcompiler.errors import QCompilerError

MARKER = ".qcompiler-artifact"
ALSO_OURS = ("qcompiler_eval.json",)  # files `qcompiler eval` adds to an artifact


def check_output(output: str | Path, overwrite: bool, inputs=()) -> Path:
    """The absolute target folder for `output`, or a QCompilerError naming the problem and the fix.

    Nothing is created. `inputs` are the model's paths: the target may not be one of them, inside
    one (a folder) or above one."""
    if output is None or not str(output).strip():
        raise QCompilerError("the output path is empty: pass -o with a folder name such as out/model-int4")
    raw = Path(os.path.expanduser(str(output)))
    target = Path(os.path.abspath(raw))
    if target.name in ("", ".", ".."):
        raise QCompilerError(f"output {output} is not a folder name: pass -o with a new folder such as out/model-int4")
    limit = _name_max(Path("/"))
    for part in target.parts:
        if len(os.fsencode(part)) > limit:
            raise QCompilerError(f"output folder name {'' if part == target.name else 'component '}is "
                                 f"{len(os.fsencode(part))} bytes long; this filesystem allows {limit}: choose a "
                                 "shorter -o")
    if len(os.fsencode(str(target))) > 4000:
        raise QCompilerError(f"output path is {len(os.fsencode(str(target)))} bytes long: choose a shorter -o")
    if target.is_symlink():
        raise QCompilerError(f"output {output} is a symbolic link (to {os.readlink(target)}): pass the folder it points "
                             "to, or another -o")
    real = Path(os.path.realpath(target.parent)) / target.name
    cwd, home = Path(os.path.realpath(Path.cwd())), Path(os.path.realpath(Path.home()))
    if real == cwd or real in cwd.parents:
        raise QCompilerError(f"output {output} is the current folder or one above it: pass -o with a new folder "
                             "such as out/model-int4")
    if real == home or real.parent == real:
        raise QCompilerError(f"output {output} is the home or root folder: pass -o with a new folder such as "
                             "out/model-int4")
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        if real == source or real in source.parents:
            raise QCompilerError(f"output {output} is the model {given} or a folder holding it: writing there would "
                                 "replace the model; choose another -o")
        if source.is_dir() and source in real.parents:
            raise QCompilerError(f"output {output} is inside the model folder {given}: choose an -o outside it")
    existing = _first_existing(Path(os.path.realpath(target.parent)))
    if not existing.is_dir():
        raise QCompilerError(f"cannot create {output}: {existing} is a file, not a folder; choose another -o")
    if real.exists():
        check_replaceable(real, output, overwrite)
    return real


def check_replaceable(target: Path, output, overwrite: bool) -> None:
    if not target.is_dir():
        raise QCompilerError(f"output {output} is a file, not a folder: choose another -o")
    if not any(target.iterdir()):
        return  # an empty folder: nothing to lose
    if not overwrite:
        raise QCompilerError(f"output folder {output} already exists: pass --overwrite (which replaces only a folder "
                             "qcompiler wrote) or choose another -o")
    foreign = foreign_files(target)
    if foreign is None:
        raise QCompilerError(f"output folder {output} was not written by qcompiler (no {MARKER} file), so "
                             "--overwrite will not replace it: delete it yourself or choose another -o")
    if foreign:
        shown = ", ".join(foreign[:3]) + (", ..." if len(foreign) > 3 else "")
        raise QCompilerError(f"output folder {output} holds files qcompiler did not write ({shown}), so --overwrite "
                             "will not replace it: move them out or choose another -o")


def foreign_files(folder: Path) -> list[str] | None:
    """Files in `folder` that its marker does not list ([] = all ours), or None if it has no valid
    marker (a list of file names)."""
    listed = read_json(folder / MARKER, {}).get("files")
    if not isinstance(listed, list) or not all(isinstance(f, str) for f in listed):
        return None
    listed = {*listed, MARKER, *ALSO_OURS}
    return sorted(f for f in _relative_files(folder) if f not in listed)


def read_json(path: Path, default):
    """JSON of the type of `default` from `path` (not followed if a link), or `default` when it is
    missing, unreadable, too deep, or of another type."""
    try:
        if path.is_symlink():
            return default
        value = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError):
        return default
    return value if isinstance(value, type(default)) else default


def _relative_files(folder: Path) -> list[str]:
    out = []
    for root, dirs, files in os.walk(folder):
        rel = Path(root).relative_to(folder)
        out += [str(rel / f) if str(rel) != "." else f for f in files]
        out += [str(rel / d) for d in dirs if os.path.islink(Path(root) / d)]  # a link to a folder is an entry too
    return out


FULL_BELOW = 16 * 2**20  # a write that fails with less free space than this failed for lack of space


def write_error(exc: BaseException, folder: Path) -> QCompilerError | None:
    """The one-line error for a failed write into `folder`, or None if the failure is not about the
    disk. Runtimes report a full disk in their own words (OpenVINO: "basic_ios::clear: iostream
    error"), so the free space is read too."""
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        free = None
    code = getattr(exc, "errno", None)
    if code in (errno.ENOSPC, errno.EDQUOT) or (free is not None and free < FULL_BELOW):
        shown = "unknown" if free is None else f"{free / 2**20:.1f} MiB"
        return QCompilerError(f"the disk holding {folder.parent} is full ({shown} free) while writing the artifact: "
                              "free some space or choose another -o; nothing was written")
    if isinstance(exc, OSError):
        return QCompilerError(f"cannot write the artifact in {folder.parent}: {exc.strerror or exc}; choose another "
                              "-o; nothing was written")
    return None


def _first_existing(path: Path) -> Path:
    while not os.path.lexists(path) and path.parent != path:
        path = path.parent
    return path


def _name_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255
