from __future__ import annotations

import pytest
import torch
from torch import nn

from distill.capture import OUTPUT_PATH, FeatureCapture, resolve_module, unwrap
from tests.distill.tiny_nets import TinyNet


def test_records_only_inside_context_and_clears_on_entry():
    net = TinyNet()
    cap = FeatureCapture(net, {"e": "early", "l": "late", "o": OUTPUT_PATH})
    x = torch.randn(1, 1, 16, 16)
    net(x)
    assert cap.outputs == {}
    with cap:
        out = net(x)
    assert set(cap.outputs) == {"e", "l", "o"}
    assert cap.outputs["e"].shape == (1, 4, 8, 8) and torch.equal(cap.outputs["o"], out)
    first = cap.outputs["l"]
    net(torch.randn(1, 1, 16, 16))  # outside: not recorded
    assert cap.outputs["l"] is first
    with cap:
        assert cap.outputs == {}  # cleared on entry
    assert not cap.is_open and not net.late._forward_hooks  # no hooks left behind


def test_tuple_output_records_first_element():
    net = TinyNet(deep_supervision=True).train()
    cap = FeatureCapture(net, {"o": OUTPUT_PATH})
    with cap:
        out = net(torch.randn(1, 1, 16, 16))
    assert isinstance(out, tuple) and torch.equal(cap.outputs["o"], out[0])


def test_unknown_path_lists_closest_names():
    with pytest.raises(ValueError, match=r"closest: .*mid1"):
        FeatureCapture(TinyNet(), {"x": "midl"})
    with pytest.raises(ValueError, match="No module"):
        resolve_module(TinyNet(), "zzzzzzzzzz")
    with pytest.raises(ValueError, match="at least one"):
        FeatureCapture(TinyNet(), {})


def test_resolves_through_module_prefix():
    net = TinyNet()
    wrapped = nn.DataParallel(net)  # on CPU without GPUs this just calls net
    assert unwrap(wrapped) is net
    assert resolve_module(wrapped, "mid1") is net.mid1
    assert resolve_module(net, "module.mid1") is net.mid1
    cap = FeatureCapture(wrapped, {"m": "mid1"})
    with cap:
        wrapped(torch.randn(1, 1, 16, 16))
    assert cap.outputs["m"].shape == (1, 8, 4, 4)
