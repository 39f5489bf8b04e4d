"""The HLFD paper's Table 1 as one command: teacher, student without KD, HLFD and the KD baselines, over seeds.

``python -m pipelines.experiment --methods hlfd,hinton --seeds 3 --out experiment_out``

Every arm runs through its bundle exactly as a user runs it (``monai.bundle.run("training", config_file=
"bundles/<role>/configs/train.yaml", ...)`` then ``evaluating`` with ``evaluate.yaml``, in this process) into
``<out>/runs/<arm>/seed<k>/``:

- ``teacher``: ``bundles/unetpp_teacher``, trained ONCE (seed 0; or ``--teacher-ckpt`` reuses a trained one, which
  is evaluated too); every KD arm of every seed distils from that one checkpoint;
- ``student``: ``bundles/resnet18_student`` (no KD), once per seed: the reference of every comparison;
- ``hlfd``: ``bundles/hlfd``; ``hinton``, ``skd``, ``imf``, ``emkd``, ``hifd``: ``bundles/kd_baselines`` with
  ``--kd_method``; ``hlfd_ufd``, ``hlfd_ifd``, ``hlfd_upd``, ``hlfd_ipd``: HLFD with only that term on (``--kd_weights``).

Equal epochs and equal data for every student arm: one dataset, ONE split file (``<out>/splits.json``, written once
before any arm runs and passed to every bundle as ``--splits_file``), the same epochs, batch, samples per volume,
sizes and learning rate. The teacher may train longer (``--teacher-epochs``). The dataset is checked once
(``pipelines.check_dataset``) before any arm runs; the bundles then skip their own copy of that check.

Outputs in ``--out``: ``cases.csv`` (one row per arm, seed and held-out volume, every column of the evaluation's
per-case CSV), ``runs.csv`` (one row per arm and seed: wall times, checkpoint, MLflow run ids), ``table.csv`` and
``table.md`` (per arm: mean ± std over seeds of the per-seed mean tumor DSC, tumor RVD and organ DSC; the paired
tumor-DSC difference to the student over volumes x seeds with a 95 % t-interval; the share of pairs the arm wins;
the share of the teacher-student gap closed; wall times).

MLflow: one store (``sqlite:///<out>/mlruns.db`` or ``--tracking-uri``), one PARENT run per experiment (its
parameters, the summary metrics, the table files as artifacts); every bundle run is its CHILD: the bundles' knob
``--run_tags`` sets ``mlflow.parentRunId`` (plus ``ctdistill_arm``, ``ctdistill_seed``, ``ctdistill_stage``) on
the runs MONAI's MLflow handler creates.

``--resume`` skips every (arm, seed) whose evaluation finished (``done.json``, written atomically after the
evaluation, names its per-case CSV); an arm that did not finish is run again from scratch (its folder is cleared;
its MLflow runs left open are marked FAILED). Without ``--resume`` an ``--out`` holding finished arms is refused.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import inspect
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from pipelines.engine.atomic import atomic_copy, atomic_write_json

__all__ = [
    "ARMS",
    "DEFAULT_METHODS",
    "METRICS",
    "PRESETS",
    "TEACHER_SEED",
    "Arm",
    "ConfigError",
    "ExperimentConfig",
    "PairedSummary",
    "build_table",
    "format_markdown",
    "main",
    "paired_difference",
    "paired_differences",
    "paired_summary",
    "parse_methods",
    "preset_config",
    "run_bundle",
    "run_experiment",
    "validate_config",
]

logger = logging.getLogger("pipelines.experiment")  # also under python -m

REPO = Path(__file__).resolve().parents[1]

#: per-case metrics summarised in the table (columns of the evaluation bundles' ``eval/cases.csv``)
METRICS: tuple[str, ...] = ("dsc_tumor", "rvd_tumor", "dsc_organ")

#: the seed of the one teacher run
TEACHER_SEED = 0

REFERENCE = "student"
TEACHER = "teacher"

#: procedural cases when ``--cases`` is not given (the demo's cohort)
DEFAULT_CASES = 24


@dataclass(frozen=True)
class Arm:
    """One row of the table: a bundle role and the knobs that make the arm.

    Args:
        name: arm name (``--methods``, folder ``runs/<name>``, MLflow tag ``ctdistill_arm``).
        role: the bundle (``bundles/<role>``).
        label: the method column of the table.
        overrides: bundle knobs of this arm (``kd_method``, ``kd_weights``).
    """

    name: str
    role: str
    label: str
    overrides: Mapping[str, Any] = field(default_factory=dict)

    @property
    def distils(self) -> bool:
        """True for the arms that read the teacher checkpoint."""
        return self.role in ("hlfd", "kd_baselines")


def _only(term: str) -> dict[str, float]:
    return {t: (1.0 if t == term else 0.0) for t in ("ufd", "ifd", "upd", "ipd")}


def _without(term: str) -> dict[str, float]:
    return {t: (0.0 if t == term else 1.0) for t in ("ufd", "ifd", "upd", "ipd")}


#: every arm, in table order (references, the paper's baselines, HLFD, then the HLFD per-term ablations)
ARMS: dict[str, Arm] = {
    a.name: a
    for a in (
        Arm(TEACHER, "unetpp_teacher", "UNet++ teacher"),
        Arm(REFERENCE, "resnet18_student", "ResNet18 student (no KD)"),
        Arm("hinton", "kd_baselines", "Hinton KD", {"kd_method": "hinton"}),
        Arm("skd", "kd_baselines", "SKD", {"kd_method": "skd"}),
        Arm("imf", "kd_baselines", "IMF", {"kd_method": "imf"}),
        Arm("emkd", "kd_baselines", "EMKD", {"kd_method": "emkd"}),
        Arm("hifd", "kd_baselines", "HIFD", {"kd_method": "hifd"}),
        Arm("hlfd", "hlfd", "HLFD"),
        # UFD/IFD sit in beta * L_F, UPD/IPD in lam * L_P (distill/hlfd.py); beta and lam keep the paper's values
        Arm("hlfd_ufd", "hlfd", "HLFD, UFD only", {"kd_weights": _only("ufd")}),
        Arm("hlfd_ifd", "hlfd", "HLFD, IFD only", {"kd_weights": _only("ifd")}),
        Arm("hlfd_upd", "hlfd", "HLFD, UPD only", {"kd_weights": _only("upd")}),
        Arm("hlfd_ipd", "hlfd", "HLFD, IPD only", {"kd_weights": _only("ipd")}),
        # leave-one-out: HLFD with one term switched off
        Arm("hlfd_wo_ufd", "hlfd", "HLFD without UFD", {"kd_weights": _without("ufd")}),
        Arm("hlfd_wo_ifd", "hlfd", "HLFD without IFD", {"kd_weights": _without("ifd")}),
        Arm("hlfd_wo_upd", "hlfd", "HLFD without UPD", {"kd_weights": _without("upd")}),
        Arm("hlfd_wo_ipd", "hlfd", "HLFD without IPD", {"kd_weights": _without("ipd")}),
    )
}

#: ``--methods`` default: the paper's Table 1 with this product's baselines
DEFAULT_METHODS: tuple[str, ...] = ("hinton", "skd", "imf", "emkd", "hifd", "hlfd")

#: the student arms ``--methods`` can select (teacher and student are always run and may be listed too)
SELECTABLE: tuple[str, ...] = tuple(n for n in ARMS if n != TEACHER)


class ConfigError(ValueError):
    """A knob with an invalid value; the message starts with the knob's command-line name."""

    def __init__(self, knob: str, message: str) -> None:
        super().__init__(f"{knob}: {message}")
        self.knob = knob


