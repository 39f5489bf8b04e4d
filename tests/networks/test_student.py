"""ResNet18 student: contract (2D, 3D), the paper's parameter count, validation errors."""

from __future__ import annotations

import pytest

from networks.student import ResNet18Student
from tests.networks.contract_case import NetworkContract


class TestStudent2D(NetworkContract):
    spatial_size = (64, 96)
    bad_size = (64, 80)
    expected_taps = {
        "early": (8, 2), "mid.0": (8, 4), "mid.1": (16, 8), "mid.2": (32, 16), "late": (64, 32), "pred_final": (3, 1),
    }  # fmt: skip

    def make(self):
        return ResNet18Student(spatial_dims=2, in_channels=5, out_channels=3, base_width=8)


class TestStudent3D(NetworkContract):
    spatial_size = (32, 32, 64)
    bad_size = (32, 32, 48)
    expected_taps = {
        "early": (4, 2), "mid.0": (4, 4), "mid.1": (6, 8), "mid.2": (8, 16), "late": (8, 32), "pred_final": (2, 1),
    }  # fmt: skip

    def make(self):
        return ResNet18Student(
            spatial_dims=3, in_channels=1, out_channels=2, widths=(4, 6, 8, 8), decoder_channels=(8, 8, 4, 4, 4)
        )


def test_parameter_count_matches_paper_and_torchvision():
    """HLFD: 11.6M (within 5 %). The encoder is torchvision's resnet18 (11,689,512) minus its fc (512*1000 + 1000)."""
    net = ResNet18Student(spatial_dims=2, in_channels=3, out_channels=3)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 11.6e6) / 11.6e6 < 0.05, n
    assert sum(p.numel() for p in net.encoder.parameters()) == 11_689_512 - 513_000


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 4}, "spatial_dims"),
        ({"widths": (8, 16, 32)}, "needs 4 values"),
        ({"decoder_channels": (8, 8)}, "needs 5 values"),
        ({"out_channels": 0}, "positive"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ResNet18Student(**kwargs)
