"""The HLFD paper's Table 1 as one command: teacher, student without KD, HLFD and the KD baselines, over seeds.

``python -m pipelines.experiment --methods hlfd,hinton --seeds 3 --out experiment_out`` (add ``--folds 5`` for
5-fold cross-validation).

Every arm runs through its bundle exactly as a user runs it (``monai.bundle.run("training", config_file=
"bundles/<role>/configs/train.yaml", ...)`` then ``evaluating`` with ``evaluate.yaml``, in this process) into
``<out>/runs/<arm>/seed<k>/`` (``<out>/runs/<arm>/fold<f>/seed<k>/`` with ``--folds``):

- ``teacher``: ``bundles/unetpp_teacher``, trained ONCE per split (seed 0; or ``--teacher-ckpt`` reuses a trained
  one, which is evaluated too); every KD arm of every seed distils from that one checkpoint;
- ``student``: ``bundles/resnet18_student`` (no KD), once per seed: the reference of every comparison;
- ``hlfd``: ``bundles/hlfd``; ``hinton``, ``skd``, ``imf``, ``emkd``, ``hifd``, ``cwd`` (channel-wise distillation,
  Shu et al. ICCV 2021), ``dist`` (DIST, Huang et al. NeurIPS 2022): ``bundles/kd_baselines`` with ``--kd_method``;
  ``hinton_masked``: Hinton KD with ``--kd_mask teacher_correct``; ``hlfd_balanced`` and ``hlfd_wo_ifd_balanced``:
  HLFD (without IFD) with ``--kd_balance grad`` (``--kd-balance-ratio`` sets their ``--kd_balance_ratio``);
  ``hlfd_ufd``, ``hlfd_ifd``, ``hlfd_upd``, ``hlfd_ipd``: HLFD with only that term on, ``hlfd_wo_<term>`` without
  it (``--kd_weights``).

Equal epochs and equal data for every student arm: one dataset, ONE split file per split (``<out>/splits.json``,
written once before any arm runs and passed to every bundle as ``--splits_file``), the same epochs, batch, samples
per volume, sizes and learning rate. The teacher may train longer (``--teacher-epochs``). The dataset is checked
once (``pipelines.check_dataset``) before any arm runs; the bundles then skip their own copy of that check.

``--folds K``: K-fold cross-validation. The labelled cases are shuffled (``--data-seed``) and dealt into K folds;
split k (``<out>/folds/fold<k>.json``, the bundles' split format) has fold k's cases as ``test``, 20 % of the
others as ``validation`` and the rest as ``training``; ``<out>/folds.json`` records every case's fold and every
split file's SHA-256. The teacher is trained per fold and every arm and seed runs per fold, so every labelled volume
is a test volume exactly once (30 label maps: 30 paired test volumes).

Outputs in ``--out``: ``cases.csv`` (one row per arm, [fold,] seed and test volume, every column of the evaluation's
per-case CSV), ``runs.csv`` (one row per run: wall times, best validation tumor DSC, checkpoint, MLflow run ids),
``table.csv`` and ``table.md`` (per arm: mean ± std over seeds of the per-seed mean tumor DSC, tumor RVD and organ
DSC; against the student, per TEST VOLUME with each volume's scores averaged over seeds
(:mod:`pipelines.paired_stats`): the mean paired tumor-DSC difference with a 95 % t-interval over volumes, an exact
Wilcoxon signed-rank p, wins / ties / losses, the per-seed mean differences listed apart, bootstrap intervals
(volumes resampled, hierarchically within resampled folds) of the difference and of the share of the
teacher-student gap closed; the validation gate; wall times).

Validation gate: after every KD run, its best validation tumor DSC (``val_history.csv``, what chose its
``best.pt``) is compared with the student's of the same fold and seed; a lower one is logged as a WARNING
"distillation lost on validation", listed under the table and in its ``val vs student`` column, and recorded on the
MLflow parent run (metrics ``<arm>.val_vs_student``, ``<arm>.val_lost``, tag ``validation_gate``).

A reused teacher (``--teacher-ckpt``) is refused, before any training, when the split it was trained on (the
``splits.json`` beside it whose SHA-256 is the ``splits_sha256`` it records) lists a test case of the experiment
(of any fold) among its training or validation cases, or when that cannot be told (:func:`check_teacher_split`).

MLflow: one store (``sqlite:///<out>/mlruns.db`` or ``--tracking-uri``), one PARENT run per experiment (its
parameters, the summary metrics, the table files as artifacts); every bundle run is its CHILD: the bundles' knob
``--run_tags`` sets ``mlflow.parentRunId`` (plus ``ctdistill_arm``, ``ctdistill_seed``, ``ctdistill_stage`` and,
with folds, ``ctdistill_fold``) on the runs MONAI's MLflow handler creates.

``--resume`` skips every run whose evaluation finished (``done.json``, written atomically after the evaluation, names
its per-case CSV); a run that did not finish is run again from scratch (its folder is cleared; its MLflow runs left
open are marked FAILED). Without ``--resume`` an ``--out`` holding finished arms is refused; with it, other settings
(``--folds`` included) are refused.
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
from pipelines.paired_stats import (
    BOOTSTRAP_RESAMPLES,
    BOOTSTRAP_SEED,
    TIE_TOLERANCE,
    compare_volumes,
    per_seed_differences,
    per_volume,
    t_interval,
)

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
    "best_validation",
    "build_table",
    "check_teacher_split",
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
    "validation_gate",
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

#: the columns that identify a test volume (``fold`` is 0 without ``--folds``)
VOLUME: tuple[str, ...] = ("fold", "case")


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
        # the strongest segmentation KD: channel-wise distillation (Shu et al., ICCV 2021) and DIST (Huang et al.,
        # NeurIPS 2022)
        Arm("cwd", "kd_baselines", "CWD", {"kd_method": "cwd"}),
        Arm("dist", "kd_baselines", "DIST", {"kd_method": "dist"}),
        # Hinton KD on the pixels the teacher gets right only, averaged per class (--kd_mask teacher_correct)
        Arm("hinton_masked", "kd_baselines", "Hinton KD, teacher-correct mask", {"kd_method": "hinton", "kd_mask": "teacher_correct"}),
        Arm("hlfd", "hlfd", "HLFD"),
        # every KD term weighted to a fixed ratio of the segmentation gradient on the student encoder (--kd_balance grad)
        Arm("hlfd_balanced", "hlfd", "HLFD, gradient-balanced", {"kd_balance": "grad"}),
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
        Arm("hlfd_wo_ifd_balanced", "hlfd", "HLFD without IFD, gradient-balanced", {"kd_weights": _without("ifd"), "kd_balance": "grad"}),
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
        folds: K-fold cross-validation (None: one split). The labelled cases are partitioned into K folds (seeded by
            ``data_seed``); fold k's cases are the TEST cases of fold k, 20 % of the others validate, the rest train;
            the teacher and every arm and seed run per fold, so every volume is tested exactly once.
        kd_balance_ratio: ``--kd_balance_ratio`` of the arms with ``--kd_balance grad`` (None: the bundle's default).
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
    folds: int | None = None
    kd_balance_ratio: float | None = None


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
    return sorted([*out.glob("runs/*/seed*/done.json"), *out.glob("runs/*/fold*/seed*/done.json")])


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
        "folds": cfg.folds,
        "kd_balance_ratio": cfg.kd_balance_ratio,
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
    if cfg.kd_balance_ratio is not None and not (math.isfinite(cfg.kd_balance_ratio) and cfg.kd_balance_ratio > 0):
        raise ConfigError("--kd-balance-ratio", f"must be a number > 0, got {cfg.kd_balance_ratio!r}.")
    if cfg.folds is not None:
        _positive("--folds", cfg.folds, minimum=2)
        if cfg.dataset_dir is None and cfg.from_labels is None:
            _check_fold_count(cfg.folds, cfg.cases or DEFAULT_CASES)
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


def _case_ids(splits_file: str | os.PathLike, sections: Sequence[str], labelled: bool = False) -> set[str]:
    """The case ids (``case``, else the id of the image path) of every entry of ``sections`` (with a label only)."""
    from pipelines.engine.metrics import case_id

    data = json.loads(Path(splits_file).read_text())
    entries = [e for s in sections for e in data.get(s) or [] if isinstance(e, dict) and e.get("image")]
    return {str(e.get("case") or case_id(e["image"])) for e in entries if e.get("label") or not labelled}


def _test_case_ids(splits_file: str | os.PathLike) -> set[str]:
    """The cases the evaluation bundles evaluate (``eval_sections``: ``test``, else ``validation``; labelled)."""
    return _case_ids(splits_file, ("test",), labelled=True) or _case_ids(splits_file, ("validation",), labelled=True)


def check_teacher_split(teacher_ckpt: str | os.PathLike, split_files: Sequence[str | os.PathLike]) -> None:
    """Refuse a reused teacher that saw a test case of the experiment (trained or validated on it).

    What the teacher saw is read from the split saved beside its checkpoint (``splits.json``, the copy
    :class:`~pipelines.engine.checkpoint.TrainCheckpointer` writes) when its SHA-256 is the ``splits_sha256`` the
    checkpoint records (or the checkpoint records none): its ``training`` and ``validation`` case ids. Cases are
    matched by id (``case``, e.g. ``case_00012``), so the same patient in another copy of the data is caught. A
    checkpoint whose recorded split is exactly an experiment split (same SHA-256) shares its training/test
    partition and passes without the side file. With ``--folds`` every fold's test cases are checked.

    Args:
        teacher_ckpt: the ``--teacher-ckpt`` file.
        split_files: the experiment's split file(s) (one per fold); evaluation reads their ``test`` section (or
            ``validation`` when ``test`` has no labelled entry, as the evaluation bundles do).

    Raises:
        ConfigError: (``--teacher-ckpt: ...``, one line) the teacher's cases overlap a test set (naming the cases and
            the fold), or what it was trained on cannot be told (no matching split beside it).
    """
    from pipelines.engine import BundleInputError
    from pipelines.engine.checkpoint import load_checkpoint, sidecar
    from pipelines.engine.tracking import file_sha256

    p = Path(teacher_ckpt)
    try:
        recorded = str(load_checkpoint(p).get("splits_sha256") or "")
    except BundleInputError as e:
        raise ConfigError("--teacher-ckpt", str(e)) from e
    side = Path(sidecar(p, "splits.json"))
    seen = _case_ids(side, ("training", "validation")) if side.is_file() and (not recorded or file_sha256(side) == recorded) else None
    folds = len(split_files) > 1
    for k, f in enumerate(split_files):
        where = f" of fold {k}" if folds else ""
        if seen is None:
            if recorded and recorded == file_sha256(f):
                continue  # trained on this very split: its training/validation cases are this split's
            raise ConfigError(
                "--teacher-ckpt",
                f"{p}: cannot tell which cases it was trained on (its recorded split sha256 {recorded[:12] or 'none'} is not "
                f"the experiment's{where} and no splits.json with that hash lies beside it), so it may have seen the test "
                "cases; put the split it was trained on beside it as splits.json, or let the experiment train the teacher (no --teacher-ckpt).",
            )
        overlap = sorted(seen & _test_case_ids(f))
        if overlap:
            names = ", ".join(overlap[:10]) + (f" and {len(overlap) - 10} more" if len(overlap) > 10 else "")
            raise ConfigError(
                "--teacher-ckpt",
                f"{p} was trained or validated on {len(overlap)} test case(s){where} of this experiment ({names}; its split "
                f"{side}): distilling from it leaks the test set. Let the experiment train the teacher (no --teacher-ckpt) "
                "or reuse one trained without these cases.",
            )


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
    """Mean, sample sd and Student-t interval of paired differences that ARE independent (one per volume).

    The interval is ``mean ± t_{(1+confidence)/2, n-1} * sd / sqrt(n)``. Several seeds of the same volume are not
    independent pairs: average them per volume first (:func:`build_table` does, :mod:`pipelines.paired_stats`).

    Args:
        diffs: the differences (NaN dropped).
        confidence: interval coverage.

    Returns:
        the summary; mean is NaN without pairs, sd and the interval are NaN with fewer than 2.
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[~np.isnan(d)]
    mean, sd, lo, hi = t_interval(d, confidence)
    return PairedSummary(mean, sd, int(d.size), int((d > 0).sum()), lo, hi)


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


