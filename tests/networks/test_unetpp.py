"""UNet++ teacher: contract (2D, 2D deep supervision, 3D), the paper's parameter count, validation errors."""

from __future__ import annotations

import pytest
import torch

from networks.unetpp import UNETPP_PRESETS, UNetPlusPlus
from tests.networks.contract_case import NetworkContract


def _taps(features, out_channels):
    n = len(features)
    taps = {"early": (features[0], 1)}
    taps.update({f"mid.{i - 1}": (features[i], 2**i) for i in range(1, n - 1)})
    taps["late"] = (features[-1], 2 ** (n - 1))
    taps.update({f"pred_mid.{j}": (out_channels, 1) for j in range(n - 2)})
    taps["pred_final"] = (out_channels, 1)
    return taps


class TestUNetPP2D(NetworkContract):
    spatial_size = (48, 80)
    bad_size = (48, 72)
    expected_taps = {
        "early": (4, 1), "mid.0": (8, 2), "mid.1": (8, 4), "mid.2": (16, 8), "late": (16, 16),
        "pred_mid.0": (3, 1), "pred_mid.1": (3, 1), "pred_mid.2": (3, 1), "pred_final": (3, 1),
    }  # fmt: skip
    no_grad_params = (r"^head[123]\.",)  # intermediate heads are built and tapped but not in the loss here

    def make(self):
        return UNetPlusPlus(spatial_dims=2, in_channels=5, out_channels=3, features=(4, 8, 8, 16, 16))

    def test_helper_taps_match(self):
        assert _taps((4, 8, 8, 16, 16), 3) == self.expected_taps


class TestUNetPP2DDeepSupervision(NetworkContract):
    spatial_size = (36, 20)  # 3 levels: divisible by 4 is enough
    bad_size = (35, 20)
    expected_taps = {"early": (4, 1), "mid.0": (6, 2), "late": (8, 4), "pred_mid.0": (2, 1), "pred_final": (2, 1)}
    train_outputs = 2

    def make(self):
        return UNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=2, features=(4, 6, 8), deep_supervision=True)

    def test_deep_supervision_first_is_final(self, net):
        net.train()
        seen = {}
        h = net.head2.register_forward_hook(lambda m, i, o: seen.setdefault("final", o))
        try:
            out = net(torch.randn(2, 1, *self.spatial_size))
        finally:
            h.remove()
        assert torch.equal(out[0], seen["final"])


class TestUNetPP3D(NetworkContract):
    spatial_size = (24, 32, 16)
    bad_size = (24, 30, 16)
    expected_taps = _taps((4, 8, 8, 16), 2)

    no_grad_params = (r"^head[12]\.",)

    def make(self):
        return UNetPlusPlus(spatial_dims=3, in_channels=1, out_channels=2, features=(4, 8, 8, 16))


def test_paper_preset_parameter_count():
    """HLFD: the UNet++ teacher has 36.1M parameters (2D, 3 input channels, 3 classes); within 5 %."""
    net = UNetPlusPlus(spatial_dims=2, in_channels=3, out_channels=3, features="paper")
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 36.1e6) / 36.1e6 < 0.05, n
    assert net.features == UNETPP_PRESETS["paper"] == (64, 128, 256, 512, 1024)


def test_tiny_parameter_count_by_hand():
    """Three levels (2, 2, 2), 1 -> 1 channels, counted by hand: convs (no bias) + BN (2 per channel) + 1x1 heads."""
    net = UNetPlusPlus(spatial_dims=2, in_channels=1, out_channels=1, features=(2, 2, 2))

    def dc(cin, c):  # DoubleConv: two 3x3 convs without bias, two BN
        return cin * c * 9 + c * c * 9 + 4 * c

    expected = dc(1, 2) + dc(2, 2) + dc(2, 2)  # encoder
    expected += dc(2 + 2, 2) + dc(2 + 2, 2)  # X(0,1), X(1,1)
    expected += dc(2 * 2 + 2, 2)  # X(0,2)
    expected += 2 * (2 * 1 + 1)  # two heads with bias
    assert sum(p.numel() for p in net.parameters()) == expected


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 1}, "spatial_dims"),
        ({"features": "huge"}, "preset"),
        ({"features": (4, 8)}, "3 to 6 levels"),
        ({"features": (4, 0, 8)}, "positive"),
        ({"in_channels": 0}, "positive"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        UNetPlusPlus(**kwargs)
