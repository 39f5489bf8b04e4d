"""pipelines.train_report on tiny synthetic cohorts: the JSON fields, positive and mutually consistent rates.

Not a timing test: only relations that hold whatever the machine's speed and load are checked (positive rates, the
derived headroom/efficiency/bottleneck from the measured rates, slices counted = steps x batch). An inequality between
measured rates (end-to-end vs step) was dropped: over 2 steps on a loaded 2-core machine it failed by timer noise.
"""

from __future__ import annotations

import json

import pytest

from pipelines.train_report import HEADROOM_GOAL, TrainReportConfig, bottleneck, bundle_of, main, train_report

TINY_STUDENT = {"base_width": 8, "decoder_channels": [16, 8, 8, 8, 8]}
TINY_TEACHER = {"features": [4, 4, 8, 8, 8]}
TINY_TRANSFUSE = {
    "embed_dim": 16, "depth": 1, "num_heads": 2, "cnn_widths": [4, 8, 16], "cnn_layers": [1, 1, 1],
    "decoder_channels": [8, 4], "head_channels": 4,
}  # fmt: skip
STEPS, BATCH = 2, 4


def _check(report: dict, kd: bool, ct: bool) -> None:
    for key in ("loader", "step", "end_to_end"):
        phase = report[key]
        assert phase["slices_per_s"] > 0 and phase["seconds"] > 0, key
    assert report["step"]["slices"] == STEPS * BATCH  # random batches are full
    # real batches: full, but the last of an epoch may be short
    assert 0 < report["end_to_end"]["slices"] <= STEPS * BATCH and 0 < report["loader"]["slices"] <= STEPS * BATCH
    used = report["device_loader"] if report["data_path"] == "device" else report["loader"]
    assert report["headroom"] == pytest.approx(used["slices_per_s"] / report["step"]["slices_per_s"])
    assert report["bottleneck"] == ("loader" if report["headroom"] < HEADROOM_GOAL else "model")
    assert report["efficiency"] == pytest.approx(report["end_to_end"]["slices_per_s"] / report["step"]["slices_per_s"])
    assert report["step"]["peak_gpu_mem_mb"] is None and report["device"] == "cpu"
    assert report["params_m"] > 0
    assert (report["teacher"] is not None and report["teacher_params_m"] > 0) == kd
    assert 0 < report["device_loader"]["slices"] <= STEPS * BATCH and report["device_loader"]["slices_per_s"] > 0
    if ct:
        inf = report["inference"]
        assert inf["inferer"] == "SliceBatchInferer"
        assert inf["bundle_slices_per_s"] > 0 and inf["monai_slice_inferer_slices_per_s"] > 0
    else:
        assert report["inference"] is None


def _config(role: str, **kw) -> TrainReportConfig:
    fields = dict(synthetic=True, cases=5, device="cpu", size=32, batch_size=BATCH, steps=STEPS, warmup=1, num_workers=0)
    return TrainReportConfig(role=role, **{**fields, **kw})


def test_student_cli_writes_the_json(tmp_path, capsys):
    out = tmp_path / "r.json"
    argv = [
        "--role", "student", "--synthetic", "--cases", "5", "--device", "cpu", "--size", "32", "--batch-size",
        str(BATCH), "--steps", str(STEPS), "--warmup", "1", "--num-workers", "0", "--network-kwargs",
        json.dumps(TINY_STUDENT), "--json", str(out),
    ]  # fmt: skip
    main(argv)
    report = json.loads(out.read_text())
    _check(report, kd=False, ct=True)
    assert report["bundle"] == "resnet18_student" and report["channels_last"] is True
    assert "bottleneck" in capsys.readouterr().out


def test_hlfd_step_includes_the_teacher():
    report = train_report(_config("hlfd", network_kwargs=TINY_STUDENT, teacher_kwargs=TINY_TEACHER, data_path="device"))
    _check(report, kd=True, ct=True)
    assert report["data_path"] == "device" and report["end_to_end"]["data_path"] == "device"


def test_polyp_role():
    report = train_report(
        _config("transfuse_polyp", network_kwargs=TINY_TRANSFUSE, overrides={"scales": [1.0]}, data_path="device")
    )
    _check(report, kd=False, ct=False)
    assert report["data_path"] == "device"


def test_bad_inputs():
    assert bundle_of("teacher") == "unetpp_teacher" and bundle_of("hlfd") == "hlfd"
    with pytest.raises(ValueError, match="valid roles"):
        bundle_of("nope")
    with pytest.raises(ValueError, match="--synthetic"):
        train_report(TrainReportConfig(role="student"))
    with pytest.raises(ValueError, match="data_path must be one of"):
        train_report(_config("student", data_path="gpu"))
    with pytest.raises(ValueError, match="must be >= 1"):
        train_report(_config("student", steps=0))
    with pytest.raises(ValueError, match="must be positive"):
        bottleneck(0.0, 1.0)
    assert bottleneck(30.0, 10.0) == ("model", 3.0)
    assert bottleneck(29.0, 10.0)[0] == "loader"
    with pytest.raises(SystemExit):
        main(["--role", "student"])  # no data source
