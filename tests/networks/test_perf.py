"""networks.perf: autocast dtype and channels-last selection (CUDA paths simulated), prepare_network, compile."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import networks
from networks.perf import (
    amp_kwargs,
    autocast_dtype,
    network_spatial_dims,
    prepare_network,
    to_memory_format,
    use_channels_last,
)

TINY_STUDENT = {"base_width": 8, "decoder_channels": [16, 8, 8, 8, 8]}


def _fake_cuda(monkeypatch, bf16: bool) -> None:
    """Make the selection functions see a CUDA device (nothing runs on it)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: bf16)


def test_autocast_auto_is_off_on_cpu_and_explicit_bf16_is_honoured():
    assert autocast_dtype("cpu", "auto") is None
    assert autocast_dtype("cpu", True) is None
    assert autocast_dtype("cpu", "off") is None
    assert autocast_dtype("cpu", False) is None
    assert autocast_dtype("cpu", "bf16") is torch.bfloat16
    assert amp_kwargs("cpu", "auto") == {}
    assert amp_kwargs("cpu", "bf16") == {"dtype": torch.bfloat16}


@pytest.mark.parametrize("bf16, expected", [(True, torch.bfloat16), (False, torch.float16)])
def test_autocast_auto_on_cuda_picks_bf16_where_supported(monkeypatch, bf16, expected):
    _fake_cuda(monkeypatch, bf16)
    assert autocast_dtype("cuda", "auto") is expected
    assert autocast_dtype(None, "auto") is expected  # None = CUDA when available
    assert autocast_dtype("cuda", "fp16") is torch.float16
    assert amp_kwargs("cuda", "auto") == {"dtype": expected}


def test_autocast_bad_values():
    with pytest.raises(ValueError, match="amp_dtype must be one of"):
        autocast_dtype("cpu", "float8")
    with pytest.raises(ValueError, match="needs a CUDA device"):
        autocast_dtype("cpu", "fp16")


def test_cuda_requested_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="is_available"):
        autocast_dtype("cuda", "auto")


def test_channels_last_selection(monkeypatch):
    assert use_channels_last("cpu", "auto")  # measured faster on this CPU too (README "Speed")
    assert use_channels_last("cpu", "on") and use_channels_last("cpu", True)
    assert not use_channels_last("cpu", "off") and not use_channels_last("cpu", False) and not use_channels_last("cpu", None)
    with pytest.raises(ValueError, match="channels_last must be one of"):
        use_channels_last("cpu", "yes")
    _fake_cuda(monkeypatch, True)
    assert use_channels_last("cuda", "auto")


@pytest.mark.parametrize(
    "name, kwargs, shape, fmt",
    [
        ("resnet18_student", dict(spatial_dims=2, in_channels=3, **TINY_STUDENT), (2, 3, 32, 32), torch.channels_last),
        ("unetpp_teacher", dict(spatial_dims=3, in_channels=1, features=[4, 8, 16]), (1, 1, 16, 16, 16), torch.channels_last_3d),
    ],
)
def test_prepare_network_channels_last_keeps_outputs(name, kwargs, shape, fmt):
    torch.manual_seed(0)
    ref = networks.create(name, **kwargs).eval()
    net = networks.create(name, **kwargs).eval()
    net.load_state_dict(ref.state_dict())
    params = [id(p) for p in net.parameters()]
    assert prepare_network(net, channels_last="on", device="cpu") is net
    assert [id(p) for p in net.parameters()] == params  # an optimizer built before still holds them
    convs = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d))]
    assert convs and all(m.weight.is_contiguous(memory_format=fmt) for m in convs)
    assert not convs[1].weight.is_contiguous()  # really converted (a 3x3 conv of >1 channels differs in NCHW)
    x = torch.randn(shape)
    with torch.no_grad():
        expected, got = ref(x), net(to_memory_format(x, True))
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_to_memory_format_leaves_other_ranks():
    x = torch.randn(2, 3)
    assert to_memory_format(x, True) is x
    y = torch.randn(1, 2, 4, 4)
    assert to_memory_format(y, False) is y
    assert to_memory_format(y, True).is_contiguous(memory_format=torch.channels_last)


