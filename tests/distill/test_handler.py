from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from torch import nn

import distill
from networks.losses import SegLoss
from tests.distill.tiny_nets import np_hlfd_terms, pair


def _data(n=4, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [
        {"image": torch.randn(1, size, size, generator=g), "label": torch.randint(0, 2, (1, size, size), generator=g)}
        for _ in range(n)
    ]


def _trainer(student, distiller, lr=0.0, decollate=False, wrapped=None, **handler_kwargs):
    net = wrapped if wrapped is not None else student
    opt = torch.optim.SGD(distill.trainable_parameters(student, distiller), lr=lr)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=DataLoader(_data(), batch_size=2, shuffle=False),
        network=net,
        optimizer=opt,
        loss_function=SegLoss(),
        decollate=decollate,
    )
    distill.DistillationHandler(distiller, allow_untrained_teacher=True, **handler_kwargs).attach(trainer)
    return trainer


def test_handler_adds_exactly_beta_lf_plus_lambda_lp():
    s_net, t_net = pair()
    d = distill.create_distiller("hlfd", s_net, t_net)
    trainer = _trainer(s_net, d, lr=0.0)  # lr 0: weights fixed, so the loss can be recomputed afterwards
    seen = []

    @trainer.on(IterationEvents.LOSS_COMPLETED)
    def record(engine):  # runs after the distillation handler (registered later)
        o = engine.state.output
        seen.append({k: (v.item() if isinstance(v, torch.Tensor) and v.ndim == 0 else v) for k, v in o.items()})

    trainer.run()
    assert not d.student_capture.is_open and d.student_capture.outputs == {}  # closed after the iteration
    assert len(seen) == 2
    for i, rec in enumerate(seen):
        batch = _data()[2 * i : 2 * i + 2]
        x = torch.stack([b["image"] for b in batch])
        y = torch.stack([b["label"] for b in batch])
        with d.student_capture:
            pred = s_net(x)
        seg = SegLoss()(pred, y).item()
        ufd, ifd, upd, ipd = np_hlfd_terms(d.student_capture.outputs, d.teacher_features(x), d.connectors)
        kd = 0.9 * (ufd + ifd) + 0.1 * (upd + ipd)
        assert rec["loss_seg"] == pytest.approx(seg, rel=1e-5)
        assert rec["loss"] == pytest.approx(seg + kd, rel=1e-4)
        assert rec["loss"] - rec["loss_seg"] == pytest.approx(kd, rel=1e-3)
        for k, v in {"kd_ufd": ufd, "kd_ifd": ifd, "kd_upd": upd, "kd_ipd": ipd, "kd_total": kd}.items():
            assert isinstance(rec[k], float) and rec[k] == pytest.approx(v, rel=1e-3), k


@pytest.mark.parametrize("method", ["hlfd", "emkd", "skd"])
def test_training_step_updates_student_and_connectors_not_teacher(method):
    s_net, t_net = pair()
    d = distill.create_distiller(method, s_net, t_net, **({"holistic": 0.1} if method == "skd" else {}))
    t_before = {k: v.clone() for k, v in t_net.state_dict().items()}
    s_before = {k: v.clone() for k, v in s_net.state_dict().items()}
    c_before = {k: v.clone() for k, v in d.state_dict().items()}
    trainer = _trainer(s_net, d, lr=0.1, decollate=True)
    trainer.run()
    assert all(torch.equal(v, t_before[k]) for k, v in t_net.state_dict().items())  # bit-identical
    assert any(not torch.equal(v, s_before[k]) for k, v in s_net.state_dict().items())
    assert all(not torch.equal(v, c_before[k]) for k, v in d.state_dict().items())  # every connector trained
    out = trainer.state.output  # decollated list: floats replicated per item for StatsHandler
    assert isinstance(out[0]["kd_total"], float) and "loss_seg" in out[0]
    assert not t_net.training


def test_none_method_adds_zero():
    s_net, _ = pair()
    d = distill.create_distiller("none", s_net)
    trainer = _trainer(s_net, d)
    trainer.run()
    o = trainer.state.output
    assert o["kd_total"] == 0.0 and o["loss"].item() == pytest.approx(o["loss_seg"])