def parse_methods(methods: str | Sequence[str]) -> tuple[str, ...]:
    """The arms to run, in table order: ``teacher``, ``student`` (always), then the selected methods.

    Args:
        methods: comma-separated names (``"hlfd,hinton"``) or a sequence of names; ``all`` selects every arm.

    Returns:
        arm names in the order of :data:`ARMS`.

    Raises:
        ConfigError: an unknown name (the message lists the valid ones).
    """
    items = methods.split(",") if isinstance(methods, str) else list(methods)
    names = {m.strip() for m in items if m and m.strip()}
    if "all" in names:
        names = (names - {"all"}) | set(SELECTABLE)
    unknown = sorted(names - set(ARMS))
    if unknown:
        raise ConfigError("--methods", f"unknown method(s) {unknown}; valid: {', '.join(SELECTABLE)} (or all).")
    names |= {TEACHER, REFERENCE}
    return tuple(n for n in ARMS if n in names)


# --------------------------------------------------------------------------------------------- configuration


@dataclass
class ExperimentConfig:
    """Every knob of the experiment (defaults: the CPU toy preset, the demo's sizes).

    Args:
        out: output folder (data, split, runs, MLflow store, tables).
        methods: selected arms (``teacher`` and ``student`` are added; see :func:`parse_methods`).
        seeds: the seeds every student arm runs with (the teacher trains once, seed 0).
        dataset_dir: data the bundles read (KiTS19/LiTS/nnU-Net/MSD folder, CSV, splits JSON); None synthesizes.
        from_labels: folder of real label maps for ``pipelines.synthesize.synthesize_from_labels`` (None: procedural
            cohort).
        task: ``kits`` or ``lits`` (HU window, split preset, synthetic anatomy).
        cases: synthetic cases (20 % held out for the test table, 20 % of the rest for validation); None: 24
            procedural cases, or every label map of ``from_labels``.
        size: in-plane size (synthetic matrix and the bundles' ``in_plane_size``).
        data_seed: seed of the synthetic cohort and of the split.
        epochs: training epochs of every student arm.
        teacher_epochs: training epochs of the teacher (None: ``epochs``).
        samples_per_volume: 2.5D slices drawn per training volume per epoch.
        batch_size: training batch (slices).
        val_interval: validation (and best.pt selection) every this many epochs.
        lr: learning rate of every run.
        teacher_features: UNet++ widths per level, or a preset name (``"paper"``).
        student_base_width: ResNet18 base width (None: the paper's widths).
        student_decoder_channels: ResNet18 decoder widths at strides 16, 8, 4, 2, 1 (None: the network default).
        teacher_ckpt: an existing teacher checkpoint to distil from (not trained here, evaluated).
        tracking_uri: MLflow store (None: ``sqlite:///<out>/mlruns.db``).
        experiment_name: MLflow experiment of the parent and child runs.
        num_workers: DataLoader workers of every bundle run.
        sw_batch_size: slices per inference batch in validation and evaluation.
        resume: skip finished arms of an existing ``out``.
        preset: the preset the values came from (recorded only).
        teacher_warmup_epochs: the teacher's ``--warmup_epochs`` (None: the bundle's default).
        teacher_grad_clip: the teacher's ``--grad_clip`` (None: the bundle's default).
        kd_warmup_epochs: ``--kd_warmup_epochs`` of every distilling arm (None: the bundle's default, 0).
    """

    out: Path = Path("experiment_out")
    methods: tuple[str, ...] = DEFAULT_METHODS
    seeds: tuple[int, ...] = (0, 1, 2)
    dataset_dir: Path | None = None
    from_labels: Path | None = None
    task: str = "kits"
    cases: int | None = None
    size: int = 64
    data_seed: int = 0
    epochs: int = 150
    teacher_epochs: int | None = None
    samples_per_volume: int = 4
    batch_size: int = 8
    val_interval: int = 10
    lr: float = 1e-3
    # the demo's networks: a 5-level UNet++ at 3/16 of the paper's widths (1.29M) and a ResNet18 at 1/4 (0.78M)
    teacher_features: tuple[int, ...] | str = (12, 24, 48, 96, 192)
    student_base_width: int | None = 16
    student_decoder_channels: tuple[int, ...] | None = (32, 24, 16, 16, 16)
    teacher_ckpt: Path | None = None
    tracking_uri: str | None = None
    experiment_name: str = "ctdistill_experiment"
    num_workers: int = 0
    sw_batch_size: int = 32
    resume: bool = False
    preset: str = "toy"
    teacher_warmup_epochs: int | None = None
    teacher_grad_clip: float | None = None
    kd_warmup_epochs: float | None = None


#: ``--preset``: values that differ from the toy defaults. ``paper``: the paper's networks (UNet++ "paper" widths,
#: 36.6M; the default ResNet18 student, 11.7M), 256^2 slices, 120 epochs, the bundles' defaults otherwise (GPU).
PRESETS: dict[str, dict[str, Any]] = {
    "toy": {},
    "paper": {
        "size": 256,
        "epochs": 120,
        "val_interval": 1,
        "teacher_features": "paper",
        "student_base_width": None,
        "student_decoder_channels": None,
        "num_workers": 4,
        "sw_batch_size": 16,
    },
}


def preset_config(preset: str = "toy", **overrides: Any) -> ExperimentConfig:
    """An :class:`ExperimentConfig` from a preset, with ``overrides`` (explicit knobs) on top.

    Raises:
        ConfigError: unknown preset.
    """
    if preset not in PRESETS:
        raise ConfigError("--preset", f"unknown preset {preset!r}; valid: {sorted(PRESETS)}.")
    return replace(ExperimentConfig(), preset=preset, **{**PRESETS[preset], **overrides})


def _teacher_levels(features: tuple[int, ...] | str) -> int:
    if isinstance(features, str):
        from networks.unetpp import UNETPP_PRESETS

        if features not in UNETPP_PRESETS:
            raise ConfigError("--teacher-features", f"unknown UNet++ preset {features!r}; valid: {sorted(UNETPP_PRESETS)} or widths.")
        return len(UNETPP_PRESETS[features])
    if not all(isinstance(f, int) and f > 0 for f in features):
        raise ConfigError("--teacher-features", f"widths must be positive integers, got {list(features)}.")
    if not 3 <= len(features) <= 6:
        raise ConfigError("--teacher-features", f"UNet++ needs 3 to 6 levels, got {len(features)}: {list(features)}.")
    return len(features)


