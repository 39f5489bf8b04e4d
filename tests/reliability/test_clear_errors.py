"""Inputs that used to end in a raw traceback or a late failure end in one clear line, before long work (issue 12)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.dicom_to_nifti import main as dicom_main
from pipelines.engine import BundleInputError, preflight, resolve_splits
from tests.pipelines.test_dicom_to_nifti import _z_positions, write_series
from tests.reliability.conftest import leftovers, one_line, snapshot


@pytest.fixture
def splits(tmp_path) -> str:
    from pipelines.synthesize import synthesize

    synthesize("kits", cases=2, size=32, out=tmp_path / "kits", seed=2)
    return resolve_splits(tmp_path / "kits", tmp_path / "run", seed=0)


def test_in_plane_size_null_means_keep(splits):
    """``--in_plane_size null`` arrives as the string "null": the documented "keep the size", not int('null')."""
    assert preflight(splits, role="unetpp_teacher", cache_rate=1.0, in_plane_size="null", pixdim="None", check_integrity=False)


@pytest.mark.parametrize("store", ["unreachable_server", "corrupt_sqlite"])
def test_tracking_store_is_checked_in_preflight(store, splits, tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    if store == "unreachable_server":
        uri, named = "http://127.0.0.1:9", "http://127.0.0.1:9"
    else:
        db = tmp_path / "run" / "mlruns.db"
        db.write_bytes(b"this is not an SQLite database" * 100)
        uri, named = f"sqlite:///{db}", str(db)
    before = snapshot(tmp_path / "run")
    t0 = time.perf_counter()
    with pytest.raises(BundleInputError) as err:
        preflight(splits, role="unetpp_teacher", check_integrity=False, tracking_uri=uri)
    assert time.perf_counter() - t0 < 10, "no minutes of retries"
    assert named in str(err.value) and one_line(str(err.value)), str(err.value)
    assert snapshot(tmp_path / "run") == before


def test_dicom_output_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "dicom"
    write_series(src, _z_positions([0.0, 2.0, 4.0]))
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    before = snapshot(src)
    assert dicom_main([str(src), str(out)]) == 1
    message = capsys.readouterr().out.strip()
    assert str(out) in message and one_line(message)
    assert out.read_bytes() == b"keep me" and snapshot(src) == before
    assert not leftovers(tmp_path)


def test_series_listing_shows_hashes_not_uids(tmp_path, capsys):
    src = tmp_path / "dicom"
    uid = write_series(src, _z_positions([0.0, 2.0, 4.0]))
    assert dicom_main([str(src), str(tmp_path / "out"), "--series", "deadbeef"]) == 1
    message = capsys.readouterr().out
    assert "available" in message and uid not in message
    assert not Path(tmp_path / "out").exists() or not any(Path(tmp_path / "out").iterdir())


def _teacher_ckpt(path: Path, spatial_dims: int, in_channels: int) -> Path:
    """A trained-looking tiny UNet++ teacher checkpoint built for ``in_channels`` inputs."""
    import torch

    import networks

    kwargs = {"spatial_dims": spatial_dims, "in_channels": in_channels, "out_channels": 3, "features": (4, 8, 8, 16)}
    net = networks.create("unetpp_teacher", **kwargs)
    torch.save({"model": net.state_dict(), "network": {"name": "unetpp_teacher", **kwargs}, "epoch": 1}, path)
    return path


@pytest.mark.parametrize("spatial_dims, in_channels", [(3, 1), (2, 5)], ids=["3d_1ch", "2d_5slices"])
def test_teacher_for_other_input_channels_is_refused_in_preflight(spatial_dims, in_channels, tmp_path):
    """A 3-slice 2.5D student cannot read a 1-channel 3D or a 5-slice teacher's inputs (was: conv RuntimeError)."""
    from pipelines.engine import check_teacher_checkpoint

    ckpt = _teacher_ckpt(tmp_path / "teacher.pt", spatial_dims, in_channels)
    with pytest.raises(BundleInputError) as err:
        check_teacher_checkpoint(ckpt, "hlfd", None, in_channels=3, spatial_dims=2)
    message = str(err.value)
    assert str(ckpt) in message and f"{in_channels} input channel" in message and "takes 3" in message, message
    assert one_line(message)
    assert check_teacher_checkpoint(ckpt, "hlfd", None, in_channels=in_channels, spatial_dims=spatial_dims)


def _monai_wrapped(error: Exception) -> RuntimeError:
    """``error`` wrapped as MONAI's ConfigExpression does (two levels of 'Failed to evaluate ...')."""
    try:
        try:
            try:
                raise error
            except Exception as e:
                raise RuntimeError("Failed to evaluate ConfigExpression: teacher_check") from e
        except RuntimeError as e:
            raise RuntimeError("Failed to evaluate ConfigExpression: training#2") from e
    except RuntimeError as outer:
        return outer


