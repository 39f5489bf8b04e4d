"""CWD (Shu et al., ICCV 2021) and DIST (Huang et al., NeurIPS 2022) against hand computations and independent numpy.

The numpy references are written from each paper's equation with explicit loops (``np.corrcoef`` for Pearson).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import distill
from distill.baselines import channel_wise_divergence, dist_relations
from tests.distill.tiny_nets import distill_once


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- CWD


def np_cwd(s, tt, tau):
    """Shu et al. Eq. 3-4: tau^2 / (N C) sum_{n,c} sum_i phi(T_nci) log(phi(T_nci) / phi(S_nci)), phi = spatial softmax."""
    n, c = s.shape[:2]
    total = 0.0
    for b in range(n):
        for k in range(c):
            ps = np.exp(s[b, k].ravel() / tau) / np.exp(s[b, k].ravel() / tau).sum()
            pt = np.exp(tt[b, k].ravel() / tau) / np.exp(tt[b, k].ravel() / tau).sum()
            total += sum(pt[i] * math.log(pt[i] / ps[i]) for i in range(pt.size))
    return tau**2 * total / (n * c)


def test_cwd_by_hand():
    """tau = 4; channel 0: teacher t/4 = [ln 3, 0] -> [3/4, 1/4], student [0, 0] -> [1/2, 1/2];
    KL = 3/4 ln(3/2) + 1/4 ln(1/2) = 0.130812; channel 1 equal (KL 0); mean over channels * 16 = 1.046496."""
    tt = t([[[[4 * math.log(3.0), 0.0]], [[1.0, 2.0]]]])
    s = t([[[[0.0, 0.0]], [[1.0, 2.0]]]])
    want = 16 * (0.75 * math.log(1.5) + 0.25 * math.log(0.5)) / 2
    assert want == pytest.approx(1.046496, abs=1e-6)
    assert channel_wise_divergence(s, tt, 4.0).item() == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_cwd_matches_numpy(tau):
    g = np.random.default_rng(0)
    s, tt = g.normal(size=(2, 3, 4, 5)) * 3, g.normal(size=(2, 3, 4, 5)) * 3
    assert channel_wise_divergence(t(s), t(tt), tau).item() == pytest.approx(np_cwd(s, tt, tau), rel=1e-10)
    assert channel_wise_divergence(t(tt), t(tt), tau).item() == pytest.approx(0.0, abs=1e-12)


def logits_pair(seed=0, shape=(2, 3, 8, 8)):
    g = np.random.default_rng(seed)
    return g.normal(size=shape) * 3, g.normal(size=shape) * 3


def test_cwd_method_defaults_and_weight():
    assert distill.default_weights("cwd") == {"cwd": 3.0, "temperature": 4.0}
    _, d, sf, tf = distill_once("cwd")
    assert set(d(sf, tf)) == {"kd_cwd", "kd_total"}  # runs on a TinyNet pair (float32)
    s, tt = logits_pair()
    out = d.method({"pred_final": [t(s)]}, {"pred_final": [t(tt)]})
    assert out["kd_cwd"].item() == pytest.approx(np_cwd(s, tt, 4.0), rel=1e-10)
    assert out["kd_total"].item() == pytest.approx(3 * np_cwd(s, tt, 4.0), rel=1e-10)
    with pytest.raises(ValueError, match="same batch and classes"):
        channel_wise_divergence(torch.zeros(1, 2, 4, 4), torch.zeros(1, 3, 4, 4))


# ---------------------------------------------------------------- DIST


def np_dist(s, tt, tau):
    """Huang et al.: Y = softmax(z / tau) per pixel; inter = 1 - mean over pixels of pearson over classes;
    intra = 1 - mean over classes of pearson over all pixels of the batch; both times tau^2."""
    k = s.shape[1]
    ys = np.exp(s / tau) / np.exp(s / tau).sum(axis=1, keepdims=True)
    yt = np.exp(tt / tau) / np.exp(tt / tau).sum(axis=1, keepdims=True)
    rows_s = np.moveaxis(ys, 1, -1).reshape(-1, k)
    rows_t = np.moveaxis(yt, 1, -1).reshape(-1, k)
    inter = 1 - np.mean([np.corrcoef(rows_s[i], rows_t[i])[0, 1] for i in range(rows_s.shape[0])])
    intra = 1 - np.mean([np.corrcoef(rows_s[:, c], rows_t[:, c])[0, 1] for c in range(k)])
    return inter * tau**2, intra * tau**2


def test_dist_by_hand():
    """One pixel, probabilities t = (0.7, 0.2, 0.1), s = (0.1, 0.2, 0.7): centred (11, -4, -7)/30 and (-7, -4, 11)/30,
    pearson = (-77 + 16 - 77) / (121 + 16 + 49) = -138/186, inter = 1 + 138/186. A second pixel equal in both
    (pearson 1) halves the mean: inter = (138/186) / 2 + ... -> (1 + 138/186 + 0) / 2."""
    pt = np.array([[0.7, 0.2, 0.1], [0.5, 0.3, 0.2]])
    ps = np.array([[0.1, 0.2, 0.7], [0.5, 0.3, 0.2]])
    to_logits = lambda p: t(np.log(p).T.reshape(1, 3, 1, 2))  # noqa: E731
    inter, intra = dist_relations(to_logits(ps), to_logits(pt), 1.0)
    assert inter.item() == pytest.approx((1 + 138 / 186) / 2, rel=1e-6)
    # intra, class 0 over the two pixels: (0.1, 0.5) vs (0.7, 0.5): pearson -1; class 1: (0.2, 0.3) vs (0.2, 0.3): 1;
    # class 2: (0.7, 0.2) vs (0.1, 0.2): -1 -> 1 - (-1 + 1 - 1)/3 = 4/3
    assert intra.item() == pytest.approx(4 / 3, rel=1e-6)


@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_dist_matches_numpy(tau):
    g = np.random.default_rng(1)
    s, tt = g.normal(size=(2, 4, 3, 5)) * 2, g.normal(size=(2, 4, 3, 5)) * 2
    inter, intra = dist_relations(t(s), t(tt), tau)
    want = np_dist(s, tt, tau)
    assert (inter.item(), intra.item()) == pytest.approx(want, rel=1e-6)  # the authors' eps 1e-8 in the denominator


def test_dist_method_defaults_and_weights():
    assert distill.default_weights("dist") == {"dist": 1.0, "beta": 1.0, "gamma": 1.0, "temperature": 1.0}
    _, d, sf, tf = distill_once("dist", beta=2.0, gamma=0.5)
    assert set(d(sf, tf)) == {"kd_inter", "kd_intra", "kd_total"}
    s, tt = logits_pair(1)
    out = d.method({"pred_final": [t(s)]}, {"pred_final": [t(tt)]})
    want = np_dist(s, tt, 1.0)
    assert (out["kd_inter"].item(), out["kd_intra"].item()) == pytest.approx(want, rel=1e-7)
    assert out["kd_total"].item() == pytest.approx(2 * want[0] + 0.5 * want[1], rel=1e-7)
