"""``python -m pipelines.export_bundle``: a MONAI model-zoo bundle zip that runs outside the repository."""

from __future__ import annotations

import ast
import csv
import json
import math
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch

import networks
from pipelines.engine.checkpoint import release_checkpoint
from pipelines.export_bundle import (
    BUNDLES_DIR,
    SCHEMA_FILE,
    export_bundle,
    export_onnx,
    export_torchscript,
    main,
    verify_bundle,
)
from tests.bundles.conftest import TINY, TINY_WIDTHS, cohort, run_bundle  # noqa: F401 (cohort: a fixture)
from tests.conftest import REPO, subprocess_env
from tests.reliability.conftest import snapshot

STUDENT_KW = {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "base_width": 8}
TRAINING_STATE = ("optimizer", "lr_scheduler", "distiller", "trainer", "best_tie_metric", "splits_sha256")


def _training_checkpoint(
    path: Path,
    role: str = "resnet18_student",
    network: str = "resnet18_student",
    kwargs: dict | None = None,
    preprocessing: dict | None = None,
) -> Path:
    """A checkpoint in the bundles' training format (as ``TrainCheckpointer`` writes it) of a random tiny network
    (default: a 4-wide 2.5D student at 64x64) after one optimizer step."""
    torch.manual_seed(0)
    kwargs = dict(STUDENT_KW if kwargs is None else kwargs)
    pre = preprocessing or {"spatial_dims": 2, "num_slices": 3, "task": "kits", "window": None, "pixdim": None,
                            "in_plane_size": [64, 64], "roi_size": None}  # fmt: skip
    net = networks.create(network, **kwargs)
    opt = torch.optim.Adam(net.parameters())
    size = pre.get("roi_size") or pre.get("in_plane_size") or [pre["size"]] * 2
    net(torch.rand(2, net.in_channels, *size))[0].sum().backward()
    opt.step()
    settings = {"role": role, "network_name": network, "network_kwargs": kwargs, "preprocessing": pre, "kd_method": "none", "seed": 0}
    torch.save(
        {
            "model": net.state_dict(), "network": {"name": network, **kwargs},
            "distiller": None, "optimizer": opt.state_dict(), "lr_scheduler": {"last_epoch": 3},
            "trainer": {"epoch": 3, "max_epochs": 3, "epoch_length": 2}, "epoch": 3, "best_metric": 0.4321,
            "best_tie_metric": 0.9, "best_epoch": 2, "settings": settings, "splits_sha256": "0" * 64,
        },
        path,
    )  # fmt: skip
    return path


