"""The baselines against their papers' original formulas (SKD, EMKD, HIFD, IMF).

Every reference here is written independently of ``distill`` (numpy, or plain torch for gradients) from the original
code's formula quoted in the test.
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

import distill
from networks.student import ResNet18Student
from networks.unetpp import UNetPlusPlus
from tests.distill.tiny_nets import TinyNet, distill_once, np_conv1x1, np_kl, np_resize, np_softmax, pair


def t(x):
    return torch.tensor(x, dtype=torch.float64)


# ---------------------------------------------------------------- SKD (Liu et al., CVPR 2019)


def np_log_softmax(x, axis=1):
    m = x.max(axis=axis, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_skd_official(s, tt):
    """CriterionPixelWise: ``sum(-softmax(t) * log_softmax(s)) / W / H``, summed over batch, pixels and classes."""
    return float((-np_softmax(tt) * np_log_softmax(s)).sum() / np.prod(s.shape[2:]))


def np_teacher_entropy_term(tt):
    """``sum(softmax(t) * log softmax(t)) / W / H`` (the constant that separates the CE form from the KL form)."""
    p = np_softmax(tt)
    return float((p * np.log(p)).sum() / np.prod(tt.shape[2:]))


def test_skd_pixel_term_has_the_official_scale():
    _, d, sf, tf = distill_once("skd")
    s, tt = sf["head"].detach().double().numpy(), tf["head"].double().numpy()
    assert s.shape[0] == 2
    want = np_skd_official(s, tt) + np_teacher_entropy_term(tt)  # KL form: the official CE minus the teacher entropy
    out = d(sf, tf)
    assert out["kd_pixel"].item() == pytest.approx(want, rel=1e-4)
    assert out["kd_total"].item() == pytest.approx(10 * want + 10 * out["kd_pair"].item(), rel=1e-4)


def test_skd_pixel_gradient_equals_the_official_loss_gradient():
    _, d, sf, tf = distill_once("skd")
    s = sf["head"].detach().clone().requires_grad_(True)
    d({"head": s, "late": sf["late"].detach()}, tf)["kd_pixel"].backward()
    # the official loss, in plain torch: rows of (pixels, classes), summed, divided by W*H
    s2 = sf["head"].detach().clone().requires_grad_(True)
    c = s2.shape[1]
    p_t = torch.softmax(tf["head"].permute(0, 2, 3, 1).reshape(-1, c), dim=1)
    log_q = torch.log_softmax(s2.permute(0, 2, 3, 1).reshape(-1, c), dim=1)
    ((-p_t * log_q).sum() / (s2.shape[2] * s2.shape[3])).backward()
    torch.testing.assert_close(s.grad, s2.grad, rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- EMKD (Qin et al., IEEE TMI 2021)


def np_region_contrast_official(x, gt):
    """EMKD ``region_contrast`` (2 classes): one cosine between the background and foreground prototypes, per sample."""
    m0, m1 = gt[:, 0:1], gt[:, 1:2]
    axes = tuple(range(2, x.ndim))
    r0 = (x * m0).sum(axes) / m0.sum(axes)
    r1 = (x * m1).sum(axes) / (m1.sum(axes) + 1.0)
    n0, n1 = np.linalg.norm(r0, axis=1), np.linalg.norm(r1, axis=1)
    return (r0 * r1).sum(1) / np.maximum(n0, 1e-8) / np.maximum(n1, 1e-8)


def np_rad_official(s, tt, gt):
    """EMKD ``region_affinity_distillation``: ``(rc_s - rc_t)^2`` averaged over the batch."""
    return float(((np_region_contrast_official(s, gt) - np_region_contrast_official(tt, gt)) ** 2).mean())


def np_rad_pairs(s, tt, gt):
    """K classes: the squared difference of every distinct pair's cosine, averaged over pairs and batch."""
    k = gt.shape[1]
    axes = tuple(range(2, s.ndim))

    def cos_pairs(x):
        protos = [(x * gt[:, i : i + 1]).sum(axes) / gt[:, i : i + 1].sum(axes) for i in range(k)]
        out = []
        for i, j in itertools.combinations(range(k), 2):
            a, b = protos[i], protos[j]
            out.append((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)))
        return np.stack(out, 1)

    return float(((cos_pairs(s) - cos_pairs(tt)) ** 2).mean())


def _labels(g, k, shape):
    lab = g.integers(0, k, size=shape)
    lab[:, 0, :k] = np.arange(k)  # every class present in every sample
    return np.eye(k)[lab].transpose(0, lab.ndim, *range(1, lab.ndim))


