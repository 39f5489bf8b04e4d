"""ctdistill networks: UNet++ teacher, ResNet18 student, TransFuse-S/L, their feature contract and factory."""

from __future__ import annotations

from networks.contract import FeatureContract, Tap, TapNetwork
from networks.factory import NETWORKS, create

__all__ = ["NETWORKS", "create", "FeatureContract", "Tap", "TapNetwork"]
