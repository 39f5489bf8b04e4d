"""Smoke tests of pipelines.model_report on tiny models (the benchmark itself is run by hand, not in tests)."""

from __future__ import annotations

import json

import pytest
import torch

import networks
from pipelines.model_report import main, model_report

TINY_TRANSFUSE = {
    "embed_dim": 16, "depth": 1, "num_heads": 2, "cnn_widths": [4, 8, 16], "cnn_layers": [1, 1, 1],
    "decoder_channels": [8, 4], "head_channels": 4,
}  # fmt: skip


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
        ["unetpp_teacher", "--cuda-graphs"],  # CPU
        ["unetpp_teacher", "--compile", "fast"],
    ],
)
def test_cli_errors(argv):
    with pytest.raises(SystemExit):
        main(argv)


def test_cuda_graphs_need_cuda():
    with pytest.raises(ValueError, match="CUDA graphs need"):
        model_report("unetpp_teacher", size=(32, 32), runs=1, warmup=0, cuda_graphs=True)


def test_fast_inference_knobs_keep_the_flops_and_are_recorded():
    """TransFuse batch 1, channels-last and compiled (aot_eager backend: inductor's C++ build takes minutes on 2
    cores): FLOPs are those of the plain eager network; the modes are recorded."""
    if not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported in this environment")
    kw = dict(size=(64, 64), channels=3, runs=1, warmup=1, network_kwargs=TINY_TRANSFUSE)
    plain = model_report("transfuse_s", **kw)
    fast = model_report("transfuse_s", **kw, channels_last=True, compile_kwargs={"backend": "aot_eager"})
    assert fast["flops"] == plain["flops"] > 0
    assert fast["compile"] == {"backend": "aot_eager"} and fast["channels_last"] and not fast["cuda_graphs"]
    assert plain["compile"] is None and plain["amp_dtype"] is None and fast["images_per_s"] > 0