def test_region_affinity_two_classes_is_the_original():
    from distill.baselines import RegionAffinityLoss

    # by hand: student prototypes parallel (cos 1), teacher orthogonal (cos 0) -> (1 - 0)^2 = 1
    regions = t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    s = t([[[[1.0, 1.0]], [[0.0, 0.0]]]])
    tt = t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    assert RegionAffinityLoss()([s], [tt], regions).item() == pytest.approx(1.0)
    g = np.random.default_rng(3)
    for shape in ((3, 4, 4), (2, 4, 4, 2)):  # 2D and 3D
        gt = _labels(g, 2, shape)
        s, tt = g.normal(size=(shape[0], 3, *shape[1:])), g.normal(size=(shape[0], 5, *shape[1:]))
        got = RegionAffinityLoss()([t(s)], [t(tt)], t(gt)).item()
        assert got == pytest.approx(np_rad_official(s, tt, gt), rel=1e-9)
    # a sample without foreground: the original's prototype is 0 / (0 + 1) = 0, its cosine 0; so is ours
    gt = _labels(g, 2, (2, 4, 4))
    gt[1] = 0.0
    gt[1, 0] = 1.0
    s, tt = g.normal(size=(2, 3, 4, 4)), g.normal(size=(2, 5, 4, 4))
    assert RegionAffinityLoss()([t(s)], [t(tt)], t(gt)).item() == pytest.approx(np_rad_official(s, tt, gt), rel=1e-9)


def test_region_affinity_k_classes_averages_distinct_pairs_and_sums_layers():
    from distill.baselines import RegionAffinityLoss

    g = np.random.default_rng(4)
    gt = _labels(g, 3, (2, 4, 4))
    s = [g.normal(size=(2, 3, 4, 4)), g.normal(size=(2, 2, 4, 4))]
    tt = [g.normal(size=(2, 4, 4, 4)), g.normal(size=(2, 6, 4, 4))]
    want = np_rad_pairs(s[0], tt[0], gt) + np_rad_pairs(s[1], tt[1], gt)
    assert RegionAffinityLoss()([t(x) for x in s], [t(x) for x in tt], t(gt)).item() == pytest.approx(want, rel=1e-9)


