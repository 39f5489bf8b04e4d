from __future__ import annotations

import pytest
import torch

import distill
import networks
from tests.distill.tiny_nets import pair

KW = {"spatial_dims": 2, "in_channels": 3, "out_channels": 2, "features": (4, 8, 8, 16)}


def _saved(tmp_path, model, **extra):
    path = tmp_path / "teacher.pt"
    torch.save({"model": model.state_dict(), **extra}, path)
    return path


def test_load_bundle_checkpoint_and_raw_state_dict(tmp_path):
    torch.manual_seed(0)
    src = networks.create("unetpp_teacher", **KW)
    path = _saved(tmp_path, src, network={"name": "unetpp_teacher", **KW}, epoch=3)
    teacher = distill.load_teacher(path)  # name and kwargs from the checkpoint
    assert distill.trained_source(teacher) == str(path)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), src.state_dict().values()))
    raw = tmp_path / "raw.pth"
    torch.save({"module." + k: v for k, v in src.state_dict().items()}, raw)  # DDP-saved raw state dict
    teacher = distill.load_teacher(raw, "unetpp_teacher", **KW)
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), src.state_dict().values()))
    teacher = distill.load_teacher(raw, {"name": "unetpp_teacher", **KW})  # kwargs as one mapping
    assert all(torch.equal(a, b) for a, b in zip(teacher.state_dict().values(), src.state_dict().values()))


def test_bad_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        distill.load_teacher(tmp_path / "missing.pt", "unetpp_teacher", **KW)
    src = networks.create("unetpp_teacher", **KW)
    path = _saved(tmp_path, src)
    with pytest.raises(ValueError, match="missing keys|shape mismatches"):
        distill.load_teacher(path, "unetpp_teacher", **{**KW, "features": (4, 8, 8, 32)})
    with pytest.raises(ValueError, match="No network name"):
        distill.load_teacher(path)
    empty = tmp_path / "empty.pt"
    torch.save({"epoch": 1, "optimizer": {}}, empty)
    with pytest.raises(ValueError, match="holds no weights"):
        distill.load_teacher(empty, "unetpp_teacher", **KW)
    junk = tmp_path / "junk.pt"
    junk.write_text("not a checkpoint")
    with pytest.raises(ValueError, match="Cannot read"):
        distill.load_teacher(junk, "unetpp_teacher", **KW)
    with pytest.raises(ValueError, match="Unknown network"):
        distill.load_teacher(path, "unet")


def test_handler_refuses_untrained_teacher():
    s, t = pair()
    d = distill.create_distiller("hlfd", s, t)
    with pytest.raises(ValueError, match="no loaded weights"):
        distill.DistillationHandler(d)
    distill.DistillationHandler(d, allow_untrained_teacher=True)
    distill.mark_trained(t, "somewhere.pt")
    distill.DistillationHandler(d, teacher=t)
    with pytest.raises(ValueError, match="not the distiller's teacher"):
        distill.DistillationHandler(d, teacher=pair()[1])
    distill.DistillationHandler(distill.create_distiller("none", s))  # no teacher needed
