"""The KD roles' validation gate (--baseline_ckpt) and KD knob validation, with fabricated checkpoints (fast)."""

from __future__ import annotations

import logging

import pytest
import torch
from torch import nn

from pipelines.engine import (
    BundleInputError,
    TrainCheckpointer,
    ValidationGate,
    baseline_score,
    kd_options,
    load_checkpoint,
)
from pipelines.engine.checkpoint import atomic_torch_save


def _baseline(path, best=0.6, **settings):
    torch.save({"model": {}, "best_metric": best, "settings": {"kd_method": "none", "key_metric": "dsc_tumor", **settings}}, path)
    return path


def test_baseline_score_reads_the_recorded_best_and_refuses_unusable_files(tmp_path):
    assert baseline_score(_baseline(tmp_path / "b.pt", 0.625)) == 0.625
    with pytest.raises(BundleInputError, match="records no best validation score"):
        baseline_score(_baseline(tmp_path / "never.pt", float("-inf")))
    with pytest.raises(BundleInputError, match="selected its best epoch by 'dsc_organ'"):
        baseline_score(_baseline(tmp_path / "organ.pt", key_metric="dsc_organ"))
    with pytest.raises(BundleInputError, match="does not exist"):
        baseline_score(tmp_path / "missing.pt")


def test_kd_options_validate_every_knob(tmp_path):
    out = kd_options("hlfd", "teacher_correct", "grad", "0.5", str(_baseline(tmp_path / "b.pt")))
    assert out == {
        "kd_mask": "teacher_correct", "kd_balance": "grad", "kd_balance_ratio": 0.5,
        "baseline_ckpt": str(tmp_path / "b.pt"), "baseline_dsc_tumor": 0.6,
    }  # fmt: skip
    assert kd_options("hinton")["baseline_ckpt"] == "" and "baseline_dsc_tumor" not in kd_options("hinton", baseline_ckpt="null")
    bad = {
        "Unknown kd_mask 'correct'; valid: none, teacher_correct": dict(kd_mask="correct"),
        "Unknown kd_balance 'norm'; valid: none, grad": dict(kd_balance="norm"),
        "kd_balance_ratio must be a finite number > 0": dict(kd_balance="grad", kd_balance_ratio="abc"),
        "--kd_method skd has none": dict(method="skd", kd_mask="teacher_correct"),
        "Unknown distillation method 'kdd'": dict(method="kdd"),
    }
    for message, kw in bad.items():
        with pytest.raises(BundleInputError, match=message):
            kd_options(kw.pop("method", "hlfd"), **kw)


def _run(tmp_path, kd_best):
    ck = TrainCheckpointer(str(tmp_path / "checkpoints"), nn.Linear(8, 8), settings={"role": "hlfd"})
    ck.ckpt_dir.mkdir(parents=True)
    for path in (ck.best_path, ck.last_path):
        atomic_torch_save({"model": {}, "best_metric": kd_best, "settings": {"role": "hlfd"}}, path)
    ck.best_metric = kd_best
    options = kd_options("hlfd", baseline_ckpt=str(_baseline(tmp_path / "baseline.pt", 0.6)))
    gate = ValidationGate(ck, options, "dsc_tumor", tracking_uri=None)
    gate(None)
    return gate, ck


def test_gate_warns_and_records_when_distillation_lost(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines.engine.gate"):
        gate, ck = _run(tmp_path, 0.45)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith("distillation lost on validation: kd 0.4500 < baseline 0.6000") for m in warnings), warnings
    for path in (ck.best_path, ck.last_path):
        rec = load_checkpoint(path)["settings"]["validation_gate"]
        assert rec["kd_lost"] is True and rec["kd"] == 0.45 and rec["baseline"] == 0.6
        assert rec["kd_minus_baseline"] == pytest.approx(-0.15) and rec["baseline_ckpt"].endswith("baseline.pt")


def test_gate_passes_quietly_when_distillation_kept_up(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="pipelines.engine.gate"):
        gate, ck = _run(tmp_path, 0.6)  # a tie is not a loss
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert load_checkpoint(ck.best_path)["settings"]["validation_gate"]["kd_lost"] is False


def test_gate_without_baseline_does_nothing(tmp_path):
    ck = TrainCheckpointer(str(tmp_path / "checkpoints"), nn.Linear(8, 8))
    gate = ValidationGate(ck, kd_options("hlfd"))

    class Engine:
        def add_event_handler(self, *a):
            raise AssertionError("attached without a baseline")

    gate.attach(Engine())
