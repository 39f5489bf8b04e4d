"""THE checkpoint format of the bundles, written and read here only.

A training checkpoint (``best.pt``/``last.pt``) is a dict of plain values and tensors (loadable with
``weights_only=True``): ``model`` (weights, unwrapped from DDP), ``network`` (the ``networks.create`` name and
kwargs, the format ``distill.load_teacher`` reads), ``distiller``, ``optimizer``, ``lr_scheduler``, ``trainer``,
``epoch``, ``best_metric``, ``best_tie_metric``, ``best_epoch``, ``settings`` (network name/kwargs,
preprocessing and ``mlflow_run_id``, the training's MLflow run) and ``splits_sha256``; ``best.pt`` holds no
``optimizer``/``lr_scheduler`` (weights only: it is what evaluation, inference, teachers and MLflow use; resuming
reads ``last.pt``). ``splits.json``, ``settings.json`` and ``mlflow_run_id`` lie beside it (:func:`sidecar`).
:class:`TrainCheckpointer` writes it (atomically, :func:`atomic_torch_save`); :func:`load_torch_file`,
:func:`load_checkpoint`, :func:`checkpoint_settings`, :func:`checkpoint_run_id` and :func:`network_from_checkpoint`
read it.
"""

from __future__ import annotations

import errno
import json
import logging
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events

from distill.capture import unwrap
from pipelines.engine.atomic import atomic_copy, atomic_write, atomic_write_text, remove_stale_temps, same_bytes
from pipelines.engine.errors import BundleInputError, as_bool

__all__ = [
    "TrainCheckpointer",
    "atomic_torch_save",
    "load_torch_file",
    "load_checkpoint",
    "release_checkpoint",
    "RELEASE_KEYS",
    "checkpoint_settings",
    "settings_from_metadata",
    "checkpoint_run_id",
    "network_from_checkpoint",
    "init_from_checkpoint",
    "RUN_ID_FILE",
    "sidecar",
    "checkpoint_bytes",
]

logger = logging.getLogger(__name__)

#: file beside the checkpoints that records the training's MLflow run id (written by the tracking handler)
RUN_ID_FILE = "mlflow_run_id"


def atomic_torch_save(obj: Any, path: str | os.PathLike, *, fsync: bool = True) -> Path:
    """``torch.save`` to a temporary file beside ``path``, then ``os.replace`` (never a half-written checkpoint).

    Args:
        obj: what to save (a checkpoint dict).
        path: destination file.
        fsync: flush to disk before the rename.

    Returns:
        the destination path.
    """
    return atomic_write(path, lambda tmp: torch.save(obj, tmp), fsync=fsync)


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