def validation_gate(runs: pd.DataFrame, *, reference: str = REFERENCE, tol: float = TIE_TOLERANCE) -> pd.DataFrame:
    """The runner's validation gate: every distilling run's best validation score against the student's.

    A KD run is compared with the run of the reference arm (the student without KD) of the same fold and seed: both
    chose ``best.pt`` by the best validation tumor DSC (``val_history.csv``), so a KD run whose best is lower
    lost on validation, whatever the test set says.

    Args:
        runs: rows ``arm, seed, best_val`` (+ ``fold``, ``role``; arms with role ``hlfd``/``kd_baselines``, or
            with an :data:`ARMS` entry that distils, are gated).
        reference: the reference arm.
        tol: a KD best lower by at least this much is a loss.

    Returns:
        one row per gated run: ``arm, fold, seed, best_val, reference_val, val_diff, lost`` (``lost`` False when a
        value is missing).
    """
    cols = ["arm", "fold", "seed", "best_val", "reference_val", "val_diff", "lost"]
    if runs is None or not len(runs) or "best_val" not in runs.columns:
        return pd.DataFrame(columns=cols)
    r = runs.copy()
    if "fold" not in r.columns:
        r["fold"] = 0
    r["fold"] = r["fold"].fillna(0).astype(int)
    r["best_val"] = pd.to_numeric(r["best_val"], errors="coerce")
    ref = r[r["arm"] == reference].set_index(["fold", "seed"])["best_val"]
    distils = r["arm"].map(lambda a: ARMS[a].distils if a in ARMS else False)
    if "role" in r.columns:
        distils |= r["role"].isin(("hlfd", "kd_baselines"))
    kd = r[distils & (r["arm"] != reference)]
    rows = []
    for x in kd.to_dict("records"):
        rv = float(ref.get((x["fold"], x["seed"]), math.nan))
        diff = float(x["best_val"]) - rv
        rows.append({"arm": x["arm"], "fold": x["fold"], "seed": x["seed"], "best_val": float(x["best_val"]),
                     "reference_val": rv, "val_diff": diff, "lost": bool(diff <= -tol)})  # fmt: skip
    return pd.DataFrame(rows, columns=cols)


