"""Atomic file writes shared by every tool: a temporary file in the destination folder, then ``os.replace``.

A reader (or a crash) sees either the old file or the complete new one, never a half-written file; when the
write fails (full disk, a killed process raising, an unpicklable object, ...) the temporary file is removed and the
destination is left as it was. Temporary names start with ``.`` and contain ``.tmp``, in the destination folder (so
``os.replace`` stays on one filesystem).
"""

from __future__ import annotations

import errno
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_MARKER",
    "refuse_symlink",
    "links_below",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_copy",
    "same_bytes",
    "remove_stale_temps",
    "remove_new_files_on_error",
]

logger = logging.getLogger(__name__)

#: every temporary file name holds this (tests look for leftovers with it)
TMP_MARKER = ".tmp"


def _suffix(name: str) -> str:
    """The extension a format-sniffing writer needs on the temporary file (``.nii.gz``, ``.nii``, ``.png``, ...)."""
    lower = name.lower()
    if lower.endswith(".nii.gz"):
        return ".nii.gz"
    return Path(name).suffix


def refuse_symlink(path: str | os.PathLike) -> None:
    """Never write through (or replace) a symbolic link: its target may be any file of the user's.

    Args:
        path: a file about to be written.

    Raises:
        OSError: ``ELOOP``, naming ``path`` and the link's target.
    """
    if os.path.islink(path):
        raise OSError(
            errno.ELOOP,
            f"{path} is a symbolic link (to {os.readlink(path)}); refusing to write through it: remove the link or "
            "choose another output folder",
            str(path),
        )


def links_below(root: str | os.PathLike) -> list[Path]:
    """Symbolic links below ``root`` (not followed; ``root`` itself may be a link to the folder), sorted."""
    found = []
    for folder, dirs, files in os.walk(root):
        found.extend(Path(folder, n) for n in (*dirs, *files) if os.path.islink(os.path.join(folder, n)))
    return sorted(found)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, fsync: bool = True) -> Path:
    """Write ``path`` atomically: ``write(tmp)`` fills a temporary file beside it, which then replaces ``path``.

    Args:
        path: destination file; its folder is created. An existing FOLDER of that name is refused.
        write: called with the temporary path (same folder, same extension) and must write the whole file there.
        fsync: flush the temporary file to disk before the rename (a power loss cannot leave an empty file).

    Returns:
        the destination path.

    Raises:
        IsADirectoryError: ``path`` is an existing folder.
        OSError: ``path`` is a symbolic link (:func:`refuse_symlink`: never written through, never replaced).
        Exception: whatever ``write`` or the filesystem raises; the temporary file is removed first (an
            ``OSError`` naming the temporary file names ``path`` instead).
    """
    path = Path(path)
    refuse_symlink(path)
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a folder; give a file path")
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f"{TMP_MARKER}{_suffix(path.name)}", dir=path.parent)
    except OSError as err:  # a read-only or full folder: name the destination, not a temporary name never made
        err.filename = str(path)
        raise
    os.close(fd)
    tmp = Path(name)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
        write(tmp)
        if fsync:
            fd = os.open(tmp, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        os.replace(tmp, path)
    except BaseException as failure:
        try:
            tmp.unlink()
        except FileNotFoundError:
            pass
        except OSError as err:  # pragma: no cover - e.g. the folder became unwritable meanwhile
            logger.warning("could not remove the temporary file %s: %s", tmp, err)
        if isinstance(failure, OSError) and failure.filename is not None and str(failure.filename) == str(tmp):
            failure.filename = str(path)  # the user knows the destination; the temporary name is gone
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes, *, fsync: bool = True) -> Path:
    """Write bytes atomically (see :func:`atomic_write`).

    Args:
        path: destination file.
        data: the whole content.
        fsync: flush to disk before the rename.

    Returns:
        the destination path.
    """
    return atomic_write(path, lambda tmp: tmp.write_bytes(data), fsync=fsync)