def _positive(knob: str, value: Any, minimum: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ConfigError(knob, f"must be an integer >= {minimum}, got {value!r}.")


def _finished_markers(out: Path) -> list[Path]:
    return sorted(out.glob("runs/*/seed*/done.json"))


def _settings(cfg: ExperimentConfig) -> dict[str, Any]:
    """What every arm's result depends on (a resumed experiment must not change any of it)."""
    data: Any
    if cfg.dataset_dir is not None:
        data = {"dataset_dir": str(Path(cfg.dataset_dir).resolve())}
    elif cfg.from_labels is not None:
        data = {"from_labels": str(Path(cfg.from_labels).resolve()), "cases": cfg.cases, "size": cfg.size, "seed": cfg.data_seed}
    else:
        data = {"synthetic": cfg.task, "cases": cfg.cases or DEFAULT_CASES, "size": cfg.size, "seed": cfg.data_seed}
    return {
        "data": data,
        "task": cfg.task,
        "data_seed": cfg.data_seed,
        "size": cfg.size,
        "epochs": cfg.epochs,
        "teacher_epochs": cfg.teacher_epochs or cfg.epochs,
        "samples_per_volume": cfg.samples_per_volume,
        "batch_size": cfg.batch_size,
        "val_interval": cfg.val_interval,
        "lr": cfg.lr,
        "teacher_features": cfg.teacher_features if isinstance(cfg.teacher_features, str) else list(cfg.teacher_features),
        "student_base_width": cfg.student_base_width,
        "student_decoder_channels": None if cfg.student_decoder_channels is None else list(cfg.student_decoder_channels),
        "teacher_ckpt": None if cfg.teacher_ckpt is None else str(Path(cfg.teacher_ckpt).resolve()),
        "tracking_uri": cfg.tracking_uri,
        "experiment_name": cfg.experiment_name,
        "teacher_warmup_epochs": cfg.teacher_warmup_epochs,
        "teacher_grad_clip": cfg.teacher_grad_clip,
        "kd_warmup_epochs": cfg.kd_warmup_epochs,
    }


def validate_config(cfg: ExperimentConfig) -> tuple[str, ...]:
    """Check every knob before any long work.

    Args:
        cfg: the configuration.

    Returns:
        the arms to run (:func:`parse_methods`).

    Raises:
        ConfigError: the first invalid knob (named as on the command line), an ``out`` holding finished arms
            without ``resume``, or a resumed ``out`` made with different settings.
    """
    arms = parse_methods(cfg.methods)
    if not cfg.seeds:
        raise ConfigError("--seeds", "needs at least one seed.")
    for s in cfg.seeds:
        _positive("--seed-list", s, minimum=0)
    if len(set(cfg.seeds)) != len(cfg.seeds):
        raise ConfigError("--seed-list", f"seeds must be distinct, got {list(cfg.seeds)}.")
    for knob, value in (
        ("--epochs", cfg.epochs),
        ("--samples-per-volume", cfg.samples_per_volume),
        ("--batch-size", cfg.batch_size),
        ("--val-interval", cfg.val_interval),
        ("--sw-batch-size", cfg.sw_batch_size),
        ("--size", cfg.size),
    ):
        _positive(knob, value)
    _positive("--num-workers", cfg.num_workers, minimum=0)
    _positive("--data-seed", cfg.data_seed, minimum=0)
    if cfg.teacher_epochs is not None:
        _positive("--teacher-epochs", cfg.teacher_epochs)
    if cfg.samples_per_volume > cfg.batch_size:
        raise ConfigError("--samples-per-volume", f"{cfg.samples_per_volume} exceeds --batch-size {cfg.batch_size} (slices per step).")
    if not (isinstance(cfg.lr, (int, float)) and cfg.lr > 0 and math.isfinite(cfg.lr)):
        raise ConfigError("--lr", f"must be a positive number, got {cfg.lr!r}.")
    if cfg.teacher_warmup_epochs is not None and not 0 <= cfg.teacher_warmup_epochs < (cfg.teacher_epochs or cfg.epochs):
        raise ConfigError("--teacher-warmup-epochs", f"must be in [0, teacher epochs), got {cfg.teacher_warmup_epochs}.")
    for knob, value in (("--teacher-grad-clip", cfg.teacher_grad_clip), ("--kd-warmup-epochs", cfg.kd_warmup_epochs)):
        if value is not None and not (math.isfinite(value) and value >= 0):
            raise ConfigError(knob, f"must be a number >= 0, got {value!r}.")
    if cfg.task not in ("kits", "lits"):
        raise ConfigError("--task", f"must be kits or lits, got {cfg.task!r}.")
    if cfg.size % 32:
        raise ConfigError("--size", f"must be divisible by 32 (the ResNet18 student's stride), got {cfg.size}.")
    if cfg.teacher_ckpt is None:
        levels = _teacher_levels(cfg.teacher_features)
        if cfg.size % 2 ** (levels - 1):
            raise ConfigError("--size", f"must be divisible by {2 ** (levels - 1)} (a {levels}-level UNet++ teacher), got {cfg.size}.")
    if cfg.student_base_width is not None:
        _positive("--student-width", cfg.student_base_width)
    if cfg.student_decoder_channels is not None:
        dec = tuple(cfg.student_decoder_channels)
        if len(dec) != 5 or not all(isinstance(c, int) and c > 0 for c in dec):
            raise ConfigError("--student-decoder", f"needs 5 positive integers (strides 16, 8, 4, 2, 1), got {list(dec)}.")
    if cfg.dataset_dir is not None and cfg.from_labels is not None:
        raise ConfigError("--from-labels", "cannot be combined with --dataset_dir (one dataset per experiment).")
    if cfg.dataset_dir is not None:
        d = Path(cfg.dataset_dir)
        if not (d.is_dir() or (d.is_file() and d.suffix == ".json")):
            raise ConfigError("--dataset_dir", f"{d} is neither a folder nor a splits JSON.")
    elif cfg.cases is not None:
        _positive("--cases", cfg.cases, minimum=5)  # training, validation and held-out test volumes
    if cfg.from_labels is not None:
        if not Path(cfg.from_labels).is_dir():
            raise ConfigError("--from-labels", f"{cfg.from_labels} is not a folder.")
        if cfg.task != "kits":
            raise ConfigError("--from-labels", f"synthesizes KiTS-style CT (kidney labels); use --task kits, got {cfg.task!r}.")
        _synthesize_from_labels_fn()
        from pipelines import synthesize as syn

        if hasattr(syn, "find_label_files"):
            try:
                n = len(syn.find_label_files(cfg.from_labels))
            except ValueError as e:
                raise ConfigError("--from-labels", str(e)) from e
            if n < max(5, cfg.cases or 0):
                raise ConfigError("--from-labels", f"{cfg.from_labels} holds {n} label map(s); the experiment needs {max(5, cfg.cases or 0)}.")
    if cfg.teacher_ckpt is not None:
        _check_teacher(cfg, arms)
    if cfg.tracking_uri and (cfg.tracking_uri.startswith("file:") or "://" not in cfg.tracking_uri):
        raise ConfigError("--tracking-uri", f"{cfg.tracking_uri!r} is a folder; MLflow 3 needs sqlite:///<path>.db or a server URI.")
    out = Path(cfg.out)
    if out.exists() and not out.is_dir():
        raise ConfigError("--out", f"{out} exists and is not a folder.")
    finished = _finished_markers(out) if out.is_dir() else []
    if finished and not cfg.resume:
        raise ConfigError(
            "--out",
            f"{out} already holds {len(finished)} finished arm(s) (e.g. {finished[0].parent.relative_to(out)}); pass "
            "--resume to continue that experiment (finished arms are skipped) or a new --out. Nothing was overwritten.",
        )
    state = out / "experiment.json"
    if cfg.resume and finished and not state.is_file():
        logger.warning("%s holds finished arms but no experiment.json: their settings cannot be checked against these knobs", out)
    if cfg.resume and state.is_file():
        before = json.loads(state.read_text()).get("settings", {})
        now = json.loads(json.dumps(_settings(cfg)))
        changed = sorted(k for k in set(before) | set(now) if before.get(k) != now.get(k))
        if changed:
            diff = "; ".join(f"{k}: {before.get(k)!r} -> {now.get(k)!r}" for k in changed)
            raise ConfigError(
                "--resume",
                f"{out} was made with other settings ({diff}); every arm must see the same data and epochs. Rerun with "
                "the original knobs or use a new --out.",
            )
    return arms


def _check_teacher(cfg: ExperimentConfig, arms: Sequence[str]) -> None:
    """A reused teacher: trained weights, the heads every selected KD method reads, 2.5D input of this task."""
    p = Path(cfg.teacher_ckpt)  # type: ignore[arg-type]
    if not p.is_file():
        raise ConfigError("--teacher-ckpt", f"{p} does not exist.")
    from pipelines.engine import BundleInputError, check_teacher_checkpoint, checkpoint_settings

    methods = sorted({ARMS[a].overrides.get("kd_method", "hlfd") for a in arms if ARMS[a].distils})
    by_method = "method" in inspect.signature(check_teacher_checkpoint).parameters
    try:
        for m in methods or [None]:
            check_teacher_checkpoint(p, "unetpp_teacher", **({"method": m} if by_method and m else {}))
        pre = checkpoint_settings(p)["preprocessing"]
    except (BundleInputError, KeyError, ValueError, RuntimeError) as e:
        raise ConfigError("--teacher-ckpt", f"{p} is not a usable teacher checkpoint: {e}") from e
    if int(pre.get("spatial_dims", 2)) != 2 or int(pre.get("num_slices", 3)) != 3:
        raise ConfigError("--teacher-ckpt", f"{p} is not a 2.5D (3-slice) checkpoint: {pre}; the students here are.")
    if pre.get("task") != cfg.task:
        raise ConfigError("--teacher-ckpt", f"{p} was trained for task {pre.get('task')!r}, this experiment is {cfg.task!r}.")
    if list(pre.get("in_plane_size") or []) != [cfg.size, cfg.size]:
        logger.warning("teacher checkpoint %s was trained at in-plane size %s; the students use %d^2", p, pre.get("in_plane_size"), cfg.size)


def _synthesize_from_labels_fn() -> Any:
    from pipelines import synthesize as syn

    fn = getattr(syn, "synthesize_from_labels", None)
    if fn is None:
        raise ConfigError(
            "--from-labels",
            "this checkout's pipelines.synthesize has no synthesize_from_labels (realistic CT from real label maps); "
            "use --dataset_dir or the procedural cohort (no --from-labels).",
        )
    return fn


# --------------------------------------------------------------------------------------------- bundles


def run_bundle(run_id: str, role: str, config: str, **overrides: Any) -> None:
    """``monai.bundle.run(run_id, config_file="<repo>/bundles/<role>/configs/<config>.yaml", **overrides)`` in this process.

    Exactly what ``python -m monai.bundle run <run_id> --config_file ... --<knob> <value>`` does (the composed
    configs are self-contained, so the working directory does not matter; pass absolute paths).

    Args:
        run_id: ``training``, ``evaluating`` or ``inferring``.
        role: the bundle (``bundles/<role>``).
        config: ``train``, ``evaluate`` or ``inference``.
        overrides: bundle knobs; every value is passed as data (``pipelines.engine.literal_overrides``): a path or
            name read from a file (``experiment.json``, a splits JSON) is never run as a MONAI expression.
    """
    from monai.bundle import run

    from pipelines.engine.config_values import literal_overrides

    config_file = REPO / "bundles" / role / "configs" / f"{config}.yaml"
    if not config_file.is_file():
        raise FileNotFoundError(f"bundle config {config_file} does not exist (role {role!r}); roles: bundles/*/role.yaml in {REPO}")
    run(run_id, config_file=str(config_file), **literal_overrides(overrides))


# --------------------------------------------------------------------------------------------- statistics


def read_cases(path: str | os.PathLike) -> pd.DataFrame:
    """A per-case CSV (``case`` kept as text, ``nan``/empty as NaN)."""
    return pd.read_csv(path, dtype={"case": str})


def paired_differences(
    a: pd.DataFrame, b: pd.DataFrame, column: str = "dsc_tumor", keys: Sequence[str] = ("case",)
) -> pd.Series:
    """``a - b`` of one metric for every key (e.g. case, or seed and case) both frames hold with defined values.

    Args:
        a: per-case rows of method a (``keys`` columns + ``column``).
        b: the same for method b.
        column: metric column.
        keys: columns that identify a pair (each must be unique within a frame).

    Returns:
        the differences, ordered by the keys.

    Raises:
        ValueError: ``column`` or a key missing, or a key repeated within a frame.
    """
    for name, frame in (("a", a), ("b", b)):
        missing = [c for c in (*keys, column) if c not in frame.columns]
        if missing:
            raise ValueError(f"{name}: no column(s) {missing}; columns: {sorted(frame.columns)}")
    merged = a[[*keys, column]].merge(b[[*keys, column]], on=list(keys), suffixes=("_a", "_b"), validate="one_to_one")
    merged = merged.dropna(subset=[f"{column}_a", f"{column}_b"]).sort_values(list(keys))
    return (merged[f"{column}_a"] - merged[f"{column}_b"]).reset_index(drop=True)


@dataclass(frozen=True)
class PairedSummary:
    """Paired differences summarised: mean, sample sd, n, n where a > b, t-interval of the mean."""

    mean: float
    sd: float
    n: int
    n_better: int
    ci_low: float
    ci_high: float


def paired_summary(diffs: Sequence[float] | pd.Series | np.ndarray, confidence: float = 0.95) -> PairedSummary:
    """Mean, sample sd and Student-t interval of paired differences.

    The interval is ``mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n)``, treating the pairs as independent.

    Args:
        diffs: the differences (NaN dropped).
        confidence: interval coverage.

    Returns:
        the summary; mean is NaN without pairs, sd and the interval are NaN with fewer than 2.
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[~np.isnan(d)]
    n = int(d.size)
    mean = float(d.mean()) if n else math.nan
    sd = float(d.std(ddof=1)) if n > 1 else math.nan
    lo = hi = math.nan
    if n > 1:
        from scipy import stats

        half = float(stats.t.ppf(0.5 + confidence / 2, n - 1)) * sd / math.sqrt(n)
        lo, hi = mean - half, mean + half
    return PairedSummary(mean, sd, n, int((d > 0).sum()), lo, hi)


def paired_difference(cases_a: Path, cases_b: Path, column: str = "dsc_tumor") -> tuple[float, float, int, int]:
    """Per-volume difference ``a - b`` of one metric over the volumes both per-case CSVs hold.

    Args:
        cases_a: per-case CSV (``case`` column + metrics) of method a.
        cases_b: the same for method b.
        column: metric column.

    Returns:
        ``(mean, sample standard deviation, n volumes, n volumes where a > b)``; mean and sd are NaN without common
        volumes (sd also with one).

    Raises:
        ValueError: ``column`` missing from a CSV.
    """
    frames = []
    for path in (cases_a, cases_b):
        frame = read_cases(path)
        if column not in frame.columns:
            raise ValueError(f"{path}: no column {column!r}; columns: {sorted(frame.columns)}")
        frames.append(frame)
    s = paired_summary(paired_differences(frames[0], frames[1], column))
    return s.mean, s.sd, s.n, s.n_better


def build_table(
    cases: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    *,
    reference: str = REFERENCE,
    teacher: str = TEACHER,
    confidence: float = 0.95,
    labels: Mapping[str, str] | None = None,
) -> pd.DataFrame:
    """The experiment table: one row per arm, from per-case results of every arm and seed.

    Per arm: ``<metric>_mean`` / ``<metric>_std`` = mean and sample std over seeds of the per-seed mean over cases
    (NaN values, e.g. RVD without ground-truth tumor, left out); ``diff_mean``, ``diff_ci_low``, ``diff_ci_high``,
    ``n_pairs``, ``share_better``: tumor DSC of the arm minus the reference for the same case and seed, with a
    ``confidence`` t-interval over those pairs (:func:`paired_summary`); ``gap_closed`` =
    ``(arm - reference) / (teacher - reference)`` of the mean tumor DSC (NaN for the two references and when the
    teacher is not better); ``train_s`` (mean per seed) and ``wall_s`` (training + evaluation, all seeds) from
    ``runs``. ``table.attrs``: ``teacher_minus_student`` and ``notes`` (the WARNING line when the teacher is not
    better than the student, also logged).

    Args:
        cases: rows ``arm, seed, case`` + :data:`METRICS` (extra columns ignored).
        runs: rows ``arm, seed, train_s, eval_s`` (optional).
        reference: the arm every other is paired with (the student without KD).
        teacher: the teacher arm.
        confidence: coverage of the paired-difference interval.
        labels: ``{arm: method label}`` (default: :data:`ARMS` labels, else the arm name).

    Returns:
        the table, arms in :data:`ARMS` order (unknown arms after, in order of appearance).

    Raises:
        ValueError: a required column missing.
    """
    missing = [c for c in ("arm", "seed", "case", *METRICS) if c not in cases.columns]
    if missing:
        raise ValueError(f"cases: no column(s) {missing}; columns: {sorted(cases.columns)}")
    df = cases.copy()
    df["case"] = df["case"].astype(str)
    labels = {**{n: a.label for n, a in ARMS.items()}, **dict(labels or {})}
    present = list(dict.fromkeys(df["arm"]))
    order = [n for n in ARMS if n in present] + [n for n in present if n not in ARMS]
    per_seed = df.groupby(["arm", "seed"])[list(METRICS)].mean()
    counts = df.groupby(["arm", "seed"]).size()
    ref_rows = df[df["arm"] == reference]
    rows: list[dict[str, Any]] = []
    for arm in order:
        ps = per_seed.loc[arm]
        row: dict[str, Any] = {"arm": arm, "method": labels.get(arm, arm), "seeds": int(len(ps)), "cases_per_seed": int(counts.loc[arm].max())}
        for m in METRICS:
            row[f"{m}_mean"] = float(ps[m].mean())
            row[f"{m}_std"] = float(ps[m].std(ddof=1)) if len(ps) > 1 else math.nan
        if arm != reference and len(ref_rows):
            s = paired_summary(paired_differences(df[df["arm"] == arm], ref_rows, "dsc_tumor", ("seed", "case")), confidence)
            row.update(diff_mean=s.mean, diff_ci_low=s.ci_low, diff_ci_high=s.ci_high, n_pairs=s.n,
                       share_better=s.n_better / s.n if s.n else math.nan)  # fmt: skip
        else:
            row.update(diff_mean=math.nan, diff_ci_low=math.nan, diff_ci_high=math.nan, n_pairs=0, share_better=math.nan)
        rows.append(row)
    table = pd.DataFrame(rows)
    means = dict(zip(table["arm"], table["dsc_tumor_mean"]))
    gap = means.get(teacher, math.nan) - means.get(reference, math.nan)
    notes: list[str] = []
    if not gap > 0:  # NaN included
        msg = (
            f"the teacher is not better than the student (teacher - student = {gap:+.3f} mean tumor DSC): "
            "distillation has nothing to teach; gap closed is undefined."
        )
        logger.warning(msg)
        notes.append(f"**WARNING**: {msg}")
        table["gap_closed"] = math.nan
    else:
        table["gap_closed"] = (table["dsc_tumor_mean"] - means[reference]) / gap
        table.loc[table["arm"].isin([teacher, reference]), "gap_closed"] = math.nan
    if runs is not None and len(runs):
        r = runs.assign(wall=runs["train_s"].fillna(0) + runs["eval_s"].fillna(0)).groupby("arm")
        table["train_s"] = table["arm"].map(r["train_s"].mean())
        table["wall_s"] = table["arm"].map(r["wall"].sum())
    else:
        table["train_s"] = math.nan
        table["wall_s"] = math.nan
    table.attrs["teacher_minus_student"] = float(gap)
    table.attrs["notes"] = notes
    table.attrs["confidence"] = confidence
    return table


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def format_markdown(table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The table as markdown with its footnotes (``table.attrs`` notes first, then ``notes``).

    Args:
        table: from :func:`build_table`.
        notes: extra footnote lines (e.g. the training protocol).

    Returns:
        markdown text.
    """
    conf = int(round(100 * table.attrs.get("confidence", 0.95)))
    head = ["method", "arm", "seeds", "tumor DSC", "tumor RVD", "organ DSC", f"Δ tumor DSC vs student [{conf}% CI]",
            "pairs", "> student", "gap closed", "train s / seed", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(v: float, fmt: str, dash: bool = False) -> str:
        return "—" if dash else ("n/a" if v is None or math.isnan(v) else format(v, fmt))

    for r in table.to_dict("records"):
        ref = r["arm"] == REFERENCE
        if ref:
            diff = "—"
        elif r["n_pairs"] == 0:
            diff = "n/a"
        else:
            ci = "n/a" if math.isnan(r["diff_ci_low"]) else f"{r['diff_ci_low']:+.3f}, {r['diff_ci_high']:+.3f}"
            diff = f"{r['diff_mean']:+.3f} [{ci}]"
        gap_dash = r["arm"] in (TEACHER, REFERENCE)
        lines.append(
            "| " + " | ".join([
                str(r["method"]), str(r["arm"]), str(r["seeds"]),
                _pm(r["dsc_tumor_mean"], r["dsc_tumor_std"]), _pm(r["rvd_tumor_mean"], r["rvd_tumor_std"]),
                _pm(r["dsc_organ_mean"], r["dsc_organ_std"]), diff, "—" if ref else str(r["n_pairs"]),
                num(r["share_better"], ".0%", ref), num(r["gap_closed"], "+.2f", gap_dash),
                num(r["train_s"], ".0f"), num(r["wall_s"], ".0f"),
            ]) + " |"
        )  # fmt: skip
    gap = table.attrs.get("teacher_minus_student", math.nan)
    foot = [
        "",
        *table.attrs.get("notes", []),
        "Metrics: mean ± std over seeds of the per-seed mean over the held-out volumes (all slices; std needs 2+ "
        "seeds); RVD = (V_pred - V_gt) / V_gt, volumes without ground-truth tumor left out.",
        f"Δ: paired difference arm - student in tumor DSC for the same volume and seed, mean over all volume x seed "
        f"pairs with a {conf}% Student-t interval on those paired differences (n - 1 degrees of freedom, pairs treated "
        "as independent); '> student': share of pairs where the arm scored higher.",
        f"Gap closed = (arm - student) / (teacher - student) of the mean tumor DSC; teacher - student = {gap:+.3f}.",
        "The teacher is trained once (seed 0) and every KD arm of every seed distils from that checkpoint; its Δ pairs "
        "it with the seed-0 student.",
        *notes,
    ]
    return "\n".join(lines + foot) + "\n"


# --------------------------------------------------------------------------------------------- experiment


def _read_done(path: Path) -> dict[str, Any] | None:
    """The done marker when it is complete and its per-case CSV exists, else None."""
    try:
        done = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return done if done.get("cases_csv") and Path(done["cases_csv"]).is_file() else None


class _Tracker:
    """The experiment's MLflow parent run and queries on its children."""

    def __init__(self, uri: str, experiment_name: str) -> None:
        import mlflow

        self.uri = uri
        self.client = mlflow.MlflowClient(tracking_uri=uri)
        exp = self.client.get_experiment_by_name(experiment_name)
        if exp is not None and exp.lifecycle_stage != "active":
            raise RuntimeError(f"MLflow experiment {experiment_name!r} in {uri} is deleted; restore it or pass another --experiment-name.")
        if exp is None:
            location = None
            if uri.startswith("sqlite:///"):  # artifacts beside the database, as MONAI's MLFlowHandler does
                location = (Path(uri[len("sqlite:///"):]).parent / "mlruns").resolve().as_uri()
            exp_id = self.client.create_experiment(experiment_name, artifact_location=location)
        else:
            exp_id = exp.experiment_id
        self.experiment_id = exp_id
        self.parent_id = ""

    def open_parent(self, previous: str | None, params: Mapping[str, Any]) -> str:
        """Reopen ``previous`` (resume) when it exists in this store, else create the parent run; log ``params``."""
        from mlflow.entities import Param, RunTag
        from mlflow.exceptions import MlflowException

        run = None
        if previous:
            try:
                run = self.client.get_run(previous)
                self.client.update_run(previous, status="RUNNING")
            except MlflowException:
                run = None
        if run is None:
            name = f"experiment_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}"
            run = self.client.create_run(self.experiment_id, run_name=name, tags={"ctdistill_kind": "experiment"})
        self.parent_id = run.info.run_id
        logged = dict(run.data.params)
        values = {k: json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v) for k, v in params.items()}
        new = [Param(k, v) for k, v in values.items() if k not in logged]
        changed = [RunTag(f"resumed_{k}", v) for k, v in values.items() if k in logged and logged[k] != v]
        self.client.log_batch(self.parent_id, params=new, tags=changed)
        return self.parent_id

    def child_tags(self, arm: str, seed: int, stage: str) -> dict[str, str]:
        return {"mlflow.parentRunId": self.parent_id, "ctdistill_arm": arm, "ctdistill_seed": str(seed), "ctdistill_stage": stage}

    def children(self, arm: str | None = None, seed: int | None = None, stage: str | None = None) -> list[Any]:
        """Child runs of the parent (newest first), filtered by arm / seed / stage tags."""
        f = [f"tags.mlflow.parentRunId = '{self.parent_id}'"]
        for key, value in (("ctdistill_arm", arm), ("ctdistill_seed", seed), ("ctdistill_stage", stage)):
            if value is not None:
                f.append(f"tags.{key} = '{value}'")
        return list(self.client.search_runs([self.experiment_id], " and ".join(f), order_by=["attributes.start_time DESC"]))

    def fail_open(self, arm: str, seed: int) -> None:
        """Mark the arm's child runs still RUNNING (an interrupted attempt) as FAILED."""
        for r in self.children(arm, seed):
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, "FAILED")
                logger.info("MLflow run %s (%s seed %d, interrupted) marked FAILED", r.info.run_id, arm, seed)

    def run_id(self, arm: str, seed: int, stage: str) -> str:
        runs = self.children(arm, seed, stage)
        return runs[0].info.run_id if runs else ""

    def finish(self, table: pd.DataFrame, files: Sequence[Path], status: str = "FINISHED") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for r in table.to_dict("records"):
            for col in ("dsc_tumor_mean", "dsc_tumor_std", "rvd_tumor_mean", "dsc_organ_mean", "diff_mean",
                        "diff_ci_low", "diff_ci_high", "share_better", "gap_closed", "train_s", "wall_s"):  # fmt: skip
                v = r.get(col)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    metrics.append(Metric(f"{r['arm']}.{col}", float(v), now, 0))
        gap = table.attrs.get("teacher_minus_student", math.nan)
        if not math.isnan(gap):
            metrics.append(Metric("teacher_minus_student", float(gap), now, 0))
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.parent_id, metrics=metrics[i : i + 500])
        for f in files:
            self.client.log_artifact(self.parent_id, str(f))
        self.client.set_terminated(self.parent_id, status)


