from __future__ import annotations

import numpy as np
import pytest
import torch

import distill
from distill.baselines import ImportanceMapLoss, PairwiseAffinityLoss, RegionAffinityLoss
from distill.baselines.emkd import region_prototypes
from tests.distill.tiny_nets import distill_once, np_at_dist, np_conv1x1, np_kl, np_resize, np_softmax, pair


def t(x):
    return torch.tensor(x, dtype=torch.float64)


def np_affinity(f):
    v = f.reshape(f.shape[0], f.shape[1], -1)
    v = v / np.linalg.norm(v, axis=1, keepdims=True)
    return np.einsum("bci,bcj->bij", v, v)


def test_pairwise_by_hand():
    # two nodes: student features parallel (affinity 1), teacher orthogonal (0) -> mean over 2x2 of (0,1,1,0)^2 = 0.5
    s = t([[[[1.0, 2.0]], [[1.0, 2.0]]]])
    tt = t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert PairwiseAffinityLoss()(s, tt).item() == pytest.approx(0.5)


def test_pairwise_matches_numpy_with_resize():
    g = np.random.default_rng(0)
    s, tt = g.normal(size=(2, 2, 2, 2)), g.normal(size=(2, 3, 4, 4))
    want = ((np_affinity(np_resize(s, (4, 4))) - np_affinity(tt)) ** 2).mean()
    assert PairwiseAffinityLoss()(t(s), t(tt)).item() == pytest.approx(want, rel=1e-9)
    # pooled nodes: 2x2 average pooling of a 4x4 map gives 4 nodes
    pooled = tt.reshape(2, 3, 2, 2, 2, 2).mean(axis=(3, 5))
    want = ((np_affinity(pooled) - np_affinity(pooled)) ** 2).mean()
    assert PairwiseAffinityLoss(pool=2)(t(tt), t(tt)).item() == pytest.approx(want, abs=1e-12)


def test_importance_map_sums_pairs():
    g = np.random.default_rng(1)
    s = [g.normal(size=(2, 2, 4, 4)), g.normal(size=(2, 2, 2, 2))]
    tt = [g.normal(size=(2, 3, 4, 4)), g.normal(size=(2, 2, 4, 4))]
    want = np_at_dist(s[0], tt[0]) + np_at_dist(s[1], tt[1])
    assert ImportanceMapLoss()([t(x) for x in s], [t(x) for x in tt]).item() == pytest.approx(want, rel=1e-9)


