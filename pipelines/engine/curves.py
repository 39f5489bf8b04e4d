"""Per-epoch validation curves: one CSV row per validation, kept across ``--resume``.

``ValidationHistory`` is a validation handler: after every validation run it appends the trainer epoch and every
scalar metric of the evaluator (``dsc_tumor``, ``dsc_organ``, ``rvd_tumor``, ...) to ``<save_dir>/val_history.csv``
(rewritten atomically). The HLFD teacher-recipe study reads these curves to see whether validation tumor DSC
collapses between epochs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import os
from pathlib import Path
from typing import Any

from ignite.engine import Engine, Events

from pipelines.engine.atomic import atomic_write_text

__all__ = ["ValidationHistory", "read_history"]

logger = logging.getLogger(__name__)


def read_history(path: str | os.PathLike) -> list[dict[str, float]]:
    """Rows of a ``val_history.csv`` as floats (``epoch`` first); an absent file gives ``[]``."""
    p = Path(path)
    if not p.is_file():
        return []
    with open(p, newline="") as f:
        return [{k: float(v) if v not in ("", "nan") else math.nan for k, v in row.items()} for row in csv.DictReader(f)]


class ValidationHistory:
    """Append the evaluator's metrics after each validation to ``<save_dir>/<name>``.

    The evaluator's ``state.epoch`` is the trainer's epoch (MONAI's ``ValidationHandler`` runs it with
    ``global_epoch``). Rows from an earlier run of the same folder with a smaller epoch are kept (resume); rows at or
    after the current epoch are replaced. Only rank 0 writes.

    Args:
        save_dir: output folder of the training run.
        name: file name (default ``val_history.csv``).
    """

    def __init__(self, save_dir: str | os.PathLike, name: str = "val_history.csv") -> None:
        if not str(name) or "/" in str(name):
            raise ValueError(f"name must be a plain file name, got {name!r}.")
        self.path = Path(save_dir) / name
        self.rows: list[dict[str, Any]] | None = None

    def attach(self, engine: Engine) -> None:
        """Register on the evaluator's ``EPOCH_COMPLETED``."""
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Record ``{"epoch": trainer epoch, **scalar metrics}`` and rewrite the CSV."""
        import ignite.distributed as idist

        if idist.get_rank() != 0:
            return
        epoch = int(engine.state.epoch)
        if self.rows is None:
            self.rows = [r for r in read_history(self.path) if int(r["epoch"]) < epoch]
        self.rows = [r for r in self.rows if int(r["epoch"]) < epoch]
        row: dict[str, Any] = {"epoch": epoch}
        for k, v in engine.state.metrics.items():
            try:
                row[k] = float(v)
            except (TypeError, ValueError):
                continue
        self.rows.append(row)
        columns = ["epoch"] + sorted({k for r in self.rows for k in r} - {"epoch"})
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
