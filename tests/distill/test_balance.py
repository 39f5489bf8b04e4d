"""kd_balance='grad': balanced weights follow the ratio of gradient norms on the student's encoder."""

from __future__ import annotations

import pytest
import torch
from monai.engines.utils import IterationEvents
from torch import nn

import distill
from distill.balance import GradientBalancer, check_kd_balance, encoder_parameters
from networks.losses import SegLoss
from tests.distill.test_handler import _trainer
from tests.distill.tiny_nets import distill_once, pair


def _linear_losses(w, a, b, c):
    """L_seg = a.w, L_1 = b.w, L_2 = c.w: gradient norms on w are exactly |a|, |b|, |c|."""
    return (a * w).sum(), {"kd_one": (b * w).sum(), "kd_two": (c * w).sum()}


def test_weights_follow_the_gradient_ratio_exactly():
    w = nn.Parameter(torch.randn(8))
    a, b, c = torch.full((8,), 0.5), torch.full((8,), 2.0), torch.full((8,), 0.125)  # norms 0.5*sqrt8, 2*sqrt8, ...
    bal = GradientBalancer([w], {"kd_one": 0.9, "kd_two": 0.1}, ratio=0.25, every=1, momentum=0.0)
    seg, terms = _linear_losses(w, a, b, c)
    total = bal(seg, terms)
    assert bal.weights["kd_one"] == pytest.approx(0.25 * 0.5 / 2.0)
    assert bal.weights["kd_two"] == pytest.approx(0.25 * 0.5 / 0.125)
    # each weighted term now pulls with r times the segmentation gradient
    (g1,) = torch.autograd.grad(bal.weights["kd_one"] * terms["kd_one"], [w], retain_graph=True)
    (g_seg,) = torch.autograd.grad(seg, [w], retain_graph=True)
    assert g1.norm().item() == pytest.approx(0.25 * g_seg.norm().item())
    assert total.item() == pytest.approx(sum(bal.weights[k] * terms[k].item() for k in terms))


def test_running_averages_and_measurement_interval():
    w = nn.Parameter(torch.randn(8))
    bal = GradientBalancer([w], {"kd_one": 1.0, "kd_two": 0.0}, ratio=1.0, every=2, momentum=0.5)
    one = torch.ones(8) / 8**0.5  # unit norm
    bal(*_linear_losses(w, 1.0 * one, 4.0 * one, one))  # measures: ema seg 1, term 4
    assert bal.weights == {"kd_one": pytest.approx(0.25), "kd_two": 0.0}  # a term with paper weight 0 stays off
    bal(*_linear_losses(w, 100 * one, one, one))  # not measured (every 2)
    assert bal.weights["kd_one"] == pytest.approx(0.25)
    bal(*_linear_losses(w, 3.0 * one, 2.0 * one, one))  # ema seg 0.5*1 + 0.5*3 = 2, term 0.5*4 + 0.5*2 = 3
    assert bal.ema["seg"] == pytest.approx(2.0) and bal.ema["kd_one"] == pytest.approx(3.0)
    assert bal.weights["kd_one"] == pytest.approx(2.0 / 3.0)
    assert bal.fixed_ratios() == {"kd_one": pytest.approx(1.5)}  # 1.0 * 3 / 2; the weight-0 term is never measured
    assert bal.calls == 3


def test_balancer_on_a_tiny_network_matches_backward_norms():
    """HLFD terms of a TinyNet pair: weights equal r * ||grad L_seg|| / ||grad L_i||, norms from plain .backward()."""
    s_net, d, sf, tf = distill_once("hlfd")
    params = encoder_parameters(s_net)
    assert len(params) == len(list(s_net.parameters()))  # TinyNet has no .encoder: the whole student
    x = torch.randn(2, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    y = torch.randint(0, 2, (2, 1, 16, 16), generator=torch.Generator().manual_seed(1))

    def losses():
        with d.student_capture:
            pred = s_net(x)
        return SegLoss()(pred, y), d(d.student_capture.outputs, d.teacher_features(x), y)

    def norm_of(name):
        s_net.zero_grad()
        seg, terms = losses()
        (seg if name == "seg" else terms[name]).backward()
        return torch.sqrt(sum(p.grad.pow(2).sum() for p in params if p.grad is not None)).item()

    want = {k: 0.25 * norm_of("seg") / norm_of(k) for k in ("kd_ufd", "kd_ifd", "kd_upd", "kd_ipd")}
    bal = GradientBalancer(params, d.method.term_weights(), ratio=0.25, every=5)
    bal(*losses())
    assert bal.weights == pytest.approx(want, rel=1e-4)


def test_term_weights_recompose_kd_total():
    for method in ("hlfd", "hinton", "cwd", "dist", "skd"):
        _, d, sf, tf = distill_once(method)
        out = d(sf, tf)
        total = sum(w * out[k] for k, w in d.method.term_weights().items())
        assert total.item() == pytest.approx(out["kd_total"].item(), rel=1e-6), method


def test_handler_logs_balanced_weights_and_uses_them():
    s_net, t_net = pair()
    d = distill.create_distiller("hlfd", s_net, t_net)
    trainer = _trainer(s_net, d, lr=0.0, balance="grad", balance_ratio=0.5, balance_every=1)
    seen = []

    @trainer.on(IterationEvents.LOSS_COMPLETED)
    def record(engine):
        seen.append({k: v for k, v in engine.state.output.items() if k.startswith(("kd_", "loss"))})

    trainer.run()
    rec = seen[-1]
    weights = {k: rec[f"kd_weight_{k}"] for k in ("ufd", "ifd", "upd", "ipd")}
    assert all(w > 0 for w in weights.values())
    kd = sum(weights[k] * rec[f"kd_{k}"] for k in weights)
    assert rec["kd_total"] == pytest.approx(kd, rel=1e-4)
    paper = d.method.term_weights()
    for k in weights:  # w_i = r * paper_i / ratio_i
        assert weights[k] == pytest.approx(0.5 * paper[f"kd_{k}"] / rec[f"kd_gradratio_{k}"], rel=1e-4)
    assert rec["loss"].item() == pytest.approx(rec["loss_seg"] + kd, rel=1e-4)


def test_bad_balance_options():
    s_net, t_net = pair()
    d = distill.create_distiller("hlfd", s_net, t_net)
    with pytest.raises(ValueError, match="Unknown kd_balance 'gradient'; valid: none, grad"):
        distill.DistillationHandler(d, allow_untrained_teacher=True, balance="gradient")
    with pytest.raises(ValueError, match="kd_balance_ratio must be a finite number > 0"):
        distill.DistillationHandler(d, allow_untrained_teacher=True, balance="grad", balance_ratio=0.0)
    with pytest.raises(ValueError, match="method 'none' has none"):
        distill.DistillationHandler(distill.create_distiller("none", s_net), balance="grad")
    assert check_kd_balance(" GRAD ") == "grad"