def test_region_affinity_by_hand_and_numpy():
    # 1x2 image, classes 0 | 1; student prototypes (1,0),(1,0) -> cos 1; teacher (1,0),(0,1) -> cos 0
    regions = t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    s = t([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    tt = t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert RegionAffinityLoss()([s], [tt], regions).item() == pytest.approx(1.0)  # one pair: (1 - 0)^2 (EMKD)
    g = np.random.default_rng(2)
    feat = g.normal(size=(2, 2, 4, 4))
    lab = g.integers(0, 3, size=(2, 8, 8))
    onehot = np.eye(3)[lab].transpose(0, 3, 1, 2)
    w = onehot.reshape(2, 3, 4, 2, 4, 2).mean(axis=(3, 5)).reshape(2, 3, -1)  # average pool to 4x4
    want = np.einsum("bkn,bcn->bkc", w, feat.reshape(2, 2, -1)) / w.sum(-1, keepdims=True)
    np.testing.assert_allclose(region_prototypes(t(feat), t(onehot)).numpy(), want, rtol=1e-9)


def test_hinton_matches_numpy_and_zero_on_equal_logits():
    _, d, sf, tf = distill_once("hinton")
    out = d(sf, tf)
    want = np_kl(sf["head"].detach().double().numpy(), np_softmax(tf["head"].double().numpy() / 4), 4)
    assert out["kd_kl"].item() == pytest.approx(want, rel=1e-4)
    assert out["kd_total"].item() == pytest.approx(want, rel=1e-4)
    assert d({"head": tf["head"]}, tf)["kd_total"].item() == pytest.approx(0, abs=1e-6)


def test_skd_pixel_plus_pair():
    _, d, sf, tf = distill_once("skd")
    out = d(sf, tf)
    s_logit, t_logit = sf["head"].detach().double().numpy(), tf["head"].double().numpy()
    pixel = np_kl(s_logit, np_softmax(t_logit), 1) * s_logit.shape[0]  # summed over the batch (SKD's official scale)
    pair_ = ((np_affinity(sf["late"].detach().double().numpy()) - np_affinity(tf["late"].double().numpy())) ** 2).mean()
    assert out["kd_pixel"].item() == pytest.approx(pixel, rel=1e-4)
    assert out["kd_pair"].item() == pytest.approx(pair_, rel=1e-4)
    assert out["kd_total"].item() == pytest.approx(10 * pixel + 10 * pair_, rel=1e-4)
    assert "kd_holistic" not in out and len(list(d.parameters())) == 0  # holistic off by default, no critic


def test_skd_holistic_trains_critic_and_reverses_student_gradient():
    _, d, sf, tf = distill_once("skd", holistic=0.1)
    out = d(sf, tf)
    assert "kd_holistic" in out and torch.isfinite(out["kd_holistic"])
    out["kd_total"].backward()
    assert all(p.grad is not None for p in d.connectors["critic"].parameters())


def test_emkd_terms():
    _, d, sf, tf = distill_once("emkd")
    # default pairing by nearest stride: student early(2)->teacher early(2), mid1(4)->mid1, mid2(8)->mid2, late(8)->mid2
    assert [tp.path for tp in d.method.plan.teacher["feat"]] == ["early", "mid1", "mid2", "mid2"]
    labels = torch.randint(0, 2, (2, 1, 16, 16))
    out = d(sf, tf, labels)
    pairs = [("early", "early"), ("mid1", "mid1"), ("mid2", "mid2"), ("late", "mid2")]
    npf = lambda k, f: f[k].detach().double().numpy()  # noqa: E731
    imd = sum(np_at_dist(npf(a, sf), npf(b, tf)) for a, b in pairs)
    pmd = np_kl(npf("head", sf), np_softmax(npf("head", tf) / 4), 4)
    assert out["kd_imd"].item() == pytest.approx(imd, rel=1e-4)
    assert out["kd_pmd"].item() == pytest.approx(pmd, rel=1e-4)
    assert out["kd_total"].item() == pytest.approx(0.1 * pmd + 0.9 * imd + 0.9 * out["kd_rad"].item(), rel=1e-4)
    assert torch.isfinite(d(sf, tf)["kd_rad"])  # without labels: the teacher's argmax


def test_hifd_matches_numpy():
    _, d, sf, tf = distill_once("hifd")
    out = d(sf, tf)
    late = tf["late"].double().numpy()
    p_t = np_softmax(tf["head"].double().numpy() / 4)
    layers = [sf[k].detach().double().numpy() for k in ("early", "mid1", "mid2")]
    feat = np.mean([((np_conv1x1(np_resize(f, late.shape[2:]), c) - late) ** 2).mean()
                    for f, c in zip(layers, d.connectors["feature"])])
    final = np_kl(sf["head"].detach().double().numpy(), p_t, 4)  # the student's final output is supervised too
    pix = np.mean([np_kl(np_conv1x1(f, h), p_t, 4) for f, h in zip(layers, d.connectors["pixel"])] + [final])
    assert out["kd_feature"].item() == pytest.approx(feat, rel=1e-4)
    assert out["kd_pixel"].item() == pytest.approx(pix, rel=1e-4)
    assert out["kd_final"].item() == pytest.approx(final, rel=1e-4)
    assert out["kd_total"].item() == pytest.approx(0.9 * feat + 0.1 * pix, rel=1e-4)


def test_imf_matches_numpy():
    _, d, sf, tf = distill_once("imf")
    out = d(sf, tf)
    c = d.connectors
    late = tf["late"].double().numpy()
    branches = [np_conv1x1(np_resize(sf[k].detach().double().numpy(), late.shape[2:]), conv)
                for k, conv in zip(("mid1", "mid2", "late"), c["branch"])]
    fused = np_conv1x1(np.concatenate(branches, 1), c["integrate"])
    feat = ((fused - late) ** 2).mean()
    logits = np.stack([np_conv1x1(b, h) for b, h in zip(branches, c["heads"])], 1)
    w_lin, b_lin = c["score"].weight.detach().double().numpy()[0], c["score"].bias.item()
    scores = np.stack([b.reshape(2, b.shape[1], -1).mean(-1) @ w_lin + b_lin for b in branches], 1)
    att = np_softmax(scores, axis=1)
    attentive = (att[:, :, None, None, None] * logits).sum(1)
    logit = np_kl(attentive, np_softmax(tf["head"].double().numpy() / 4), 4)
    assert out["kd_feature"].item() == pytest.approx(feat, rel=1e-4)
    assert out["kd_logit"].item() == pytest.approx(logit, rel=2e-3)  # float32 KL of a small value
    assert out["kd_total"].item() == pytest.approx(feat + logit, rel=1e-3)


@pytest.mark.parametrize("method", ["hlfd", "hinton", "skd", "imf", "emkd", "hifd"])
def test_gradients_reach_student_and_connectors_never_teacher(method):
    s_net, t_net = pair()
    d = distill.create_distiller(method, s_net, t_net)
    x = torch.randn(2, 1, 16, 16)
    with d.student_capture:
        s_net(x)
    out = d(d.student_capture.outputs, d.teacher_features(x), torch.randint(0, 2, (2, 1, 16, 16)))
    out["kd_total"].backward()
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in s_net.parameters())
    assert all(p.grad is not None for p in d.parameters())
    assert all(p.grad is None and not p.requires_grad for p in t_net.parameters())
    assert not t_net.training
    # deterministic: same inputs, same loss
    again = d(d.student_capture.outputs, d.teacher_features(x), torch.zeros(2, 1, 16, 16))
    first = d(d.student_capture.outputs, d.teacher_features(x), torch.zeros(2, 1, 16, 16))
    assert again["kd_total"].item() == first["kd_total"].item()


@pytest.mark.parametrize("method", ["hlfd", "hinton", "skd", "imf", "emkd", "hifd"])
def test_every_method_runs_in_3d(method):
    s_net, t_net = pair(spatial_dims=3)
    d = distill.create_distiller(method, s_net, t_net, **({"holistic": 0.1} if method == "skd" else {}))
    x = torch.randn(1, 1, 16, 16, 8)
    with d.student_capture:
        s_net(x)
    out = d(d.student_capture.outputs, d.teacher_features(x), torch.randint(0, 2, (1, 1, 16, 16, 8)))
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    out["kd_total"].backward()
    assert all(p.grad is not None for p in d.parameters())
