"""A training run's output folder: claimed (created, locked) before anything is written, and released.

:func:`guard_training_output` is the first preflight step of every training bundle: it takes an exclusive lock on
``<output_dir>/.lock`` and refuses to start over an earlier run's checkpoints unless resuming or overwriting.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.engine.atomic import links_below
from pipelines.engine.checkpoint import load_torch_file
from pipelines.engine.errors import BundleInputError, as_bool

__all__ = ["LOCK_NAME", "TrainingOutput", "guard_training_output", "release_output_dir"]

logger = logging.getLogger(__name__)


#: lock file a training run holds (``fcntl.flock``) in its output folder
LOCK_NAME = ".lock"
#: output folders this process holds the lock of: resolved path -> open file descriptor
_HELD_LOCKS: dict[str, int] = {}


@dataclass(frozen=True)
class TrainingOutput:
    """What :func:`guard_training_output` established about a training run's output folder.

    Attributes:
        output_dir: the folder (created, locked by this process on rank 0).
        resume: the run continues ``last_path``.
        overwrite: the run replaces an earlier run's checkpoints.
        last_path: ``<output_dir>/checkpoints/last.pt``.
        splits_sha256: the split hash stored in ``last_path`` when resuming ("" otherwise).
        epoch: the epoch stored in ``last_path`` when resuming (0 otherwise).
    """

    output_dir: str
    resume: bool
    overwrite: bool
    last_path: str
    splits_sha256: str = ""
    epoch: int = 0


def _lock_output_dir(d: Path) -> None:
    """Hold an exclusive ``flock`` on ``<d>/.lock`` until the process exits (re-entrant within a process)."""
    key = str(d.resolve())
    lock = d / LOCK_NAME
    if key in _HELD_LOCKS:
        try:
            if os.fstat(_HELD_LOCKS[key]).st_ino == os.stat(lock).st_ino:
                return  # this process already holds it
        except OSError:
            pass
        os.close(_HELD_LOCKS.pop(key))  # the folder was removed and made again: lock the new file
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o644)  # never through a link
    except OSError as e:
        raise BundleInputError(
            f"output_dir {d} is not writable ({e.strerror}: {lock}); choose a folder you can write to (--output_dir)."
        ) from e
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        logger.warning("no fcntl on this platform: %s is not locked against a second training run", d)
        os.close(fd)
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
        holder = ""
        try:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        except OSError:
            pass
        os.close(fd)
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            who = f"pid {holder.split()[0]}" if holder else "another process"
            raise BundleInputError(
                f"output_dir {d} is in use by another training run ({who}, lock {lock}); wait for it to finish or "
                "choose another --output_dir."
            ) from e
        logger.warning("cannot lock %s (%s): a second training run into %s would not be stopped", lock, e.strerror, d)
        return
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()} {socket.gethostname()}\n".encode(), 0)
    except OSError as e:
        os.close(fd)
        raise BundleInputError(f"output_dir {d} is not writable ({e.strerror}: {lock}); choose another --output_dir.") from e
    _HELD_LOCKS[key] = fd


def release_output_dir(output_dir: str | os.PathLike) -> bool:
    """Release the lock :func:`guard_training_output` took on ``output_dir`` (the lock file stays).

    The lock is otherwise released when the process exits; in-process callers (tests, notebooks) may release it.

    Args:
        output_dir: the training output folder.

    Returns:
        True when this process held the lock.
    """
    fd = _HELD_LOCKS.pop(str(Path(output_dir).resolve()), None)
    if fd is None:
        return False
    os.close(fd)  # closing the descriptor releases the flock
    return True


def guard_training_output(
    output_dir: str | os.PathLike,
    *,
    resume: Any = False,
    overwrite: Any = False,
    lock: Any = True,
    ckpt_subdir: str = "checkpoints",
) -> TrainingOutput:
    """Claim a training run's output folder before anything is written into it (the first preflight step).

    Creates ``output_dir``, takes an exclusive lock on ``<output_dir>/.lock`` (held until the process exits; a second
    run into the same folder stops here, naming the holder's pid), and refuses to start over an earlier run's
    checkpoints unless ``--resume true`` (continue ``last.pt``, which must exist and load) or ``--overwrite true``
    (replace them).

    Args:
        output_dir: the bundle's ``--output_dir``.
        resume: ``--resume``: continue from ``<output_dir>/<ckpt_subdir>/last.pt``.
        overwrite: ``--overwrite``: allow replacing an earlier run's ``best.pt``/``last.pt``.
        lock: take the lock (rank 0 of a multi-GPU run; the other ranks only check).
        ckpt_subdir: checkpoint folder inside ``output_dir``.

    Returns:
        a :class:`TrainingOutput` (truthy), whose ``splits_sha256`` lets :func:`resolve_splits` check that a resumed
        run keeps its split.

    Raises:
        BundleInputError: both resume and overwrite; an output folder that cannot be created or written; a folder
            locked by another run; a folder holding symbolic links; an earlier run's checkpoints without resume/overwrite; resume without a loadable
            ``last.pt``.
    """
    d = Path(output_dir)
    resume, overwrite = as_bool(resume), as_bool(overwrite)
    if resume and overwrite:
        raise BundleInputError(
            "--resume true and --overwrite true contradict each other: resume continues the run in --output_dir, "
            "overwrite starts a new one over it; pass only one."
        )
    try:
        d.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise BundleInputError(f"output_dir {d} cannot be created ({e.strerror or e}); choose another --output_dir.") from e
    links = links_below(d)
    if links:  # a pre-seeded link (.lock, splits.json, checkpoints/) would send our writes into someone's file
        raise BundleInputError(
            f"output_dir {d} holds a symbolic link, {links[0]} (to {os.readlink(links[0])}); a training run never "
            "writes through links: remove it or choose another --output_dir."
        )
    if as_bool(lock):
        _lock_output_dir(d)
    ckpt_dir = d / ckpt_subdir
    last, best = ckpt_dir / "last.pt", ckpt_dir / "best.pt"
    if resume:
        if not last.is_file():
            raise BundleInputError(f"--resume true but {last} does not exist (nothing to resume); start without --resume.")
        ckpt = load_torch_file(last, "the checkpoint to resume")
        if not isinstance(ckpt, dict) or "model" not in ckpt or "epoch" not in ckpt:
            raise BundleInputError(f"{last} is not a ctdistill training checkpoint (no 'model'/'epoch'); cannot resume from it.")
        logger.info("resuming %s from epoch %s", last, ckpt.get("epoch"))
        return TrainingOutput(str(d), True, False, str(last), str(ckpt.get("splits_sha256") or ""), int(ckpt["epoch"]))
    existing = [p for p in (last, best) if p.exists()]
    if existing and not overwrite:
        raise BundleInputError(
            f"{existing[0]} exists: output_dir {d} holds an earlier training run. Pass --resume true to continue it, "
            "--overwrite true to replace its checkpoints, or choose another --output_dir."
        )
    if existing:
        logger.warning("--overwrite true: the checkpoints in %s are replaced by this run's", ckpt_dir)
    return TrainingOutput(str(d), False, overwrite, str(last))
