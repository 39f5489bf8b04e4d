"""The engine the bundle configs call: everything with logic behind ``bundles/**/configs/*.yaml``.

The bundles write ``$import pipelines.engine`` once and reference ``pipelines.engine.<name>`` (or
``_target_: pipelines.engine.<Name>``); this package re-exports the public API of its modules, one concern each:

- ``checkpoint``: THE checkpoint format (written by ``TrainCheckpointer``, read by ``load_checkpoint`` & co.)
- ``output``: a training run's output folder (lock, resume/overwrite guard)
- ``splits``: which split JSON a run reads, its sections, loader batch size
- ``preflight``: the checks before long work (dataset, teacher checkpoint, disk, MLflow store)
- ``config_values``: user strings into bundle configs as data, never as MONAI expressions/references/macros
- ``errors``: ``BundleInputError`` and the knob parsers ``as_bool`` / ``optional_knob``
- ``gate``: the KD roles' validation gate (``--baseline_ckpt``: did distillation beat the plain student?)
- ``inferers``, ``metrics`` (per-volume metrics, CSV reports, metric handlers), ``handlers`` (ignite handlers),
  ``optim`` (lr schedule, gradient clipping), ``curves`` (validation history), ``pictures`` (case overlays,
  training curves, per-case plot), ``progress`` (evaluation/inference progress bars), ``data`` (CacheDataset, memory
  estimate, NIfTI writer), ``atomic`` (atomic file writes), ``tracking`` (MLflow), ``knobs`` (bundle ``--help`` and
  unknown-knob guard), ``inference`` (input discovery, label-map writer), ``safeguards`` (inputs
  that are not CT, implausible results, provenance), ``plan`` (the preprocessing plan: target spacing, window,
  network input, from the training split), ``dicom_seg`` (DICOM-SEG output, C-STORE), ``labels`` (label names,
  colours, 3D Slicer color tables), ``polyp`` (the polyp bundle's data pieces)

The command-line tools stay in ``pipelines/`` (``python -m pipelines.<tool>``); nothing here parses arguments.
"""

from __future__ import annotations

import importlib

from pipelines.engine.atomic import *  # noqa: F403
from pipelines.engine.case_dataset import *  # noqa: F403
from pipelines.engine.checkpoint import *  # noqa: F403
from pipelines.engine.config_values import *  # noqa: F403
from pipelines.engine.curves import *  # noqa: F403
from pipelines.engine.data import *  # noqa: F403
from pipelines.engine.dicom_seg import *  # noqa: F403
from pipelines.engine.errors import *  # noqa: F403
from pipelines.engine.gate import *  # noqa: F403
from pipelines.engine.handlers import *  # noqa: F403
from pipelines.engine.inference import *  # noqa: F403
from pipelines.engine.inferers import *  # noqa: F403
from pipelines.engine.knobs import *  # noqa: F403
from pipelines.engine.labels import *  # noqa: F403
from pipelines.engine.metrics import *  # noqa: F403
from pipelines.engine.optim import *  # noqa: F403
from pipelines.engine.output import *  # noqa: F403
from pipelines.engine.pictures import *  # noqa: F403
from pipelines.engine.plan import *  # noqa: F403
from pipelines.engine.polyp import *  # noqa: F403
from pipelines.engine.preflight import *  # noqa: F403
from pipelines.engine.progress import *  # noqa: F403
from pipelines.engine.safeguards import *  # noqa: F403
from pipelines.engine.splits import *  # noqa: F403
from pipelines.engine.tracking import *  # noqa: F403

#: the modules re-exported here (one concern each; the public API is the union of their ``__all__``)
_MODULES = ("atomic", "case_dataset", "checkpoint", "config_values", "curves", "data", "dicom_seg", "errors", "gate", "handlers", "inference", "inferers", "knobs", "labels", "metrics", "optim", "output", "pictures", "plan", "polyp", "preflight", "progress", "safeguards", "splits", "tracking")
__all__ = [name for module in _MODULES for name in importlib.import_module(f"pipelines.engine.{module}").__all__]