class TrainCheckpointer:
    """Best and last checkpoints, their sidecar files, and resume.

    ``<ckpt_dir>/last.pt`` after every epoch and ``<ckpt_dir>/best.pt`` when the evaluator's key metric (mean
    validation tumor DSC) improves, or stays equal while the tie metric (mean organ DSC) improves: a model that
    finds no tumor yet (tumor DSC 0 at every validation) is then still kept at its best organ segmentation, not at
    its first validation. Each holds ``model`` (weights, unwrapped from DDP), ``network`` (the
    ``networks.create`` name and kwargs, the format ``distill.load_teacher`` reads), ``distiller`` (connectors),
    ``optimizer``, ``lr_scheduler``, ``trainer`` (ignite state: epoch, iteration), ``epoch``, ``best_metric``,
    ``best_epoch``, ``settings`` (network name/kwargs, preprocessing, and ``mlflow_run_id``: the run recorded in
    ``<ckpt_dir>/mlflow_run_id`` when the checkpoint is written, so a teacher or an evaluated checkpoint names its
    training run) and ``splits_sha256``; ``best.pt`` leaves out ``optimizer`` and ``lr_scheduler`` (weights only,
    a third of the size with Adam; resume reads ``last.pt``). Next to them: ``splits.json`` (copy of the split file)
    and ``settings.json``. Only rank 0 writes.

    With ``resume=True``, ``last.pt`` is loaded when training starts (every rank) and training continues with
    the next epoch, so a killed run loses at most the epoch in progress. Checkpoints are loaded with
    ``weights_only=True`` and written atomically (:mod:`pipelines.engine.atomic`); ``splits.json`` and ``settings.json`` are
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

    def _state(self, engine: Engine, resumable: bool = True) -> dict[str, Any]:
        """The checkpoint dict; ``resumable=False`` (``best.pt``) leaves out the optimizer and scheduler state."""
        from pipelines.engine.tracking import file_sha256

        settings = dict(self.settings)
        run_id = _read_run_id(self.ckpt_dir / RUN_ID_FILE)
        if run_id:
            settings["mlflow_run_id"] = run_id
        state = {
            "model": unwrap(self.network).state_dict(),
            "network": {"name": self.settings.get("network_name"), **dict(self.settings.get("network_kwargs") or {})},
            "distiller": unwrap(self.distiller).state_dict() if self.distiller is not None else None,
            "trainer": {"epoch": engine.state.epoch, "max_epochs": engine.state.max_epochs, "epoch_length": engine.state.epoch_length},
            "epoch": engine.state.epoch,
            "best_metric": self.best_metric,
            "best_tie_metric": self.best_tie,
            "best_epoch": self.best_epoch,
            "settings": settings,
            "splits_sha256": file_sha256(self.splits_file) if self.splits_file else "",
        }
        if resumable:
            state["optimizer"] = self.optimizer.state_dict() if self.optimizer is not None else None
            state["lr_scheduler"] = self.lr_scheduler.state_dict() if self.lr_scheduler is not None else None
        return state

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
                from pipelines.engine.optim import fast_forward

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
            for name in ("last.pt", "best.pt", "splits.json", "settings.json", RUN_ID_FILE):
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
            logger.warning(
                "validation %s is undefined at epoch %d (no validation case has this region in its label or the "
                "prediction: empty vs empty is not a perfect score): best.pt is not selected by it this epoch",
                self.key_metric, self._trainer.state.epoch,
            )  # fmt: skip
            return
        tie = -math.inf
        if self.tie_metric is not None:
            t = evaluator.state.metrics.get(self.tie_metric)
            tie = -math.inf if t is None or math.isnan(float(t)) else float(t)
        if value > self.best_metric or (value == self.best_metric and tie > self.best_tie):
            self.best_metric, self.best_tie, self.best_epoch = value, tie, self._trainer.state.epoch
            self._best_saved = True
            if self._rank0():
                self._save(self._state(self._trainer, resumable=False), self.best_path)
                extra = f" ({self.tie_metric} {tie:.4f})" if self.tie_metric is not None else ""
                logger.info("new best %s %.4f%s at epoch %d -> %s", self.key_metric, value, extra, self.best_epoch, self.best_path)

    def __call__(self, engine: Engine) -> None:
        """Save ``last.pt`` (and ``best.pt`` when there is no evaluator yet), rank 0 only."""
        if not self._rank0():
            return
        if self.evaluator is None or not self._best_saved:
            # no validation ran (or no defined metric yet): keep a best.pt of THIS run so evaluation/inference can run
            self._save(self._state(engine, resumable=False), self.best_path)
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


#: checkpoint keys kept in a released checkpoint besides the weights
RELEASE_KEYS: tuple[str, ...] = ("network", "settings", "epoch", "best_metric", "best_epoch")


def release_checkpoint(ckpt: Mapping[str, Any]) -> dict[str, Any]:
    """The released form of a training checkpoint (a zoo bundle's ``models/model.pt``): weights + the network settings.

    Args:
        ckpt: a bundle training checkpoint (``pipelines.engine.load_checkpoint``).

    Returns:
        ``{"model": state_dict, "network": {...}, "settings": {...}, "epoch", "best_metric", "best_epoch"}`` (the
        last three when recorded); optimizer, scheduler, distiller and trainer state are dropped.

    Raises:
        ValueError: the checkpoint has no ``settings.network_name`` (not written by a ctdistill bundle).
    """
    settings = dict(ckpt.get("settings") or {})
    if "network_name" not in settings:
        raise ValueError("the checkpoint lacks settings.network_name; it was not written by a ctdistill bundle.")
    out: dict[str, Any] = {"model": dict(ckpt["model"])}
    for key in RELEASE_KEYS:
        if ckpt.get(key) is not None:
            out[key] = ckpt[key]
    out.setdefault("network", {"name": settings["network_name"], **dict(settings.get("network_kwargs") or {})})
    out["settings"] = settings
    return out


def checkpoint_settings(path: str | os.PathLike) -> dict[str, Any]:
    """The ``settings`` saved in a checkpoint (network name/kwargs, preprocessing)."""
    return dict(load_checkpoint(path).get("settings") or {})


def settings_from_metadata(meta_file: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint settings of an exported bundle, whose ``models/model.pt`` is a plain state dict: the
    ``ctdistill`` section of its ``configs/metadata.json`` (written by ``pipelines.export_bundle``).

    Args:
        meta_file: the bundle's ``configs/metadata.json``.

    Returns:
        ``{"role", "network_name", "network_kwargs", "preprocessing", "seed", "mlflow_run_id"}`` as a training
        checkpoint's ``settings`` holds them (:func:`checkpoint_settings`).

    Raises:
        BundleInputError: a missing or unreadable file, or one without the ``ctdistill`` network settings.
    """
    p = Path(meta_file)
    try:
        meta = json.loads(p.read_text())
    except (OSError, ValueError) as e:
        raise BundleInputError(f"cannot read the bundle metadata {p} ({type(e).__name__}: {e}); run from the bundle folder or pass --bundle_root <folder>.") from e
    section = meta.get("ctdistill") if isinstance(meta, dict) else None
    if not isinstance(section, dict) or not section.get("network_name"):
        raise BundleInputError(f"{p} has no 'ctdistill' section with network_name: it is not the metadata of an exported ctdistill bundle.")
    return {
        "role": section.get("role", ""),
        "network_name": section["network_name"],
        "network_kwargs": dict(section.get("network_kwargs") or {}),
        "preprocessing": dict(section.get("preprocessing") or {}),
        "seed": section.get("seed", 0),
        "mlflow_run_id": section.get("source_mlflow_run_id", ""),
    }


def _read_run_id(path: Path) -> str:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return ""


def checkpoint_run_id(path: str | os.PathLike, settings: Mapping[str, Any] | None = None) -> str:
    """The MLflow run id of the training that wrote a checkpoint.

    Read from the checkpoint's ``settings["mlflow_run_id"]``; for a checkpoint written before that was recorded,
    from the ``mlflow_run_id`` file beside it.

    Args:
        path: the checkpoint.
        settings: its settings when already read (an exported bundle's come from ``metadata.json``: its
            ``models/model.pt`` is a plain state dict); None reads them from the checkpoint.

    Returns:
        the run id, ``""`` when none is recorded.

    Raises:
        BundleInputError: a missing or unloadable checkpoint.
    """
    run_id = str((checkpoint_settings(path) if settings is None else settings).get("mlflow_run_id") or "")
    return run_id or _read_run_id(Path(path).parent / RUN_ID_FILE)


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


def init_from_checkpoint(network: torch.nn.Module, path: str | os.PathLike | None) -> torch.nn.Module:
    """Start training from released weights (``--init_checkpoint``): load a checkpoint's weights into ``network``.

    Accepts a bundle checkpoint (``best.pt``/``last.pt``), an exported bundle's ``models/model.pt`` or a plain state
    dict, loaded weights only. Loading is strict: the role's network (name, widths, channels) must be the one the
    weights were trained with. Optimizer, scheduler and epoch start fresh (``--resume true`` continues a run instead).

    Args:
        network: the freshly built network (``networks.create``).
        path: the weights file; ``""``/None leaves ``network`` as built.

    Returns:
        ``network`` with the weights loaded.

    Raises:
        BundleInputError: a missing or unloadable file, a file without weights, or weights that do not fit the
            network (the message names the file, the mismatched keys and the knobs to fix).
    """
    if path is None or str(path).strip() in ("", "None", "null"):
        return network
    p = Path(path)
    if not p.is_file():
        raise BundleInputError(f"--init_checkpoint {p} does not exist; pass a trained best.pt or an exported models/model.pt.")
    from networks.weights import read_state_dict, state_mismatch

    obj = load_torch_file(p, "init checkpoint")
    try:  # unwraps {"model": ...} / {"state_dict": ...}, strips a DDP "module." prefix
        state, _ = read_state_dict(obj if isinstance(obj, Mapping) else {})
    except ValueError as e:
        raise BundleInputError(f"--init_checkpoint {p} holds no weights (expected a bundle checkpoint or a state dict).") from e
    missing, unexpected, shapes = state_mismatch(network, state)
    if missing or unexpected or shapes:
        settings = obj.get("settings", {}) if isinstance(obj, Mapping) else {}
        trained = f" (it was trained as {settings.get('network_name')} with {settings.get('network_kwargs')})" if settings.get("network_name") else ""
        raise BundleInputError(
            f"--init_checkpoint {p} does not fit this role's network{trained}: {len(missing)} missing keys {missing[:3]}, "
            f"{len(unexpected)} unexpected keys {unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}; set "
            "--network_name/--network_kwargs/--num_slices/--out_channels as the weights were trained."
        )
    network.load_state_dict(state, strict=True)
    logger.info("initialised %s from %s (%d tensors)", type(network).__name__, p, len(state))
    return network


def sidecar(checkpoint: str | os.PathLike, name: str) -> str:
    """Path of a file saved next to a checkpoint (``splits.json``, ``settings.json``)."""
    return str(Path(checkpoint).parent / name)