@pytest.mark.parametrize("full", [False, True], ids=["default", "CTDISTILL_TRACEBACK=1"])
def test_excepthook_prints_the_projects_message_first(full, tmp_path, capsys, monkeypatch):
    """A missing teacher checkpoint, wrapped by MONAI: 'ERROR: <message>' first; the traceback only on request."""
    from pipelines.engine import check_teacher_checkpoint
    from pipelines.engine.knobs import project_error, report_project_error

    monkeypatch.setenv("CTDISTILL_TRACEBACK", "1" if full else "")
    try:
        check_teacher_checkpoint(tmp_path / "teacher.pt", "hlfd")
    except BundleInputError as e:
        wrapped = _monai_wrapped(e)
    assert isinstance(project_error(wrapped), BundleInputError)
    report_project_error(type(wrapped), wrapped, wrapped.__traceback__)
    err = capsys.readouterr().err
    first = err.splitlines()[0]
    assert first.startswith("ERROR: teacher checkpoint") and str(tmp_path / "teacher.pt") in first, err
    assert ("Failed to evaluate" in err) is full and ("Traceback" in err) is full
    # an error the project did not raise keeps Python's report
    assert project_error(_monai_wrapped(KeyError("x"))) is None
    assert project_error(_monai_wrapped(ValueError("from a library"))) is None


def test_bundle_error_shows_the_projects_message_first(cohort, tmp_path):
    """Through the bundle, a teacher built for other inputs: stderr starts with 'ERROR: <message>' naming the
    checkpoint and both channel counts, not MONAI's 'Failed to evaluate' traceback (nor the conv RuntimeError)."""
    from tests.reliability.conftest import run_bundle

    ckpt = _teacher_ckpt(tmp_path / "teacher.pt", 3, 1)
    proc = run_bundle(
        "training", "bundles/hlfd/configs/train.yaml", "--dataset_dir", str(cohort), "--output_dir",
        str(tmp_path / "run"), "--teacher_ckpt", str(ckpt), expect_ok=False, timeout=240,
    )  # fmt: skip
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode != 0 and lines, proc.stdout[-2000:]
    assert lines[0].startswith("ERROR: teacher checkpoint") and str(ckpt) in lines[0], proc.stderr[-3000:]
    assert "Failed to evaluate" not in proc.stderr and "Traceback" not in proc.stderr
    assert "1 input channel(s) (3D)" in lines[0] and "takes 3 (2D" in lines[0]
    assert not (tmp_path / "mlruns.db").exists(), "refused before any MLflow run"


def _unwritable_run(tool: str, ro: Path, cohort: Path, tmp_path: Path, capsys) -> tuple[str, Path]:
    """Run ``tool`` with its output in (or being) the read-only folder ``ro``: (its one message, the path named)."""
    from pipelines.datalist import main as datalist_main
    from pipelines.engine import guard_training_output, release_output_dir
    from pipelines.engine.inference import discover_inputs
    from pipelines.synthesize import main as synthesize_main

    if tool in ("training_new_folder", "training_existing_folder", "inference"):
        out = {"training_new_folder": ro / "run", "training_existing_folder": ro, "inference": ro / "pred"}[tool]
        try:
            with pytest.raises(ValueError) as err:
                guard_training_output(out) if tool.startswith("training") else discover_inputs(cohort, out)
        finally:
            release_output_dir(out)
        return str(err.value), out
    if tool == "dicom_to_nifti":
        write_series(tmp_path / "dicom", _z_positions([0.0, 2.0, 4.0]))
        assert dicom_main([str(tmp_path / "dicom"), str(ro / "nifti")]) == 1
        return capsys.readouterr().out.strip(), ro / "nifti"
    out = ro / ("splits.json" if tool == "datalist" else "cohort")
    synthesize_argv = ["--cases", "1", "--size", "32", "--out", str(out)]
    argv = [str(cohort), "--out", str(out)] if tool == "datalist" else synthesize_argv
    with pytest.raises(SystemExit) as exc:
        (datalist_main if tool == "datalist" else synthesize_main)(argv)
    assert exc.value.code in (1, 2)
    return capsys.readouterr().err.strip().splitlines()[-1], out


@pytest.mark.parametrize(
    "tool", ["training_new_folder", "training_existing_folder", "inference", "dicom_to_nifti", "datalist", "synthesize"]
)
def test_unwritable_output_is_one_clear_line(tool, read_only_dir, cohort, tmp_path, capsys):
    """An output folder nobody can write to: refused before any work, naming it (never a temporary file's name,
    never a raw OSError after the first case); the inputs unchanged."""
    before = snapshot(cohort)
    message, named = _unwritable_run(tool, read_only_dir, cohort, tmp_path, capsys)
    assert one_line(message) and str(named) in message, message
    assert "writ" in message or "Read-only" in message or "Permission denied" in message, message
    assert ".tmp" not in message, "the destination is named, not a temporary file"
    assert snapshot(cohort) == before
    assert not any(read_only_dir.iterdir())
