"""Baseline distillation methods compared in the HLFD paper (Table 1), plus Hinton KD, CWD and DIST."""

from __future__ import annotations

from distill.baselines.cwd import CWD, channel_wise_divergence
from distill.baselines.dist import DIST, dist_relations
from distill.baselines.emkd import EMKD, ImportanceMapLoss, RegionAffinityLoss, decoder_rad_taps, decoder_taps
from distill.baselines.hifd import HIFD
from distill.baselines.hinton import HintonKD
from distill.baselines.imf import IMF, IMFNetwork
from distill.baselines.skd import SKD, PairwiseAffinityLoss

__all__ = [
    "HintonKD",
    "SKD",
    "PairwiseAffinityLoss",
    "IMF",
    "IMFNetwork",
    "EMKD",
    "ImportanceMapLoss",
    "RegionAffinityLoss",
    "decoder_taps",
    "decoder_rad_taps",
    "HIFD",
    "CWD",
    "channel_wise_divergence",
    "DIST",
    "dist_relations",
]