def _prepare_data(cfg: ExperimentConfig, out: Path) -> Path:
    """The dataset every arm reads: ``dataset_dir``, or a cohort synthesized into ``<out>/data``."""
    if cfg.dataset_dir is not None:
        return Path(cfg.dataset_dir).resolve()
    data = out / "data"
    t0 = time.perf_counter()
    if cfg.from_labels is not None:
        fn = _synthesize_from_labels_fn()
        params = inspect.signature(fn).parameters
        kw = {k: v for k, v in dict(task=cfg.task, cases=cfg.cases, size=cfg.size, out=data, seed=cfg.data_seed).items() if k in params}
        fn(Path(cfg.from_labels).resolve(), **kw)
        logger.info("synthesized CT from the label maps in %s (%.1f s) -> %s", cfg.from_labels, time.perf_counter() - t0, data)
    else:
        from pipelines.synthesize import synthesize

        n = cfg.cases or DEFAULT_CASES
        synthesize(cfg.task, cases=n, size=cfg.size, out=data, seed=cfg.data_seed)
        logger.info("synthesized %d %s cases (%d^2) in %.1f s -> %s", n, cfg.task, cfg.size, time.perf_counter() - t0, data)
    return data


def _write_split(cfg: ExperimentConfig, data: Path, out: Path) -> Path:
    """``<out>/splits.json``: the one split of every arm (written once; the user's own split file is copied)."""
    from pipelines.engine import resolve_splits

    target = out / "splits.json"
    src = Path(resolve_splits(str(data), str(out), seed=cfg.data_seed, task=cfg.task))
    if src.resolve() != target.resolve():
        atomic_copy(src, target)
    return target


