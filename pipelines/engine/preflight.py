"""Every check a bundle runs before long work: the dataset (files, integrity, cache memory), the teacher
checkpoint of KD roles, the free disk of the output folder, the MLflow store; and the KD weights of a method.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.engine.checkpoint import checkpoint_bytes, load_torch_file
from pipelines.engine.errors import BundleInputError, as_bool, optional_knob

__all__ = [
    "CHECKPOINT_COPIES",
    "DISK_MARGIN_BYTES",
    "STORE_NEW_BYTES",
    "STORE_RUN_BYTES",
    "preflight",
    "run_check_dataset",
    "check_free_disk",
    "check_cache",
    "check_teacher_checkpoint",
    "check_checkpoint_role",
    "kd_weights",
]

logger = logging.getLogger(__name__)


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
    ckpt = load_torch_file(p, "teacher checkpoint")
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
        from distill.plan import _default_names as default_tap_names
        from distill.plan import check_trained_heads, network_taps

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
            roles = distill.method_class(method).TEACHER_ROLES
            taps = network_taps(teacher)
            lacking = [r for r, spec in roles.items() if not default_tap_names(taps, spec.groups)]
            if lacking:  # e.g. a student's best.pt given as --teacher_ckpt
                raise ValueError(
                    f"its network {name} has no {'/'.join(roles[lacking[0]].groups)} outputs for the {method} "
                    f"teacher role {lacking[0]!r}: is it a student's checkpoint? Pass a teacher's best.pt "
                    "(bundles/unetpp_teacher)"
                )
            check_trained_heads(teacher, roles)
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
    """Run ``pipelines.check_dataset.check_dataset`` on a split file; its report lines are logged.

    The lines are those ``python -m pipelines.check_dataset SPLITS`` prints: one per problem, then a verdict line.

    Args:
        splits_file: the split JSON (every listed image/label is checked).

    Returns:
        the report lines (warnings included) of a clean dataset.

    Raises:
        BundleInputError: an error in the dataset (or a split file it cannot read), with every line of the report.
    """
    from pipelines.check_dataset import SEVERITIES, check_dataset

    try:
        problems = check_dataset(splits_file)
    except (FileNotFoundError, ValueError) as e:
        lines, failed = [f"ERROR {splits_file}: {e}"], True
    else:
        counts = {s: sum(p.severity == s for p in problems) for s in SEVERITIES}
        failed = bool(counts["error"])
        verdict = "FAILED" if failed else "OK"
        lines = [str(p) for p in problems]
        lines.append(f"{verdict}: {counts['error']} error(s), {counts['warning']} warning(s) in {splits_file}")
    if failed:
        report = "\n  ".join(lines)
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


def check_checkpoint_role(role: str, settings: Mapping[str, Any], checkpoint: str | os.PathLike) -> bool:
    """Evaluation: the checkpoint must come from this bundle's role (else its run is tracked under the wrong role).

    Args:
        role: the evaluating bundle's ``role``.
        settings: the checkpoint's ``settings`` (``role``, ``network_name``; a checkpoint without them is accepted).
        checkpoint: its path (named in the message).

    Returns:
        True (so it can sit in a bundle's expression list).

    Raises:
        BundleInputError: naming both roles, the network and the config to use instead.
    """
    trained = str((settings or {}).get("role") or "")
    if trained and trained != str(role):
        raise BundleInputError(
            f"{checkpoint} was trained by the {trained} bundle (network {settings.get('network_name', '?')}), not by "
            f"{role}: evaluate it with bundles/{trained}/configs/evaluate.yaml (the results would be tracked as {role})."
        )
    return True


def _check_resume_fits(last: Path, network: torch.nn.Module) -> None:
    """``--resume true``: the checkpoint's weights must load into this run's network (same architecture knobs)."""
    from networks.weights import read_state_dict, state_mismatch

    ckpt = load_torch_file(last, "the checkpoint to resume")
    missing, unexpected, shapes = state_mismatch(network, read_state_dict(ckpt)[0] if isinstance(ckpt, Mapping) else {})
    if missing or unexpected or shapes:
        recorded = (ckpt.get("settings") or {}).get("network_kwargs") if isinstance(ckpt, Mapping) else None
        first = (shapes or missing or unexpected)[0]
        raise BundleInputError(
            f"{last} does not fit this run's network ({len(shapes)} tensor(s) of another shape, {len(missing)} missing, "
            f"{len(unexpected)} unexpected, e.g. {first}): it was trained with --network_kwargs {recorded}; resume with "
            "the same --network_kwargs (and --network_name), or start anew with --overwrite true."
        )


def _check_declared_labels(splits_file: str | os.PathLike, classes: int) -> None:
    """The label values the dataset declares (``dataset.json``, recorded in the split's ``meta.labels``) must be
    classes the network predicts (0..classes-1): a value 3 with 3 output channels would fail mid-training."""
    try:
        meta = json.loads(Path(splits_file).read_text()).get("meta") or {}
    except (OSError, ValueError, AttributeError):
        return
    labels = meta.get("labels") if isinstance(meta, Mapping) else None
    if not isinstance(labels, Mapping):
        return
    beyond = {str(k): v for k, v in labels.items() if isinstance(v, int) and not 0 <= v < classes}
    if beyond:
        name, value = next(iter(beyond.items()))
        raise BundleInputError(
            f"the dataset declares label {name!r} = {value} (dataset.json, recorded in {splits_file}) but the network "
            f"predicts {classes} classes (0..{classes - 1}); remap the labels to 0..{classes - 1} or set --out_channels "
            f"{max(beyond.values()) + 1}."
        )


#: free bytes a new MLflow SQLite store needs: MLflow 3 creates its tables in about 0.95 MB, then a run adds its
#: params, tags and per-epoch metrics
STORE_NEW_BYTES = 2 << 20
#: free bytes an existing store needs for one more run (params, tags, metrics)
STORE_RUN_BYTES = 1 << 20


def _reserve(folder: Path, need: int) -> None:
    """Allocate ``need`` bytes in a temporary file of ``folder`` (removed again): a full disk or a quota refuses it
    with ENOSPC/EDQUOT even where ``shutil.disk_usage`` counts space the user cannot have."""
    import errno
    import tempfile

    fd, tmp = tempfile.mkstemp(prefix=".mlflow-store-probe-", suffix=".tmp", dir=folder)
    try:
        try:
            os.posix_fallocate(fd, 0, need)
        except (AttributeError, OSError) as e:  # no posix_fallocate (macOS), or a filesystem without it
            if isinstance(e, OSError) and e.errno not in (errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS):
                raise
            os.write(fd, b"\0" * need)
            os.fsync(fd)
    finally:
        os.close(fd)
        os.unlink(tmp)


def _check_store_writable(tracking_uri: str) -> None:
    """A local MLflow store (``sqlite:///<file>``, ``file:`` or a folder) must be writable and, for SQLite, have room
    for the run (:data:`STORE_NEW_BYTES` for a new store, :data:`STORE_RUN_BYTES` for an existing one, allocated for
    real and released): a read-only or full disk would otherwise fail at the first logged metric with a raw
    OSError/sqlalchemy traceback ("database or disk is full"), after the data were cached."""
    import errno
    import shutil
    from urllib.parse import urlparse

    parsed = urlparse(tracking_uri)
    if parsed.scheme == "sqlite" and tracking_uri.startswith("sqlite:///"):
        target = Path(tracking_uri[len("sqlite:///") :])
    elif parsed.scheme in ("", "file"):
        target = Path(parsed.path if parsed.scheme else tracking_uri)
    else:
        return
    probe = target if target.exists() else target.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    read_only = BundleInputError(
        f"the MLflow store {target} cannot be written ({probe} is read-only); pass a --tracking_uri on a writable "
        "disk (e.g. sqlite:///<folder you can write>/mlruns.db)."
    )
    if not os.access(probe, os.W_OK):
        raise read_only
    if parsed.scheme != "sqlite":
        return
    folder = probe if probe.is_dir() else probe.parent
    need = STORE_RUN_BYTES if target.is_file() else STORE_NEW_BYTES
    try:
        free = shutil.disk_usage(folder).free
        if free < need:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        _reserve(folder, need)
    except OSError as e:
        if e.errno not in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
                raise read_only from e
            raise BundleInputError(
                f"the MLflow store {target} cannot be written ({folder}: {e.strerror or e}); pass a --tracking_uri on a "
                "disk that works (e.g. sqlite:///<folder you can write>/mlruns.db)."
            ) from e
        mb = 1 << 20
        raise BundleInputError(
            f"the MLflow store {target} is on a full disk ({shutil.disk_usage(folder).free / mb:.1f} MB free in "
            f"{folder}, {'the store' if target.is_file() else 'a new store'} needs about {need / mb:.0f} MB); free "
            "some space there or pass a --tracking_uri on another disk (e.g. sqlite:///<folder with room>/mlruns.db)."
        ) from e


def _check_parent_run(tracking_uri: str, run_id: str) -> None:
    """``--run_tags mlflow.parentRunId``: the parent must be a run of this store (else the run nests nowhere)."""
    missing = BundleInputError(
        f"--run_tags mlflow.parentRunId {run_id!r} is not a run of the MLflow store {tracking_uri}; give the id of an "
        "existing run (mlflow ui lists them) or drop the tag."
    )
    if tracking_uri.startswith("sqlite:///") and not Path(tracking_uri[len("sqlite:///") :]).is_file():
        raise missing  # a store that does not exist yet holds no run (and is not created just to look)
    import mlflow
    from mlflow.exceptions import MlflowException

    try:
        mlflow.MlflowClient(tracking_uri=tracking_uri).get_run(run_id)
    except MlflowException as e:
        raise missing from e


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
    run_tags: Mapping[str, Any] | None = None,
    resume_from: str | os.PathLike | None = None,
) -> bool:
    """Every check that must pass before a bundle starts long work.

    Args:
        splits_file: split JSON (from :func:`resolve_splits`).
        role: bundle role (for messages).
        check_integrity: run ``pipelines.check_dataset`` on the listed sections' files first.
        sections: split sections the run reads.
        cache_rate: CacheDataset cache rate (memory check, :func:`check_cache`; the bundles pass 0 here and check the
            cache with the run's preprocessing plan as the next step).
        in_plane_size: in-plane resize before the cache (memory estimate without a plan).
        pixdim: resampling spacing before the cache (memory estimate without a plan).
        teacher_check: the result of :func:`check_teacher_checkpoint` in KD roles (a config reference, so the
            teacher is checked before anything else); ignored otherwise.
        tracking_uri: the MLflow store: a server must answer within seconds, a SQLite file must be a database
            (``pipelines.engine.tracking.check_tracking_uri``), and a local store must be writable with room for the
            run (a read-only or full disk is named); None skips the check.
        output_dir: the training output folder: its disk must hold the run's checkpoints (:func:`check_free_disk`);
            None skips the check.
        network: the network to be trained (the checkpoint size of the disk check).
        run_tags: the ``--run_tags``: a ``mlflow.parentRunId`` must name a run of the store (``tracking_uri``).
        resume_from: the ``last.pt`` a ``--resume true`` run continues: its weights must fit ``network`` (the same
            ``--network_kwargs``), checked here rather than as a size-mismatch traceback after caching.

    Returns:
        True (so it can sit in a bundle's expression list).

    Raises:
        BundleInputError: with every integrity message, or the teacher / memory / disk / tracking-store problem, or a
            section with fewer cases than DDP processes (DistributedSampler would fail mid-run).
    """
    in_plane_size, pixdim = optional_knob(in_plane_size), optional_knob(pixdim)
    if resume_from and network is not None:
        _check_resume_fits(Path(resume_from), network)
    if network is not None and getattr(network, "out_channels", None):
        _check_declared_labels(splits_file, int(network.out_channels))
    if output_dir is not None:
        check_free_disk(output_dir, network)
    if tracking_uri:
        from pipelines.engine.tracking import check_tracking_uri

        try:
            check_tracking_uri(str(tracking_uri))
        except ValueError as e:
            raise BundleInputError(str(e)) from e
        _check_store_writable(str(tracking_uri))
        parent = str(dict(run_tags or {}).get("mlflow.parentRunId") or "")
        if parent:
            _check_parent_run(str(tracking_uri), parent)
    from pipelines.engine.splits import split_entries

    entries: list[dict] = []
    data = json.loads(Path(splits_file).read_text())
    for s in sections:
        entries.extend(split_entries(splits_file, s))  # paths relative to the JSON's folder, never the cwd
    if not entries:
        raise BundleInputError(f"{splits_file} lists no cases in {list(sections)}; check --dataset_dir.")
    world = torch.distributed.get_world_size() if torch.distributed.is_available() and torch.distributed.is_initialized() else 1
    for s in sections if world > 1 else ():
        n = len(data.get(s) or [])
        if n < world:
            raise BundleInputError(
                f"{splits_file}: the {s!r} section lists {n} case(s) but the run has {world} processes; every rank needs "
                f"at least one: add cases to {s!r} (--splits_file) or start fewer processes (--nproc_per_node {max(n, 1)})."
            )
    missing = [str(e[k]) for e in entries for k in ("image", "label") if k in e and not Path(e[k]).exists()]
    if missing:
        raise BundleInputError(f"{len(missing)} files listed in {splits_file} do not exist, e.g. {missing[:3]}.")
    if as_bool(check_integrity):
        run_check_dataset(splits_file)
    check_cache(splits_file, cache_rate, {"pixdim": pixdim, "in_plane_size": in_plane_size}, sections=sections)
    return True


def check_cache(
    splits_file: str | os.PathLike,
    cache_rate: float,
    preprocessing: Mapping[str, Any] | None = None,
    *,
    sections: Sequence[str] = ("training", "validation"),
) -> bool:
    """The CacheDataset must fit in memory, estimated from the image headers with the preprocessing the run uses.

    With a preprocessing plan (``pipelines.engine.apply_plan``) that is the plan's target spacing and network input
    (2.5D slices padded up to it, larger ones kept; 3D pads nothing before the cache), not the ``--pixdim`` /
    ``--in_plane_size`` knobs: a 0.6 mm scan resampled to a 1.2 mm plan caches a quarter of its voxels.

    Args:
        splits_file: split JSON.
        cache_rate: the ``--cache_rate`` (0: nothing cached, nothing checked).
        preprocessing: the ``build_transforms`` keyword arguments (the bundles' ``@preprocessing``): ``pixdim``,
            ``in_plane_size``, ``in_plane_mode``, ``spatial_dims``; None: no resampling, slices kept.
        sections: split sections the run caches.

    Returns:
        True (so it can sit in a bundle's expression list).

    Raises:
        BundleInputError: the cache would not fit, naming the memory and the ``--cache_rate`` that would.
    """
    if float(cache_rate) <= 0:
        return True
    from pipelines.engine.data import estimate_cache
    from pipelines.engine.splits import split_entries

    pre = dict(preprocessing or {})
    mode = str(pre.get("in_plane_mode") or "resize")
    size = optional_knob(pre.get("in_plane_size"))
    if mode == "pad" and int(pre.get("spatial_dims") or 2) == 3:
        size = None  # the 3D path pads nothing before the cache (its patches are padded after it)
    entries = [e for s in sections for e in split_entries(splits_file, s)]
    est = estimate_cache(entries, float(cache_rate), pixdim=optional_knob(pre.get("pixdim")), in_plane_size=size, in_plane_mode=mode)
    if not est.fits:
        raise BundleInputError(f"the CacheDataset would not fit in memory: {est.message()} (--cache_rate).")
    return True
