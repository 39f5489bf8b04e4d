"""pipelines.engine.curves.ValidationHistory: one row per validation, kept across a resumed run."""

from __future__ import annotations

import math

from ignite.engine import Engine

from pipelines.engine.curves import ValidationHistory, read_history


def _validate(handler, epoch, metrics):
    engine = Engine(lambda e, b: None)
    engine.state.epoch, engine.state.metrics = epoch, dict(metrics)
    handler(engine)


def test_rows_per_epoch_and_resume_replaces_later_rows(tmp_path):
    h = ValidationHistory(tmp_path)
    _validate(h, 1, {"dsc_tumor": 0.25, "dsc_organ": 0.5})
    _validate(h, 2, {"dsc_tumor": 0.5, "dsc_organ": 0.75, "note": "x"})  # non-scalars are skipped
    rows = read_history(tmp_path / "val_history.csv")
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert rows[1]["dsc_tumor"] == 0.5 and "note" not in rows[1]
    # a resumed run (new handler) from epoch 2 keeps epoch 1 and replaces epoch 2
    h2 = ValidationHistory(tmp_path)
    _validate(h2, 2, {"dsc_tumor": 0.125, "dsc_organ": math.nan})
    rows = read_history(tmp_path / "val_history.csv")
    assert [(r["epoch"], r["dsc_tumor"]) for r in rows] == [(1.0, 0.25), (2.0, 0.125)]
    assert math.isnan(rows[1]["dsc_organ"])
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp files left
