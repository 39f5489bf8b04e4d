"""The one contract test base class every ctdistill network's test class inherits.

A subclass sets ``spatial_size`` (a valid input size), ``expected_taps`` (hand-written ``{name: (channels,
stride)}``), ``train_outputs`` (how many tensors the training-mode forward returns) and implements ``make()``.
"""

from __future__ import annotations

import re

import pytest
import torch

from networks.contract import TAP_GROUPS, FeatureContract, TapNetwork


class NetworkContract:
    """Contract tests: output shapes, taps via ``describe_features``, train/eval outputs, backward, input-size errors."""

    #: valid input spatial size of the tiny model
    spatial_size: tuple[int, ...] = ()
    #: a spatial size that violates size_divisor, or None if every size is valid
    bad_size: tuple[int, ...] | None = None
    #: hand-written expected taps: name -> (channels, stride)
    expected_taps: dict[str, tuple[int, int]] = {}
    #: number of tensors the training-mode forward returns (1: a plain tensor)
    train_outputs: int = 1
    #: regexes of parameter names allowed to receive no gradient from the training outputs
    no_grad_params: tuple[str, ...] = ()
    batch_size: int = 2

    def make(self) -> TapNetwork:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    @pytest.fixture(scope="class")
    def net(self) -> TapNetwork:
        torch.manual_seed(0)
        return self.make()

    def _input(self, net: TapNetwork, size=None) -> torch.Tensor:
        size = self.spatial_size if size is None else size
        return torch.randn(self.batch_size, net.in_channels, *size)

    def test_is_tap_network(self, net):
        assert isinstance(net, TapNetwork)
        assert net.spatial_dims == len(self.spatial_size)
        assert isinstance(net.feature_contract(), FeatureContract)

    def test_eval_output_shape(self, net):
        net.eval()
        with torch.no_grad():
            y = net(self._input(net))
        assert isinstance(y, torch.Tensor)
        assert tuple(y.shape) == (self.batch_size, net.out_channels, *self.spatial_size)
        assert torch.isfinite(y).all()

    def test_train_outputs(self, net):
        net.train()
        out = net(self._input(net))
        outs = out if isinstance(out, tuple) else (out,)
        if self.train_outputs == 1:
            assert isinstance(out, torch.Tensor)
        assert len(outs) == self.train_outputs
        for o in outs:
            assert tuple(o.shape) == (self.batch_size, net.out_channels, *self.spatial_size)

    def test_taps_declared_and_observed(self, net):
        contract = net.feature_contract()
        named = contract.named()
        assert {k: (t.channels, t.stride) for k, t in named.items()} == self.expected_taps
        assert contract.group("early") == ["early"] and contract.group("late") == ["late"]
        assert len(contract.group("mid")) >= 1
        rows = net.describe_features(self.spatial_size)
        assert [r["name"] for r in rows] == list(named)
        for r in rows:
            ch, stride = self.expected_taps[r["name"]]
            assert r["shape"] == (1, ch, *(s // stride for s in self.spatial_size))
        modules = dict(net.named_modules())
        assert all(t.path in modules for t in named.values())
        assert set(TAP_GROUPS) >= {k.split(".")[0] for k in named}

    def test_backward(self, net):
        net.train()
        net.zero_grad(set_to_none=True)
        out = net(self._input(net))
        outs = out if isinstance(out, tuple) else (out,)
        sum(o.float().square().mean() for o in outs).backward()
        missing = [
            n
            for n, p in net.named_parameters()
            if p.requires_grad
            and (p.grad is None or not torch.isfinite(p.grad).all())
            and not any(re.search(pat, n) for pat in self.no_grad_params)
        ]
        assert not missing, f"parameters without a finite gradient: {missing[:10]}"
        net.zero_grad(set_to_none=True)

    def test_bad_input_size(self, net):
        if self.bad_size is None:
            pytest.skip("every input size is valid for this network")
        net.eval()
        with pytest.raises(ValueError, match="Nearest valid size"):
            net(self._input(net, self.bad_size))
        with pytest.raises(ValueError, match="divisible"):
            net.describe_features(self.bad_size)
