"""Guard rails of issue 11: preflight refuses fewer cases than DDP ranks; --init_checkpoint loads released weights."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

import networks
from pipelines.engine import BundleInputError, init_from_checkpoint, preflight
from tests.conftest import REPO

TINY = {"features": [4, 8, 16, 32]}


def _splits(tmp_path: Path, n_val: int) -> Path:
    files = []
    for i in range(2 + n_val):
        img = tmp_path / f"case_{i}.nii.gz"
        img.write_bytes(b"x")
        files.append({"image": str(img), "label": str(img)})
    path = tmp_path / "splits.json"
    path.write_text(json.dumps({"training": files[:2], "validation": files[2:]}))
    return path


@pytest.mark.parametrize(
    "world, n_val, short", [(2, 1, "validation"), (2, 2, None), (3, 2, "training"), (3, 5, "training"), (1, 1, None)]
)
def test_preflight_needs_a_case_per_rank(tmp_path, monkeypatch, world, n_val, short):
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: world > 1)
    monkeypatch.setattr(torch.distributed, "get_world_size", lambda *a, **k: world)
    splits = _splits(tmp_path, n_val)
    if short is None:
        assert preflight(str(splits), role="r", check_integrity=False)
        return
    n = 2 if short == "training" else n_val  # two training cases
    with pytest.raises(BundleInputError, match=rf"'{short}' section lists {n} case\(s\) but the run has {world} processes"):
        preflight(str(splits), role="r", check_integrity=False)


def _trained(seed: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    net = networks.create("unetpp_teacher", spatial_dims=2, in_channels=3, out_channels=3, **kwargs)
    for p in net.parameters():  # weights unlike any fresh initialisation
        p.data.uniform_(-1, 1)
    return net


@pytest.mark.parametrize("form", ["bundle", "state_dict", "ddp_state_dict"])
def test_init_from_checkpoint_loads_every_weight(tmp_path, form):
    src = _trained(1, features=TINY["features"])
    state = src.state_dict()
    obj = {
        "bundle": {"model": state, "settings": {"network_name": "unetpp_teacher"}},
        "state_dict": state,
        "ddp_state_dict": {f"module.{k}": v for k, v in state.items()},
    }[form]
    path = tmp_path / "w.pt"
    torch.save(obj, path)
    fresh = networks.create("unetpp_teacher", spatial_dims=2, in_channels=3, out_channels=3, features=TINY["features"])
    out = init_from_checkpoint(fresh, str(path))
    assert out is fresh
    for k, v in state.items():
        assert torch.equal(out.state_dict()[k], v), k


def test_init_from_checkpoint_errors_name_the_file(tmp_path):
    net = networks.create("unetpp_teacher", spatial_dims=2, in_channels=3, out_channels=3, features=TINY["features"])
    before = {k: v.clone() for k, v in net.state_dict().items()}
    assert init_from_checkpoint(net, "") is net and init_from_checkpoint(net, None) is net
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    with pytest.raises(BundleInputError, match="missing.pt does not exist"):
        init_from_checkpoint(net, tmp_path / "missing.pt")
    wide = tmp_path / "wide.pt"
    torch.save({"model": _trained(0, features=[8, 16, 32, 64]).state_dict(), "settings": {"network_name": "unetpp_teacher", "network_kwargs": {"features": [8, 16, 32, 64]}}}, wide)
    with pytest.raises(BundleInputError, match=r"wide.pt does not fit this role's network \(it was trained as unetpp_teacher"):
        init_from_checkpoint(net, wide)
    junk = tmp_path / "junk.pt"
    torch.save({"epoch": 3}, junk)
    with pytest.raises(BundleInputError, match="junk.pt holds no weights"):
        init_from_checkpoint(net, junk)


def test_bundle_knob_reaches_the_network(tmp_path):
    """The generated teacher config builds its network from --init_checkpoint (resolved in-process, no training)."""
    src = _trained(2, features=TINY["features"], deep_supervision=True)
    path = tmp_path / "best.pt"
    torch.save({"model": src.state_dict()}, path)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "unetpp_teacher" / "configs" / "train.yaml"))
    # no dataset here: the preprocessing plan (derived from the training split) is left out
    parser.update({"init_checkpoint": str(path), "network_kwargs": dict(TINY), "device": "$torch.device('cpu')", "preprocessing_plan": None})
    net = parser.get_parsed_content("network_def")
    assert all(torch.equal(net.state_dict()[k], v) for k, v in src.state_dict().items())
    assert parser.get_parsed_content("settings")["init_checkpoint"] == str(path)


_CT_ROLES = ("unetpp_teacher", "resnet18_student", "hlfd", "kd_baselines", "transfuse_ct")


def _preflight_call(role: str, files: tuple[str, ...], tmp_path: Path, monkeypatch, **overrides) -> dict:
    """Evaluate the preflight step of ``role``'s training list (config files ``files``) with a recording preflight."""
    import pipelines.engine

    calls: list[dict] = []
    monkeypatch.setattr(pipelines.engine, "preflight", lambda splits, **kw: calls.append({"splits": splits, **kw}) or True)
    monkeypatch.setattr(pipelines.engine, "check_cache", lambda splits, rate, pre: calls.append({"cache": (rate, pre["pixdim"])}) or True)
    parser = ConfigParser()
    parser.read_config([str(REPO / "bundles" / role / "configs" / f) for f in files])
    guard = type("Guard", (), {"resume": True, "last_path": str(tmp_path / "out" / "checkpoints" / "last.pt")})()
    knobs = {"splits": str(tmp_path / "splits.json"), "run_guard": guard, "network_def": None, "teacher_check": True,
             "output_dir": str(tmp_path / "out"), "run_tags": {"team": "ct"}, "is_rank0": True,
             "preprocessing_plan": {"target_spacing": [0.8, 0.8, 2.0], "in_plane_size": [96, 96], "window": [-200, 300]},
             **overrides}  # fmt: skip
    for key, value in knobs.items():
        parser[key] = value
    steps = [i for i, step in enumerate(parser["training"]) if "preflight" in str(step)]
    assert len(steps) == 1, parser["training"]
    parser.get_parsed_content(f"training#{steps[0]}")
    assert len(calls) == 2 and calls[1] == {"cache": (1.0, [0.8, 0.8, 2.0])}, "then the cache, with the plan's spacing"
    return calls[0]


