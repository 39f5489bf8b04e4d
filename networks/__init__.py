"""ctdistill networks: UNet++ teacher, ResNet18 student, TransFuse-S/L, their feature contract and factory, and the
segmentation losses every role trains them with (``networks.losses``)."""

from __future__ import annotations

from networks.contract import FeatureContract, Tap, TapNetwork
from networks.factory import NETWORKS, create
from networks.losses import TRANSFUSE_DS_WEIGHTS, SegLoss, StructureLoss, deep_supervision_loss, structure_loss
from networks.weights import LoadReport, load_deit_weights, load_resnet_weights

__all__ = [
    "NETWORKS",
    "create",
    "FeatureContract",
    "Tap",
    "TapNetwork",
    "LoadReport",
    "load_resnet_weights",
    "load_deit_weights",
    "SegLoss",
    "StructureLoss",
    "deep_supervision_loss",
    "structure_loss",
    "TRANSFUSE_DS_WEIGHTS",
]
