"""The validation gate of the KD roles: did distillation beat the same student trained alone, on validation?

``--baseline_ckpt <best.pt of a plain student run>`` (``bundles/resnet18_student``): before training, the baseline's
recorded best validation score (``best_metric``, the key metric, mean validation tumor DSC by default) is read and
logged as the MLflow params ``baseline_ckpt`` and ``baseline_<key metric>``; when training completes,
:class:`ValidationGate` compares it with the KD run's own best validation score and

- records ``settings["validation_gate"] = {"baseline_ckpt", "key_metric", "baseline", "kd", "kd_minus_baseline",
  "kd_lost"}`` in the run's ``best.pt`` and ``last.pt`` (rewritten atomically),
- logs the MLflow metrics ``gate_baseline_<key>``, ``gate_kd_<key>``, ``gate_kd_minus_baseline``, ``gate_kd_lost``
  (1 when distillation lost) and the tag ``validation_gate`` (``lost``/``passed``) on the training's run,
- logs ``WARNING distillation lost on validation: kd X < baseline Y`` when it lost (INFO otherwise).

The two scores are comparable only on the same validation cases: a baseline whose recorded split differs from the
run's (``splits_sha256``) is reported with a warning.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from pipelines.engine.checkpoint import (
    RUN_ID_FILE,
    TrainCheckpointer,
    _read_run_id,
    atomic_torch_save,
    load_checkpoint,
    load_torch_file,
)
from pipelines.engine.errors import BundleInputError

__all__ = ["baseline_score", "ValidationGate"]

logger = logging.getLogger(__name__)


def baseline_score(path: str | os.PathLike, key_metric: str = "dsc_tumor", splits_file: str | os.PathLike | None = None) -> float:
    """The best validation score a baseline (plain student) run recorded in its checkpoint.

    Args:
        path: the ``--baseline_ckpt`` file (a ``best.pt``/``last.pt`` written by a training bundle).
        key_metric: the KD run's key metric; a baseline that recorded another one is refused.
        splits_file: the KD run's split JSON; a baseline trained on another split is reported with a warning.

    Returns:
        the baseline's ``best_metric``.

    Raises:
        BundleInputError: a missing or unloadable file, no finite ``best_metric`` (never validated), or a different
            recorded key metric.
    """
    p = Path(path)
    ckpt = load_checkpoint(p)
    best = ckpt.get("best_metric")
    if isinstance(best, bool) or not isinstance(best, (int, float)) or not math.isfinite(best):
        raise BundleInputError(
            f"baseline checkpoint {p} records no best validation score (best_metric={best!r}); pass the best.pt of a "
            "plain student run that validated at least once (bundles/resnet18_student)."
        )
    settings = dict(ckpt.get("settings") or {})
    recorded = settings.get("key_metric")
    if recorded and recorded != key_metric:
        raise BundleInputError(
            f"baseline checkpoint {p} selected its best epoch by {recorded!r}, this run by {key_metric!r}; the scores "
            f"are not comparable: pass --key_metric {recorded} or another baseline."
        )
    method = settings.get("kd_method")
    if method not in (None, "none"):
        logger.warning("baseline checkpoint %s was trained with kd_method %r, not as a plain student", p, method)
    if splits_file:
        from pipelines.engine.tracking import file_sha256

        theirs, ours = str(ckpt.get("splits_sha256") or ""), file_sha256(splits_file)
        if theirs and theirs != ours:
            logger.warning(
                "baseline checkpoint %s was trained on another split (splits_sha256 %s, this run %s): its validation "
                "score may come from other cases", p, theirs[:12], ours[:12],
            )  # fmt: skip
    return float(best)


class ValidationGate:
    """At the end of training, compare the run's best validation score with a baseline's (module docstring).

    Args:
        checkpointer: the run's ``TrainCheckpointer`` (its ``best_metric`` and checkpoint folder).
        options: the KD options (``pipelines.engine.kd_options``): ``baseline_ckpt`` and ``baseline_<key_metric>``;
            without a ``baseline_ckpt`` the gate does nothing.
        key_metric: the key metric name.
        tracking_uri: the MLflow store of the run (None or ``""``: not logged to MLflow).
    """

    def __init__(
        self,
        checkpointer: TrainCheckpointer,
        options: Mapping[str, Any],
        key_metric: str = "dsc_tumor",
        tracking_uri: str | None = None,
    ) -> None:
        self.checkpointer, self.key_metric = checkpointer, str(key_metric)
        self.baseline_ckpt = str(options.get("baseline_ckpt") or "")
        self.baseline = options.get(f"baseline_{self.key_metric}")
        if self.baseline_ckpt and self.baseline is None:
            self.baseline = baseline_score(self.baseline_ckpt, self.key_metric)
        self.tracking_uri = str(tracking_uri or "")
        self.record: dict[str, Any] | None = None

    def attach(self, engine: Engine) -> None:
        """Run at the end of training (``COMPLETED``); nothing without a baseline."""
        if self.baseline_ckpt:
            engine.add_event_handler(Events.COMPLETED, self)

    def verdict(self, kd: float) -> dict[str, Any]:
        """The record of the comparison for the run's best score ``kd``."""
        base = float(self.baseline)
        return {
            "baseline_ckpt": self.baseline_ckpt,
            "key_metric": self.key_metric,
            "baseline": base,
            "kd": float(kd),
            "kd_minus_baseline": float(kd) - base,
            "kd_lost": bool(kd < base),
        }

    def __call__(self, engine: Engine) -> None:
        """Compare, log the verdict, record it in the checkpoints and MLflow (rank 0 writes)."""
        kd = self.checkpointer.best_metric
        if not math.isfinite(kd):
            logger.warning("validation gate: the run recorded no validation %s; nothing to compare with %s", self.key_metric, self.baseline_ckpt)
            return
        rec = self.record = self.verdict(kd)
        if rec["kd_lost"]:
            logger.warning(
                "distillation lost on validation: kd %.4f < baseline %.4f (best %s of each run; baseline %s)",
                rec["kd"], rec["baseline"], self.key_metric, self.baseline_ckpt,
            )  # fmt: skip
        else:
            logger.info("distillation kept up on validation: kd %.4f >= baseline %.4f (best %s)", rec["kd"], rec["baseline"], self.key_metric)
        if not TrainCheckpointer._rank0():
            return
        self.checkpointer.settings["validation_gate"] = rec
        for path in (self.checkpointer.best_path, self.checkpointer.last_path):
            if path.is_file():
                ckpt = load_torch_file(path, "the run's checkpoint")
                ckpt.setdefault("settings", {})["validation_gate"] = rec
                atomic_torch_save(ckpt, path)
        self._log_mlflow(rec)

    def _log_mlflow(self, rec: Mapping[str, Any]) -> None:
        run_id = _read_run_id(self.checkpointer.ckpt_dir / RUN_ID_FILE)  # "" when missing or unreadable
        if not self.tracking_uri or not run_id:
            return
        try:
            from mlflow.entities import Metric, RunTag
            from mlflow.tracking import MlflowClient

            now = int(time.time() * 1000)
            values = {
                f"gate_baseline_{self.key_metric}": rec["baseline"],
                f"gate_kd_{self.key_metric}": rec["kd"],
                "gate_kd_minus_baseline": rec["kd_minus_baseline"],
                "gate_kd_lost": float(rec["kd_lost"]),
            }
            MlflowClient(self.tracking_uri).log_batch(
                run_id,
                metrics=[Metric(k, float(v), now, 0) for k, v in values.items()],
                tags=[RunTag("validation_gate", "lost" if rec["kd_lost"] else "passed")],
            )
        except Exception as e:  # noqa: BLE001 - the verdict is in the log and the checkpoints; MLflow is a copy
            logger.warning("could not log the validation gate to MLflow run %s (%s: %s)", run_id, type(e).__name__, e)
