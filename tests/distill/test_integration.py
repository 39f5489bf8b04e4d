"""One SupervisedTrainer epoch with the real networks: UNet++ teacher from a checkpoint, ResNet18 student, every
method; and TransFuse-S as the teacher with HLFD. Tiny widths, 2.5D stacks of 3 slices, 32 x 32."""

from __future__ import annotations

import pytest
import torch
from monai.data import DataLoader, MetaTensor
from monai.engines import SupervisedTrainer

import distill
import networks
from networks.losses import SegLoss

UNETPP = {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "features": (4, 8, 8, 16, 16), "deep_supervision": True}
STUDENT = {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "base_width": 8}
TRANSFUSE = {
    "in_channels": 3, "out_channels": 2, "img_size": 32, "embed_dim": 16, "depth": 1, "num_heads": 2,
    "cnn_widths": (4, 8, 16), "cnn_layers": (1, 1, 1), "decoder_channels": (8, 4), "head_channels": 4,
}  # fmt: skip

EXPECTED_KEYS = {
    "hlfd": {"kd_ufd", "kd_ifd", "kd_upd", "kd_ipd"},
    "hinton": {"kd_kl"},
    "skd": {"kd_pixel", "kd_pair"},
    "imf": {"kd_feature", "kd_logit"},
    "emkd": {"kd_pmd", "kd_imd", "kd_rad"},
    "hifd": {"kd_feature", "kd_pixel"},
    "cwd": {"kd_cwd"},
    "dist": {"kd_inter", "kd_intra"},
    "none": set(),
}


def _cohort(n=4, size=32):
    """2.5D samples: (3, H, W) slice stacks with a bright disc, label (1, H, W) of the centre slice."""
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    data = []
    for i in range(n):
        cy, cx, r = 10 + 3 * i, 12 + 2 * i, 4 + i % 3
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()
        image = 0.3 * torch.randn(3, size, size, generator=g) + disc
        data.append({"image": MetaTensor(image), "label": MetaTensor(disc[None].long())})
    return data


def _checkpoint(path, name, kwargs):
    torch.manual_seed(1)
    net = networks.create(name, **kwargs)
    torch.save({"model": net.state_dict(), "network": {"name": name, **kwargs}}, path)
    return path


@pytest.fixture(scope="module")
def unetpp_ckpt(tmp_path_factory):
    return _checkpoint(tmp_path_factory.mktemp("teacher") / "unetpp.pt", "unetpp_teacher", UNETPP)


def _epoch(method, teacher, **options):
    torch.manual_seed(0)
    student = networks.create("resnet18_student", **STUDENT)
    d = distill.create_distiller(method, student, teacher, **options)
    opt = torch.optim.Adam(distill.trainable_parameters(student, d), lr=1e-3)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, network=student, optimizer=opt, loss_function=SegLoss(),
        train_data_loader=DataLoader(_cohort(), batch_size=2), decollate=False,
    )
    distill.DistillationHandler(d, teacher=teacher).attach(trainer)
    t_before = {k: v.clone() for k, v in teacher.state_dict().items()} if teacher is not None else {}
    keys = list(student.state_dict())
    trainer.run()
    assert list(student.state_dict()) == keys  # nothing of the distiller ends up in the exported student
    out = trainer.state.output
    assert trainer.state.iteration == 2
    assert torch.isfinite(out["loss"]) and set(out) >= EXPECTED_KEYS[method] | {"kd_total", "loss_seg"}
    assert out["loss"].item() == pytest.approx(out["loss_seg"] + out["kd_total"], rel=1e-5, abs=1e-6)
    if teacher is not None:
        assert all(torch.equal(v, t_before[k]) for k, v in teacher.state_dict().items())
    return out


@pytest.mark.parametrize("method", distill.METHODS)
def test_unetpp_teacher_resnet18_student_every_method(method, unetpp_ckpt):
    teacher = None if method == "none" else distill.load_teacher(unetpp_ckpt)
    out = _epoch(method, teacher)
    if method != "none":
        assert out["kd_total"] > 0


@pytest.mark.parametrize("method", distill.MASKABLE)
def test_teacher_correct_mask_through_the_handler(method, unetpp_ckpt):
    """The handler passes the batch's labels: every maskable method trains with kd_mask='teacher_correct'."""
    out = _epoch(method, distill.load_teacher(unetpp_ckpt), kd_mask="teacher_correct")
    assert out["kd_total"] >= 0


def test_transfuse_teacher_with_hlfd(tmp_path):
    teacher = distill.load_teacher(_checkpoint(tmp_path / "transfuse.pt", "transfuse_s", TRANSFUSE))
    d = distill.create_distiller("hlfd", networks.create("resnet18_student", **STUDENT), teacher)
    assert [t.path for t in d.method.plan.teacher["pred_mid"]] == ["head_transformer", "head_f0"]
    out = _epoch("hlfd", teacher)
    assert all(out[k] > 0 for k in ("kd_ufd", "kd_ifd", "kd_upd", "kd_ipd"))
