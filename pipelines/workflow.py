"""Typed building blocks the bundle configs call: datasets and preflight checks, inferers, metric handlers,
checkpoints with resume, per-epoch training averages.

The bundles (``bundles/<role>/configs/*.yaml``) stay declarative; everything with logic lives here so it is
tested and documented once. The names below are referenced from ``bundles/common/configs/*.yaml``.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import socket
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from monai.handlers import IgniteMetricHandler, from_engine
from monai.inferers import Inferer, SimpleInferer, SliceInferer, SlidingWindowInferer

from pipelines.atomic import atomic_copy, atomic_torch_save, atomic_write_text, remove_stale_temps, same_bytes
from pipelines.metrics import RegionMetric

__all__ = [
    "BundleInputError",
    "as_bool",
    "optional_knob",
    "resolve_splits",
    "load_split",
    "TrainingOutput",
    "guard_training_output",
    "release_output_dir",
    "preflight",
    "run_check_dataset",
    "check_free_disk",
    "checkpoint_bytes",
    "check_teacher_checkpoint",
    "kd_weights",
    "make_inferer",
    "ct_metric_handlers",
    "polyp_metric_handlers",
    "trainable",
    "unwrap",
    "EpochAverager",
    "TrainCheckpointer",
    "load_checkpoint",
    "load_torch_file",
    "network_from_checkpoint",
    "checkpoint_settings",
    "atomic_torch_save",
    "loss_of",
    "SaveOnIteration",
    "sidecar",
    "volumes_per_batch",
    "simple_inferer",
]

logger = logging.getLogger(__name__)

#: metric handler name -> (RegionMetric kind, region); the first is the key metric (best checkpoint)
CT_METRICS: dict[str, tuple[str, str]] = {
    "dsc_tumor": ("dsc", "tumor"),
    "rvd_tumor": ("rvd", "tumor"),
    "abs_rvd_tumor": ("abs_rvd", "tumor"),
    "dsc_organ": ("dsc", "organ"),
    "rvd_organ": ("rvd", "organ"),
    "abs_rvd_organ": ("abs_rvd", "organ"),
    "tumor_ml_pred": ("ml_pred", "tumor"),
    "tumor_ml_gt": ("ml_gt", "tumor"),
}

SPLIT_NAMES = ("training", "validation", "test")


class BundleInputError(ValueError):
    """Bad user input detected before any long work (raised by the preflight checks)."""


def as_bool(value: Any) -> bool:
    """A CLI flag as bool: ``fire`` passes ``--resume true`` as the string ``"true"``.

    Raises:
        ValueError: a string other than true/false/yes/no/1/0/on/off.
    """
    if isinstance(value, str):
        v = value.strip().lower()
        if v in ("true", "yes", "1", "on"):
            return True
        if v in ("false", "no", "0", "off", "", "none", "null"):
            return False
        raise ValueError(f"expected a boolean (true/false), got {value!r}.")
    return bool(value)


def optional_knob(value: Any) -> Any:
    """A knob whose documented "unset" is ``null``: the CLI passes ``--in_plane_size null`` as the string ``"null"``.

    Args:
        value: the knob value.

    Returns:
        None for None or the strings null/none/"" (any case), else ``value`` unchanged.
    """
    if isinstance(value, str) and value.strip().lower() in ("", "null", "none"):
        return None
    return value


# ----------------------------------------------------------------------------------------------- data


#: task -> datalist preset holding out the paper's test share (KiTS19 168:42, LiTS 131:70)
TASK_PRESETS = {"kits": "kits19", "lits": "lits"}


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
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
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
            locked by another run; an earlier run's checkpoints without resume/overwrite; resume without a loadable
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


def resolve_splits(
    dataset_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    seed: int = 0,
    splits_file: str | None = None,
    task: str | None = "kits",
    guard: TrainingOutput | None = None,
) -> str:
    """Return the split JSON to use, writing one into ``output_dir`` when the dataset has none.

    Order: an explicit ``splits_file``; ``dataset_dir`` itself when it is a ``.json`` file;
    ``<dataset_dir>/splits.json``; else ``pipelines.datalist`` detects the layout and writes
    ``<output_dir>/splits.json`` (deterministic for a seed; the task's preset holds out the paper's test share,
    so training, evaluation and the demo agree on the held-out volumes). Nothing is written into ``dataset_dir``.
    The split is written once: an identical existing file is kept as it is.

    Args:
        dataset_dir: the user's data folder (KiTS19, LiTS, nnU-Net/MSD layouts, or a split JSON).
        output_dir: the bundle's output folder.
        seed: split seed.
        splits_file: an explicit split JSON, or None/"".
        task: ``kits`` or ``lits`` (selects the datalist preset), None for no test hold-out.
        guard: a training run's :func:`guard_training_output` result (a config reference, so the output folder is
            claimed before the split is written). When it resumes, the split must be the one the checkpoint was
            trained on (same SHA-256), and ``<output_dir>/splits.json`` is never rewritten.

    Returns:
        the path of the split JSON.

    Raises:
        BundleInputError: no dataset_dir, a missing or unreadable folder, a folder without recognisable data, a
            ``<output_dir>/splits.json`` not written by ``pipelines.datalist``, or (resuming) a split that differs
            from the checkpoint's.
    """
    path = _resolve_split_path(dataset_dir, output_dir, seed, splits_file, task, guard)
    if guard is not None and guard.resume and guard.splits_sha256:
        from pipelines.mlflow_tracking import file_sha256

        if file_sha256(path) != guard.splits_sha256:
            raise BundleInputError(
                f"the split {path} differs from the one {guard.last_path} was trained on (SHA-256 mismatch): resuming "
                "would mix training and held-out cases. Resume with --splits_file "
                f"{Path(guard.last_path).parent / 'splits.json'} (the split saved with the checkpoints), or start anew "
                "with --overwrite true."
            )
    return path


def _resolve_split_path(
    dataset_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    seed: int,
    splits_file: str | None,
    task: str | None,
    guard: TrainingOutput | None,
) -> str:
    if splits_file:
        if not Path(splits_file).is_file():
            raise BundleInputError(f"splits_file {splits_file} does not exist.")
        return str(splits_file)
    if not dataset_dir:
        raise BundleInputError("no dataset given: pass --dataset_dir <folder with the CT volumes> (or --splits_file <json>).")
    d = Path(dataset_dir)
    if d.is_file() and d.suffix == ".json":
        return str(d)
    if not d.is_dir():
        raise BundleInputError(f"dataset_dir {d} does not exist; pass the folder holding the CT volumes and labels.")
    if (d / "splits.json").is_file():
        return str(d / "splits.json")
    from pipelines import datalist

    out = Path(output_dir) / "splits.json"
    try:
        result = datalist.build_datalist(d, seed=int(seed), preset=TASK_PRESETS.get(task or ""))
    except OSError as e:
        raise BundleInputError(f"dataset_dir {d}: cannot read {e.filename or d} ({e.strerror or e}).") from e
    except ValueError as e:
        raise BundleInputError(f"dataset_dir {d} holds no dataset this product reads: {e}") from e
    text = datalist.datalist_text(result)
    if same_bytes(out, text.encode()):
        logger.info("split %s unchanged (kept as written before)", out)
        return str(out)
    if guard is not None and guard.resume and out.exists():
        raise BundleInputError(
            f"{out}, the split this run started with, differs from the split computed now from {d} (the dataset "
            f"changed?): resume with --splits_file {out} to keep it, or start anew with --overwrite true."
        )
    try:
        datalist.save_datalist(result, out)
    except (ValueError, OSError) as e:
        raise BundleInputError(f"cannot write the split {out}: {e}") from e
    return str(out)


def load_split(splits_file: str | os.PathLike, section: str | Sequence[str], labelled: bool = True) -> list[dict]:
    """Entries of one split section (the first usable of ``section`` when a list is given).

    Args:
        splits_file: splits JSON written by ``pipelines.datalist`` (or by the user).
        section: a section name, or several tried in order (e.g. ``["test", "validation"]``).
        labelled: keep only entries with a ``label`` (training, validation and evaluation need one). A section
            with no labelled entry is skipped: the LiTS preset's ``test`` section holds the 70 unlabelled test
            volumes, so evaluation falls through to ``validation``.

    Returns:
        ``[{"image": ..., "label": ...}, ...]``.

    Raises:
        BundleInputError: every listed section is missing or empty (or has no labelled entry).
    """
    data = json.loads(Path(splits_file).read_text())
    for s in [section] if isinstance(section, str) else list(section):
        entries = [{k: v for k, v in e.items() if k in ("image", "label")} for e in data.get(s) or []]
        kept = [e for e in entries if e.get("label")] if labelled else entries
        if len(kept) < len(entries):
            logger.warning("%s: %d of %d entries in %r have no label and are left out", splits_file, len(entries) - len(kept), len(entries), s)
        if kept:
            return kept
    what = "labelled entries" if labelled else "entries"
    raise BundleInputError(f"{splits_file} has no {what} in {section!r}; sections present: {[k for k in data if k != 'meta']}.")


def _teacher_input(state: Mapping[str, torch.Tensor], net_kwargs: Mapping[str, Any]) -> tuple[int | None, int | None]:
    """(input channels, spatial dims) of a teacher checkpoint: its ``network`` kwargs, else its first conv weight."""
    channels, dims = net_kwargs.get("in_channels"), net_kwargs.get("spatial_dims")
    first_conv = next((w for w in state.values() if isinstance(w, torch.Tensor) and w.ndim in (4, 5)), None)
    if channels is None and first_conv is not None:
        channels = int(first_conv.shape[1])
    if dims is None and first_conv is not None:
        dims = first_conv.ndim - 2
    return (int(channels) if channels is not None else None), (int(dims) if dims is not None else None)


def check_teacher_checkpoint(
    path: str | os.PathLike | None,
    role: str,
    method: str | None = None,
    in_channels: Any = None,
    spatial_dims: Any = None,
) -> bool:
    """KD roles: stop unless ``path`` is an existing checkpoint holding trained weights (and trained heads).

    Args:
        path: the ``--teacher_ckpt`` value.
        role: the bundle role (for the message).
        method: the distillation method; when given, the teacher is rebuilt from the checkpoint and every prediction
            head the method reads must have been trained (``distill.plan.check_trained_heads``: HLFD's UPD reads the
            UNet++ intermediate heads, which only a teacher trained with deep supervision has trained).
        in_channels: the student's input channels (``@in_channels``: ``--num_slices`` in 2.5D, 1 in 3D); the teacher
            reads the same batch, so it must take as many (None: not checked).
        spatial_dims: the student's ``--spatial_dims`` (None: not checked).

    Returns:
        True.

    Raises:
        BundleInputError: no path, a missing file, a file without weights, a checkpoint saved before any epoch, a
            teacher built for other input channels or spatial dims than the student (naming both), or a teacher
            whose heads the method reads were never trained.
    """
    if not path:
        raise BundleInputError(
            f"role {role} distils from a trained teacher: pass --teacher_ckpt <path>, e.g. the best.pt written by "
            "bundles/unetpp_teacher (runs/unetpp_teacher/checkpoints/best.pt). A freshly built teacher is refused "
            "(MONAI's DataLoader reseeds torch's RNG, so it could even equal the student)."
        )
    p = Path(path)
    if not p.is_file():
        raise BundleInputError(f"teacher checkpoint {p} does not exist; train bundles/unetpp_teacher first or fix --teacher_ckpt.")
    from distill import read_checkpoint

    try:
        state, net_kwargs = read_checkpoint(p)
    except ValueError as e:
        raise BundleInputError(str(e)) from e
    ckpt = torch.load(p, map_location="cpu", weights_only=True)
    if isinstance(ckpt, dict) and int(ckpt.get("epoch", 1)) == 0:
        raise BundleInputError(f"teacher checkpoint {p} was saved before any training epoch (untrained).")
    t_channels, t_dims = _teacher_input(state, net_kwargs)
    want_channels, want_dims = optional_knob(in_channels), optional_knob(spatial_dims)
    want_channels = int(want_channels) if want_channels is not None else None
    want_dims = int(want_dims) if want_dims is not None else None
    if (want_channels is not None and t_channels is not None and t_channels != want_channels) or (
        want_dims is not None and t_dims is not None and t_dims != want_dims
    ):
        knobs = f"--spatial_dims {want_dims}" + (f" --num_slices {want_channels}" if want_dims == 2 else "")
        raise BundleInputError(
            f"teacher checkpoint {p} was built for {t_channels} input channel(s) ({t_dims}D) but the {role} student "
            f"takes {want_channels} ({want_dims}D: {knobs}); distil from a teacher trained with the same "
            "--spatial_dims and --num_slices, or set them to the teacher's."
        )
    if method and method != "none":
        import distill
        import networks
        from distill.plan import check_trained_heads

        # which heads were trained follows from the architecture the checkpoint records (deep_supervision), so the
        # network is built from the kwargs already read, not loaded from the file a third time
        name = net_kwargs.get("name")
        if not name:
            raise BundleInputError(
                f"teacher checkpoint {p} records no network name; save it as {{'model': state_dict, 'network': "
                f"{{'name': <one of {', '.join(networks.NETWORKS)}>, **create kwargs}}}} (the bundles do)."
            )
        try:
            teacher = networks.create(name, **{k: v for k, v in net_kwargs.items() if k != "name"})
            check_trained_heads(teacher, distill.method_class(method).TEACHER_ROLES)
        except ValueError as e:
            raise BundleInputError(f"teacher checkpoint {p}: {e}") from e
    return True


def kd_weights(method: str, extra: Mapping[str, Any] | None = None, **knobs: Any) -> dict[str, Any]:
    """The weights passed to ``distill.create_distiller``: the knobs the method accepts, None meaning its default.

    Args:
        method: a ``distill.METHODS`` name.
        extra: method-specific weights (``--kd_weights "{'pair': 5.0}"``); names must be the method's.
        knobs: the flat bundle knobs (``beta``, ``lam``, ``temperature``, ``p``); unknown to the method -> ignored.

    Returns:
        ``{name: value}`` with every weight the method takes (defaults filled in).

    Raises:
        ValueError: an ``extra`` weight the method does not take (listing the valid ones).
    """
    import distill

    valid = distill.default_weights(method)
    bad = sorted(set(extra or {}) - set(valid))
    if bad:
        raise ValueError(f"kd_weights {bad} are not weights of {method!r}; valid: {sorted(valid)}.")
    out = dict(valid)
    out.update({k: v for k, v in knobs.items() if k in valid and v is not None})
    out.update(dict(extra or {}))
    return out


def run_check_dataset(splits_file: str | os.PathLike) -> list[str]:
    """Run ``pipelines.check_dataset`` on a split file (its CLI contract: exit 0 when clean, else one line per problem).

    The check runs in this process through the module's ``main(argv)``; its report lines are logged.

    Args:
        splits_file: the split JSON (every listed image/label is checked).

    Returns:
        the report lines (warnings included) of a clean dataset.

    Raises:
        BundleInputError: a non-zero exit, with every line of the report.
    """
    import contextlib
    import importlib.util
    import io

    if importlib.util.find_spec("pipelines.check_dataset") is None:
        logger.warning("pipelines.check_dataset is not available: dataset integrity NOT checked")
        return []
    from pipelines import check_dataset

    buf = io.StringIO()
    code: Any = 0
    with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
        try:
            ret = check_dataset.main([str(splits_file)])
            code = ret if isinstance(ret, int) else 0
        except SystemExit as e:
            code = e.code
    lines = [ln for ln in buf.getvalue().splitlines() if ln.strip()]
    if code not in (0, None):
        report = "\n  ".join(lines) or f"exit status {code}"
        raise BundleInputError(
            f"dataset integrity check failed (python -m pipelines.check_dataset {splits_file}); fix the data first "
            f"(or pass --check_data false):\n  {report}"
        )
    for ln in lines:
        logger.info("check_dataset: %s", ln)
    return lines


#: checkpoint copies a training run holds on disk at once: best.pt, last.pt, the temporary file of a write in
#: progress, and best.pt copied into the MLflow artifact store (sqlite default: inside output_dir)
CHECKPOINT_COPIES = 4
#: room for CSVs, the executed config, the split and the MLflow database
DISK_MARGIN_BYTES = 16 << 20


def _tensor_bytes(obj: Any) -> int:
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def checkpoint_bytes(network: torch.nn.Module, optimizer_states: int = 2) -> int:
    """Estimated size of a training checkpoint of ``network``: its weights plus the optimizer's per-weight state.

    Args:
        network: the trained network (DDP-wrapped or not).
        optimizer_states: tensors the optimizer keeps per weight (Adam: 2 moments).

    Returns:
        bytes (weights x (1 + optimizer_states) + buffers).
    """
    net = unwrap(network)
    weights = sum(p.numel() * p.element_size() for p in net.parameters())
    buffers = sum(b.numel() * b.element_size() for b in net.buffers())
    return weights * (1 + int(optimizer_states)) + buffers


def check_free_disk(output_dir: str | os.PathLike, network: torch.nn.Module | None = None, *, need_bytes: int = 0) -> int:
    """Stop before long work when ``output_dir``'s filesystem cannot hold the run's checkpoints.

    A run keeps :data:`CHECKPOINT_COPIES` checkpoints on disk at once (best, last, a write in progress, the MLflow
    artifact copy) plus :data:`DISK_MARGIN_BYTES`; an earlier run's ``best.pt``/``last.pt`` being replaced count as
    free. (The cache is in memory: :func:`preflight` checks it against RAM.)

    Args:
        output_dir: the run's output folder (must exist).
        network: the network to be trained (its checkpoint size is estimated with :func:`checkpoint_bytes`).
        need_bytes: further bytes the run will write.

    Returns:
        the bytes needed.

    Raises:
        BundleInputError: less free space than needed, with both numbers and the folder.
    """
    import shutil

    d = Path(output_dir)
    per_ckpt = checkpoint_bytes(network) if network is not None else 0
    need = CHECKPOINT_COPIES * per_ckpt + DISK_MARGIN_BYTES + int(need_bytes)
    try:
        free = shutil.disk_usage(d).free
    except OSError as e:
        logger.warning("cannot read the free space of %s (%s): not checked", d, e)
        return need
    replaced = sum(f.stat().st_size for f in (d / "checkpoints" / "last.pt", d / "checkpoints" / "best.pt") if f.is_file())
    if free + replaced < need:
        mb = 1 << 20
        raise BundleInputError(
            f"not enough free disk space in output_dir {d}: {free / mb:.1f} MB free, the run needs about "
            f"{need / mb:.1f} MB ({CHECKPOINT_COPIES} checkpoints of {per_ckpt / mb:.1f} MB + {DISK_MARGIN_BYTES / mb:.0f} MB "
            "for logs and MLflow); free some space or choose another --output_dir."
        )
    return need


def preflight(
    splits_file: str,
    *,
    role: str,
    check_integrity: bool = True,
    sections: Sequence[str] = ("training", "validation"),
    cache_rate: float = 0.0,
    in_plane_size: Sequence[int] | None = None,
    pixdim: Sequence[float] | None = None,
    teacher_check: Any = True,
    tracking_uri: str | None = None,
    output_dir: str | os.PathLike | None = None,
    network: torch.nn.Module | None = None,
) -> bool:
    """Every check that must pass before a bundle starts long work.

    Args:
        splits_file: split JSON (from :func:`resolve_splits`).
        role: bundle role (for messages).
        check_integrity: run ``pipelines.check_dataset`` on the listed sections' files first.
        sections: split sections the run reads.
        cache_rate: CacheDataset cache rate (memory check).
        in_plane_size: in-plane size before the cache (memory estimate).
        pixdim: resampling spacing before the cache (memory estimate).
        teacher_check: the result of :func:`check_teacher_checkpoint` in KD roles (a config reference, so the
            teacher is checked before anything else); ignored otherwise.
        tracking_uri: the MLflow store: a server must answer within seconds, a SQLite file must be a database
            (``pipelines.mlflow_tracking.check_tracking_uri``); None skips the check.
        output_dir: the training output folder: its disk must hold the run's checkpoints (:func:`check_free_disk`);
            None skips the check.
        network: the network to be trained (the checkpoint size of the disk check).

    Returns:
        True (so it can sit in a bundle's expression list).

    Raises:
        BundleInputError: with every integrity message, or the teacher / memory / disk / tracking-store problem.
    """
    in_plane_size, pixdim = optional_knob(in_plane_size), optional_knob(pixdim)
    if output_dir is not None:
        check_free_disk(output_dir, network)
    if tracking_uri:
        from pipelines.mlflow_tracking import check_tracking_uri

        try:
            check_tracking_uri(str(tracking_uri))
        except ValueError as e:
            raise BundleInputError(str(e)) from e
    entries: list[dict] = []
    data = json.loads(Path(splits_file).read_text())
    for s in sections:
        entries.extend(data.get(s) or [])
    if not entries:
        raise BundleInputError(f"{splits_file} lists no cases in {list(sections)}; check --dataset_dir.")
    missing = [str(e[k]) for e in entries for k in ("image", "label") if k in e and not Path(e[k]).exists()]
    if missing:
        raise BundleInputError(f"{len(missing)} files listed in {splits_file} do not exist, e.g. {missing[:3]}.")
    if as_bool(check_integrity):
        run_check_dataset(splits_file)
    if cache_rate > 0:
        from pipelines.data import estimate_cache

        est = estimate_cache(entries, cache_rate, pixdim=pixdim, in_plane_size=in_plane_size)
        if not est.fits:
            raise BundleInputError(f"the CacheDataset would not fit in memory: {est.message()} (--cache_rate).")
    return True


# ----------------------------------------------------------------------------------------------- model


def make_inferer(spatial_dims: int, roi_size: Sequence[int] | None = None, sw_batch_size: int = 8, overlap: float = 0.25) -> Inferer:
    """Whole-volume inferer: 2.5D ``SliceInferer`` over the last (axial) axis, or 3D ``SlidingWindowInferer``.

    Args:
        spatial_dims: 2 (the network sees (k, H, W) slices; every slice of the volume is predicted) or 3.
        roi_size: 3D window (h, w, d); ignored in 2.5D (whole slices).
        sw_batch_size: slices / windows per forward.
        overlap: 3D window overlap.

    Returns:
        the inferer; input (B, C, H, W, D) -> logits (B, classes, H, W, D).

    Raises:
        ValueError: spatial_dims not 2 or 3.
    """
    if spatial_dims == 2:
        return SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=sw_batch_size, progress=False)
    if spatial_dims == 3:
        if roi_size is None or len(roi_size) != 3:
            raise ValueError(f"3D inference needs roi_size (h, w, d), got {roi_size!r}.")
        return SlidingWindowInferer(roi_size=tuple(roi_size), sw_batch_size=sw_batch_size, overlap=overlap, mode="gaussian")
    raise ValueError(f"spatial_dims must be 2 (2.5D) or 3, got {spatial_dims!r}.")


def simple_inferer() -> Inferer:
    """The training-time inferer (patches/slices go straight through the network)."""
    return SimpleInferer()


def ct_metric_handlers(key: bool, names: Sequence[str] | None = None) -> dict[str, IgniteMetricHandler]:
    """IgniteMetricHandlers of the per-volume CT metrics (``save_details=True`` for the per-case CSV).

    Args:
        key: True -> only the key metric ``{"dsc_tumor": ...}``; False -> every other metric.
        names: metric names to build (default all of ``CT_METRICS``).

    Returns:
        ``{name: handler}`` for ``SupervisedEvaluator(key_val_metric=..., additional_metrics=...)``.
    """
    names = list(names or CT_METRICS)
    chosen = names[:1] if key else names[1:]
    return {
        n: IgniteMetricHandler(
            metric_fn=RegionMetric(*CT_METRICS[n]), output_transform=from_engine(["pred", "label"]), save_details=True
        )
        for n in chosen
    }


def polyp_metric_handlers(key: bool, threshold: float = 0.5) -> dict[str, IgniteMetricHandler]:
    """Per-image ``mdice`` (key metric) or ``miou`` handlers of the polyp bundle (``save_details=True``)."""
    from pipelines.metrics import BinaryOverlapMetric

    name, kind = ("mdice", "dice") if key else ("miou", "iou")
    return {
        name: IgniteMetricHandler(
            metric_fn=BinaryOverlapMetric(kind, threshold), output_transform=from_engine(["pred", "label"]), save_details=True
        )
    }


def unwrap(module: torch.nn.Module | None) -> torch.nn.Module | None:
    """The module inside DDP / DataParallel wrappers."""
    while module is not None and hasattr(module, "module") and isinstance(module.module, torch.nn.Module):
        module = module.module
    return module


def trainable(network: torch.nn.Module, distiller: torch.nn.Module | None = None) -> list[torch.nn.Parameter]:
    """Parameters for the optimizer: the student's plus the distiller's connectors (if any)."""
    if distiller is None:
        return [p for p in network.parameters() if p.requires_grad]
    import distill

    return list(distill.trainable_parameters(network, distiller))


# ----------------------------------------------------------------------------------------------- handlers


class EpochAverager:
    """Average scalar entries of the trainer output over each epoch into ``engine.state.metrics``.

    Collects ``loss`` (as ``train_loss``) and every ``kd_*`` entry the distillation handler stores in the engine
    output, plus the learning rate the epoch trained with (read at ``EPOCH_STARTED``, before the per-epoch scheduler
    steps), so StatsHandler and MLflow log them once per epoch.

    Args:
        prefix_keys: output keys (or prefixes ending with ``*``) to average.
        optimizer: optimizer whose first group's lr is logged as ``lr``.
    """

    def __init__(self, prefix_keys: Sequence[str] = ("loss", "loss_seg", "kd_*"), optimizer: torch.optim.Optimizer | None = None) -> None:
        self.keys = tuple(prefix_keys)
        self.optimizer = optimizer
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        """Register on EPOCH_STARTED / ITERATION_COMPLETED / EPOCH_COMPLETED."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _want(self, k: str) -> bool:
        return any(k == p or (p.endswith("*") and k.startswith(p[:-1])) for p in self.keys)

    def _reset(self, engine: Engine) -> None:
        self._sum, self._n = {}, {}
        # the lr this epoch trains with (the scheduler steps at EPOCH_COMPLETED, before this handler publishes)
        self._lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        items = out[0] if isinstance(out, list) and out else out
        if not isinstance(items, Mapping):
            return
        for k, v in items.items():
            if not isinstance(k, str) or not self._want(k):
                continue
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    continue
                v = v.detach().item()
            if isinstance(v, (int, float)):
                self._sum[k] = self._sum.get(k, 0.0) + float(v)
                self._n[k] = self._n.get(k, 0) + 1

    def __call__(self, engine: Engine) -> None:
        """Publish the epoch means (``loss`` -> ``train_loss``)."""
        for k, s in self._sum.items():
            engine.state.metrics["train_loss" if k == "loss" else k] = s / max(self._n[k], 1)
        if getattr(self, "_lr", None) is not None:
            engine.state.metrics["lr"] = self._lr


class TrainCheckpointer:
    """Best and last checkpoints, their sidecar files, and resume.

    ``<ckpt_dir>/last.pt`` after every epoch and ``<ckpt_dir>/best.pt`` when the evaluator's key metric (mean
    validation tumor DSC) improves, or stays equal while the tie metric (mean organ DSC) improves: a model that
    finds no tumor yet (tumor DSC 0 at every validation) is then still kept at its best organ segmentation, not at
    its first validation. Each holds ``model`` (weights, unwrapped from DDP), ``network`` (the
    ``networks.create`` name and kwargs, the format ``distill.load_teacher`` reads), ``distiller`` (connectors),
    ``optimizer``, ``lr_scheduler``, ``trainer`` (ignite state: epoch, iteration), ``epoch``, ``best_metric``,
    ``best_epoch``, ``settings`` (network name/kwargs and preprocessing) and ``splits_sha256``. Next to them:
    ``splits.json`` (copy of the split file) and ``settings.json``. Only rank 0 writes.

    With ``resume=True``, ``last.pt`` is loaded when training starts (every rank) and training continues with
    the next epoch, so a killed run loses at most the epoch in progress. Checkpoints are loaded with
    ``weights_only=True`` and written atomically (:mod:`pipelines.atomic`); ``splits.json`` and ``settings.json`` are
    written once (an identical file is left alone). Whether the folder may be written at all (an earlier run's
    checkpoints, another run holding it) is decided before, by :func:`guard_training_output`.

    Args:
        ckpt_dir: checkpoint folder.
        network: the trained network (DDP-wrapped or not).
        optimizer: its optimizer.
        lr_scheduler: its scheduler (stepped per epoch).
        distiller: the KD connectors module, or None.
        evaluator: the validation engine whose ``key_metric`` selects ``best.pt``.
        key_metric: metric name in ``evaluator.state.metrics``.
        tie_metric: second metric that breaks ties of ``key_metric`` (None: ties keep the earlier checkpoint).
        resume: load ``last.pt`` on start.
        splits_file: split JSON copied next to the checkpoints.
        settings: network and preprocessing settings stored in each checkpoint and in ``settings.json``.
    """

    def __init__(
        self,
        ckpt_dir: str,
        network: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None = None,
        lr_scheduler: Any = None,
        distiller: torch.nn.Module | None = None,
        evaluator: Engine | None = None,
        key_metric: str = "dsc_tumor",
        tie_metric: str | None = None,
        resume: bool = False,
        splits_file: str | None = None,
        settings: Mapping[str, Any] | None = None,
    ) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.network, self.optimizer, self.lr_scheduler, self.distiller = network, optimizer, lr_scheduler, distiller
        self.evaluator, self.key_metric, self.tie_metric = evaluator, key_metric, tie_metric or None
        self.resume, self.splits_file = as_bool(resume), splits_file
        self.settings = _plain(dict(settings or {}))
        self.best_metric, self.best_tie, self.best_epoch = -math.inf, -math.inf, 0
        self._trainer: Engine | None = None
        # best.pt written by THIS run (or by the run being resumed): an earlier run's best.pt never survives a new run
        self._best_saved = False

    @property
    def last_path(self) -> Path:
        return self.ckpt_dir / "last.pt"

    @property
    def best_path(self) -> Path:
        return self.ckpt_dir / "best.pt"

    def attach(self, engine: Engine) -> None:
        """Attach to the trainer (and to the evaluator given at construction)."""
        self._trainer = engine
        # the end-of-epoch save is registered when the run starts (``_started``), after every other handler: the
        # epoch's metrics reach MLflow before last.pt says the epoch is done, so a kill in between repeats the
        # epoch's metrics on resume, never loses them
        engine.add_event_handler(Events.STARTED, self._started)
        if self.evaluator is not None:
            self.evaluator.add_event_handler(Events.EPOCH_COMPLETED, self._validated)

    @staticmethod
    def _rank0() -> bool:
        import ignite.distributed as idist

        return idist.get_rank() == 0

    def _state(self, engine: Engine) -> dict[str, Any]:
        from pipelines.mlflow_tracking import file_sha256

        return {
            "model": unwrap(self.network).state_dict(),
            "network": {"name": self.settings.get("network_name"), **dict(self.settings.get("network_kwargs") or {})},
            "distiller": unwrap(self.distiller).state_dict() if self.distiller is not None else None,
            "optimizer": self.optimizer.state_dict() if self.optimizer is not None else None,
            "lr_scheduler": self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None,
            "trainer": {"epoch": engine.state.epoch, "max_epochs": engine.state.max_epochs, "epoch_length": engine.state.epoch_length},
            "epoch": engine.state.epoch,
            "best_metric": self.best_metric,
            "best_tie_metric": self.best_tie,
            "best_epoch": self.best_epoch,
            "settings": self.settings,
            "splits_sha256": file_sha256(self.splits_file) if self.splits_file else "",
        }

    def _started(self, engine: Engine) -> None:
        if isinstance(engine, Engine) and not engine.has_event_handler(self, Events.EPOCH_COMPLETED):
            engine.add_event_handler(Events.EPOCH_COMPLETED, self)
        if self.resume:
            if not self.last_path.is_file():
                raise BundleInputError(f"--resume true but {self.last_path} does not exist; start without --resume.")
            ckpt = load_torch_file(self.last_path, "the checkpoint to resume")
            if not isinstance(ckpt, dict) or "model" not in ckpt:
                raise BundleInputError(f"{self.last_path} is not a ctdistill training checkpoint (no 'model'); cannot resume from it.")
            self._best_saved = self.best_path.is_file()
            unwrap(self.network).load_state_dict(ckpt["model"])
            if self.distiller is not None and ckpt.get("distiller") is not None:
                unwrap(self.distiller).load_state_dict(ckpt["distiller"])
            peak_lrs = [g.get("initial_lr", g["lr"]) for g in self.optimizer.param_groups] if self.optimizer is not None else []
            if self.optimizer is not None and ckpt.get("optimizer") is not None:
                self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.lr_scheduler is not None and self.optimizer is not None:
                # rebuilt for this run's --epochs/--warmup_epochs/--lr and positioned at the saved epoch (not restored)
                from pipelines.optim import fast_forward

                fast_forward(self.lr_scheduler, self.optimizer, int(ckpt["epoch"]), peak_lrs)
            max_epochs = engine.state.max_epochs
            engine.state.epoch = int(ckpt["epoch"])
            engine.state.iteration = int(ckpt["epoch"]) * int(engine.state.epoch_length or 0)
            engine.state.max_epochs = max_epochs
            self.best_metric, self.best_epoch = float(ckpt.get("best_metric", -math.inf)), int(ckpt.get("best_epoch", 0))
            self.best_tie = float(ckpt.get("best_tie_metric", -math.inf))
            logger.info("resumed from %s at epoch %d (best %s at epoch %d)", self.last_path, engine.state.epoch, self.best_metric, self.best_epoch)
            if engine.state.epoch >= max_epochs:
                logger.warning("checkpoint epoch %d >= epochs %d: nothing left to train", engine.state.epoch, max_epochs)
        if self._rank0():
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
            # a run killed while writing a checkpoint leaves its temporary file (the checkpoint itself is intact)
            for name in ("last.pt", "best.pt", "splits.json", "settings.json", "mlflow_run_id"):
                remove_stale_temps(self.ckpt_dir / name)
            split_copy = self.ckpt_dir / "splits.json"
            if self.splits_file and Path(self.splits_file).resolve() != split_copy.resolve():
                if not same_bytes(split_copy, Path(self.splits_file).read_bytes()):
                    atomic_copy(self.splits_file, split_copy)
            settings = json.dumps(self.settings, indent=1)
            if not same_bytes(self.ckpt_dir / "settings.json", settings.encode()):
                atomic_write_text(self.ckpt_dir / "settings.json", settings)

    def _save(self, state: dict[str, Any], path: Path) -> None:
        """Write ``state`` atomically; a full disk is reported with the file and the numbers (the old file stays)."""
        import shutil

        try:
            atomic_torch_save(state, path)
        except (OSError, RuntimeError) as e:
            try:
                free = shutil.disk_usage(path.parent).free
            except OSError:
                raise e from None
            size = _tensor_bytes(state)
            if getattr(e, "errno", None) != errno.ENOSPC and free >= size:
                raise
            raise OSError(
                errno.ENOSPC,
                f"cannot write checkpoint {path}: the disk is full ({free / 2**20:.1f} MB free, the checkpoint needs "
                f"about {size / 2**20:.1f} MB); {'the previous ' + path.name + ' is intact' if path.exists() else 'nothing was written'}. "
                "Free some space, then continue with --resume true",
            ) from e

    def _validated(self, evaluator: Engine) -> None:
        value = evaluator.state.metrics.get(self.key_metric)
        if value is None or self._trainer is None:
            return
        value = float(value)
        if math.isnan(value):
            return
        tie = -math.inf
        if self.tie_metric is not None:
            t = evaluator.state.metrics.get(self.tie_metric)
            tie = -math.inf if t is None or math.isnan(float(t)) else float(t)
        if value > self.best_metric or (value == self.best_metric and tie > self.best_tie):
            self.best_metric, self.best_tie, self.best_epoch = value, tie, self._trainer.state.epoch
            self._best_saved = True
            if self._rank0():
                self._save(self._state(self._trainer), self.best_path)
                extra = f" ({self.tie_metric} {tie:.4f})" if self.tie_metric is not None else ""
                logger.info("new best %s %.4f%s at epoch %d -> %s", self.key_metric, value, extra, self.best_epoch, self.best_path)

    def __call__(self, engine: Engine) -> None:
        """Save ``last.pt`` (and ``best.pt`` when there is no evaluator yet), rank 0 only."""
        if not self._rank0():
            return
        if self.evaluator is None or not self._best_saved:
            # no validation ran (or no defined metric yet): keep a best.pt of THIS run so evaluation/inference can run
            self._save(self._state(engine), self.best_path)
            self._best_saved = True
        self._save(self._state(engine), self.last_path)


def _plain(x: Any) -> Any:
    """Config values (MONAI proxies, tuples, tensors) -> JSON-able plain Python."""
    if isinstance(x, Mapping):
        return {str(k): _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if x is None:
        return None
    # exact builtin types (numpy scalars subclass float/int): the checkpoints must load with weights_only=True
    for kind in (bool, str, int, float):
        if isinstance(x, kind):
            return kind(x)
    if hasattr(x, "item") and callable(x.item) and getattr(x, "ndim", None) == 0:  # numpy scalar
        return _plain(x.item())
    if hasattr(x, "tolist") and callable(x.tolist):  # numpy array
        return _plain(x.tolist())
    raw = getattr(x, "_raw", None)
    if raw is not None:
        return _plain(raw)
    return str(x)


def load_torch_file(path: str | os.PathLike, what: str = "checkpoint") -> Any:
    """``torch.load`` of a user-supplied file on CPU with ``weights_only=True``: never runs code from the file.

    Args:
        path: the file.
        what: what the file is (for the message), e.g. ``"the checkpoint to resume"``.

    Returns:
        the loaded object (dicts, lists, tensors, numbers, strings).

    Raises:
        BundleInputError: a missing file, or one that cannot be loaded as weights (truncated, not a PyTorch file, or
            holding objects other than tensors and plain values, e.g. a pickle that would run code).
    """
    p = Path(path)
    if not p.is_file():
        raise BundleInputError(f"{what} {p} does not exist.")
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any loader failure becomes one clear message naming the file
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
        raise BundleInputError(
            f"cannot load {what} {p}: it is truncated, not a PyTorch checkpoint, or holds objects other than weights "
            f"(loaded with weights_only=True, never as code) [{type(e).__name__}: {first}]"
        ) from e


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a bundle checkpoint on CPU, weights only (:func:`load_torch_file`).

    Args:
        path: the ``--checkpoint`` file.

    Returns:
        the checkpoint dict.

    Raises:
        BundleInputError: a missing or unloadable file, or one without ``model`` weights.
    """
    p = Path(path)
    if not p.is_file():
        raise BundleInputError(f"checkpoint {p} does not exist; train the role first or pass --checkpoint <path>.")
    ckpt = load_torch_file(p, "checkpoint")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        raise BundleInputError(f"{p} is not a ctdistill bundle checkpoint (no 'model' weights).")
    return ckpt


def checkpoint_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The ``settings`` saved in a checkpoint (network name/kwargs, preprocessing)."""
    return dict(load_checkpoint(path).get("settings") or {})


def network_from_checkpoint(path: str | os.PathLike, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the network a checkpoint was trained with (``networks.create``) and load its weights; eval mode."""
    import networks

    ckpt = load_checkpoint(path)
    s = ckpt.get("settings") or {}
    if "network_name" not in s:
        raise BundleInputError(f"{path} lacks the network settings; it was not written by a ctdistill bundle.")
    net = networks.create(s["network_name"], **dict(s.get("network_kwargs") or {}))
    net.load_state_dict(ckpt["model"])
    return net.to(device).eval()


def loss_of(output: Any) -> float:
    """The scalar loss from a trainer's ``engine.state.output`` (dict, or decollated list of dicts)."""
    item = output[0] if isinstance(output, list) and output else output
    loss = item["loss"] if isinstance(item, Mapping) else item
    return float(loss.detach().item()) if isinstance(loss, torch.Tensor) else float(loss)


class SaveOnIteration:
    """Apply extra transforms (e.g. ``Invertd`` + a writer) to a copy of each output item after every iteration.

    Keeps the metrics in the network's grid while the saved label maps go back to each input's geometry.

    Args:
        transforms: callables applied in order to a shallow copy of each decollated output dict.
        enabled: False turns the handler into a no-op (``--save_predictions false``).
    """

    def __init__(self, transforms: Sequence[Any], enabled: bool = True) -> None:
        self.transforms = list(transforms)
        self.enabled = as_bool(enabled)

    def attach(self, engine: Engine) -> None:
        """Register on ITERATION_COMPLETED."""
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Run the transforms on every item of ``engine.state.output``."""
        out = engine.state.output
        for item in out if isinstance(out, list) else [out]:
            d = dict(item)
            for t in self.transforms:
                d = t(d)


def sidecar(checkpoint: str | os.PathLike, name: str) -> str:
    """Path of a file saved next to a checkpoint (``splits.json``, ``settings.json``)."""
    return str(Path(checkpoint).parent / name)


def volumes_per_batch(batch_size: int, samples_per_volume: int) -> int:
    """DataLoader batch size in VOLUMES for a training batch of ``batch_size`` slices/patches.

    Each cached volume yields ``samples_per_volume`` crops that MONAI's ``list_data_collate`` flattens into the batch,
    so a loader batch of ``v`` volumes trains on ``v * samples_per_volume`` crops. The result is
    ``max(1, batch_size // samples_per_volume)``; a batch that is not a multiple is rounded down (logged), and
    ``samples_per_volume > batch_size`` gives batches of ``samples_per_volume`` crops.

    Raises:
        ValueError: non-positive values.
    """
    if int(batch_size) < 1 or int(samples_per_volume) < 1:
        raise ValueError(f"batch_size and samples_per_volume must be >= 1, got {batch_size} and {samples_per_volume}.")
    v = max(1, int(batch_size) // int(samples_per_volume))
    if v * int(samples_per_volume) != int(batch_size):
        logger.warning(
            "batch_size %d is not a multiple of samples_per_volume %d: training batches hold %d crops",
            batch_size, samples_per_volume, v * int(samples_per_volume),
        )  # fmt: skip
    return v