def _gate_message(g: Mapping[str, Any], folds: bool) -> str:
    where = (f"fold {g['fold']} " if folds else "") + f"seed {g['seed']}"
    return (f"distillation lost on validation: {g['arm']} {where} best validation tumor DSC {g['best_val']:.4f} < "
            f"student {g['reference_val']:.4f} ({g['val_diff']:+.4f})")  # fmt: skip


def _seed_diffs_text(d: Mapping[int, float]) -> str:
    return "; ".join(f"{s}: {v:+.4f}" for s, v in d.items())


def build_table(
    cases: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    *,
    reference: str = REFERENCE,
    teacher: str = TEACHER,
    confidence: float = 0.95,
    labels: Mapping[str, str] | None = None,
    tol: float = TIE_TOLERANCE,
    resamples: int = BOOTSTRAP_RESAMPLES,
    bootstrap_seed: int = BOOTSTRAP_SEED,
) -> pd.DataFrame:
    """The experiment table: one row per arm, from per-case results of every arm, fold and seed.

    Per arm: ``<metric>_mean`` / ``<metric>_std`` = mean and sample std over seeds of the per-seed mean over the test
    volumes (all folds pooled; NaN values, e.g. RVD without ground-truth tumor, left out). Against the reference,
    per TEST VOLUME (``fold, case``; each method's score of a volume averaged over its seeds first,
    :mod:`pipelines.paired_stats`): ``n_volumes``, ``diff_mean``, ``diff_sd``, ``diff_ci_low``/``diff_ci_high``
    (``confidence`` t-interval over volumes), ``wilcoxon_p`` (exact signed-rank), ``wins``/``ties``/``losses``
    (tie: ``|diff| < tol``), ``diff_boot_low``/``diff_boot_high`` (percentile bootstrap over volumes, hierarchical
    over folds), ``diff_per_seed`` (text ``"seed: mean difference; ..."``, the per-seed means listed apart),
    ``gap_closed`` = ``(arm - reference) / (teacher - reference)`` of the per-volume means with
    ``gap_boot_low``/``gap_boot_high`` (NaN for the two references and when the teacher is not better);
    ``val_vs_student`` (mean over the arm's runs of its best validation tumor DSC minus the student's of the same
    fold and seed, :func:`validation_gate`) and ``val_lost`` (runs that lost); ``train_s`` (mean per run) and
    ``wall_s`` (training + evaluation, all runs) from ``runs``. ``table.attrs``: ``teacher_minus_student`` (mean
    per-volume difference), ``notes`` (WARNING lines: a teacher not better than the student, distillation lost on
    validation; also logged), ``confidence``, ``tie_tolerance``, ``resamples``, ``folds``.

    Args:
        cases: rows ``arm, seed, case`` (+ ``fold`` with K-fold cross-validation) + :data:`METRICS`.
        runs: rows ``arm, seed, train_s, eval_s`` (+ ``fold``, ``best_val``, ``role``; optional).
        reference: the arm every other is paired with (the student without KD).
        teacher: the teacher arm.
        confidence: coverage of the intervals.
        labels: ``{arm: method label}`` (default: :data:`ARMS` labels, else the arm name).
        tol: tie tolerance of wins/ties/losses and of the Wilcoxon zeros.
        resamples: bootstrap resamples.
        bootstrap_seed: bootstrap seed (the same resampled volumes for every arm).

    Returns:
        the table, arms in :data:`ARMS` order (unknown arms after, in order of appearance).

    Raises:
        ValueError: a required column missing, or a volume repeated within an arm and seed.
    """
    missing = [c for c in ("arm", "seed", "case", *METRICS) if c not in cases.columns]
    if missing:
        raise ValueError(f"cases: no column(s) {missing}; columns: {sorted(cases.columns)}")
    df = cases.copy()
    df["case"] = df["case"].astype(str)
    if "fold" not in df.columns:
        df["fold"] = 0
    repeated = df.duplicated(["arm", "seed", *VOLUME])
    if repeated.any():
        first = df[repeated].iloc[0]
        raise ValueError(f"cases: volume {first['case']!r} (fold {first['fold']}) appears twice for arm {first['arm']!r} seed {first['seed']}.")
    labels = {**{n: a.label for n, a in ARMS.items()}, **dict(labels or {})}
    present = list(dict.fromkeys(df["arm"]))
    order = [n for n in ARMS if n in present] + [n for n in present if n not in ARMS]
    per_seed = df.groupby(["arm", "seed"])[list(METRICS)].mean()
    counts = df.groupby(["arm", "seed"]).size()
    ref_rows = df[df["arm"] == reference]
    ref_v = per_volume(ref_rows, "dsc_tumor", VOLUME) if len(ref_rows) else None
    teacher_rows = df[df["arm"] == teacher]
    teacher_v = per_volume(teacher_rows, "dsc_tumor", VOLUME) if len(teacher_rows) else None
    stats_kw = dict(confidence=confidence, tol=tol, resamples=resamples, seed=bootstrap_seed)
    gap = math.nan
    if ref_v is not None and teacher_v is not None:
        both = pd.concat({"t": teacher_v, "r": ref_v}, axis=1, join="inner").dropna()
        gap = float((both["t"] - both["r"]).mean()) if len(both) else math.nan
    rows: list[dict[str, Any]] = []
    for arm in order:
        ps = per_seed.loc[arm]
        rows_a = df[df["arm"] == arm]
        row: dict[str, Any] = {"arm": arm, "method": labels.get(arm, arm), "seeds": int(len(ps)), "folds": int(rows_a["fold"].nunique()),
                               "cases_per_seed": int(counts.loc[arm].max())}  # fmt: skip
        for m in METRICS:
            row[f"{m}_mean"] = float(ps[m].mean())
            row[f"{m}_std"] = float(ps[m].std(ddof=1)) if len(ps) > 1 else math.nan
        if arm != reference and ref_v is not None:
            use_teacher = teacher_v if gap > 0 and arm != teacher else None
            c = compare_volumes(per_volume(rows_a, "dsc_tumor", VOLUME), ref_v, use_teacher, **stats_kw)
            row.update(n_volumes=c.n, diff_mean=c.mean, diff_sd=c.sd, diff_ci_low=c.ci_low, diff_ci_high=c.ci_high,
                       wilcoxon_p=c.wilcoxon_p, wins=c.wins, ties=c.ties, losses=c.losses, diff_boot_low=c.boot_low,
                       diff_boot_high=c.boot_high, diff_per_seed=_seed_diffs_text(per_seed_differences(rows_a, ref_rows, "dsc_tumor", VOLUME)),
                       gap_closed=c.gap_closed, gap_boot_low=c.gap_low, gap_boot_high=c.gap_high)  # fmt: skip
        else:
            row.update({k: math.nan for k in _DIFF_COLUMNS}, n_volumes=0, wins=0, ties=0, losses=0, diff_per_seed="")
        rows.append(row)
    table = pd.DataFrame(rows)
    notes: list[str] = []
    if not gap > 0:  # NaN included
        msg = (
            f"the teacher is not better than the student (teacher - student = {gap:+.3f} mean tumor DSC over the test "
            "volumes): distillation has nothing to teach; gap closed is undefined."
        )
        logger.warning(msg)
        notes.append(f"**WARNING**: {msg}")
    gate = validation_gate(runs if runs is not None else pd.DataFrame(), reference=reference, tol=tol)
    table["val_vs_student"] = table["arm"].map(gate.groupby("arm")["val_diff"].mean()) if len(gate) else math.nan
    table["val_lost"] = table["arm"].map(gate.groupby("arm")["lost"].sum()).fillna(0).astype(int) if len(gate) else 0
    folds = int(df["fold"].nunique())
    for g in gate[gate["lost"]].to_dict("records") if len(gate) else []:
        msg = _gate_message(g, folds > 1)
        logger.warning(msg)
        notes.append(f"**WARNING**: {msg}")
    if runs is not None and len(runs):
        r = runs.assign(wall=runs["train_s"].fillna(0) + runs["eval_s"].fillna(0)).groupby("arm")
        table["train_s"] = table["arm"].map(r["train_s"].mean())
        table["wall_s"] = table["arm"].map(r["wall"].sum())
    else:
        table["train_s"] = math.nan
        table["wall_s"] = math.nan
    table.attrs.update(teacher_minus_student=float(gap), notes=notes, confidence=confidence, tie_tolerance=tol, resamples=resamples, folds=folds)
    return table