def _unzip(zip_path: Path, dest: Path) -> Path:
    with zipfile.ZipFile(zip_path) as zf:
        zf.extractall(dest)
    (folder,) = [p for p in dest.iterdir() if p.is_dir()]
    return folder


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(training checkpoint, bundle zip with model.ts, unpacked bundle folder) of a random tiny student."""
    tmp = tmp_path_factory.mktemp("export")
    ckpt = _training_checkpoint(tmp / "best.pt")
    out = export_bundle("resnet18_student", ckpt, tmp / "student.zip", name="tiny_student", torchscript=True)
    return ckpt, out, _unzip(out, tmp_path_factory.mktemp("unpacked"))


def test_zip_layout_and_weights_only_model(exported):
    ckpt, out, folder = exported
    with zipfile.ZipFile(out) as zf:
        names = set(zf.namelist())
    expected = {f"tiny_student/{p}" for p in (
        "configs/inference.yaml", "configs/evaluate.yaml", "configs/train.yaml", "configs/multi_gpu_train.yaml",
        "configs/logging.conf", "configs/metadata.json", "models/model.pt", "models/model.ts", "docs/README.md",
        "docs/data_license.txt", "LICENSE",
    )}  # fmt: skip
    assert names == expected
    # a plain state dict (the zoo's default ckpt_export form): exactly the training checkpoint's weights
    model = torch.load(folder / "models" / "model.pt", map_location="cpu", weights_only=True)
    source = torch.load(ckpt, map_location="cpu", weights_only=True)
    assert set(model) == set(source["model"])
    assert all(torch.equal(model[k], source["model"][k]) for k in source["model"])
    assert "KiTS19" in (folder / "docs" / "data_license.txt").read_text()
    assert (folder / "LICENSE").read_text() == (REPO / "LICENSE").read_text()
    assert "Apache License" in (folder / "LICENSE").read_text()
    # nothing in the exported configs points into this repository
    for cfg in (folder / "configs").glob("*.yaml"):
        text = cfg.read_text()
        assert "bundles/" not in text and str(REPO) not in text, cfg.name
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert image["num_channels"] == 3 and image["spatial_shape"] == [64, 64]
    assert meta["eval_metrics"] == {"val_mean_dsc_tumor": 0.4321}
    assert meta["name"] == "tiny_student" and meta["numpy_version"] == np.__version__
    readme = (folder / "docs" / "README.md").read_text()
    assert "0.4321" in readme and "monai.bundle run inferring" in readme and "Not a medical device" in readme


TINY_TRANSFUSE = {"embed_dim": 16, "depth": 1, "num_heads": 2, "cnn_widths": [4, 8, 16], "cnn_layers": [1, 1, 1],
                  "decoder_channels": [8, 4], "head_channels": 4, "img_size": 64}  # fmt: skip


@pytest.mark.parametrize(
    "role, network, kwargs, preprocessing, shape, metric",
    [
        ("unetpp_teacher", "unetpp_teacher", {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "features": [4, 8, 16, 32]},
         {"spatial_dims": 2, "num_slices": 3, "task": "kits", "in_plane_size": [64, 64], "roi_size": None}, [3, 64, 64], "dsc_tumor"),
        ("hlfd", "resnet18_student", {"spatial_dims": 3, "in_channels": 1, "out_channels": 3, "base_width": 8},
         {"spatial_dims": 3, "num_slices": 3, "task": "kits", "in_plane_size": None, "roi_size": [64, 64, 32]}, [1, 64, 64, 32], "dsc_tumor"),
        ("transfuse_polyp", "transfuse_s", {"in_channels": 3, "out_channels": 1, **TINY_TRANSFUSE}, {"size": 64}, [3, 64, 64], "mdice"),
    ],
)  # fmt: skip
def test_other_roles_and_3d_export_and_verify(role, network, kwargs, preprocessing, shape, metric, tmp_path):
    ckpt = _training_checkpoint(tmp_path / "best.pt", role, network, kwargs, preprocessing)
    folder = _unzip(export_bundle(role, ckpt, tmp_path / "b.zip"), tmp_path / "unpacked")  # verified while exporting
    meta = json.loads((folder / "configs" / "metadata.json").read_text())
    image = meta["network_data_format"]["inputs"]["image"]
    assert [image["num_channels"], *image["spatial_shape"]] == shape
    assert meta["network_data_format"]["outputs"]["pred"]["num_channels"] == kwargs["out_channels"]
    assert meta["eval_metrics"] == {f"val_mean_{metric}": 0.4321}
    assert meta["ctdistill"]["role"] == role and meta["ctdistill"]["network_kwargs"] == kwargs
    state = torch.load(folder / "models" / "model.pt", weights_only=True)
    assert set(state) == set(torch.load(ckpt, weights_only=True)["model"])


def test_bundle_checkpoint_drops_training_state(exported):
    ckpt = torch.load(exported[0], map_location="cpu", weights_only=True)
    assert all(k in ckpt for k in TRAINING_STATE)
    kept = release_checkpoint(ckpt)
    assert not any(k in kept for k in TRAINING_STATE)
    assert kept["settings"]["network_kwargs"] == STUDENT_KW
    with pytest.raises(ValueError, match="network_name"):
        release_checkpoint({"model": {}, "settings": {}})


def test_verify_metadata_and_net_in_out_offline(exported, tmp_path):
    folder = shutil.copytree(exported[2], tmp_path / "b")
    verify_bundle(folder)  # the shipped schema: MONAI finds the file and downloads nothing (no network here)
    meta_file = folder / "configs" / "metadata.json"
    meta = json.loads(meta_file.read_text())
    broken = {k: v for k, v in meta.items() if k != "copyright"}
    meta_file.write_text(json.dumps(broken))
    with pytest.raises(ValueError, match="copyright"):
        verify_bundle(folder)
    meta["network_data_format"]["outputs"]["pred"]["num_channels"] = 2
    meta_file.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match="output channel number `3`"):
        verify_bundle(folder)


def test_torchscript_equals_eager(exported, tmp_path):
    folder = exported[2]
    eager = networks.create("resnet18_student", **STUDENT_KW).eval()
    eager.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    ts = torch.jit.load(str(folder / "models" / "model.ts"), map_location="cpu")
    x = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = eager(x), ts(x)
    assert want.shape == (2, 3, 64, 64)
    assert torch.allclose(got, want, atol=1e-5), float((got - want).abs().max())
    # the same export from the unpacked folder (MONAI's ckpt_export, traced at the metadata's shape)
    again = export_torchscript(folder, tmp_path / "again.ts")
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(again))(x), want, atol=1e-5)


@pytest.mark.parametrize(
    "name, kwargs",
    [
        ("resnet18_student", {"base_width": 8}),
        ("unetpp_teacher", {"features": [4, 8, 16, 32]}),
        ("transfuse_s", {"embed_dim": 16, "depth": 1, "num_heads": 2, "cnn_widths": [4, 8, 16], "cnn_layers": [1, 1, 1],
                         "decoder_channels": [8, 4], "head_channels": 4, "img_size": 64, "out_channels": 3}),
    ],
)  # fmt: skip
def test_onnx_equals_eager_with_dynamic_batch(name, kwargs, tmp_path):
    onnxruntime = pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    net = networks.create(name, **kwargs).eval()
    path = export_onnx(net, tmp_path / f"{name}.onnx", (3, 64, 64), check_atol=None)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 3):
        x = torch.rand(batch, 3, 64, 64, generator=torch.Generator().manual_seed(batch))
        got = session.run(None, {"image": x.numpy()})[0]
        with torch.no_grad():
            want = net(x).numpy()
        assert got.shape == want.shape == (batch, 3, 64, 64)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
    assert not list(tmp_path.glob("*.data")), "weights are inside the .onnx file"


def test_refusals_name_the_problem(exported, tmp_path, capsys):
    ckpt, out, _ = exported
    before = out.read_bytes()
    with pytest.raises(FileExistsError, match=str(out)):
        export_bundle("resnet18_student", ckpt, out)
    assert out.read_bytes() == before
    with pytest.raises(ValueError, match="unknown role 'student'; valid: hlfd, kd_baselines, resnet18_student, "):
        export_bundle("student", ckpt, tmp_path / "a.zip")
    with pytest.raises(ValueError, match="unknown role 'common'"):
        export_bundle("common", ckpt, tmp_path / "a.zip")
    with pytest.raises(ValueError, match="trained by the 'resnet18_student' role, not 'hlfd'"):
        export_bundle("hlfd", ckpt, tmp_path / "b.zip")
    with pytest.raises(ValueError, match=r"must be a \.zip"):
        export_bundle("resnet18_student", ckpt, tmp_path / "c.tar")
    assert main(["resnet18_student", "--checkpoint", str(tmp_path / "missing.pt"), "--out", str(tmp_path / "d.zip")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("ERROR:") and "missing.pt" in err
    assert not list(tmp_path.glob("*.zip"))
    # same checkpoint, same bundle: the zip is byte-identical (fixed entry order and times)
    again = export_bundle("resnet18_student", ckpt, tmp_path / "again.zip", name="tiny_student", torchscript=False)
    first = export_bundle("resnet18_student", ckpt, tmp_path / "first.zip", name="tiny_student", torchscript=False)
    assert again.read_bytes() == first.read_bytes()


def test_every_role_metadata_is_valid_and_pinned():
    """Each role's metadata passes the zoo schema, names the pinned versions, and its network_data_format matches
    the role's network_def (monai.bundle verify_net_in_out at tiny widths)."""
    from monai.bundle import verify_net_in_out

    schema = json.loads(SCHEMA_FILE.read_text())
    pins = dict(line.split("==") for line in (REPO / "constraints.txt").read_text().split() if "==" in line)
    metas = sorted(BUNDLES_DIR.glob("*/configs/metadata.json"))
    assert len(metas) >= 6
    for path in metas:
        meta = json.loads(path.read_text())
        jsonschema.Draft201909Validator(schema).validate(meta)
        assert (meta["monai_version"], meta["pytorch_version"], meta["numpy_version"]) == (pins["monai"], pins["torch"], pins["numpy"]), path
        for pkg, version in meta["required_packages_version"].items():
            assert version == (pins.get(pkg) or "0.1.0"), (path, pkg)
        for tensor in (*meta["network_data_format"]["inputs"].values(), *meta["network_data_format"]["outputs"].values()):
            assert all(isinstance(s, int) for s in tensor["spatial_shape"]), path
        role = path.parent.parent.name
        tiny = ast.literal_eval(TINY_WIDTHS.get(role, TINY_WIDTHS["transfuse_ct"]))
        verify_net_in_out(net_id="network_def", meta_file=str(path), config_file=str(path.with_name("train.yaml")),
                          device="cpu", network_kwargs=tiny)  # fmt: skip


