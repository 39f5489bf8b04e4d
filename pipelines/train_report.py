"""Training throughput of a bundle role: loader, model step and end-to-end slices/s, and the bottleneck (a benchmark).

Usage::

    python -m pipelines.train_report --role student --synthetic --preset demo
    python -m pipelines.train_report --role hlfd --dataset_dir /data/kits19 --device cuda --size 256 --batch-size 16

For one role (``teacher``, ``student``, ``hlfd``, ``kd_baselines``, ``transfuse_ct``, ``transfuse_polyp``, or a bundle
name) on one device, built from the role's own ``bundles/<role>/configs/train.yaml`` (``monai.bundle.ConfigParser``):

- **loader**: slices/s the bundle's ``train_loader`` delivers alone (iterated for ``--steps`` batches from a fresh
  iterator, crossing epochs as training does, worker start-up included); the CacheDataset's one-off caching time
  is reported apart (``cache_s``);
- **step**: slices/s of the training step alone (forward, loss, backward, optimizer step; for the distillation
  roles the teacher forward without autograd and the method's terms, through the bundle's own
  ``DistillationHandler``), in a MONAI ``SupervisedTrainer`` fed random tensors shaped like the loader's batches
  and already on the device;
- **end-to-end**: slices/s of the same trainer fed by the real loader;
- peak GPU memory of the step and end-to-end phases (CUDA);
- the bottleneck: ``headroom = loader / step``; the loader is the bottleneck when ``headroom < 3`` (the issue's
  goal: in a synchronous loop a loader 3x faster than the step still costs 25 % of the step rate,
  ``e2e = 1 / (1/loader + 1/step)``), otherwise the model is.

The validation, checkpointing and tracking handlers of the bundle are not attached (they do not run per step).
The first ``--warmup`` iterations of each phase are not timed. On a shared CPU the loader's workers and the step
compete for the same cores: the loader figure alone is an upper bound there, the end-to-end figure is what
training gets. A distillation role without ``--teacher-ckpt`` uses a randomly initialised teacher of the same
architecture (the speed does not depend on the weights), written as a checkpoint in the bundle's format.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from monai.utils import CommonKeys

from pipelines.benchmark_cli import add_benchmark_args, apply_benchmark_args, emit_report
from transforms.device_path import DATA_PATHS

__all__ = [
    "ROLES",
    "KD_ROLES",
    "HEADROOM_GOAL",
    "bundle_of",
    "TrainReportConfig",
    "demo_config",
    "synthesize_polyp",
    "train_report",
    "bottleneck",
    "format_report",
    "main",
]

logger = logging.getLogger(__name__)

#: short role names -> bundle folder names (bundle names are accepted as they are)
ROLES: dict[str, str] = {
    "teacher": "unetpp_teacher",
    "student": "resnet18_student",
    "hlfd": "hlfd",
    "kd_baselines": "kd_baselines",
    "transfuse_ct": "transfuse_ct",
    "transfuse_polyp": "transfuse_polyp",
}
#: bundles whose step includes a teacher forward
KD_ROLES: tuple[str, ...] = ("hlfd", "kd_baselines")
#: the loader must deliver this many times the step's slices/s not to be named the bottleneck
HEADROOM_GOAL = 3.0

_REPO = Path(__file__).resolve().parents[1]


def bundle_of(role: str) -> str:
    """The bundle folder of a role (``teacher`` -> ``unetpp_teacher``; bundle names map to themselves).

    Raises:
        ValueError: an unknown role, naming the valid ones.
    """
    if role in ROLES:
        return ROLES[role]
    if role in ROLES.values():
        return role
    raise ValueError(f"Unknown role {role!r}; valid roles: {', '.join(ROLES)} (or the bundle names {', '.join(ROLES.values())}).")


@dataclass
class TrainReportConfig:
    """What to measure.

    Args:
        role: a key or value of :data:`ROLES`.
        dataset_dir: the dataset (CT: any layout the bundles read; polyp: the Kvasir-SEG / CVC-ClinicDB root); None
            with ``synthetic``.
        synthetic: write a small synthetic cohort (CT: ``pipelines.synthesize``; polyp: :func:`synthesize_polyp`) to a
            temporary folder and measure on it.
        cases: synthetic cases / images per polyp dataset.
        device: ``"cpu"`` or ``"cuda"`` (None: CUDA when available).
        size: in-plane size (CT ``in_plane_size``; polyp ``size``).
        batch_size: slices per training step.
        steps: timed batches / iterations of each phase (>= 1).
        warmup: untimed iterations before each timed phase (>= 0).
        num_workers: the loader's worker processes (the bundle knob).
        network_kwargs: the bundle's ``network_kwargs`` knob (e.g. tiny widths).
        teacher_ckpt: distillation roles: a trained teacher checkpoint; None builds a random one.
        teacher_kwargs: kwargs of the random teacher (``networks.create("unetpp_teacher", ...)``; defaults: the
            teacher bundle's, deep supervision on).
        overrides: any other bundle knobs (e.g. ``{"samples_per_volume": 4}``).
        channels_last: ``networks.perf`` knob for the student and the teacher (``"auto"``, ``"on"``, ``"off"``).
        compile: compile the student (``nn.Module.compile``).
        amp_dtype: ``networks.perf`` autocast knob (``"auto"``, ``"bf16"``, ``"fp16"``, ``"off"``); MONAI's trainer
            autocasts on CUDA only.
        data_path: the loader of the end-to-end phase: ``"loader"`` (the bundle's ``train_loader``), ``"device"``
            (``transforms.device_path``, 2.5D CT roles) or ``"auto"`` (the device path where the role has one, as the
            bundles' ``data_path auto`` with ``cache_rate`` 1). The
            device path's rate is measured too unless ``"loader"``.
        repeats: measure every phase this many times (interleaved) and report the median run (>= 1).
        inference: also time whole-volume 2.5D inference of one validation volume (CT roles): the bundle's
            ``make_inferer`` against MONAI's per-slice ``SliceInferer``.
        seed: data and network seed.
    """

    role: str
    dataset_dir: str | None = None
    synthetic: bool = False
    cases: int = 12
    device: str | None = None
    size: int = 256
    batch_size: int = 16
    steps: int = 20
    warmup: int = 3
    num_workers: int = 2
    network_kwargs: Mapping[str, Any] | None = None
    teacher_ckpt: str | None = None
    teacher_kwargs: Mapping[str, Any] | None = None
    overrides: Mapping[str, Any] | None = None
    channels_last: str = "auto"
    compile: bool = False
    amp_dtype: str = "auto"
    data_path: str = "auto"
    repeats: int = 1
    inference: bool = True
    seed: int = 0


def demo_config(role: str, **changes: Any) -> TrainReportConfig:
    """The sizes of ``pipelines.demo`` (in-plane size, batch, samples per volume, network widths) for a role.

    The TransFuse roles, which the demo does not train, keep TransFuse-S at the demo's sizes.

    Args:
        role: a role of :data:`ROLES`.
        changes: other :class:`TrainReportConfig` fields.
    """
    from pipelines.demo import DemoConfig

    d = DemoConfig()
    bundle = bundle_of(role)
    student = {"base_width": d.student_base_width}
    if d.student_decoder_channels is not None:
        student["decoder_channels"] = list(d.student_decoder_channels)
    teacher = {"features": list(d.teacher_features)}
    kwargs: dict[str, Any] = dict(
        role=role,
        size=d.size,
        batch_size=d.batch_size,
        cases=d.cases,
        num_workers=0,  # the demo's setting
        # the demo trains no TransFuse: its roles keep TransFuse-S (the bundles' default)
        network_kwargs=teacher if bundle == "unetpp_teacher" else ({} if bundle.startswith("transfuse") else student),
        teacher_kwargs=teacher,
        overrides={"samples_per_volume": d.samples_per_volume},
    )
    kwargs.update(changes)
    return TrainReportConfig(**kwargs)


# ----------------------------------------------------------------------------------------------- data


def synthesize_polyp(out: str | os.PathLike, images: int = 12, size: int = 64, seed: int = 0) -> Path:
    """Write a tiny polyp cohort in the Kvasir-SEG / CVC-ClinicDB layout (random texture, one bright disk per mask).

    Args:
        out: folder to write ``Kvasir-SEG/{images,masks}`` and ``CVC-ClinicDB/{images,masks}`` into.
        images: images per dataset (>= 2).
        size: image side in pixels (>= 16).
        seed: random seed.

    Returns:
        ``out``.

    Raises:
        ValueError: ``images < 2`` or ``size < 16``.
    """
    import numpy as np
    from PIL import Image

    if images < 2 or size < 16:
        raise ValueError(f"images must be >= 2 and size >= 16, got images={images}, size={size}.")
    out = Path(out)
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    for ds in ("Kvasir-SEG", "CVC-ClinicDB"):
        (out / ds / "images").mkdir(parents=True, exist_ok=True)
        (out / ds / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(images):
            cy, cx = rng.uniform(0.3, 0.7, 2) * size
            disk = (yy - cy) ** 2 + (xx - cx) ** 2 < (rng.uniform(0.1, 0.25) * size) ** 2
            rgb = rng.integers(40, 120, (size, size, 3)).astype(np.uint8)
            rgb[disk] = rng.integers(150, 255, 3).astype(np.uint8)
            Image.fromarray(rgb).save(out / ds / "images" / f"{i}.png")
            Image.fromarray((disk * 255).astype(np.uint8)).save(out / ds / "masks" / f"{i}.png")
    return out


def _teacher_checkpoint(path: Path, in_channels: int, out_channels: int, kwargs: Mapping[str, Any] | None) -> Path:
    """A randomly initialised UNet++ teacher saved in the bundles' checkpoint format (speed only)."""
    import networks

    net_kwargs = {"spatial_dims": 2, "in_channels": in_channels, "out_channels": out_channels, "deep_supervision": True}
    net_kwargs.update(kwargs or {})
    teacher = networks.create("unetpp_teacher", **net_kwargs)
    torch.save({"model": teacher.state_dict(), "network": {"name": "unetpp_teacher", **net_kwargs}, "epoch": 1}, path)
    return path


# ----------------------------------------------------------------------------------------------- timing


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _batch_slices(batch: Any) -> int:
    image = batch[CommonKeys.IMAGE] if isinstance(batch, Mapping) else batch[0]
    return int(image.shape[0])


def _time_loader(loader: Any, batches: int) -> dict[str, Any]:
    """Iterate ``batches`` batches from a fresh iterator (restarting at epoch ends, as training does)."""
    slices, taken, first = 0, 0, None
    t0 = time.perf_counter()
    while taken < batches:
        empty = True
        for batch in loader:
            empty = False
            if first is None:
                first = time.perf_counter() - t0
            slices += _batch_slices(batch)
            taken += 1
            if taken >= batches:
                break
        if empty:
            raise ValueError("the training loader yields no batches (empty training split?).")
    seconds = time.perf_counter() - t0
    return {
        "slices_per_s": slices / seconds,
        "batches": taken,
        "slices": slices,
        "seconds": seconds,
        "first_batch_s": first,
        "batches_per_epoch": len(loader) if hasattr(loader, "__len__") else None,
    }


class _PhaseTimer:
    """Times iterations ``warmup + 1 .. warmup + steps`` of a trainer (device-synchronised) and stops it after them."""

    def __init__(self, device: torch.device, warmup: int, steps: int) -> None:
        self.device, self.warmup, self.steps = device, warmup, steps
        self.t0: float | None = None
        self.seconds = math.nan
        self.slices = 0

    def attach(self, engine: Any) -> None:
        from ignite.engine import Events

        engine.add_event_handler(Events.ITERATION_COMPLETED, self)
        if self.warmup == 0:
            engine.add_event_handler(Events.STARTED, self._start)

    def _start(self, engine: Any) -> None:
        _sync(self.device)
        self.t0 = time.perf_counter()

    def __call__(self, engine: Any) -> None:
        it = engine.state.iteration
        if it == self.warmup:
            self._start(engine)
        elif it > self.warmup:
            self.slices += _batch_slices(engine.state.batch)
            if it == self.warmup + self.steps:
                _sync(self.device)
                self.seconds = time.perf_counter() - self.t0
                engine.terminate()

    def result(self) -> dict[str, Any]:
        return {"slices_per_s": self.slices / self.seconds, "steps": self.steps, "slices": self.slices, "seconds": self.seconds}


def _peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated(device) / 2**20, 1) if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def bottleneck(loader_rate: float, step_rate: float, goal: float = HEADROOM_GOAL) -> tuple[str, float]:
    """``("loader" | "model", headroom)`` with ``headroom = loader_rate / step_rate``; the loader below ``goal``.

    Raises:
        ValueError: a rate that is not positive.
    """
    if not (loader_rate > 0 and step_rate > 0):
        raise ValueError(f"rates must be positive, got loader {loader_rate}, step {step_rate}.")
    headroom = loader_rate / step_rate
    return ("loader" if headroom < goal else "model"), headroom


# ----------------------------------------------------------------------------------------------- the report


def _overrides(cfg: TrainReportConfig, bundle: str, dataset_dir: str, work: Path) -> dict[str, Any]:
    knobs: dict[str, Any] = {
        "dataset_dir": dataset_dir,
        "output_dir": str(work / "run"),
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "seed": cfg.seed,
        "overwrite": True,
        "check_data": False,
    }
    if bundle == "transfuse_polyp":
        knobs["size"] = cfg.size
    else:
        knobs["in_plane_size"] = [cfg.size, cfg.size]
    if cfg.network_kwargs:
        knobs["network_kwargs"] = dict(cfg.network_kwargs)
    knobs.update(cfg.overrides or {})
    return knobs


def _trainer(parsed: Mapping[str, Any], loader: Any, device: torch.device, timer: _PhaseTimer, amp: dict[str, Any]) -> Any:
    """A bundle-equivalent ``SupervisedTrainer`` without the per-epoch handlers (validation, checkpoints, tracking)."""
    from monai.engines import SupervisedTrainer
    from monai.inferers import SimpleInferer

    trainer = SupervisedTrainer(
        device=device,
        max_epochs=10**6,  # stopped by the timer
        train_data_loader=loader,
        network=parsed["network"],
        optimizer=parsed["optimizer"],
        loss_function=parsed["loss"],
        inferer=SimpleInferer(),
        iteration_update=parsed["iteration_update"],
        decollate=False,
        amp=amp["amp"],
        amp_kwargs=amp["amp_kwargs"],
    )
    for handler in parsed["kd_handlers"]:
        handler.attach(trainer)
    if parsed["grad_clipper"] is not None:
        parsed["grad_clipper"].attach(trainer)
    timer.attach(trainer)
    return trainer


def _median(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The run with the median ``slices_per_s`` (the lower middle one for an even count), with all rates in ``runs``."""
    ordered = sorted(runs, key=lambda r: r["slices_per_s"])
    return dict(ordered[(len(ordered) - 1) // 2], runs=[round(r["slices_per_s"], 2) for r in runs])


def _time_inference(
    parser: Any, bundle: str, network: torch.nn.Module, device: torch.device, amp: Mapping[str, Any], repeats: int
) -> dict[str, Any] | None:
    """Whole-volume inference slices/s of the first validation volume: the bundle's inferer vs MONAI's SliceInferer.

    Median of ``repeats`` timed runs each, after one untimed run; eval mode, ``torch.inference_mode``, the training
    autocast. None for the polyp role and 3D.
    """
    from monai.inferers import SliceInferer

    from pipelines.engine import load_split
    from transforms.device_loader import as_plain

    if bundle == "transfuse_polyp" or int(parser.get_parsed_content("spatial_dims")) != 2:
        return None
    item = load_split(parser.get_parsed_content("splits"), "validation")[0]
    image = parser.get_parsed_content("val_transforms")(dict(item))[CommonKeys.IMAGE]
    x = as_plain(image)[None].to(device)
    sw = int(parser.get_parsed_content("sw_batch_size"))
    inferers = {
        "bundle": parser.get_parsed_content("val_inferer"),
        "monai_slice_inferer": SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=sw, progress=False),
    }
    network.eval()
    result: dict[str, Any] = {"volume_shape": list(x.shape), "sw_batch_size": sw, "inferer": type(inferers["bundle"]).__name__}
    with torch.inference_mode(), torch.autocast(device.type, enabled=bool(amp["amp"]), **amp["amp_kwargs"]):
        for key, inferer in inferers.items():
            inferer(x, network)
            times = []
            for _ in range(repeats):
                _sync(device)
                t0 = time.perf_counter()
                inferer(x, network)
                _sync(device)
                times.append(time.perf_counter() - t0)
            result[f"{key}_slices_per_s"] = x.shape[-1] / sorted(times)[(len(times) - 1) // 2]
    network.train()
    return result


def _device_loader(parser: Any, bundle: str, device: torch.device) -> tuple[Any, float] | None:
    """The device-resident loader with the bundle's knobs and its caching time: 2.5D slabs
    (``transforms.build_device_train_loader``) or polyp images (``transforms.build_device_image_loader``); None for 3D."""
    from pipelines.engine import load_split
    from transforms import build_device_image_loader, build_device_train_loader

    def knob(key: str) -> Any:
        return parser.get_parsed_content(key)

    t0 = time.perf_counter()
    datalist = load_split(knob("splits"), "training")
    common = {"batch_size": int(knob("batch_size")), "device": device, "seed": int(knob("seed"))}
    if bundle == "transfuse_polyp":
        loader = build_device_image_loader(datalist, knob("train_transforms"), **common)
    elif int(knob("spatial_dims")) == 2:
        loader = build_device_train_loader(
            datalist,
            knob("preprocessing"),
            samples_per_volume=int(knob("samples_per_volume")),
            tumor_share=float(knob("tumor_share")),
            **common,
        )
    else:
        return None
    return loader, time.perf_counter() - t0


def _data_path(requested: str, device: torch.device, have_device_path: bool) -> str:
    """Which loader feeds the end-to-end phase: ``"device"`` or ``"loader"`` (``"auto"``: as the bundles choose,
    the device path wherever the role has one — 2.5D CT and polyp with the whole training set cached)."""
    if requested == "auto":
        return "device" if have_device_path else "loader"
    return requested


def _random_batches(example: Mapping[str, Any], out_channels: int, device: torch.device, count: int, channels_last: bool) -> list[dict[str, torch.Tensor]]:
    """``count`` references to ONE random batch shaped like ``example`` (image normal, label integer classes)."""
    from networks.perf import to_memory_format

    image = torch.as_tensor(example[CommonKeys.IMAGE])
    label = torch.as_tensor(example[CommonKeys.LABEL])
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(image.shape, generator=gen).to(device)
    classes = max(2, out_channels)
    y = torch.randint(0, classes, label.shape, generator=gen).to(device=device, dtype=label.dtype)
    batch = {CommonKeys.IMAGE: to_memory_format(x, channels_last), CommonKeys.LABEL: y}
    return [batch] * count


def train_report(cfg: TrainReportConfig) -> dict[str, Any]:
    """Measure one role (see the module docstring).

    Args:
        cfg: what to measure.

    Returns:
        a JSON-serialisable dict: ``role, bundle, device, torch, threads, load_avg, size, batch_size, num_workers,
        network, params_m, teacher, teacher_params_m, channels_last, compile, amp_dtype, cache_s, loader, step,
        end_to_end, sync_bound_slices_per_s, headroom, efficiency, bottleneck, bottleneck_rule``; ``loader``,
        ``step`` and ``end_to_end`` hold ``slices_per_s`` and their counts; ``step`` and ``end_to_end`` hold
        ``peak_gpu_mem_mb`` (None on CPU).

    Raises:
        ValueError: an unknown role, bad counts, no data source, CUDA requested where none is available, or a
            bundle error (its message).
    """
    from monai.bundle import ConfigParser

    from networks.perf import amp_kwargs, autocast_dtype, channels_last_for, prepare_network, resolve_device
    from pipelines.engine.config_values import config_literal, literal_overrides

    bundle = bundle_of(cfg.role)
    if cfg.steps < 1 or cfg.repeats < 1 or cfg.warmup < 0 or cfg.batch_size < 1 or cfg.size < 16 or cfg.num_workers < 0:
        raise ValueError(
            f"steps ({cfg.steps}), repeats ({cfg.repeats}) and batch_size ({cfg.batch_size}) must be >= 1, warmup ({cfg.warmup}) and num_workers "
            f"({cfg.num_workers}) >= 0, size ({cfg.size}) >= 16."
        )
    if cfg.data_path not in DATA_PATHS:
        raise ValueError(f"data_path must be one of {DATA_PATHS}, got {cfg.data_path!r}.")
    if not cfg.synthetic and not cfg.dataset_dir:
        raise ValueError("give a dataset (dataset_dir) or synthetic=True (--synthetic).")
    device = resolve_device(cfg.device)
    dtype = autocast_dtype(device, cfg.amp_dtype)
    if dtype is not None and device.type != "cuda":
        raise ValueError(f"amp_dtype {cfg.amp_dtype!r} on {device}: MONAI's trainer autocasts on CUDA only; use 'off'.")
    amp = {"amp": dtype is not None, "amp_kwargs": amp_kwargs(device, cfg.amp_dtype)}
    torch.manual_seed(cfg.seed)
    load_avg = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="train_report_") as tmp:
        work = Path(tmp)
        dataset_dir = cfg.dataset_dir
        if cfg.synthetic:
            data = work / "data"
            t0 = time.perf_counter()
            if bundle == "transfuse_polyp":
                synthesize_polyp(data, images=cfg.cases, size=cfg.size, seed=cfg.seed)
            else:
                from pipelines.synthesize import synthesize

                synthesize("kits", cases=cfg.cases, size=cfg.size, out=data, seed=cfg.seed)
            logger.info("synthetic cohort in %.1f s: %s", time.perf_counter() - t0, data)
            dataset_dir = str(data)
        knobs = literal_overrides(_overrides(cfg, bundle, str(dataset_dir), work))  # user strings as data, never code
        knobs["device"] = f"$torch.device({str(device)!r})"
        parser = ConfigParser()
        parser.read_config(str(_REPO / "bundles" / bundle / "configs" / "train.yaml"))  # self-contained: any cwd
        if "data_path" in parser:
            knobs["data_path"] = "loader"  # the bundle's CacheDataset + DataLoader; the device path is built below
        if bundle in KD_ROLES:
            in_channels = int(knobs.get("num_slices", parser["num_slices"]))
            knobs["teacher_ckpt"] = config_literal(cfg.teacher_ckpt or str(
                _teacher_checkpoint(work / "teacher.pt", in_channels, int(parser["out_channels"]), cfg.teacher_kwargs)
            ))
        parser.update(pairs=knobs)
        # the loader first: building it writes the split and caches the volumes (timed apart)
        t0 = time.perf_counter()
        loader = parser.get_parsed_content("train_loader")
        cache_s = time.perf_counter() - t0
        example = next(iter(loader))
        parsed = {k: parser.get_parsed_content(k) for k in ("network", "optimizer", "loss", "kd_handlers")}
        for key in ("iteration_update", "grad_clipper"):
            parsed[key] = parser.get_parsed_content(key) if key in parser else None
        # what the network really runs in (off on CPU for widths oneDNN mishandles): the random batches follow it
        channels_last = channels_last_for(parsed["network"], device, cfg.channels_last)
        prepare_network(parsed["network"], channels_last=channels_last, compile=cfg.compile, device=device)
        teacher = parser.get_parsed_content("teacher") if bundle in KD_ROLES else None
        if teacher is not None:
            prepare_network(teacher, channels_last=channels_last, device=device)
        loaders = {"loader": loader}
        device_path = _device_loader(parser, bundle, device) if cfg.data_path != "loader" else None
        if device_path is not None:
            loaders["device"] = device_path[0]
        elif cfg.data_path == "device":
            raise ValueError(f"the device data path is not available for {bundle} in 3D (2.5D and polyp only).")
        used = _data_path(cfg.data_path, device, "device" in loaders)
        out_channels = int(getattr(parsed["network"], "out_channels", 2))
        batches = _random_batches(example, out_channels, device, cfg.warmup + cfg.steps, channels_last)
        runs: dict[str, list[dict[str, Any]]] = {}
        for _ in range(cfg.repeats):  # the phases interleaved, so a burst of load on a shared machine hits all
            for key, source in loaders.items():
                runs.setdefault(key, []).append(_time_loader(source, cfg.steps))
            for key, source in (("step", batches), ("end_to_end", loaders[used])):
                _reset_peak(device)
                timer = _PhaseTimer(device, cfg.warmup, cfg.steps)
                _trainer(parsed, source, device, timer, amp).run()
                runs.setdefault(key, []).append(dict(timer.result(), peak_gpu_mem_mb=_peak_mb(device)))
        timed = {key: _median(values) for key, values in runs.items()}
        if device_path is not None:
            timed["device"]["cache_s"] = round(device_path[1], 3)
        step, e2e = timed["step"], dict(timed["end_to_end"], data_path=used)
        infer = _time_inference(parser, bundle, parsed["network"], device, amp, cfg.repeats) if cfg.inference else None

    loader_result = timed[used]
    name, headroom = bottleneck(loader_result["slices_per_s"], step["slices_per_s"])
    net = parsed["network"]
    sync_bound = 1.0 / (1.0 / loader_result["slices_per_s"] + 1.0 / step["slices_per_s"])
    return {
        "role": cfg.role,
        "bundle": bundle,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_avg": [round(v, 2) for v in load_avg],
        "size": [cfg.size, cfg.size],
        "batch_size": cfg.batch_size,
        "num_workers": cfg.num_workers,
        "synthetic": cfg.synthetic,
        "network": type(net).__name__,
        "network_kwargs": dict(cfg.network_kwargs or {}),
        "params_m": round(sum(p.numel() for p in net.parameters()) / 1e6, 3),
        "teacher": type(teacher).__name__ if teacher is not None else None,
        "teacher_params_m": round(sum(p.numel() for p in teacher.parameters()) / 1e6, 3) if teacher is not None else None,
        "channels_last": channels_last,
        "compile": cfg.compile,
        "amp_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "cache_s": round(cache_s, 3),
        "data_path": used,
        "loader": timed["loader"],
        "device_loader": timed.get("device"),
        "step": step,
        "end_to_end": e2e,
        "inference": infer,
        "sync_bound_slices_per_s": sync_bound,
        "headroom": headroom,
        "efficiency": e2e["slices_per_s"] / step["slices_per_s"],
        "bottleneck": name,
        "bottleneck_rule": f"loader when loader slices/s < {HEADROOM_GOAL:g} x step slices/s, else model",
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Human-readable table of a :func:`train_report` result."""
    r = report
    amp = r["amp_dtype"] or "off"
    lines = [
        f"role           {r['role']} (bundle {r['bundle']}) on {r['device']} ({r['threads']} threads, {r['cpu_count']} "
        f"cores, load {r['load_avg'][0]:.2f}; torch {r['torch']})",
        f"network        {r['network']} {r['params_m']:.2f} M"
        + (f"; teacher {r['teacher']} {r['teacher_params_m']:.2f} M" if r["teacher"] else ""),
        f"settings       {r['size'][0]}x{r['size'][1]}, batch {r['batch_size']}, {r['num_workers']} workers, "
        f"channels_last {r['channels_last']}, compile {r['compile']}, autocast {amp}",
        "",
        "| phase | slices/s | measured over | peak GPU MB |",
        "|---|---|---|---|",
    ]
    for key, label in (("loader", "loader (bundle train_loader)"), ("device_loader", "loader (device path)")):
        p = r[key]
        if p is not None:
            lines.append(
                f"| {label} | {p['slices_per_s']:.1f} | {p['batches']} batches, {p['seconds']:.2f} s (first batch "
                f"{p['first_batch_s']:.2f} s) | - |"
            )
    e2e_label = f"end-to-end ({'device path' if r['data_path'] == 'device' else 'bundle train_loader'} + step)"
    for key, label in (("step", "train step (random tensors on device)"), ("end_to_end", e2e_label)):
        p = r[key]
        mem = "-" if p["peak_gpu_mem_mb"] is None else f"{p['peak_gpu_mem_mb']:.0f}"
        lines.append(f"| {label} | {p['slices_per_s']:.1f} | {p['steps']} steps, {p['seconds']:.2f} s | {mem} |")
    inf = r["inference"]
    if inf is not None:
        shape = "x".join(str(n) for n in inf["volume_shape"][1:])
        lines += [
            f"| whole-volume inference, {inf['inferer']} | {inf['bundle_slices_per_s']:.1f} | one {shape} volume, "
            f"sw_batch_size {inf['sw_batch_size']} | - |",
            f"| whole-volume inference, MONAI SliceInferer | {inf['monai_slice_inferer_slices_per_s']:.1f} | the same | - |",
        ]
    lines += [
        "",
        f"cache          {r['cache_s']:.1f} s (one-off CacheDataset build)"
        + (f"; device path {r['device_loader']['cache_s']:.1f} s" if r["device_loader"] else ""),
        f"headroom       {'device path' if r['data_path'] == 'device' else 'bundle loader'} / step = {r['headroom']:.2f}; end-to-end / step = {r['efficiency']:.2f} "
        f"(synchronous bound {r['sync_bound_slices_per_s']:.1f} slices/s)",
        f"bottleneck     {r['bottleneck']} ({r['bottleneck_rule']})",
    ]
    return "\n".join(lines)


def _json_arg(parser: argparse.ArgumentParser, text: str | None, name: str) -> dict[str, Any] | None:
    if text is None:
        return None
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        parser.error(f"{name} must be a JSON object, e.g. '{{\"base_width\": 8}}': {e}")
    if not isinstance(value, dict):
        parser.error(f"{name} must be a JSON object, got {text!r}")
    return value


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m pipelines.train_report --role ROLE (--dataset_dir D | --synthetic) [--preset demo] [--device
    cpu|cuda] [--size N] [--batch-size B] [--steps N] [--warmup N] [--repeats N] [--no-inference] [--num-workers N] [--network-kwargs JSON]
    [--teacher-ckpt PATH] [--teacher-kwargs JSON] [--channels-last auto|on|off] [--compile] [--amp-dtype
    auto|bf16|fp16|off] [--threads N] [--json PATH]``."""
    from networks.perf import AMP_DTYPES, CHANNELS_LAST_MODES

    parser = argparse.ArgumentParser(prog="python -m pipelines.train_report", description=__doc__.splitlines()[0])
    parser.add_argument("--role", required=True, choices=list(dict.fromkeys([*ROLES, *ROLES.values()])))
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset_dir", "--dataset-dir", default=None, help="the dataset the bundle reads")
    source.add_argument("--synthetic", action="store_true", help="measure on a synthetic cohort written to a temp dir")
    parser.add_argument("--preset", choices=("demo",), default=None, help="demo: pipelines.demo's sizes and widths")
    parser.add_argument("--cases", type=int, default=None, help="synthetic cases (polyp: images per dataset)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when available")
    parser.add_argument("--size", type=int, default=None, help="in-plane size (default 256; demo 64)")
    parser.add_argument("--batch-size", type=int, default=None, help="slices per step (default 16; demo 8)")
    parser.add_argument("--steps", type=int, default=20, help="timed iterations per phase (default 20)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed iterations before each phase (default 3)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every phase; the median is reported (default 1)")
    parser.add_argument("--no-inference", action="store_true", help="skip the whole-volume inference timing")
    parser.add_argument("--num-workers", type=int, default=None, help="loader workers (default 2; demo 0)")
    parser.add_argument("--network-kwargs", default=None, help="JSON, the bundle's network_kwargs knob")
    parser.add_argument("--teacher-ckpt", default=None, help="KD roles: a trained teacher (default: random weights)")
    parser.add_argument("--teacher-kwargs", default=None, help="JSON, kwargs of the random teacher")
    parser.add_argument("--channels-last", choices=CHANNELS_LAST_MODES, default="auto")
    parser.add_argument("--compile", action="store_true", help="torch.compile the student (nn.Module.compile)")
    parser.add_argument("--amp-dtype", choices=AMP_DTYPES, default="auto")
    parser.add_argument(
        "--data-path", choices=DATA_PATHS, default="auto", help="loader of the end-to-end phase (auto: the device path where the role has one, as the bundles)"
    )
    add_benchmark_args(parser)
    args = parser.parse_args(argv)
    apply_benchmark_args(parser, args)
    fields: dict[str, Any] = dict(
        dataset_dir=args.dataset_dir,
        synthetic=args.synthetic,
        device=args.device,
        steps=args.steps,
        warmup=args.warmup,
        teacher_ckpt=args.teacher_ckpt,
        channels_last=args.channels_last,
        compile=args.compile,
        amp_dtype=args.amp_dtype,
        data_path=args.data_path,
        repeats=args.repeats,
        inference=not args.no_inference,
    )
    optional = {
        "cases": args.cases,
        "size": args.size,
        "batch_size": args.batch_size,
        "num_workers": args.num_workers,
        "network_kwargs": _json_arg(parser, args.network_kwargs, "--network-kwargs"),
        "teacher_kwargs": _json_arg(parser, args.teacher_kwargs, "--teacher-kwargs"),
    }
    fields.update({k: v for k, v in optional.items() if v is not None})
    try:
        cfg = demo_config(args.role, **fields) if args.preset == "demo" else TrainReportConfig(role=args.role, **fields)
        report = train_report(cfg)
    except ValueError as err:
        parser.error(str(err))
    emit_report(format_report(report), report, args.json)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    main()
