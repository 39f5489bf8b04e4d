from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import distill
from distill.hlfd import IFDLoss, IPDLoss, UFDLoss, UPDLoss
from distill.kl import pixel_kl
from tests.distill.tiny_nets import np_at_dist, np_hlfd_terms, np_kl, np_resize, np_softmax, pair

T64 = torch.float64


def t(x):
    return torch.tensor(x, dtype=T64)


def test_kl_by_hand():
    # teacher p = (1/2, 1/2); student logits (0, ln 3) -> q = (1/4, 3/4); KL = 1/2 ln 2 + 1/2 ln(2/3)
    p = torch.full((1, 2, 1, 1), 0.5, dtype=T64)
    s = t([[[[0.0]], [[math.log(3.0)]]]])
    assert pixel_kl(s, p, 1.0).item() == pytest.approx(0.5 * math.log(2) + 0.5 * math.log(2 / 3))
    # with T = 2 the student logits are halved and the result scaled by 4
    q = np.array([1, 3**0.5]) / (1 + 3**0.5)
    want = 4 * (0.5 * math.log(0.5 / q[0]) + 0.5 * math.log(0.5 / q[1]))
    assert pixel_kl(s, p, 2.0).item() == pytest.approx(want)


def test_ufd_matches_numpy():
    g = np.random.default_rng(0)
    s = g.normal(size=(2, 2, 4, 4))
    tm = [g.normal(size=(2, 2, 4, 4)), g.normal(size=(2, 3, 2, 2))]
    unified = np.concatenate([np_resize(tm[0], (2, 2)), tm[1]], axis=1)  # smallest middle size is 2x2
    assert UFDLoss()(t(s), [t(x) for x in tm]).item() == pytest.approx(np_at_dist(s, unified), rel=1e-9)


def test_ifd_matches_numpy_and_sums():
    g = np.random.default_rng(1)
    sm = [g.normal(size=(2, 2, 4, 4)), g.normal(size=(2, 3, 2, 2))]
    late = g.normal(size=(2, 2, 2, 2))
    want = np_at_dist(sm[0], late) + np_at_dist(sm[1], late)
    assert IFDLoss()([t(x) for x in sm], t(late)).item() == pytest.approx(want, rel=1e-9)


def test_upd_averages_tempered_probabilities():
    g = np.random.default_rng(2)
    s = g.normal(size=(2, 2, 2, 2))
    tp = [g.normal(size=(2, 2, 4, 4)), g.normal(size=(2, 2, 4, 4))]
    unified = (np_softmax(tp[0] / 4) + np_softmax(tp[1] / 4)) / 2
    assert UPDLoss(4.0)(t(s), [t(x) for x in tp]).item() == pytest.approx(np_kl(s, unified, 4.0), rel=1e-9)


def test_ipd_is_mean_over_middle_maps():
    g = np.random.default_rng(3)
    sm = [g.normal(size=(2, 2, 4, 4)), g.normal(size=(2, 2, 2, 2))]
    final = g.normal(size=(2, 2, 4, 4))
    p = np_softmax(final / 4)
    want = (np_kl(sm[0], p, 4) + np_kl(sm[1], p, 4)) / 2
    assert IPDLoss(4.0)([t(x) for x in sm], t(final)).item() == pytest.approx(want, rel=1e-9)


def test_terms_zero_when_student_equals_teacher():
    g = np.random.default_rng(4)
    z = t(g.normal(size=(2, 2, 4, 4)))
    assert UFDLoss()(z, [z]).item() == pytest.approx(0, abs=1e-12)
    assert IFDLoss()([z, z], z).item() == pytest.approx(0, abs=1e-12)
    assert UPDLoss()(z, [z, z]).item() == pytest.approx(0, abs=1e-12)
    assert IPDLoss()([z], z).item() == pytest.approx(0, abs=1e-12)


def _features(student, teacher, x):
    d = distill.create_distiller("hlfd", student, teacher)
    with d.student_capture:
        student(x)
    return d, d.student_capture.outputs, d.teacher_features(x)


def test_hlfd_total_is_beta_feature_plus_lambda_pixel_with_its_heads():
    s_net, t_net = pair()
    x = torch.randn(2, 1, 16, 16)
    d, sf, tf = _features(s_net, t_net, x)
    out = d(sf, tf)
    ufd, ifd, upd, ipd = np_hlfd_terms(sf, tf, d.connectors)
    for k, v in {"kd_ufd": ufd, "kd_ifd": ifd, "kd_upd": upd, "kd_ipd": ipd}.items():
        assert out[k].item() == pytest.approx(v, rel=1e-4), k
    assert out["kd_total"].item() == pytest.approx(0.9 * (ufd + ifd) + 0.1 * (upd + ipd), rel=1e-4)
    # same inputs -> same loss (no random projections)
    again = d(sf, tf)
    assert all(again[k].item() == out[k].item() for k in out)


def test_hlfd_weights_override():
    s_net, t_net = pair()
    x = torch.randn(2, 1, 16, 16)
    d, sf, tf = _features(s_net, t_net, x)
    base = d(sf, tf)
    torch.manual_seed(0)
    d2 = distill.create_distiller("hlfd", s_net, t_net, beta=1.8, lam=0.2, ufd=0.0, ipd=2.0)
    d2.load_state_dict(d.state_dict())
    out = d2(sf, tf)
    want = 1.8 * base["kd_ifd"] + 0.2 * (base["kd_upd"] + 2 * base["kd_ipd"])
    assert out["kd_total"].item() == pytest.approx(want.item(), rel=1e-6)


def test_hlfd_3d():
    s_net, t_net = pair(spatial_dims=3)
    x = torch.randn(1, 1, 16, 16, 8)
    d, sf, tf = _features(s_net, t_net, x)
    out = d(sf, tf)
    assert set(out) >= {"kd_ufd", "kd_ifd", "kd_upd", "kd_ipd", "kd_total"}
    assert all(torch.isfinite(v) for v in out.values())