@pytest.mark.parametrize("role", _CT_ROLES)
def test_multi_gpu_overlay_runs_the_preflight_of_train_yaml(role, tmp_path, monkeypatch):
    """Was: multi_gpu_train.yaml called preflight without the MLflow store, --run_tags parent or --resume checks
    (tracking_uri, run_tags, resume_from). Now every rank runs train.yaml's preflight; integrity only on rank 0."""
    single = _preflight_call(role, ("train.yaml",), tmp_path, monkeypatch)
    assert single["resume_from"] == str(tmp_path / "out" / "checkpoints" / "last.pt")
    assert single["run_tags"] == {"team": "ct"} and single["tracking_uri"] == f"sqlite:///{tmp_path / 'mlruns.db'}"
    assert single["check_integrity"] is True and single["output_dir"] == str(tmp_path / "out")
    multi = ("train.yaml", "multi_gpu_train.yaml")
    assert _preflight_call(role, multi, tmp_path, monkeypatch) == single
    other_rank = _preflight_call(role, multi, tmp_path, monkeypatch, is_rank0=False)
    assert other_rank == {**single, "check_integrity": False}


def _thin_scan(path: Path) -> Path:
    """A 0.5 x 0.5 x 2 mm scan of 400 x 400 x 20 voxels (RAS), zeros: only its header is read."""
    import nibabel as nib
    import numpy as np

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.zeros((400, 400, 20), np.int16), np.diag([0.5, 0.5, 2.0, 1.0])), str(path))
    return path


def test_cache_estimate_follows_the_plans_spacing_and_network_input(tmp_path):
    """A plan pads slices up to its network input and keeps larger ones (never resizes them)."""
    from pipelines.engine.data import cached_item_bytes

    scan = _thin_scan(tmp_path / "ct.nii.gz")
    one_mm = (1.0, 1.0, 2.0)  # 400 x 400 at 0.5 mm -> 200 x 200 at 1 mm
    assert cached_item_bytes(scan, pixdim=one_mm, in_plane_size=(224, 224), in_plane_mode="pad") == 224 * 224 * 20 * 8
    assert cached_item_bytes(scan, pixdim=one_mm, in_plane_size=(128, 128), in_plane_mode="pad") == 200 * 200 * 20 * 8
    assert cached_item_bytes(scan, pixdim=one_mm, in_plane_size=(128, 128)) == 128 * 128 * 20 * 8  # resize (no plan)


@pytest.mark.parametrize("available_mb, fits", [(40, True), (20, False)])
def test_bundle_cache_check_uses_the_plan_not_the_knobs(available_mb, fits, tmp_path, monkeypatch):
    """Was: the preflight estimated the cache from --pixdim/--in_plane_size (null: 400 x 400 x 20 x 8 B = 25.6 MB a
    case, 51.2 MB for two) and refused a run whose plan (--target_spacing 1: 200 x 200, network input 224) caches
    224 x 224 x 20 x 8 B = 8.0 MB a case. Now the plan's figure is checked: 16.1 MB fits a 0.7 x 40 MB budget, not
    0.7 x 20 MB = 14 MB, where one case (cache_rate 0.5) would."""
    import json

    import pipelines.engine.data as data

    cases = [{"image": str(_thin_scan(tmp_path / f"case_{i}" / "imaging.nii.gz")), "label": str(tmp_path / f"case_{i}" / "imaging.nii.gz")} for i in range(2)]
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"training": cases[:1], "validation": cases[1:]}))
    monkeypatch.setattr(data, "available_memory_bytes", lambda: available_mb * 10**6)
    parser = ConfigParser()
    parser.read_config(str(REPO / "bundles" / "resnet18_student" / "configs" / "train.yaml"))
    guard = type("Guard", (), {"resume": False, "last_path": ""})()
    knobs = {"splits": str(splits), "run_guard": guard, "network_def": None, "output_dir": str(tmp_path / "out"),
             "check_data": False, "target_spacing": 1.0, "in_plane_size": None, "cache_rate": 1.0}  # fmt: skip
    for key, value in knobs.items():
        parser[key] = value
    step = next(i for i, item in enumerate(parser["training"]) if "preflight" in str(item))
    if fits:
        parser.get_parsed_content(f"training#{step}")
        assert parser.get_parsed_content("preprocessing")["in_plane_size"] == [224, 224]
        return
    with pytest.raises(RuntimeError, match="Failed to evaluate") as err:  # MONAI wraps it; the bundle prints the cause
        parser.get_parsed_content(f"training#{step}")
    cause = err.value.__cause__
    assert isinstance(cause, BundleInputError) and "CacheDataset would not fit in memory" in str(cause), cause
    assert "use cache_rate <= 0.5" in str(cause), "one 8.0 MB case fits the 14 MB budget (a 25.6 MB one would not)"