def atomic_write_text(path: str | os.PathLike, text: str, *, encoding: str = "utf-8", fsync: bool = True) -> Path:
    """Write text atomically (see :func:`atomic_write`).

    Args:
        path: destination file.
        text: the whole content.
        encoding: text encoding.
        fsync: flush to disk before the rename.

    Returns:
        the destination path.
    """
    return atomic_write_bytes(path, text.encode(encoding), fsync=fsync)


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1, fsync: bool = True, **dumps: Any) -> Path:
    """Serialise ``obj`` as JSON first (nothing is written when that fails), then write it atomically.

    Args:
        path: destination file.
        obj: JSON-able object.
        indent: ``json.dumps`` indent.
        fsync: flush to disk before the rename.
        **dumps: further ``json.dumps`` arguments (e.g. ``default=str``).

    Returns:
        the destination path.

    Raises:
        TypeError, ValueError: ``obj`` is not JSON-able (nothing written).
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, **dumps) + "\n", fsync=fsync)


def atomic_copy(src: str | os.PathLike, dst: str | os.PathLike, *, fsync: bool = True) -> Path:
    """Copy ``src`` to ``dst`` atomically (see :func:`atomic_write`).

    Returns:
        the destination path.
    """
    return atomic_write(dst, lambda tmp: shutil.copyfile(src, tmp), fsync=fsync)


def same_bytes(path: str | os.PathLike, data: bytes) -> bool:
    """Whether ``path`` is a file holding exactly ``data`` (a write can then be skipped: written once).

    Returns:
        True when the file exists with that content.
    """
    p = Path(path)
    try:
        return p.is_file() and p.stat().st_size == len(data) and p.read_bytes() == data
    except OSError:
        return False


def remove_stale_temps(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary files an interrupted :func:`atomic_write` of ``path`` left beside it.

    A process killed during a write (SIGKILL, power loss) cannot remove its temporary file; ``path`` itself is intact
    (the old or the new complete file). Call this only while no other process writes ``path`` (e.g. a training run
    holding its output folder's lock).

    Args:
        path: the destination file whose leftovers are removed (``.<name>.<random>.tmp<ext>`` in its folder).

    Returns:
        the removed files.
    """
    path = Path(path)
    removed: list[Path] = []
    if not path.parent.is_dir():
        return removed
    for tmp in path.parent.glob(f".{path.name}.*{TMP_MARKER}{_suffix(path.name)}"):
        try:
            tmp.unlink()
            removed.append(tmp)
        except OSError as err:  # pragma: no cover - e.g. removed meanwhile
            logger.warning("could not remove the stale temporary file %s: %s", tmp, err)
    if removed:
        logger.info("removed %d temporary file(s) of an interrupted write of %s", len(removed), path)
    return removed


def _paths_below(root: Path) -> set[str]:
    """Every file, folder and link below ``root`` (links are not followed)."""
    found: set[str] = set()
    for folder, dirs, files in os.walk(root):
        found.update(os.path.join(folder, name) for name in (*dirs, *files))
    return found


@contextmanager
def remove_new_files_on_error(root: str | os.PathLike) -> Iterator[None]:
    """Undo what a multi-file write created below ``root`` when it fails: no partial output is left behind.

    On any exception (a full disk, Ctrl-C, a bug) every file, link and folder below ``root`` that did not exist when
    the context was entered is removed, and ``root`` itself (with the parent folders it needed) when it did not exist
    either; then the exception propagates. Nothing that existed before is removed (a file that existed and was
    replaced in place keeps its new content: use :func:`atomic_write` for each file, so it is never half-written).
    Nothing is done when the block succeeds. Another process must not write below ``root`` meanwhile.

    Args:
        root: the output folder (it need not exist yet).

    Yields:
        None.
    """
    root = Path(root)
    created_top: Path | None = None
    if not root.exists():
        created_top = root
        while not created_top.parent.exists():
            created_top = created_top.parent
    existed = set() if created_top is not None else _paths_below(root)
    try:
        yield
    except BaseException:
        if created_top is not None:
            shutil.rmtree(created_top, ignore_errors=True)
            logger.info("removed %s, which the failed write created", created_top)
        elif root.is_dir():
            removed = 0
            for folder, dirs, files in os.walk(root, topdown=False):
                for name in (*files, *dirs):
                    path = os.path.join(folder, name)
                    if path in existed:
                        continue
                    try:
                        if os.path.isdir(path) and not os.path.islink(path):
                            os.rmdir(path)  # its new content is already gone; a folder still holding files stays
                        else:
                            os.unlink(path)
                        removed += 1
                    except OSError as err:
                        logger.warning("could not remove %s after the failed write: %s", path, err)
            logger.info("removed %d new file(s)/folder(s) of the failed write below %s", removed, root)
        raise