def _recipe_overrides(cfg: ExperimentConfig, arm: Arm) -> dict[str, Any]:
    """Training-recipe knobs set for this arm (only those given; the bundles' defaults otherwise)."""
    if arm.name == TEACHER:
        pairs = (("warmup_epochs", cfg.teacher_warmup_epochs), ("grad_clip", cfg.teacher_grad_clip))
    elif arm.distils:
        pairs = (("kd_warmup_epochs", cfg.kd_warmup_epochs),)
    else:
        pairs = ()
    return {k: v for k, v in pairs if v is not None}


def _network_kwargs(cfg: ExperimentConfig, arm: Arm) -> dict[str, Any]:
    if arm.role == "unetpp_teacher":
        f = cfg.teacher_features
        return {"features": f if isinstance(f, str) else list(f)}
    kw: dict[str, Any] = {}
    if cfg.student_base_width is not None:
        kw["base_width"] = cfg.student_base_width
    if cfg.student_decoder_channels is not None:
        kw["decoder_channels"] = list(cfg.student_decoder_channels)
    return kw


def _mlflow_uri(cfg: ExperimentConfig, out: Path) -> str:
    uri = cfg.tracking_uri or f"sqlite:///{out / 'mlruns.db'}"
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env and env != uri:
        # MONAI's MLFlowHandler lets the environment win; the parent run must live in the same store as its children
        logger.warning("MLFLOW_TRACKING_URI=%s overrides %s for every run of this experiment", env, uri)
        return env
    return uri


