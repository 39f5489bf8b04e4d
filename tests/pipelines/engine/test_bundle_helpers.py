"""pipelines.engine helpers the bundles call: flags, batch sizing, KD weights, preflight errors, inferers, MLflow helpers,
best-checkpoint ties."""

from __future__ import annotations

import json

import pytest
import torch

from pipelines.engine import (
    BundleInputError,
    as_bool,
    check_teacher_checkpoint,
    kd_weights,
    load_checkpoint,
    load_split,
    make_inferer,
    preflight,
    resolve_splits,
    volumes_per_batch,
)
from pipelines.engine.tracking import default_tracking_uri, file_sha256, kd_params, run_params, unique_run_name


def test_as_bool():
    assert as_bool("true") and as_bool("True") and as_bool(1) and not as_bool("false") and not as_bool(False)
    with pytest.raises(ValueError, match="boolean"):
        as_bool("maybe")


def test_volumes_per_batch():
    assert volumes_per_batch(8, 4) == 2
    assert volumes_per_batch(8, 8) == 1
    assert volumes_per_batch(4, 8) == 1  # batches of 8 crops
    assert volumes_per_batch(10, 4) == 2
    with pytest.raises(ValueError):
        volumes_per_batch(0, 4)


def test_kd_weights_fill_defaults_and_reject_foreign_names():
    w = kd_weights("hlfd", None, beta=0.5, lam=None, temperature=2.0, p=None)
    assert w["beta"] == 0.5 and w["lam"] == 0.1 and w["temperature"] == 2.0 and w["p"] == 4.0
    assert "beta" not in kd_weights("hinton", None, beta=0.9, temperature=3.0)
    with pytest.raises(ValueError, match="valid"):
        kd_weights("hinton", {"pair": 1.0})
    assert kd_params({"lam": 0.1, "temperature": 4.0, "beta": 0.9}) == {"lambda": 0.1, "T": 4.0, "beta": 0.9}


def test_teacher_checkpoint_errors(tmp_path):
    with pytest.raises(BundleInputError, match="--teacher_ckpt"):
        check_teacher_checkpoint("", "hlfd")
    with pytest.raises(BundleInputError, match="does not exist"):
        check_teacher_checkpoint(tmp_path / "nope.pt", "hlfd")
    torch.save({"optimizer": {}}, tmp_path / "empty.pt")
    with pytest.raises(BundleInputError, match="no weights"):
        check_teacher_checkpoint(tmp_path / "empty.pt", "hlfd")
    torch.save({"model": {"w": torch.zeros(1)}, "network": {"name": "unetpp_teacher"}, "epoch": 0}, tmp_path / "e0.pt")
    with pytest.raises(BundleInputError, match="untrained"):
        check_teacher_checkpoint(tmp_path / "e0.pt", "hlfd")


def test_resolve_splits_errors(tmp_path):
    with pytest.raises(BundleInputError, match="--dataset_dir"):
        resolve_splits(None, tmp_path)
    with pytest.raises(BundleInputError, match="does not exist"):
        resolve_splits(tmp_path / "missing", tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(BundleInputError, match="holds no dataset"):
        resolve_splits(tmp_path / "empty", tmp_path / "out")
    assert not any((tmp_path / "empty").iterdir()), "nothing written into the dataset folder"


def test_load_split_skips_unlabelled_entries(tmp_path):
    """LiTS preset: 'test' holds the unlabelled test volumes, so evaluation falls through to 'validation'."""
    s = tmp_path / "s.json"
    s.write_text(json.dumps({
        "test": [{"image": "t1.nii"}, {"image": "t2.nii"}],
        "validation": [{"image": "v1.nii", "label": "l1.nii"}, {"image": "v2.nii"}],
    }))
    # relative entries are relative to the JSON's folder (pipelines.engine.entry_path), never the working directory
    assert load_split(s, ["test", "validation"]) == [{"image": str(tmp_path / "v1.nii"), "label": str(tmp_path / "l1.nii")}]
    assert [e["image"] for e in load_split(s, "test", labelled=False)] == [str(tmp_path / "t1.nii"), str(tmp_path / "t2.nii")]
    with pytest.raises(BundleInputError, match="no labelled entries"):
        load_split(s, "test")


def test_load_split_fallback_and_preflight_missing_files(tmp_path):
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"training": [{"image": str(tmp_path / "a.nii.gz"), "label": str(tmp_path / "b.nii.gz")}], "test": []}))
    assert load_split(s, ["test", "training"])[0]["image"].endswith("a.nii.gz")
    with pytest.raises(BundleInputError, match="no labelled entries"):
        load_split(s, "validation")
    with pytest.raises(BundleInputError, match="do not exist"):
        preflight(str(s), role="x", sections=("training",), check_integrity=False)


def test_preflight_cache_that_does_not_fit(tmp_path, monkeypatch):
    import numpy as np

    from pipelines.engine.data import save_nifti

    img = save_nifti(np.zeros((32, 32, 8), np.int16), np.eye(4), tmp_path / "i.nii.gz")
    lab = save_nifti(np.zeros((32, 32, 8), np.uint8), np.eye(4), tmp_path / "l.nii.gz")
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"training": [{"image": str(img), "label": str(lab)}] * 4}))
    monkeypatch.setattr("pipelines.engine.data.available_memory_bytes", lambda: 40_000)
    with pytest.raises(BundleInputError, match="cache_rate"):
        preflight(str(s), role="x", sections=("training",), check_integrity=False, cache_rate=1.0)