def test_spatial_dims_of_mixed_network():
    mixed = nn.Sequential(nn.Conv2d(1, 1, 1), nn.Conv3d(1, 1, 1))
    with pytest.raises(ValueError, match="mixes 2D and 3D"):
        network_spatial_dims(mixed)
    assert network_spatial_dims(nn.Linear(2, 2)) == 2


def test_prepare_network_type_error():
    with pytest.raises(TypeError, match="nn.Module"):
        prepare_network("resnet", device="cpu")


def test_compile_gives_the_same_outputs_and_plain_state_dict_keys():
    """compile=True (dynamo + AOT autograd; the aot_eager backend keeps the test fast on CPU: inductor's C++ build
    of even a tiny network takes over a minute on 2 cores) gives the eager outputs and unprefixed state_dict keys."""
    if not hasattr(torch, "compile") or not torch._dynamo.is_dynamo_supported():
        pytest.skip("torch.compile is not supported in this environment")
    torch.manual_seed(0)
    kwargs = dict(spatial_dims=2, in_channels=3, **TINY_STUDENT)
    ref = networks.create("resnet18_student", **kwargs).eval()
    net = networks.create("resnet18_student", **kwargs).eval()
    net.load_state_dict(ref.state_dict())
    prepare_network(net, channels_last="off", compile=True, device="cpu", compile_kwargs={"backend": "aot_eager"})
    assert list(net.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), ref(x), rtol=1e-5, atol=1e-5)


# --- issue 19: oneDNN's CPU channels-last 1x1 strided backward-weights with < 8 input channels -------------------
_ONEDNN_REPRO = r"""
import sys, torch
from torch import nn
from networks.perf import prepare_network
torch.set_num_threads(1)
torch.manual_seed(0)
x0 = torch.randn(4, 4, 64, 64)
ref = nn.Conv2d(4, 8, 1, stride=2, bias=False)
ref(x0.clone().requires_grad_()).square().mean().backward()
net = nn.Conv2d(4, 8, 1, stride=2, bias=False)
net.load_state_dict(ref.state_dict())
prepare_network(net, channels_last="on", device="cpu")  # the product's own decision
for _ in range(5):
    net.zero_grad()
    net(x0.clone().requires_grad_()).square().mean().backward()
err = (net.weight.grad - ref.weight.grad).abs().max().item()
print("maxdiff", err, "channels_last", net.weight.is_contiguous(memory_format=torch.channels_last) and not net.weight.is_contiguous())
sys.exit(0 if err < 1e-6 else 3)
"""


def test_prepare_network_never_runs_the_onednn_channels_last_bug(tmp_path):
    """The issue's reproduction, through prepare_network, in a subprocess (the bug segfaults or corrupts the heap):
    it must exit 0 with the weight gradients of the contiguous layout."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", _ONEDNN_REPRO], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, (out.returncode, out.stdout, out.stderr[-2000:])
    assert "channels_last False" in out.stdout


def test_onednn_unsafe_convs_names_the_narrow_strided_pointwise_convs(caplog):
    from networks.perf import channels_last_for, onednn_unsafe_convs

    narrow = networks.create("resnet18_student", spatial_dims=2, in_channels=3, out_channels=3, base_width=4)
    wide = networks.create("resnet18_student", spatial_dims=2, in_channels=3, out_channels=3, base_width=8)
    assert any("layer2" in name for name in onednn_unsafe_convs(narrow))
    assert onednn_unsafe_convs(wide) == []
    assert onednn_unsafe_convs(nn.Conv3d(4, 8, 1, stride=2)) != []  # 3D too
    assert onednn_unsafe_convs(nn.Conv2d(4, 8, 3, stride=2)) == []  # not pointwise
    assert onednn_unsafe_convs(nn.Conv2d(4, 8, 1, stride=1)) == []  # not strided
    with caplog.at_level("WARNING"):
        assert channels_last_for(narrow, "cpu", "auto") is False
    assert "channels_last disabled" in caplog.text and "layer2" in caplog.text
    assert channels_last_for(wide, "cpu", "auto") is True
    prepare_network(narrow, channels_last="on", device="cpu")
    assert all(p.is_contiguous() for p in narrow.parameters())