def run_experiment(cfg: ExperimentConfig) -> pd.DataFrame:
    """Run every arm and seed through the bundles, evaluate them, write and return the table.

    Args:
        cfg: the configuration (checked first with :func:`validate_config`).

    Returns:
        the table (:func:`build_table`); ``cases.csv``, ``runs.csv``, ``table.csv``, ``table.md`` are written to
        ``cfg.out`` and logged, with the summary metrics, on the MLflow parent run.

    Raises:
        ConfigError: an invalid knob (before any work).
        RuntimeError: the bundles are not found.
        Exception: whatever a bundle raises (the parent run and the arm's open child runs are marked FAILED; the
            finished arms stay finished for ``resume``).
    """
    names = validate_config(cfg)
    out = Path(cfg.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "experiment.json"
    previous = json.loads(state_path.read_text()) if cfg.resume and state_path.is_file() else {}
    from pipelines.engine import run_check_dataset
    from pipelines.engine.tracking import file_sha256

    splits = out / "splits.json"
    if previous and splits.is_file() and file_sha256(splits) == previous.get("splits_sha256"):
        data = Path(previous["data_dir"])
        logger.info("resume: the data in %s and the split %s of the first run are reused", data, splits)
    else:
        data = _prepare_data(cfg, out)
        splits = _write_split(cfg, data, out)
    split_sha = file_sha256(splits)
    t0 = time.perf_counter()
    report = run_check_dataset(splits)  # once for every arm; the bundles skip their copy (check_data false)
    logger.info("dataset check of %s: clean (%d line(s), %.1f s)", splits, len(report), time.perf_counter() - t0)
    counts = {k: len(v) for k, v in json.loads(splits.read_text()).items() if isinstance(v, list)}
    uri = _mlflow_uri(cfg, out)
    tracker = _Tracker(uri, cfg.experiment_name)
    teacher_epochs = cfg.teacher_epochs or cfg.epochs
    params = {
        "methods": ",".join(n for n in names if n not in (TEACHER, REFERENCE)),
        "arms": ",".join(names),
        "seeds": ",".join(map(str, cfg.seeds)),
        "epochs": cfg.epochs,
        "teacher_epochs": teacher_epochs,
        "in_plane_size": cfg.size,
        "batch_size": cfg.batch_size,
        "samples_per_volume": cfg.samples_per_volume,
        "val_interval": cfg.val_interval,
        "lr": cfg.lr,
        "task": cfg.task,
        "teacher_features": cfg.teacher_features,
        "student_base_width": cfg.student_base_width,
        "student_decoder_channels": cfg.student_decoder_channels,
        "teacher_ckpt": str(cfg.teacher_ckpt or ""),
        "data": "dataset_dir" if cfg.dataset_dir else ("from_labels" if cfg.from_labels else f"synthetic ({cfg.cases or DEFAULT_CASES} cases)"),
        "data_seed": cfg.data_seed,
        "split_counts": counts,
        "splits_sha256": split_sha,
        "preset": cfg.preset,
    }
    parent = tracker.open_parent(previous.get("parent_run_id"), params)
    atomic_write_json(
        state_path,
        {"settings": _settings(cfg), "parent_run_id": parent, "tracking_uri": uri, "experiment_name": cfg.experiment_name,
         "data_dir": str(data), "splits_sha256": split_sha, "config": asdict(cfg)},
        default=str,
    )  # fmt: skip
    logger.info("MLflow parent run %s in %s (experiment %s)", parent, uri, cfg.experiment_name)

    base = dict(
        dataset_dir=str(data), splits_file=str(splits), task=cfg.task, in_plane_size=[cfg.size, cfg.size],
        lr=cfg.lr, samples_per_volume=cfg.samples_per_volume, batch_size=cfg.batch_size, val_interval=cfg.val_interval,
        num_workers=cfg.num_workers, sw_batch_size=cfg.sw_batch_size, check_data=False, tracking_uri=uri,
        experiment_name=cfg.experiment_name,
    )  # fmt: skip
    teacher_dir = out / "runs" / TEACHER / f"seed{TEACHER_SEED}"
    teacher_ckpt = Path(cfg.teacher_ckpt).resolve() if cfg.teacher_ckpt else teacher_dir / "checkpoints" / "best.pt"
    plan = [(ARMS[TEACHER], TEACHER_SEED)] + [(ARMS[n], s) for s in cfg.seeds for n in names if n != TEACHER]
    done: list[dict[str, Any]] = []
    try:
        for i, (arm, seed) in enumerate(plan, 1):
            logger.info("[%d/%d] %s, seed %d", i, len(plan), arm.name, seed)
            done.append(_run_arm(arm, seed, cfg, out, base, teacher_ckpt, teacher_epochs, tracker))
        cases, runs = _collect(done)
        table = build_table(cases, runs)
        protocol = (
            f"Protocol: every student arm {cfg.epochs} epochs, batch {cfg.batch_size} slices ({cfg.samples_per_volume} per "
            f"volume), {cfg.size}^2, lr {cfg.lr:g}, one split ({counts.get('training', 0)} training / "
            f"{counts.get('validation', 0)} validation / {counts.get('test', 0)} test volumes, sha256 {split_sha[:12]}); "
            f"teacher {teacher_epochs} epochs" + (f" (reused: {cfg.teacher_ckpt})" if cfg.teacher_ckpt else "") + "; seeds "
            + ", ".join(map(str, cfg.seeds)) + "."
        )
        md = format_markdown(table, [protocol])
        files = [out / "cases.csv", out / "runs.csv", out / "table.csv", out / "table.md", state_path]
        cases.to_csv(files[0], index=False)
        runs.to_csv(files[1], index=False)
        table.to_csv(files[2], index=False)
        files[3].write_text(md)
        tracker.finish(table, files)
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.client.set_terminated(tracker.parent_id, "FAILED")
        raise
    logger.info("table written to %s (MLflow parent run %s)", out / "table.md", parent)
    return table


def _run_arm(
    arm: Arm,
    seed: int,
    cfg: ExperimentConfig,
    out: Path,
    base: Mapping[str, Any],
    teacher_ckpt: Path,
    teacher_epochs: int,
    tracker: _Tracker,
) -> dict[str, Any]:
    """Train (unless a reused teacher) and evaluate one arm and seed; return its done marker."""
    run_dir = out / "runs" / arm.name / f"seed{seed}"
    marker = run_dir / "done.json"
    if cfg.resume:
        finished = _read_done(marker)
        if finished is not None:
            logger.info("%s seed %d: finished earlier (%s), skipped", arm.name, seed, marker)
            return finished
    if run_dir.exists():
        logger.info("%s seed %d: clearing the unfinished attempt in %s (it is run again from scratch)", arm.name, seed, run_dir)
        tracker.fail_open(arm.name, seed)
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True)
    reused = arm.name == TEACHER and cfg.teacher_ckpt is not None
    ckpt = teacher_ckpt if reused else run_dir / "checkpoints" / "best.pt"
    common = dict(base, output_dir=str(run_dir), seed=seed)
    train_s = math.nan
    try:
        if not reused:
            kw = dict(common, epochs=teacher_epochs if arm.name == TEACHER else cfg.epochs, network_kwargs=_network_kwargs(cfg, arm), **arm.overrides)
            if arm.distils:
                kw["teacher_ckpt"] = str(teacher_ckpt)
            kw.update(_recipe_overrides(cfg, arm))
            t0 = time.perf_counter()
            run_bundle("training", arm.role, "train", run_tags=tracker.child_tags(arm.name, seed, "train"), **kw)
            train_s = time.perf_counter() - t0
        ev = {k: common[k] for k in ("dataset_dir", "splits_file", "output_dir", "seed", "num_workers", "sw_batch_size",
                                     "check_data", "tracking_uri", "experiment_name")}  # fmt: skip
        t0 = time.perf_counter()
        run_bundle("evaluating", arm.role, "evaluate", checkpoint=str(ckpt), run_tags=tracker.child_tags(arm.name, seed, "evaluate"), **ev)
        eval_s = time.perf_counter() - t0
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.fail_open(arm.name, seed)
        raise
    record = {
        "arm": arm.name,
        "seed": seed,
        "role": arm.role,
        "method": arm.label,
        "cases_csv": str(run_dir / "eval" / "cases.csv"),
        "summary_csv": str(run_dir / "eval" / "summary.csv"),
        "checkpoint": str(ckpt),
        "teacher_ckpt": str(teacher_ckpt) if arm.distils else "",
        "epochs": 0 if reused else (teacher_epochs if arm.name == TEACHER else cfg.epochs),
        "train_s": train_s,
        "eval_s": eval_s,
        "train_run_id": "" if reused else tracker.run_id(arm.name, seed, "train"),
        "eval_run_id": tracker.run_id(arm.name, seed, "evaluate"),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not Path(record["cases_csv"]).is_file():
        raise RuntimeError(f"{arm.name} seed {seed}: the evaluation wrote no {record['cases_csv']}.")
    atomic_write_json(marker, record, default=str)
    trained = "not trained (reused checkpoint)" if reused else f"train {train_s:.1f} s"
    logger.info("%s seed %d: done (%s, evaluation %.1f s)", arm.name, seed, trained, eval_s)
    return record


def _collect(done: Sequence[Mapping[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    frames = []
    for d in done:
        c = read_cases(d["cases_csv"])
        c.insert(0, "case", c.pop("case"))
        for i, (k, v) in enumerate((("arm", d["arm"]), ("seed", int(d["seed"])), ("role", d["role"]))):
            c.insert(i, k, v)
        frames.append(c)
    cases = pd.concat(frames, ignore_index=True)
    keep = ("arm", "seed", "role", "method", "epochs", "train_s", "eval_s", "checkpoint", "teacher_ckpt", "train_run_id", "eval_run_id", "cases_csv")
    runs = pd.DataFrame([{k: d.get(k) for k in keep} for d in done])
    runs["train_s"] = pd.to_numeric(runs["train_s"], errors="coerce")
    runs["eval_s"] = pd.to_numeric(runs["eval_s"], errors="coerce")
    return cases, runs


# --------------------------------------------------------------------------------------------- CLI


def _seed_list(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(s) for s in text.split(",") if s.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(f"comma-separated integers expected, got {text!r}") from e


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m pipelines.experiment",
        description=__doc__.split("\n\n")[0],
        epilog="Presets: toy (default; CPU, the demo's sizes) and paper (UNet++ 'paper' widths, default ResNet18 student, "
        "256^2, 120 epochs; for a GPU). An explicit knob wins over the preset.",
    )
    a = p.add_argument
    a("--out", type=Path, default=ExperimentConfig.out, help="output folder (default %(default)s)")
    a("--methods", default=",".join(DEFAULT_METHODS),
      help=f"comma-separated arms besides the always-run teacher and student: {', '.join(SELECTABLE[1:])}, or all "
           "(default %(default)s)")  # fmt: skip
    g = p.add_mutually_exclusive_group()
    g.add_argument("--seeds", type=int, default=None, help="run every student arm with seeds 0..N-1 (default 3)")
    g.add_argument("--seed-list", type=_seed_list, default=None, help="explicit seeds, e.g. 0,3,7")
    a("--preset", choices=sorted(PRESETS), default="toy", help="sizes preset (default %(default)s)")
    a("--dataset_dir", "--dataset-dir", dest="dataset_dir", type=Path, default=None,
      help="data in any layout the bundles read (KiTS19, LiTS, nnU-Net/MSD, CSV, splits JSON); default: a synthetic cohort")  # fmt: skip
    a("--from-labels", type=Path, default=None, help="synthesize CT from the real label maps in this folder "
      "(pipelines.synthesize.synthesize_from_labels)")  # fmt: skip
    a("--task", choices=("kits", "lits"), default="kits", help="HU window, split preset and synthetic anatomy (default %(default)s)")
    a("--cases", type=int, default=None, help="synthetic cases (default 24, or every label map of --from-labels; 20%% held out for the table)")
    a("--size", type=int, default=None, help="in-plane size, divisible by 32 (toy 64, paper 256)")
    a("--data-seed", type=int, default=0, help="seed of the synthetic cohort and of the split (default %(default)s)")
    a("--epochs", type=int, default=None, help="epochs of every student arm (toy 150, paper 120)")
    a("--teacher-epochs", type=int, default=None, help="epochs of the teacher (default: --epochs)")
    a("--samples-per-volume", type=int, default=None, help="2.5D slices per training volume per epoch (default 4)")
    a("--batch-size", type=int, default=None, help="training batch in slices (default 8)")
    a("--val-interval", type=int, default=None, help="validate every N epochs (toy 10, paper 1)")
    a("--lr", type=float, default=None, help="learning rate (default 1e-3)")
    a("--teacher-features", nargs="+", metavar="F", default=None, help="UNet++ widths per level or a preset name (toy 12 24 48 96 192, paper: paper)")
    a("--student-width", type=int, default=None, help="ResNet18 student base width (toy 16; paper: the network default 64)")
    a("--student-decoder", type=int, nargs=5, metavar="C", default=None, help="ResNet18 decoder widths at strides 16 8 4 2 1 (toy 32 24 16 16 16)")
    a("--teacher-ckpt", type=Path, default=None, help="reuse this trained UNet++ teacher (evaluated, not trained)")
    a("--tracking-uri", default=None, help="MLflow store (default sqlite:///<out>/mlruns.db)")
    a("--experiment-name", default=ExperimentConfig.experiment_name, help="MLflow experiment (default %(default)s)")
    a("--num-workers", type=int, default=None, help="DataLoader workers (toy 0, paper 4)")
    a("--sw-batch-size", type=int, default=None, help="slices per inference batch (toy 32, paper 16)")
    a("--teacher-warmup-epochs", type=int, default=None, help="teacher lr warm-up epochs (default: the bundle's, 5)")
    a("--teacher-grad-clip", type=float, default=None, help="teacher gradient-norm clip, 0 = off (default: the bundle's, 1.0)")
    a("--kd-warmup-epochs", type=float, default=None, help="ramp the distillation weight over N epochs in every KD arm (default 0: the papers' full weight)")
    a("--resume", action="store_true", help="continue an existing --out: skip finished arms, rerun unfinished ones from scratch (their folders are cleared)")
    return p


def config_from_args(args: argparse.Namespace) -> ExperimentConfig:
    """The :class:`ExperimentConfig` of parsed CLI arguments (preset values under explicit knobs).

    Raises:
        ConfigError: an invalid ``--teacher-features`` or ``--preset``.
    """
    explicit: dict[str, Any] = {}
    if args.teacher_features is not None:
        tf = args.teacher_features
        if len(tf) == 1 and not tf[0].lstrip("-").isdigit():
            explicit["teacher_features"] = tf[0]
        else:
            try:
                explicit["teacher_features"] = tuple(int(x) for x in tf)
            except ValueError as e:
                raise ConfigError("--teacher-features", f"widths must be integers or one preset name, got {tf}.") from e
    for key, name in (("cases", "cases"), ("size", "size"), ("epochs", "epochs"), ("teacher_epochs", "teacher_epochs"),
                      ("samples_per_volume", "samples_per_volume"), ("batch_size", "batch_size"),
                      ("val_interval", "val_interval"), ("lr", "lr"), ("student_width", "student_base_width"),
                      ("num_workers", "num_workers"), ("sw_batch_size", "sw_batch_size"),
                      ("teacher_warmup_epochs", "teacher_warmup_epochs"), ("teacher_grad_clip", "teacher_grad_clip"),
                      ("kd_warmup_epochs", "kd_warmup_epochs")):  # fmt: skip
        v = getattr(args, key)
        if v is not None:
            explicit[name] = v
    if args.student_decoder is not None:
        explicit["student_decoder_channels"] = tuple(args.student_decoder)
    seeds = args.seed_list if args.seed_list is not None else tuple(range(args.seeds if args.seeds is not None else 3))
    if args.seeds is not None and args.seeds < 1:
        raise ConfigError("--seeds", f"must be an integer >= 1, got {args.seeds}.")
    return preset_config(
        args.preset,
        out=args.out,
        methods=tuple(m.strip() for m in args.methods.split(",") if m.strip()),
        seeds=seeds,
        dataset_dir=args.dataset_dir,
        from_labels=args.from_labels,
        task=args.task,
        data_seed=args.data_seed,
        teacher_ckpt=args.teacher_ckpt,
        tracking_uri=args.tracking_uri,
        experiment_name=args.experiment_name,
        resume=args.resume,
        **explicit,
    )


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m pipelines.experiment --methods hlfd,hinton --seeds 3 --out experiment_out``."""
    p = _parser()
    args = p.parse_args(argv)
    try:
        cfg = config_from_args(args)
        validate_config(cfg)
    except ConfigError as e:
        p.error(str(e))
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from pipelines.engine.knobs import install_excepthook

    install_excepthook()  # a project error (bad data: a NaN voxel) is its message, not a traceback (CTDISTILL_TRACEBACK=1)
    t0 = time.perf_counter()
    run_experiment(cfg)
    out = Path(cfg.out).resolve()
    print()
    print((out / "table.md").read_text())
    print(f"total {time.perf_counter() - t0:.0f} s on {os.cpu_count()} CPU cores; outputs in {out}")
    print(f"MLflow: mlflow ui --backend-store-uri {_mlflow_uri(cfg, out)}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