def test_handler_in_train_handlers_list():
    # SupervisedTrainer attaches train_handlers before it has its network: the check runs at STARTED
    s_net, t_net = pair()
    d = distill.create_distiller("hinton", s_net, t_net)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(_data(), batch_size=2),
        network=s_net, optimizer=torch.optim.SGD(distill.trainable_parameters(s_net, d), lr=0.1),
        loss_function=SegLoss(), decollate=False,
        train_handlers=[distill.DistillationHandler(d, allow_untrained_teacher=True)],
    )
    trainer.run()
    assert trainer.state.output["kd_total"] > 0
    other, _ = pair(seed=1)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(_data(), batch_size=2),
        network=other, optimizer=torch.optim.SGD(other.parameters(), lr=0.1), loss_function=SegLoss(),
        train_handlers=[distill.DistillationHandler(d, allow_untrained_teacher=True)],
    )
    with pytest.raises(ValueError, match="not the distiller's student"):
        trainer.run()


def test_handler_rejects_other_network():
    s_net, t_net = pair()
    d = distill.create_distiller("hlfd", s_net, t_net)
    other, _ = pair(seed=1)
    with pytest.raises(ValueError, match="not the distiller's student"):
        _trainer(other, d)


def test_dataparallel_wrapped_student():
    s_net, t_net = pair()
    wrapped = nn.DataParallel(s_net)  # CPU: a `module.`-prefixed wrapper that calls the network
    d = distill.create_distiller("hlfd", wrapped, t_net)
    trainer = _trainer(s_net, d, lr=0.1, wrapped=wrapped)
    trainer.run()
    assert trainer.state.output["kd_total"] > 0


def test_ddp_wrapped_student_gloo(tmp_path):
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        s_net, t_net = pair()
        ddp = nn.parallel.DistributedDataParallel(s_net, find_unused_parameters=True)  # TinyNet: pred_mid heads unused
        d = distill.create_distiller("hifd", ddp, t_net)
        assert d.student_capture.paths and distill.unwrap(d.student) is s_net
        before = {k: v.clone() for k, v in s_net.state_dict().items()}
        trainer = _trainer(s_net, d, lr=0.1, wrapped=ddp)
        trainer.run()
        assert trainer.state.output["kd_total"] > 0
        assert any(not torch.equal(v, before[k]) for k, v in s_net.state_dict().items())
    finally:
        dist.destroy_process_group()


def test_mixed_precision_features_give_float32_losses():
    s_net, t_net = pair()
    d = distill.create_distiller("hlfd", s_net, t_net)
    x = torch.randn(2, 1, 16, 16)
    with d.student_capture:
        s_net(x)
    ref = d(d.student_capture.outputs, d.teacher_features(x))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        with d.student_capture:
            s_net(x)
        assert d.student_capture.outputs["mid1"].dtype == torch.bfloat16
        out = d(d.student_capture.outputs, d.teacher_features(x))
    assert all(v.dtype == torch.float32 for v in out.values())
    for k in ref:
        assert out[k].item() == pytest.approx(ref[k].item(), rel=0.1, abs=1e-3), k


def test_warmup_ramps_the_distillation_weight_linearly():
    """warmup_epochs=1 over a 2-iteration epoch: scale (it - 1) / 2 -> 0 then 0.5 (then 1 from epoch 2 on)."""
    s_net, t_net = pair()
    d = distill.create_distiller("hlfd", s_net, t_net)
    trainer = _trainer(s_net, d, lr=0.0, warmup_epochs=1.0)
    seen = []

    @trainer.on(IterationEvents.LOSS_COMPLETED)
    def record(engine):
        o = engine.state.output
        seen.append((o["loss"].item(), o["loss_seg"], o["kd_total"], o["kd_scale"]))

    trainer.run()
    assert [s[3] for s in seen] == [0.0, 0.5]
    for loss, seg, kd, scale in seen:
        assert loss == pytest.approx(seg + scale * kd, rel=1e-5)
    with pytest.raises(ValueError, match="warmup_epochs"):
        distill.DistillationHandler(d, allow_untrained_teacher=True, warmup_epochs=-1)
