"""Baseline distillation methods compared in the HLFD paper (Table 1) plus Hinton KD."""

from __future__ import annotations

from distill.baselines.emkd import EMKD, ImportanceMapLoss, RegionAffinityLoss
from distill.baselines.hifd import HIFD
from distill.baselines.hinton import HintonKD
from distill.baselines.imf import IMF
from distill.baselines.skd import SKD, PairwiseAffinityLoss

__all__ = ["HintonKD", "SKD", "PairwiseAffinityLoss", "IMF", "EMKD", "ImportanceMapLoss", "RegionAffinityLoss", "HIFD"]
