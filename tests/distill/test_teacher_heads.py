"""Defect 1 of the HLFD review: UPD must not distil a teacher's untrained heads.

A UNet++ trained without deep supervision never back-propagates into ``head1 .. head{L-2}``: their logits stay at
their random initialisation. The teacher must be trained with deep supervision over ALL its heads (loss weights
sized to the head count) and methods that read a teacher's intermediate predictions must refuse a teacher whose
heads were not trained.
"""

from __future__ import annotations

import pytest
import torch

import distill
import networks
from networks.losses import SegLoss

KW = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "features": (4, 8, 8, 16)}  # 4 levels: heads 1..3
STUDENT = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "base_width": 8}


def _step_grads(deep_supervision: bool) -> dict[str, torch.Tensor | None]:
    torch.manual_seed(0)
    net = networks.create("unetpp_teacher", deep_supervision=deep_supervision, **KW).train()
    loss = SegLoss(ds_weights=net.ds_weights)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 1, 32, 32))
    loss(net(x), y).backward()
    return {f"head{j}": getattr(net, f"head{j}").weight.grad for j in (1, 2, 3)}


def test_deep_supervision_trains_every_head_with_weights_sized_to_the_heads():
    net = networks.create("unetpp_teacher", deep_supervision=True, **KW)
    assert net.ds_weights == pytest.approx((1 / 3, 1 / 3, 1 / 3))  # L - 1 = 3 heads, averaged as in UNet++
    assert net.supervised_taps() == {"head1", "head2", "head3"}
    grads = _step_grads(True)
    for name, g in grads.items():
        assert g is not None and g.abs().sum() > 0, f"{name} received no gradient"


def test_without_deep_supervision_only_the_final_head_learns():
    net = networks.create("unetpp_teacher", deep_supervision=False, **KW)
    assert net.ds_weights is None and net.supervised_taps() == {"head3"}
    grads = _step_grads(False)
    assert grads["head1"] is None and grads["head2"] is None and grads["head3"] is not None


def test_segloss_default_weights_follow_the_number_of_outputs():
    """Equal weights over however many outputs arrive: 4 UNet++ outputs no longer crash a 3-weight default."""
    torch.manual_seed(0)
    y = torch.randint(0, 3, (2, 1, 16, 16))
    preds = tuple(torch.randn(2, 3, 16, 16) for _ in range(4))
    single = SegLoss()
    want = sum(single(p, y) for p in preds) / 4
    torch.testing.assert_close(SegLoss()(preds, y), want)
    with pytest.raises(ValueError, match="4 deep-supervision outputs but 3"):
        SegLoss(ds_weights=(0.5, 0.3, 0.2))(preds, y)


def _teacher(tmp_path, deep_supervision: bool):
    net = networks.create("unetpp_teacher", deep_supervision=deep_supervision, **KW)
    path = tmp_path / f"teacher_ds{int(deep_supervision)}.pt"
    torch.save({"model": net.state_dict(), "network": {"name": "unetpp_teacher", "deep_supervision": deep_supervision, **KW}, "epoch": 3}, path)
    return distill.load_teacher(path)


@pytest.mark.parametrize("method", ["hlfd"])
def test_methods_reading_intermediate_predictions_refuse_untrained_heads(tmp_path, method):
    student = networks.create("resnet18_student", **STUDENT)
    with pytest.raises(ValueError, match=r"head1.*not trained.*deep supervision"):
        distill.create_distiller(method, student, _teacher(tmp_path, False))
    distill.create_distiller(method, student, _teacher(tmp_path, True))  # trained heads: accepted


def test_methods_reading_only_the_final_map_accept_a_teacher_without_deep_supervision(tmp_path):
    student = networks.create("resnet18_student", **STUDENT)
    distill.create_distiller("hinton", student, _teacher(tmp_path, False))


def test_bundle_preflight_refuses_a_teacher_without_deep_supervision_before_any_work(tmp_path):
    from pipelines.engine import BundleInputError, check_teacher_checkpoint

    _teacher(tmp_path, False)
    bad = tmp_path / "teacher_ds0.pt"
    with pytest.raises(BundleInputError, match=r"teacher_ds0.pt.*head1.*not trained"):
        check_teacher_checkpoint(bad, "hlfd", "hlfd")
    assert check_teacher_checkpoint(bad, "kd_baselines", "hinton")  # reads the final map only
    _teacher(tmp_path, True)
    assert check_teacher_checkpoint(tmp_path / "teacher_ds1.pt", "hlfd", "hlfd")
