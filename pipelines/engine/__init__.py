"""The engine the bundle configs call: everything with logic behind ``bundles/**/configs/*.yaml``.

The bundles write ``$import pipelines.engine`` once and reference ``pipelines.engine.<name>`` (or
``_target_: pipelines.engine.<Name>``); this package re-exports the public API of its modules, one concern each:

- ``checkpoint``: THE checkpoint format (written by ``TrainCheckpointer``, read by ``load_checkpoint`` & co.)
- ``output``: a training run's output folder (lock, resume/overwrite guard)
- ``splits``: which split JSON a run reads, its sections, loader batch size
- ``preflight``: the checks before long work (dataset, teacher checkpoint, disk, MLflow store)
- ``errors``: ``BundleInputError`` and the knob parsers ``as_bool`` / ``optional_knob``
- ``inferers``, ``metrics`` (per-volume metrics, CSV reports, metric handlers), ``handlers`` (ignite handlers),
  ``optim`` (lr schedule, gradient clipping), ``curves`` (validation history), ``data`` (CacheDataset, memory
  estimate, NIfTI writer), ``atomic`` (atomic file writes), ``tracking`` (MLflow), ``knobs`` (bundle ``--help`` and
  unknown-knob guard), ``inference`` (input discovery, label-map writer), ``polyp`` (the polyp bundle's data pieces)

The command-line tools stay in ``pipelines/`` (``python -m pipelines.<tool>``); nothing here parses arguments.
"""

from __future__ import annotations

from pipelines.engine.atomic import (
    TMP_MARKER,
    atomic_copy,
    atomic_write,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temps,
    same_bytes,
)
from pipelines.engine.checkpoint import (
    TrainCheckpointer,
    atomic_torch_save,
    checkpoint_bytes,
    checkpoint_settings,
    load_checkpoint,
    load_torch_file,
    network_from_checkpoint,
    sidecar,
)
from pipelines.engine.curves import (
    ValidationHistory,
    read_history,
)
from pipelines.engine.data import (
    CacheEstimate,
    available_memory_bytes,
    build_dataset,
    cached_item_bytes,
    ensure_cache_fits,
    estimate_cache,
    save_nifti,
)
from pipelines.engine.errors import (
    BundleInputError,
    as_bool,
    optional_knob,
)
from pipelines.engine.handlers import (
    EpochAverager,
    SaveOnIteration,
    loss_of,
    trainable,
)
from pipelines.engine.inference import (
    NIFTI_SUFFIXES,
    VOLUME_COLUMNS,
    VOLUMES_CSV,
    VolumesCsvWriter,
    WriteLabelMapd,
    check_input_volume,
    convert_dicom,
    discover_inputs,
    is_label_file,
    output_path,
    previous_outputs,
)
from pipelines.engine.inferers import (
    make_inferer,
    simple_inferer,
)
from pipelines.engine.knobs import (
    MONAI_RUN_ARGS,
    check_cli,
    install_excepthook,
    project_error,
    report_project_error,
    role_knobs,
)
from pipelines.engine.metrics import (
    CASE_COLUMNS,
    CT_METRICS,
    KINDS,
    REGIONS,
    BinaryOverlapMetric,
    CaseMetricsSaver,
    RegionMetric,
    case_id,
    ct_metric_handlers,
    dsc,
    polyp_metric_handlers,
    rvd,
    summarize_cases,
    voxel_volume_ml,
    write_csv_atomic,
)
from pipelines.engine.optim import (
    GradientClipper,
    build_lr_scheduler,
    fast_forward,
)
from pipelines.engine.output import (
    LOCK_NAME,
    TrainingOutput,
    guard_training_output,
    release_output_dir,
)
from pipelines.engine.polyp import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    POLYP_DATASETS,
    TEST_SHARES,
    BinarizeMaskd,
    MasksCsvWriter,
    MultiScaleIteration,
    WriteMaskd,
    discover_images,
    find_pairs,
    multiscale_size,
    polyp_transforms,
    write_polyp_splits,
)
from pipelines.engine.preflight import (
    CHECKPOINT_COPIES,
    DISK_MARGIN_BYTES,
    check_free_disk,
    check_teacher_checkpoint,
    kd_weights,
    preflight,
    run_check_dataset,
)
from pipelines.engine.splits import (
    SPLIT_NAMES,
    TASK_PRESETS,
    load_split,
    resolve_splits,
    volumes_per_batch,
)
from pipelines.engine.tracking import (
    TaggedMLFlowHandler,
    check_tracking_uri,
    default_tracking_uri,
    file_sha256,
    find_runs,
    kd_params,
    run_params,
    save_executed_config,
    unique_run_name,
)

__all__ = [
    "BundleInputError",
    "as_bool",
    "optional_knob",
    "TMP_MARKER",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_copy",
    "same_bytes",
    "remove_stale_temps",
    "TrainCheckpointer",
    "atomic_torch_save",
    "load_torch_file",
    "load_checkpoint",
    "checkpoint_settings",
    "network_from_checkpoint",
    "sidecar",
    "checkpoint_bytes",
    "LOCK_NAME",
    "TrainingOutput",
    "guard_training_output",
    "release_output_dir",
    "SPLIT_NAMES",
    "TASK_PRESETS",
    "resolve_splits",
    "load_split",
    "volumes_per_batch",
    "CHECKPOINT_COPIES",
    "DISK_MARGIN_BYTES",
    "preflight",
    "run_check_dataset",
    "check_free_disk",
    "check_teacher_checkpoint",
    "kd_weights",
    "make_inferer",
    "simple_inferer",
    "REGIONS",
    "KINDS",
    "CASE_COLUMNS",
    "dsc",
    "rvd",
    "voxel_volume_ml",
    "RegionMetric",
    "BinaryOverlapMetric",
    "CaseMetricsSaver",
    "summarize_cases",
    "write_csv_atomic",
    "case_id",
    "CT_METRICS",
    "ct_metric_handlers",
    "polyp_metric_handlers",
    "EpochAverager",
    "SaveOnIteration",
    "loss_of",
    "trainable",
    "build_lr_scheduler",
    "fast_forward",
    "GradientClipper",
    "ValidationHistory",
    "read_history",
    "save_nifti",
    "build_dataset",
    "CacheEstimate",
    "available_memory_bytes",
    "cached_item_bytes",
    "estimate_cache",
    "ensure_cache_fits",
    "default_tracking_uri",
    "check_tracking_uri",
    "unique_run_name",
    "file_sha256",
    "run_params",
    "save_executed_config",
    "find_runs",
    "kd_params",
    "TaggedMLFlowHandler",
    "MONAI_RUN_ARGS",
    "role_knobs",
    "check_cli",
    "project_error",
    "report_project_error",
    "install_excepthook",
    "NIFTI_SUFFIXES",
    "VOLUMES_CSV",
    "discover_inputs",
    "is_label_file",
    "previous_outputs",
    "check_input_volume",
    "convert_dicom",
    "output_path",
    "WriteLabelMapd",
    "VolumesCsvWriter",
    "VOLUME_COLUMNS",
    "POLYP_DATASETS",
    "TEST_SHARES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "find_pairs",
    "write_polyp_splits",
    "BinarizeMaskd",
    "polyp_transforms",
    "MultiScaleIteration",
    "WriteMaskd",
    "multiscale_size",
    "discover_images",
    "MasksCsvWriter",
]