def np_block_mean(a, size):
    """Average-pool (B, K, *S) by whole blocks to size (the soft region masks of our EMKD)."""
    b, k = a.shape[:2]
    shape = [b, k]
    for n, m in zip(a.shape[2:], size):
        shape += [m, n // m]
    return a.reshape(shape).mean(axis=tuple(range(3, 2 + 2 * len(size), 2)))


def test_emkd_region_affinity_on_decoder_taps():
    from distill.baselines.emkd import decoder_rad_taps, decoder_taps

    torch.manual_seed(0)
    t_net = UNetPlusPlus(2, 1, 2, features=(4, 8, 16, 32))
    s_net = ResNet18Student(2, 1, 2, base_width=2)
    assert [(x.path, x.channels, x.stride) for x in decoder_taps(t_net)] == [
        ("conv2_1", 16, 4), ("conv1_2", 8, 2), ("conv0_3", 4, 1)
    ]
    assert [(x.path, x.channels, x.stride) for x in decoder_taps(s_net)] == [
        (f"decoder.{k}", 4, 2 ** (4 - k)) for k in range(5)
    ]
    s_taps, t_taps = decoder_rad_taps(s_net, t_net)
    d = distill.create_distiller("emkd", s_net, t_net, student_taps=s_taps, teacher_taps=t_taps)
    plan = d.method.plan
    assert [x.path for x in plan.teacher["rad"]] == ["conv2_1", "conv2_1", "conv2_1", "conv1_2", "conv0_3"]
    assert all(x.path.startswith("encoder.") for x in plan.student["feat"])  # IMD stays on the encoder
    x = torch.randn(2, 1, 32, 32)
    labels = torch.randint(0, 2, (2, 1, 32, 32))
    labels[:, 0, 0, :2] = torch.tensor([0, 1])
    with d.student_capture:
        s_net(x)
    sf, tf = d.student_capture.outputs, d.teacher_features(x)
    out = d(sf, tf, labels, input_size=(32, 32))  # declared channels and strides are checked
    onehot = np.eye(2)[labels[:, 0].numpy()].transpose(0, 3, 1, 2)
    want = 0.0
    for st, tt_ in zip(plan.student["rad"], plan.teacher["rad"]):
        fs, ft = sf[st.path].detach().double().numpy(), tf[tt_.path].double().numpy()
        cs = np_region_contrast_official(fs, np_block_mean(onehot, fs.shape[2:]))
        ct = np_region_contrast_official(ft, np_block_mean(onehot, ft.shape[2:]))
        want += float(((cs - ct) ** 2).mean())
    assert out["kd_rad"].item() == pytest.approx(want, rel=1e-4, abs=1e-7)


def test_decoder_taps_refuse_unknown_networks():
    from distill.baselines.emkd import decoder_taps

    with pytest.raises(ValueError, match="TinyNet.*decoder.*networks.Tap"):
        decoder_taps(TinyNet())


def test_emkd_rad_taps_default_to_the_imd_taps_and_can_be_overridden():
    s_net, t_net = pair()
    d = distill.create_distiller("emkd", s_net, t_net)
    plan = d.method.plan
    assert plan.student["rad"] == plan.student["feat"] and plan.teacher["rad"] == plan.teacher["feat"]
    d = distill.create_distiller("emkd", s_net, t_net, student_taps={"rad": ["late"]}, teacher_taps={"rad": ["late"]})
    assert [x.path for x in d.method.plan.student["rad"]] == ["late"]
    assert len(d.method.plan.student["feat"]) == 4


# ---------------------------------------------------------------- HIFD (Luo et al., IJCNN 2023)


def test_hifd_distils_the_final_output_too():
    s_net, d, sf, tf = distill_once("hifd")
    out = d(sf, tf)
    npf = lambda f, k: f[k].detach().double().numpy()  # noqa: E731
    p_t = np_softmax(npf(tf, "head") / 4)
    final = np_kl(npf(sf, "head"), p_t, 4)
    aux = [np_kl(np_conv1x1(npf(sf, k), h), p_t, 4) for k, h in zip(("early", "mid1", "mid2"), d.connectors["pixel"])]
    assert out["kd_final"].item() == pytest.approx(final, rel=1e-4)
    assert out["kd_pixel"].item() == pytest.approx(np.mean(aux + [final]), rel=1e-4)
    want_total = 0.9 * out["kd_feature"].item() + 0.1 * np.mean(aux + [final])
    assert out["kd_total"].item() == pytest.approx(want_total, rel=1e-4)
    out["kd_total"].backward()
    assert s_net.head.weight.grad is not None and s_net.head.weight.grad.abs().sum() > 0  # the final classifier learns


# ---------------------------------------------------------------- IMF (Kim et al., IJCAI 2023)


def _np_imf_attentive(branch_feats, c, size):
    branches = [np_conv1x1(np_resize(f, size), conv) for f, conv in zip(branch_feats, c["branch"])]
    logits = np.stack([np_conv1x1(b, h) for b, h in zip(branches, c["heads"])], 1)
    w_lin, b_lin = c["score"].weight.detach().double().numpy()[0], c["score"].bias.item()
    scores = np.stack([b.reshape(b.shape[0], b.shape[1], -1).mean(-1) @ w_lin + b_lin for b in branches], 1)
    att = np_softmax(scores, axis=1)
    return (att.reshape(*att.shape, *([1] * (logits.ndim - 2))) * logits).sum(1)


@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
def test_imf_network_deploys_the_attentive_branches():
    from distill.baselines import IMFNetwork

    s_net, d, sf, tf = distill_once("imf")
    net = IMFNetwork(s_net, d)
    assert net.out_channels == 2 and net.spatial_dims == 2
    net.eval()
    s_net.eval()
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        y = net(x)
        m1 = s_net.mid1(s_net.early(x))
        m2 = s_net.mid2(m1)
        late = s_net.late(m2)
    feats = [f.double().numpy() for f in (m1, m2, late)]
    attentive = _np_imf_attentive(feats, d.connectors, (2, 2))  # the teacher's late size: 16 // stride 8
    assert y.shape == (2, 2, 16, 16)
    np.testing.assert_allclose(y.double().numpy(), np_resize(attentive, (16, 16)), rtol=1e-4, atol=1e-5)
    sd = net.state_dict()  # one network to save and load: the student and the IMF connectors
    assert any(k.startswith("student.") for k in sd) and any(k.startswith("imf.connectors.branch.") for k in sd)
    with torch.no_grad():
        assert s_net(x).shape == (2, 2, 16, 16)  # the student itself is unchanged (its own head, no hooks left)
    traced = torch.jit.trace(net, x, check_trace=False)  # exportable by tracing
    torch.testing.assert_close(traced(x), y)


def test_imf_network_output_is_what_training_distils():
    from distill.baselines import IMFNetwork
    from distill.kl import pixel_kl, tempered_probs

    s_net, t_net = pair()
    d = distill.create_distiller("imf", s_net, t_net)
    net = IMFNetwork(s_net, d.method)
    x = torch.randn(2, 1, 16, 16)
    with d.student_capture:
        s_net(x)
    tf = d.teacher_features(x)
    kd_logit = d(d.student_capture.outputs, tf)["kd_logit"]
    y = net(x)
    assert pixel_kl(y, tempered_probs(tf["head"], 4.0), 4.0).item() == pytest.approx(kd_logit.item(), rel=1e-5)


def test_imf_network_checks_its_inputs():
    from distill.baselines import IMFNetwork

    s_net, t_net = pair()
    with pytest.raises(TypeError, match="IMF"):
        IMFNetwork(s_net, distill.create_distiller("hinton", s_net, t_net))
    d = distill.create_distiller("imf", s_net, t_net)
    with pytest.raises(ValueError, match="No module"):
        IMFNetwork(torch.nn.Conv2d(1, 2, 1), d)