def _dsc(p: np.ndarray, g: np.ndarray) -> float:
    s = p.sum() + g.sum()
    return 1.0 if s == 0 else 2.0 * np.logical_and(p, g).sum() / s


@pytest.mark.slow
def test_exported_bundle_runs_in_an_empty_folder(cohort, tmp_path_factory):  # noqa: F811 (the cohort fixture)
    """Done when (issue 11): train, export with the CLI, unpack outside the repo, infer and evaluate there."""
    work = tmp_path_factory.mktemp("done_when")
    assert REPO not in work.parents
    run = work / "run"
    run_bundle(
        "training", "bundles/resnet18_student/configs/train.yaml", "--dataset_dir", str(cohort),
        "--output_dir", str(run), "--network_kwargs", TINY_WIDTHS["resnet18_student"], *TINY,
    )  # fmt: skip
    # one epoch of a 4-wide student predicts background everywhere (its head bias dominates): a seeded random head
    # without bias makes the label maps, and so the comparisons below, informative
    ckpt = torch.load(run / "checkpoints" / "best.pt", map_location="cpu", weights_only=True)
    ckpt["model"]["head.weight"] = torch.randn(ckpt["model"]["head.weight"].shape, generator=torch.Generator().manual_seed(0))
    ckpt["model"]["head.bias"] = torch.zeros_like(ckpt["model"]["head.bias"])
    torch.save(ckpt, run / "checkpoints" / "varied.pt")
    zip_path = work / "student_bundle.zip"
    assert main(["resnet18_student", "--checkpoint", str(run / "checkpoints" / "varied.pt"), "--out", str(zip_path)]) == 0
    empty = work / "unpacked"
    empty.mkdir()
    bundle = _unzip(zip_path, empty)
    packed = snapshot(bundle)

    inputs = work / "in"
    inputs.mkdir()
    cases = sorted(p.name for p in cohort.glob("case_*"))
    for case in cases:
        shutil.copy(cohort / case / "imaging.nii.gz", inputs / f"{case}.nii.gz")
    run_bundle(
        "inferring", "bundles/resnet18_student/configs/inference.yaml", "--input_dir", str(inputs),
        "--output_dir", str(work / "repo_out"), "--checkpoint", str(run / "checkpoints" / "varied.pt"),
    )  # fmt: skip

    def in_bundle(*args: str) -> None:
        cmd = [sys.executable, "-m", "monai.bundle", "run", *args]
        proc = subprocess.run(cmd, cwd=bundle, env=subprocess_env(), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]

    in_bundle("inferring", "--config_file", "configs/inference.yaml", "--input_dir", str(inputs), "--output_dir", str(work / "bundle_out"))
    in_bundle("evaluating", "--config_file", "configs/evaluate.yaml", "--dataset_dir", str(cohort))

    # nothing written inside the bundle: its default outputs and MLflow store go to <bundle>_output beside it
    assert sorted(p.name for p in empty.iterdir()) == [bundle.name, f"{bundle.name}_output"]
    assert snapshot(bundle) == packed, "evaluation and inference wrote into the bundle folder"
    outside = empty / f"{bundle.name}_output"
    assert (outside / "mlruns.db").is_file() and (outside / "eval" / "summary.csv").is_file()
    labels = {}
    for case in cases:
        mine = np.asarray(nib.load(str(work / "bundle_out" / f"{case}.nii.gz")).dataobj)
        repo = np.asarray(nib.load(str(work / "repo_out" / f"{case}.nii.gz")).dataobj)
        assert np.array_equal(mine, repo), case
        labels[case] = mine
    assert len(np.unique(np.concatenate([v.ravel() for v in labels.values()]))) == 3, "all three classes predicted"
    with open(outside / "eval" / "cases.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows, "the evaluation scored the held-out volumes"
    for r in rows:
        g = np.asarray(nib.load(str(cohort / r["case"] / "segmentation.nii.gz")).dataobj)
        p = labels[r["case"]]
        for column, want in (("dsc_tumor", _dsc(p == 2, g == 2)), ("dsc_organ", _dsc(p >= 1, g >= 1))):
            got = float(r[column])
            assert not math.isnan(got) and got == pytest.approx(want, abs=1e-5), (r["case"], column)


def _property_problems(config: Path, workflow_type: str, meta: Path | None = None) -> list[str]:
    """MONAI's workflow-property check on the config text, without building anything: every required property's id
    is in the config and every optional one is referenced by its standard id (``ConfigWorkflow.check_properties``
    does the same and also evaluates each required property, which needs data; see the exported-bundle test)."""
    from monai.bundle import ConfigWorkflow
    from monai.utils import BundleProperty, BundlePropertyConfig

    wf = ConfigWorkflow(config_file=str(config), meta_file=str(meta or config.with_name("metadata.json")), logging_file=False, workflow_type=workflow_type)
    problems = [f"missing {n} ({p[BundlePropertyConfig.ID]})" for n, p in wf.properties.items()
                if p.get(BundleProperty.REQUIRED) and p[BundlePropertyConfig.ID] not in wf.parser]  # fmt: skip
    problems += [f"wrong id for {n}" for n, p in wf.properties.items() if not p.get(BundleProperty.REQUIRED) and not wf._check_optional_id(n, p)]
    return problems


@pytest.mark.parametrize("role", sorted(p.name for p in BUNDLES_DIR.iterdir() if (p / "role.yaml").is_file()))
def test_every_role_config_has_monai_workflow_properties(role):
    """MONAI Label and the zoo tools load a bundle through its TrainProperties / InferProperties ids."""
    configs = BUNDLES_DIR / role / "configs"
    for name, kind in (("train.yaml", "train"), ("evaluate.yaml", "infer"), ("inference.yaml", "infer")):
        assert _property_problems(configs / name, kind) == [], (role, name)


def test_exported_bundle_passes_default_ckpt_export_and_check_properties(exported, cohort, tmp_path):  # noqa: F811
    """The zoo's ckpt_export with its default key (the plain state dict, no --key_in_ckpt) equals eager; MONAI's own
    ConfigWorkflow.check_properties() (which evaluates every required property) passes for infer and train."""
    from monai.bundle import ConfigWorkflow, ckpt_export

    folder = shutil.copytree(exported[2], tmp_path / "b")
    packed = snapshot(folder)
    ts = tmp_path / "model.ts"
    ckpt_export(net_id="network_def", filepath=str(ts), ckpt_file=str(folder / "models" / "model.pt"),
                meta_file=str(folder / "configs" / "metadata.json"), config_file=str(folder / "configs" / "inference.yaml"),
                bundle_root=str(folder), use_trace=True)  # fmt: skip
    eager = networks.create("resnet18_student", **STUDENT_KW).eval()
    eager.load_state_dict(torch.load(folder / "models" / "model.pt", weights_only=True))
    x = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.allclose(torch.jit.load(str(ts))(x), eager(x), atol=1e-5)
    inputs = tmp_path / "in"
    inputs.mkdir()
    shutil.copy(next(cohort.glob("case_*")) / "imaging.nii.gz", inputs / "a.nii.gz")
    meta = str(folder / "configs" / "metadata.json")
    for config, kind, override in (
        ("inference.yaml", "infer", {"input_dir": str(inputs), "output_dir": str(tmp_path / "out")}),
        ("evaluate.yaml", "infer", {"dataset_dir": str(cohort), "output_dir": str(tmp_path / "eval")}),
        ("train.yaml", "train", {"dataset_dir": str(cohort), "output_dir": str(tmp_path / "train"), "in_plane_size": [64, 64],
                                 "network_kwargs": {"base_width": 8}, "num_workers": 0, "pictures": False}),
    ):  # fmt: skip
        wf = ConfigWorkflow(config_file=str(folder / "configs" / config), meta_file=meta, logging_file=False,
                            workflow_type=kind, bundle_root=str(folder), **override)  # fmt: skip
        wf.initialize()
        assert wf.check_properties() == [], config
    assert snapshot(folder) == packed, "the property checks wrote into the bundle"