#: the table's columns of the comparison with the reference (NaN in the reference's own row)
_DIFF_COLUMNS: tuple[str, ...] = (
    "diff_mean", "diff_sd", "diff_ci_low", "diff_ci_high", "wilcoxon_p", "diff_boot_low", "diff_boot_high",
    "gap_closed", "gap_boot_low", "gap_boot_high",
)  # fmt: skip


def _pm(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "n/a"
    return f"{mean:.3f}" if math.isnan(std) else f"{mean:.3f} ± {std:.3f}"


def _interval(low: float, high: float, fmt: str = "+.3f") -> str:
    return "n/a" if math.isnan(low) or math.isnan(high) else f"[{low:{fmt}}, {high:{fmt}}]"


def format_markdown(table: pd.DataFrame, notes: Sequence[str] = ()) -> str:
    """The table as markdown with its footnotes (``table.attrs`` notes first, then ``notes``).

    Args:
        table: from :func:`build_table`.
        notes: extra footnote lines (e.g. the training protocol).

    Returns:
        markdown text.
    """
    conf = int(round(100 * table.attrs.get("confidence", 0.95)))
    tol = table.attrs.get("tie_tolerance", TIE_TOLERANCE)
    head = ["method", "arm", "seeds", "tumor DSC", "tumor RVD", "organ DSC", f"Δ tumor DSC vs student [{conf}% t CI]",
            f"bootstrap {conf}% CI", "Wilcoxon p", "volumes", "W / T / L", "Δ per seed", f"gap closed [bootstrap {conf}% CI]",
            "val vs student", "train s / run", "wall s"]  # fmt: skip
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def num(v: Any, fmt: str, dash: bool = False) -> str:
        return "—" if dash else ("n/a" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, fmt))

    for r in table.to_dict("records"):
        ref = r["arm"] == REFERENCE
        none = ref or r["n_volumes"] == 0
        diff = "—" if ref else ("n/a" if none else f"{r['diff_mean']:+.3f} {_interval(r['diff_ci_low'], r['diff_ci_high'])}")
        gap_dash = r["arm"] in (TEACHER, REFERENCE)
        gap = "—" if gap_dash else ("n/a" if math.isnan(r["gap_closed"]) else f"{r['gap_closed']:+.2f} {_interval(r['gap_boot_low'], r['gap_boot_high'], '+.2f')}")
        val = "—" if ref or math.isnan(r.get("val_vs_student", math.nan)) else f"{r['val_vs_student']:+.3f}" + (f" (lost {r['val_lost']})" if r.get("val_lost") else "")
        lines.append(
            "| " + " | ".join([
                str(r["method"]), str(r["arm"]), str(r["seeds"]),
                _pm(r["dsc_tumor_mean"], r["dsc_tumor_std"]), _pm(r["rvd_tumor_mean"], r["rvd_tumor_std"]),
                _pm(r["dsc_organ_mean"], r["dsc_organ_std"]), diff,
                "—" if ref else ("n/a" if none else _interval(r["diff_boot_low"], r["diff_boot_high"])),
                num(r["wilcoxon_p"], ".3f", ref), "—" if ref else str(r["n_volumes"]),
                "—" if ref else f"{r['wins']} / {r['ties']} / {r['losses']}", "—" if ref else (r["diff_per_seed"] or "n/a"),
                gap, val, num(r["train_s"], ".0f"), num(r["wall_s"], ".0f"),
            ]) + " |"
        )  # fmt: skip
    gap = table.attrs.get("teacher_minus_student", math.nan)
    folds = table.attrs.get("folds", 1)
    foot = [
        "",
        *table.attrs.get("notes", []),
        "Metrics: mean ± std over seeds of the per-seed mean over the test volumes" + (f" (all {folds} folds pooled)" if folds > 1 else "")
        + " (all slices; std needs 2+ seeds); RVD = (V_pred - V_gt) / V_gt, volumes without ground-truth tumor left out.",
        "Δ: the unit is the test VOLUME. Each method's tumor DSC of a volume is averaged over its seeds, then the "
        f"difference arm - student is taken per volume; mean over volumes with a {conf}% Student-t interval (n - 1 "
        f"degrees of freedom, n = volumes), an exact two-sided Wilcoxon signed-rank p (zero differences, |Δ| < {tol:g}, "
        f"dropped), and a percentile bootstrap {conf}% interval ({table.attrs.get('resamples', BOOTSTRAP_RESAMPLES)} "
        "resamples of the volumes" + (", hierarchical: folds drawn with replacement, then volumes within each fold"
        if folds > 1 else "") + f", fixed seed). W / T / L: volumes won / tied (|Δ| < {tol:g}) / lost. Δ per seed: "
        "seed: mean over volumes of arm - student of that seed (listed apart; not the test).",
        f"Gap closed = (arm - student) / (teacher - student) of the mean tumor DSC over the test volumes, with its "
        f"bootstrap interval over the same resamples; teacher - student = {gap:+.3f}.",
        "Val vs student: the arm's best validation tumor DSC (its best.pt) minus the student's of the same "
        + ("fold and " if folds > 1 else "") + "seed, mean over its runs; 'lost k': k runs where distillation lost on validation.",
        "The teacher is trained once" + (" per fold" if folds > 1 else "") + " (seed 0) and every KD arm of every seed "
        "distils from that checkpoint; its Δ pairs it with the student's seed mean of each volume.",
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


#: table columns logged as ``<arm>.<column>`` metrics of the parent run
_LOGGED_COLUMNS: tuple[str, ...] = (
    "dsc_tumor_mean", "dsc_tumor_std", "rvd_tumor_mean", "dsc_organ_mean", "n_volumes", "diff_mean", "diff_ci_low",
    "diff_ci_high", "wilcoxon_p", "wins", "ties", "losses", "diff_boot_low", "diff_boot_high", "gap_closed",
    "gap_boot_low", "gap_boot_high", "val_vs_student", "val_lost", "train_s", "wall_s",
)  # fmt: skip


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

    def child_tags(self, arm: str, seed: int, stage: str, fold: int | None = None) -> dict[str, str]:
        tags = {"mlflow.parentRunId": self.parent_id, "ctdistill_arm": arm, "ctdistill_seed": str(seed), "ctdistill_stage": stage}
        if fold is not None:
            tags["ctdistill_fold"] = str(fold)
        return tags

    def children(self, arm: str | None = None, seed: int | None = None, stage: str | None = None, fold: int | None = None) -> list[Any]:
        """Child runs of the parent (newest first), filtered by arm / seed / stage / fold tags."""
        f = [f"tags.mlflow.parentRunId = '{self.parent_id}'"]
        for key, value in (("ctdistill_arm", arm), ("ctdistill_seed", seed), ("ctdistill_stage", stage), ("ctdistill_fold", fold)):
            if value is not None:
                f.append(f"tags.{key} = '{value}'")
        return list(self.client.search_runs([self.experiment_id], " and ".join(f), order_by=["attributes.start_time DESC"]))

    def fail_open(self, arm: str, seed: int, fold: int | None = None) -> None:
        """Mark the arm's child runs still RUNNING (an interrupted attempt) as FAILED."""
        for r in self.children(arm, seed, fold=fold):
            if r.info.status == "RUNNING":
                self.client.set_terminated(r.info.run_id, "FAILED")
                logger.info("MLflow run %s (%s seed %d, interrupted) marked FAILED", r.info.run_id, arm, seed)

    def run_id(self, arm: str, seed: int, stage: str, fold: int | None = None) -> str:
        runs = self.children(arm, seed, stage, fold)
        return runs[0].info.run_id if runs else ""

    def finish(self, table: pd.DataFrame, files: Sequence[Path], status: str = "FINISHED") -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        metrics = []
        for r in table.to_dict("records"):
            for col in _LOGGED_COLUMNS:
                v = r.get(col)
                if v is not None and not (isinstance(v, float) and math.isnan(v)):
                    metrics.append(Metric(f"{r['arm']}.{col}", float(v), now, 0))
        gap = table.attrs.get("teacher_minus_student", math.nan)
        if not math.isnan(gap):
            metrics.append(Metric("teacher_minus_student", float(gap), now, 0))
        for i in range(0, len(metrics), 500):
            self.client.log_batch(self.parent_id, metrics=metrics[i : i + 500])
        notes = table.attrs.get("notes", [])
        lost = [n.removeprefix("**WARNING**: ") for n in notes if "distillation lost on validation" in n]
        self.client.set_tag(self.parent_id, "validation_gate", ("; ".join(lost) if lost else "passed")[:5000])
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


def _check_fold_count(folds: int, n: int) -> None:
    """K folds of n cases: every fold holds a test case and leaves 2+ cases to train and validate on."""
    if folds > n or n - math.ceil(n / folds) < 2:
        raise ConfigError("--folds", f"{folds} folds of {n} labelled case(s): every fold needs a test case and 2+ other cases to train and validate on.")


def _labelled_cases(data: Path) -> tuple[str, list[dict[str, Any]]]:
    """Every labelled case of the data (a split JSON's sections pooled, or the cases of a dataset folder)."""
    from pipelines import datalist
    from pipelines.engine.metrics import case_id

    source = data / "splits.json" if data.is_dir() and (data / "splits.json").is_file() else data
    if source.is_file() and source.suffix == ".json":
        split = json.loads(source.read_text())
        entries = [e for name, v in split.items() if name != "meta" and isinstance(v, list) for e in v if e.get("label")]
        seen: dict[str, dict[str, Any]] = {}
        for e in entries:
            seen.setdefault(str(e["image"]), {"image": str(e["image"]), "label": str(e["label"]), "case": e.get("case") or case_id(e["image"]), "labelled": True})
        return "splits", sorted(seen.values(), key=lambda c: c["case"])
    layout, cases = datalist.find_cases(data)
    return layout, [c for c in cases if c["labelled"] and c.get("label") and Path(c["label"]).is_file()]


def _write_folds(cfg: ExperimentConfig, data: Path, out: Path) -> tuple[Path, list[Path]]:
    """K-fold cross-validation splits: ``<out>/folds/fold<k>.json`` (the bundles' split format) and ``<out>/folds.json``.

    The labelled cases are shuffled with ``data_seed`` and dealt round-robin into K folds (sizes differ by at most
    one). Split k: ``test`` = fold k's cases; the others are split by ``pipelines.datalist.make_splits`` into
    ``validation`` (20 %) and ``training`` (seed ``data_seed``). ``folds.json`` records K, the seed, every case's
    fold and every split file with its SHA-256. Deterministic: the same data and seed give the same bytes.

    Returns:
        ``(folds.json, [fold split files])``.

    Raises:
        ConfigError: too few labelled cases for K folds.
    """
    from pipelines import datalist
    from pipelines.engine.tracking import file_sha256

    k = int(cfg.folds)  # type: ignore[arg-type]
    layout, cases = _labelled_cases(data)
    _check_fold_count(k, len(cases))
    rng = np.random.default_rng(int(cfg.data_seed))
    fold_of = {cases[j]["case"]: i % k for i, j in enumerate(rng.permutation(len(cases)))}
    if len(fold_of) != len(cases):
        raise ConfigError("--folds", f"{data}: case ids repeat ({len(cases)} cases, {len(fold_of)} ids); every case needs its own id.")
    files = []
    for f in range(k):
        marked = [dict(c, split="test") if fold_of[c["case"]] == f else c for c in cases]
        splits = datalist.make_splits(marked, val_fraction=0.2, seed=int(cfg.data_seed))
        result: dict[str, Any] = dict(splits)
        result["meta"] = {
            "created_by": datalist.CREATED_BY, "layout": layout, "source": str(data), "preset": None,
            "seed": int(cfg.data_seed), "val_fraction": 0.2, "folds": None, "fold": None,
            "cross_validation": {"folds": k, "test_fold": f}, "labels": None,
            "counts": {name: len(splits[name]) for name in datalist.SPLITS},
        }  # fmt: skip
        files.append(datalist.save_datalist(result, out / "folds" / f"fold{f}.json"))
    record = {
        "folds": k, "seed": int(cfg.data_seed), "source": str(data),
        "cases": {c: fold_of[c] for c in sorted(fold_of)},
        "splits": [{"fold": f, "file": str(p), "sha256": file_sha256(p)} for f, p in enumerate(files)],
    }  # fmt: skip
    folds_json = out / "folds.json"
    atomic_write_json(folds_json, record)
    return folds_json, files


def _fold_files(folds_json: Path) -> list[Path] | None:
    """The fold split files ``folds.json`` records, when every one is still the file it recorded; else None."""
    from pipelines.engine.tracking import file_sha256

    try:
        splits = json.loads(folds_json.read_text())["splits"]
        files = [Path(s["file"]) for s in splits]
        ok = all(p.is_file() and file_sha256(p) == s["sha256"] for p, s in zip(files, splits))
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return files if ok else None


def _recipe_overrides(cfg: ExperimentConfig, arm: Arm) -> dict[str, Any]:
    """Training-recipe knobs set for this arm (only those given; the bundles' defaults otherwise)."""
    if arm.name == TEACHER:
        pairs = (("warmup_epochs", cfg.teacher_warmup_epochs), ("grad_clip", cfg.teacher_grad_clip))
    elif arm.distils:
        pairs = (("kd_warmup_epochs", cfg.kd_warmup_epochs),)
        if arm.overrides.get("kd_balance") == "grad":
            pairs += (("kd_balance_ratio", cfg.kd_balance_ratio),)
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
    """Run every arm, fold and seed through the bundles, evaluate them, write and return the table.

    Args:
        cfg: the configuration (checked first with :func:`validate_config`).

    Returns:
        the table (:func:`build_table`); ``cases.csv``, ``runs.csv``, ``table.csv``, ``table.md`` are written to
        ``cfg.out`` and logged, with the summary metrics, on the MLflow parent run.

    Raises:
        ConfigError: an invalid knob, or a reused teacher that saw a test case (before any training).
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

    record = out / ("folds.json" if cfg.folds else "splits.json")
    reusable = bool(previous) and record.is_file() and file_sha256(record) == previous.get("splits_sha256")
    split_files = _fold_files(record) if reusable and cfg.folds else ([record] if reusable else None)
    if split_files is not None:
        data = Path(previous["data_dir"])
        logger.info("resume: the data in %s and the split(s) %s of the first run are reused", data, record)
    else:
        data = _prepare_data(cfg, out)
        if cfg.folds:
            record, split_files = _write_folds(cfg, data, out)
        else:
            record = _write_split(cfg, data, out)
            split_files = [record]
    split_sha = file_sha256(record)
    if cfg.teacher_ckpt is not None:
        check_teacher_split(Path(cfg.teacher_ckpt), split_files)
    t0 = time.perf_counter()
    report = run_check_dataset(split_files[0])  # once for every arm (every fold lists every case); the bundles skip theirs
    logger.info("dataset check of %s: clean (%d line(s), %.1f s)", split_files[0], len(report), time.perf_counter() - t0)
    sizes = [{k: len(v) for k, v in json.loads(f.read_text()).items() if isinstance(v, list)} for f in split_files]
    counts = sizes[0] if not cfg.folds else {k: [c.get(k, 0) for c in sizes] for k in ("training", "validation", "test")}
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
        "folds": cfg.folds or 0,
        "kd_balance_ratio": "" if cfg.kd_balance_ratio is None else cfg.kd_balance_ratio,
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
        dataset_dir=str(data), task=cfg.task, in_plane_size=[cfg.size, cfg.size],
        lr=cfg.lr, samples_per_volume=cfg.samples_per_volume, batch_size=cfg.batch_size, val_interval=cfg.val_interval,
        num_workers=cfg.num_workers, sw_batch_size=cfg.sw_batch_size, check_data=False, tracking_uri=uri,
        experiment_name=cfg.experiment_name,
    )  # fmt: skip
    folds: list[int | None] = list(range(cfg.folds)) if cfg.folds else [None]
    plan = [
        (arm, seed, fold)
        for fold in folds
        for arm, seed in [(ARMS[TEACHER], TEACHER_SEED)] + [(ARMS[n], s) for s in cfg.seeds for n in names if n != TEACHER]
    ]
    done: list[dict[str, Any]] = []
    try:
        for i, (arm, seed, fold) in enumerate(plan, 1):
            where = "" if fold is None else f"fold {fold}, "
            logger.info("[%d/%d] %s, %sseed %d", i, len(plan), arm.name, where, seed)
            teacher_ckpt = Path(cfg.teacher_ckpt).resolve() if cfg.teacher_ckpt else _run_dir(out, TEACHER, TEACHER_SEED, fold) / "checkpoints" / "best.pt"
            fold_base = dict(base, splits_file=str(split_files[fold or 0]))
            done.append(_run_arm(arm, seed, cfg, out, fold_base, teacher_ckpt, teacher_epochs, tracker, fold))
            if arm.distils:
                _gate_now(done[-1], done, cfg.folds is not None)
        cases, runs = _collect(done)
        table = build_table(cases, runs)
        if cfg.folds:
            split_text = (f"{cfg.folds}-fold cross-validation (every labelled volume tested once; test volumes per fold "
                          f"{counts['test']}, training {counts['training']}, validation {counts['validation']}; folds.json "
                          f"sha256 {split_sha[:12]}); teacher trained per fold")  # fmt: skip
        else:
            split_text = (f"one split ({counts.get('training', 0)} training / {counts.get('validation', 0)} validation / "
                          f"{counts.get('test', 0)} test volumes, sha256 {split_sha[:12]}); teacher")  # fmt: skip
        protocol = (
            f"Protocol: every student arm {cfg.epochs} epochs, batch {cfg.batch_size} slices ({cfg.samples_per_volume} per "
            f"volume), {cfg.size}^2, lr {cfg.lr:g}, {split_text} {teacher_epochs} epochs"
            + (f" (reused: {cfg.teacher_ckpt})" if cfg.teacher_ckpt else "") + "; seeds " + ", ".join(map(str, cfg.seeds)) + "."
        )
        md = format_markdown(table, [protocol])
        files = [out / "cases.csv", out / "runs.csv", out / "table.csv", out / "table.md", state_path, record]
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


def _run_dir(out: Path, arm: str, seed: int, fold: int | None) -> Path:
    """``<out>/runs/<arm>/seed<k>``, or ``<out>/runs/<arm>/fold<f>/seed<k>`` with ``--folds``."""
    return out / "runs" / arm / ("" if fold is None else f"fold{fold}") / f"seed{seed}"


def best_validation(run_dir: str | os.PathLike, key_metric: str = "dsc_tumor") -> float:
    """The best validation score of a training run: the maximum of ``key_metric`` in its ``val_history.csv``.

    ``best.pt`` is chosen by that score, so this is the validation score of the network the table evaluates.

    Returns:
        the score; NaN when the run validated never (no file, no defined value).
    """
    try:
        history = pd.read_csv(Path(run_dir) / "val_history.csv")
    except (OSError, ValueError):
        return math.nan
    if key_metric not in history.columns:
        return math.nan
    values = pd.to_numeric(history[key_metric], errors="coerce").dropna()
    return float(values.max()) if len(values) else math.nan


def _gate_now(record: Mapping[str, Any], done: Sequence[Mapping[str, Any]], folds: bool) -> None:
    """Log the validation gate of one finished KD run against the student run of its fold and seed."""
    same = [d for d in done if d["arm"] == REFERENCE and d["seed"] == record["seed"] and d.get("fold") == record.get("fold")]
    if not same:
        return
    for g in validation_gate(pd.DataFrame([dict(same[-1]), dict(record)])).to_dict("records"):
        if g["lost"]:
            logger.warning(_gate_message(g, folds))
        elif not math.isnan(g["val_diff"]):
            where = (f"fold {g['fold']} " if folds else "") + f"seed {g['seed']}"
            logger.info("validation gate passed: %s %s best validation tumor DSC %.4f vs student %.4f (%+.4f)", g["arm"], where, g["best_val"], g["reference_val"], g["val_diff"])


def _run_arm(
    arm: Arm,
    seed: int,
    cfg: ExperimentConfig,
    out: Path,
    base: Mapping[str, Any],
    teacher_ckpt: Path,
    teacher_epochs: int,
    tracker: _Tracker,
    fold: int | None = None,
) -> dict[str, Any]:
    """Train (unless a reused teacher) and evaluate one arm, seed (and fold); return its done marker."""
    run_dir = _run_dir(out, arm.name, seed, fold)
    marker = run_dir / "done.json"
    what = f"{arm.name} seed {seed}" if fold is None else f"{arm.name} fold {fold} seed {seed}"
    if cfg.resume:
        finished = _read_done(marker)
        if finished is not None:
            logger.info("%s: finished earlier (%s), skipped", what, marker)
            return finished
    if run_dir.exists():
        logger.info("%s: clearing the unfinished attempt in %s (it is run again from scratch)", what, run_dir)
        tracker.fail_open(arm.name, seed, fold)
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
            run_bundle("training", arm.role, "train", run_tags=tracker.child_tags(arm.name, seed, "train", fold), **kw)
            train_s = time.perf_counter() - t0
        ev = {k: common[k] for k in ("dataset_dir", "splits_file", "output_dir", "seed", "num_workers", "sw_batch_size",
                                     "check_data", "tracking_uri", "experiment_name")}  # fmt: skip
        t0 = time.perf_counter()
        run_bundle("evaluating", arm.role, "evaluate", checkpoint=str(ckpt), run_tags=tracker.child_tags(arm.name, seed, "evaluate", fold), **ev)
        eval_s = time.perf_counter() - t0
    except BaseException:
        with contextlib.suppress(Exception):
            tracker.fail_open(arm.name, seed, fold)
        raise
    record = {
        "arm": arm.name,
        "fold": fold,
        "seed": seed,
        "role": arm.role,
        "method": arm.label,
        "cases_csv": str(run_dir / "eval" / "cases.csv"),
        "summary_csv": str(run_dir / "eval" / "summary.csv"),
        "checkpoint": str(ckpt),
        "teacher_ckpt": str(teacher_ckpt) if arm.distils else "",
        "splits_file": str(base["splits_file"]),
        "epochs": 0 if reused else (teacher_epochs if arm.name == TEACHER else cfg.epochs),
        "train_s": train_s,
        "eval_s": eval_s,
        "best_val": math.nan if reused else best_validation(run_dir),
        "train_run_id": "" if reused else tracker.run_id(arm.name, seed, "train", fold),
        "eval_run_id": tracker.run_id(arm.name, seed, "evaluate", fold),
        "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    if not Path(record["cases_csv"]).is_file():
        raise RuntimeError(f"{what}: the evaluation wrote no {record['cases_csv']}.")
    atomic_write_json(marker, record, default=str)
    trained = "not trained (reused checkpoint)" if reused else f"train {train_s:.1f} s"
    logger.info("%s: done (%s, evaluation %.1f s)", what, trained, eval_s)
    return record


def _collect(done: Sequence[Mapping[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``cases.csv`` (one row per arm, [fold,] seed and test volume) and ``runs.csv`` (one row per run)."""
    folds = any(d.get("fold") is not None for d in done)
    frames = []
    for d in done:
        c = read_cases(d["cases_csv"])
        c.insert(0, "case", c.pop("case"))
        ids = (("arm", d["arm"]),) + ((("fold", int(d["fold"])),) if folds else ()) + (("seed", int(d["seed"])), ("role", d["role"]))
        for i, (k, v) in enumerate(ids):
            c.insert(i, k, v)
        frames.append(c)
    cases = pd.concat(frames, ignore_index=True)
    keep = ("arm", *(("fold",) if folds else ()), "seed", "role", "method", "epochs", "train_s", "eval_s", "best_val", "checkpoint",
            "teacher_ckpt", "train_run_id", "eval_run_id", "cases_csv")  # fmt: skip
    runs = pd.DataFrame([{k: d.get(k) for k in keep} for d in done])
    if "best_val" in runs.columns:  # a marker written before best_val was recorded: read it from the run folder
        missing = runs["best_val"].isna() & (runs["epochs"] > 0)
        runs.loc[missing, "best_val"] = [best_validation(Path(p).parents[1]) for p in runs.loc[missing, "cases_csv"]]
    for col in ("train_s", "eval_s", "best_val"):
        runs[col] = pd.to_numeric(runs[col], errors="coerce")
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
    a("--folds", type=int, default=None, help="K-fold cross-validation: every labelled case is a test case exactly once, "
      "the teacher and every arm trained per fold (default: one split)")
    a("--kd-balance-ratio", type=float, default=None, help="--kd_balance_ratio of the gradient-balanced arms "
      "(hlfd_balanced, hlfd_wo_ifd_balanced; default: the bundle's, 0.25)")
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
                      ("kd_warmup_epochs", "kd_warmup_epochs"), ("folds", "folds"), ("kd_balance_ratio", "kd_balance_ratio")):  # fmt: skip
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
