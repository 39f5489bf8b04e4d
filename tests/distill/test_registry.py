from __future__ import annotations

import pytest

import distill
from networks.contract import Tap
from tests.distill.tiny_nets import TinyNet, pair


def test_methods_and_bad_names():
    assert distill.METHODS == ("hlfd", "hinton", "skd", "imf", "emkd", "hifd", "cwd", "dist", "none")
    s, t = pair()
    with pytest.raises(ValueError, match="valid methods: hlfd, hinton, skd, imf, emkd, hifd, cwd, dist, none"):
        distill.create_distiller("kd", s, t)
    with pytest.raises(ValueError, match="DKD baseline is 'emkd'"):
        distill.create_distiller("dkd", s, t)
    assert distill.method_class(" HLFD ") is distill.HLFD
    with pytest.raises(ValueError, match=r"Unknown weight\(s\) \['gamma'\].*beta"):
        distill.create_distiller("hlfd", s, t, gamma=1.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        distill.create_distiller("hlfd", s, None)
    with pytest.raises(ValueError, match="must be a finite number"):
        distill.create_distiller("hlfd", s, t, beta=-1.0)
    for method in ("hlfd", "hinton", "skd", "imf", "emkd", "hifd", "cwd", "dist"):
        with pytest.raises(ValueError, match="temperature must be > 0"):
            distill.create_distiller(method, s, t, temperature=0.0)
    assert distill.default_weights("hlfd")["beta"] == 0.9 and distill.default_weights("hlfd")["lam"] == 0.1


def test_none_needs_no_teacher():
    s, _ = pair()
    d = distill.create_distiller("none", s)
    assert not d.needs_teacher and d({}, {})["kd_total"].item() == 0.0


def test_default_taps_come_from_contracts():
    s, t = pair()
    plan = distill.create_distiller("hlfd", s, t).method.plan
    assert [x.path for x in plan.student["mid"]] == ["mid1", "mid2"]
    assert [x.path for x in plan.teacher["pred_mid"]] == ["head_mid1", "head_mid2"]
    assert plan.teacher["pred_final"][0].path == "head"


def test_overrides_and_their_checks():
    s, t = pair()
    d = distill.create_distiller("hlfd", s, t, student_taps={"mid": ["mid.1"]}, teacher_taps={"pred_mid": "head_mid2"})  # name or path
    assert [x.path for x in d.method.plan.student["mid"]] == ["mid2"] and len(d.connectors["ipd"]) == 1
    d = distill.create_distiller("hinton", s, t, teacher_taps={"pred_final": "output"})
    assert d.method.plan.teacher["pred_final"][0].path == "<output>"
    d = distill.create_distiller("hlfd", s, t, student_taps={"early": Tap("early.0", 2, 2)})  # any module path
    assert d.method.plan.student["early"][0].path == "early.0"
    with pytest.raises(ValueError, match="Unknown student tap 'mid9'.*valid tap names"):
        distill.create_distiller("hlfd", s, t, student_taps={"mid": ["mid9"]})
    with pytest.raises(ValueError, match="Unknown teacher role"):
        distill.create_distiller("hlfd", s, t, teacher_taps={"decoder": "mid1"})
    with pytest.raises(ValueError, match="exactly one tap"):
        distill.create_distiller("hlfd", s, t, student_taps={"early": ["early", "mid1"]})
    with pytest.raises(ValueError, match="class logits with 2 channels"):
        distill.create_distiller("hlfd", s, t, teacher_taps={"pred_mid": ["mid1"]})
    with pytest.raises(ValueError, match="paired one-to-one"):
        distill.create_distiller("emkd", s, t, teacher_taps={"feat": ["mid1"]})
    with pytest.raises(ValueError, match="No module 'nowhere'"):
        distill.create_distiller("hlfd", s, t, student_taps={"early": Tap("nowhere", 2, 2)})


def test_incompatible_networks():
    s = TinyNet(2, out_channels=2)
    with pytest.raises(ValueError, match="2 output classes but teacher has 3"):
        distill.create_distiller("hinton", s, TinyNet(2, out_channels=3))
    with pytest.raises(ValueError, match="2D but teacher is 3D"):
        distill.create_distiller("hinton", s, TinyNet(3, out_channels=2))
    with pytest.raises(TypeError, match="feature_contract"):
        distill.create_distiller("hinton", s, __import__("torch").nn.Conv2d(1, 2, 1))


def test_declared_channels_are_checked_at_run_time():
    s, t = pair()
    d = distill.create_distiller("hlfd", s, t, student_taps={"early": Tap("early", 99, 2)})
    import torch

    x = torch.randn(1, 1, 16, 16)
    with d.student_capture:
        s(x)
    with pytest.raises(ValueError, match="declares 99 channels"):
        d(d.student_capture.outputs, d.teacher_features(x))
    d = distill.create_distiller("hlfd", s, t, student_taps={"early": Tap("early", 2, 4)})
    with d.student_capture:
        s(x)
    d(d.student_capture.outputs, d.teacher_features(x))  # without the input size no stride check
    with pytest.raises(ValueError, match=r"declares stride 4 \(spatial \(4, 4\)"):
        d(d.student_capture.outputs, d.teacher_features(x), input_size=(16, 16))
    with pytest.raises(RuntimeError, match="No student output captured"):
        d({}, d.teacher_features(x))
