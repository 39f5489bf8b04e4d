"""Smoke tests of pipelines.model_report on tiny models (the benchmark itself is run by hand, not in tests)."""

from __future__ import annotations

import json

import pytest

import networks
from pipelines.model_report import main, model_report


def _conv_flops(cin, cout, k, numel_out):
    return 2 * cin * cout * k * numel_out  # one multiply-add = 2 FLOPs


def test_unetpp_flops_and_params_by_hand():
    """UNet++ with 3 levels (2, 2, 2), 1 -> 1 channels, 8 x 8 input: only convolutions count."""
    r = model_report(
        "unetpp_teacher", size=(8, 8), channels=1, classes=1, runs=1, warmup=0, network_kwargs={"features": (2, 2, 2)}
    )
    hw = {0: 64, 1: 16, 2: 4}

    def dc(cin, c, level):  # DoubleConv: two 3x3 convs
        return _conv_flops(cin, c, 9, hw[level]) + _conv_flops(c, c, 9, hw[level])

    expected = dc(1, 2, 0) + dc(2, 2, 1) + dc(2, 2, 2) + dc(4, 2, 0) + dc(4, 2, 1) + dc(6, 2, 0)
    expected += 2 * _conv_flops(2, 1, 1, 64)  # two 1x1 heads
    assert r["flops"] == expected
    net = networks.create("unetpp_teacher", in_channels=1, out_channels=1, features=(2, 2, 2))
    assert r["params"] == sum(p.numel() for p in net.parameters())
    assert r["input_shape"] == [1, 1, 8, 8] and len(r["latency_ms"]) == 1 and r["images_per_s"] > 0


def test_cli_writes_json(tmp_path, capsys):
    out = tmp_path / "report.json"
    main(
        [
            "resnet18_student",
            "--size",
            "64",
            "32",
            "--channels",
            "1",
            "--classes",
            "2",
            "--runs",
            "2",
            "--warmup",
            "1",
            "--json",
            str(out),
        ]
    )
    data = json.loads(out.read_text())
    assert data["network"] == "resnet18_student" and data["input_shape"] == [1, 1, 64, 32]
    assert data["out_channels"] == 2 and len(data["latency_ms"]) == 2 and data["gflops"] > 0
    assert "parameters" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv",
    [
        ["unet"],
        ["unetpp_teacher", "--size", "30", "30"],
        ["unetpp_teacher", "--size", "32"],
        ["resnet18_student", "--parallel-streams"],
        ["unetpp_teacher", "--runs", "0"],
        ["unetpp_teacher", "--threads", "0"],
    ],
)
def test_cli_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)