def test_preflight_reports_integrity_problems(tmp_path):
    import numpy as np

    from pipelines.engine.data import save_nifti

    img = save_nifti(np.full((16, 16, 4), -1000, np.int16) + np.arange(4, dtype=np.int16) * 400, np.eye(4), tmp_path / "img.nii.gz")
    lab = save_nifti(np.full((16, 16, 4), 7, np.uint8), np.eye(4), tmp_path / "lab.nii.gz")
    s = tmp_path / "s.json"
    s.write_text(json.dumps({"training": [{"image": str(img), "label": str(lab)}], "validation": []}))
    with pytest.raises(BundleInputError, match="lab.nii.gz"):
        preflight(str(s), role="x", sections=("training",))


@pytest.mark.parametrize("dims", [2, 3])
def test_inferer_covers_every_slice(dims):
    seen = []

    def net(x):
        seen.append(tuple(x.shape))
        return torch.cat([x[:, :1] * 0 + 1, x[:, :1] * 0], 1)

    inf = make_inferer(dims, roi_size=(8, 8, 4), sw_batch_size=4)
    x = torch.rand(1, 3 if dims == 2 else 1, 8, 8, 10)
    y = inf(x, net)
    assert y.shape == (1, 2, 8, 8, 10)
    assert torch.all(y[:, 0] == 1)
    if dims == 2:
        assert sum(s[0] for s in seen) == 10 and all(len(s) == 4 for s in seen)


def test_mlflow_helpers(tmp_path):
    uri = default_tracking_uri(tmp_path / "o")
    assert uri == f"sqlite:///{tmp_path.resolve() / 'mlruns.db'}"  # beside the run folders: shared by the roles
    assert default_tracking_uri(tmp_path, "http://srv:5000") == "http://srv:5000"
    with pytest.raises(ValueError, match="file store"):
        default_tracking_uri(tmp_path, str(tmp_path))
    assert unique_run_name("hlfd") != unique_run_name("hlfd")
    f = tmp_path / "s.json"
    f.write_text("{}")
    p = run_params({"role": "hlfd", "in_plane_size": [64, 64]}, f)
    assert p["in_plane_size"] == "[64, 64]" and p["splits_sha256"] == file_sha256(f) and len(p["splits_sha256"]) == 64


def test_checkpointer_breaks_tumor_dsc_ties_with_organ_dsc(tmp_path):
    """Validations (tumor, organ): (0, .2) -> (0, .7) -> (0, .5) -> (.3, .1): best.pt follows epochs 1, 2, 2, 4."""
    from types import SimpleNamespace

    from pipelines.engine import TrainCheckpointer

    net = torch.nn.Linear(2, 2)
    ckpt = TrainCheckpointer(str(tmp_path), net, key_metric="dsc_tumor", tie_metric="dsc_organ")
    trainer = SimpleNamespace(state=SimpleNamespace(epoch=0, max_epochs=4, epoch_length=1))
    ckpt._trainer = trainer
    best_epochs = []
    for epoch, (tumor, organ) in enumerate([(0.0, 0.2), (0.0, 0.7), (0.0, 0.5), (0.3, 0.1)], start=1):
        trainer.state.epoch = epoch
        ckpt._validated(SimpleNamespace(state=SimpleNamespace(metrics={"dsc_tumor": tumor, "dsc_organ": organ})))
        best_epochs.append(load_checkpoint(tmp_path / "best.pt")["best_epoch"])
    assert best_epochs == [1, 2, 2, 4]
    # without a tie metric the first of equal values is kept
    plain = TrainCheckpointer(str(tmp_path / "plain"), net, key_metric="dsc_tumor")
    plain._trainer = trainer
    for epoch, organ in ((1, 0.2), (2, 0.9)):
        trainer.state.epoch = epoch
        plain._validated(SimpleNamespace(state=SimpleNamespace(metrics={"dsc_tumor": 0.0, "dsc_organ": organ})))
    assert plain.best_epoch == 1


def test_config_knobs_are_the_plain_top_level_values():
    """Every plain knob of a bundle config becomes a param; sections, references, expressions and run control do not."""
    from monai.bundle import ConfigParser

    from pipelines.engine.tracking import config_knobs

    config = ConfigParser({
        "imports": ["$import os"], "lr_min": 1e-6, "warmup_epochs": 5, "grad_clip": 1.0, "deep_supervision": True,
        "window": None, "in_plane_size": [64, 64], "network_kwargs": {"features": [4, 8]}, "resume": True,
        "trainer": "@train#trainer", "device": "$torch.device('cpu')", "loss": {"_target_": "networks.SegLoss"},
        "handlers": ["@a", "$b"], "_meta_": {"version": "1"},
    })  # fmt: skip
    assert config_knobs(config) == {"lr_min": 1e-6, "warmup_epochs": 5, "grad_clip": 1.0, "deep_supervision": True,
                                    "window": None, "in_plane_size": [64, 64], "network_kwargs": {"features": [4, 8]}}  # fmt: skip
    del config
    assert config_knobs() == {}  # outside a bundle run (no ConfigParser on the call stack)
