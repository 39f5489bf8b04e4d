"""No data lost or overwritten, by construction (issue 12): inference outputs, datalist --out, training output folders,
and temp files of failed writes. Each refusal names the offending file or knob in one line, and leaves every input
byte-identical."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from pipelines.datalist import main as datalist_main
from pipelines.engine import (
    BundleInputError,
    TrainCheckpointer,
    TrainingOutput,
    atomic,
    guard_training_output,
    load_checkpoint,
    release_output_dir,
    resolve_splits,
)
from pipelines.engine.inference import VOLUMES_CSV, WriteLabelMapd, discover_inputs
from pipelines.engine.metrics import write_csv_atomic
from tests.reliability.conftest import TINY, TINY_WIDTHS, leftovers, one_line, run_bundle, snapshot, write_nifti


@pytest.fixture
def kits(tmp_path) -> Path:
    """A private 2-case KiTS-layout cohort (32^2, ~12 slices): tests may point tools at it; it must stay intact."""
    from pipelines.synthesize import synthesize

    synthesize("kits", cases=2, size=32, out=tmp_path / "kits", seed=5)
    return tmp_path / "kits"


@pytest.fixture
def released(tmp_path):
    """Release the output-folder locks a test took in this process."""
    yield
    for p in [tmp_path, *tmp_path.rglob("*")]:
        if p.is_dir():
            release_output_dir(p)


# ------------------------------------------------------------------------------------------------ inference


def _scan(path: Path, ct_volume: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_nifti(path, ct_volume, np.diag([0.8, 0.8, 2.5, 1.0]))


def _layout(case: str, root: Path, ct_volume: np.ndarray) -> tuple[Path, Path, Path]:
    """(input_dir, output_dir, the file that must be named) for each way inference used to lose data."""
    src = root / "in"
    _scan(src / "scan_a.nii.gz", ct_volume)
    if case == "output_inside_input_holding_an_input":
        # the bug: in/preds/scan_a.nii.gz (an input) was dropped from the inputs, then overwritten by scan_a's labels
        other = _scan(src / "preds" / "scan_a.nii.gz", ct_volume)
        return src, src / "preds", other
    if case == "output_inside_input_holding_a_foreign_file":
        foreign = src / "preds" / "notes.txt"
        foreign.parent.mkdir()
        foreign.write_text("the radiologist's notes")
        return src, src / "preds", foreign
    if case == "output_is_the_input_folder":
        return src, src, src
    if case == "output_holds_a_file_no_inference_wrote":
        existing = _scan(root / "out" / "scan_a.nii.gz", ct_volume)  # e.g. a copy of the CT kept there by the user
        return src, root / "out", existing
    raise AssertionError(case)


@pytest.mark.parametrize(
    "case",
    [
        "output_inside_input_holding_an_input",
        "output_inside_input_holding_a_foreign_file",
        "output_is_the_input_folder",
        "output_holds_a_file_no_inference_wrote",
    ],
)
def test_inference_refuses_output_folders_that_could_lose_data(case, tmp_path, ct_volume):
    src, out, named = _layout(case, tmp_path, ct_volume)
    before = snapshot(tmp_path)
    with pytest.raises(ValueError) as err:
        discover_inputs(src, out)
    assert str(named) in str(err.value) and one_line(str(err.value))
    assert snapshot(tmp_path) == before
    assert not leftovers(tmp_path)


def _pred(src: Path, shape=(16, 16, 8)):
    from monai.data import MetaTensor

    labels = torch.zeros((1, *shape))
    labels[0, 2:6, 2:6, 1:3] = 1
    labels[0, 3:4, 3:4, 1:2] = 2
    return {"pred": MetaTensor(labels, affine=torch.diag(torch.tensor([0.8, 0.8, 2.5, 1.0])), meta={"filename_or_obj": str(src)})}


def test_label_writer_never_replaces_a_file_it_did_not_write(tmp_path, ct_volume):
    src = _scan(tmp_path / "in" / "scan_a.nii.gz", ct_volume)
    out = tmp_path / "out"
    foreign = _scan(out / "scan_b.nii.gz", ct_volume)
    before = snapshot(tmp_path / "in", foreign)
    WriteLabelMapd(output_dir=str(out))(_pred(src))
    assert (out / "scan_a.nii.gz").is_file()
    # a later run into the same folder may replace what the earlier one wrote (volumes.csv lists it) ...
    WriteLabelMapd(output_dir=str(out))(_pred(src))
    # ... but never a file no inference wrote, even when discover_inputs was bypassed
    other = tmp_path / "in" / "scan_b.nii.gz"
    shutil.copy(src, other)
    with pytest.raises(ValueError, match="refusing to overwrite") as err:
        WriteLabelMapd(output_dir=str(out))(_pred(other))
    assert str(foreign) in str(err.value) and one_line(str(err.value))
    assert snapshot(tmp_path / "in", foreign) == {**before, **snapshot(other)}
    rows = (out / VOLUMES_CSV).read_text().splitlines()
    assert len(rows) == 2 and rows[1].startswith("scan_a,")
    assert not leftovers(tmp_path)


def test_rerun_into_own_output_folder_and_partial_run_are_allowed(tmp_path, ct_volume):
    """Outputs of an earlier (even crashed) run are listed in volumes.csv after every case, so a rerun may replace them."""
    src = tmp_path / "in"
    for name in ("scan_a", "scan_b"):
        _scan(src / f"{name}.nii.gz", ct_volume)
    out = src / "preds"  # inside the input tree, holding only this tool's outputs: fine
    writer = WriteLabelMapd(output_dir=str(out))
    writer(_pred(src / "scan_a.nii.gz"))  # the run "crashes" here: no VolumesCsvWriter at COMPLETED
    assert [e["image"] for e in discover_inputs(src, out)] == [str(src / "scan_a.nii.gz"), str(src / "scan_b.nii.gz")]
    writer2 = WriteLabelMapd(output_dir=str(out))
    for name in ("scan_a", "scan_b"):
        writer2(_pred(src / f"{name}.nii.gz"))
    assert {r.split(",")[0] for r in (out / VOLUMES_CSV).read_text().splitlines()[1:]} == {"scan_a", "scan_b"}


def test_inference_skips_the_label_files_of_a_dataset_layout(kits, tmp_path):
    before = snapshot(kits)
    inputs = [Path(e["image"]) for e in discover_inputs(kits, tmp_path / "pred")]
    assert [p.name for p in inputs] == ["imaging.nii.gz", "imaging.nii.gz"]
    assert snapshot(kits) == before


# ------------------------------------------------------------------------------------------------ datalist


@pytest.mark.parametrize(
    "target",
    ["dataset.json", "case_00000/imaging.nii.gz", "case_00000", ".", "case_00000/imaging.nii.gz/splits.json"],
)
def test_datalist_never_replaces_what_it_did_not_write(target, kits, capsys):
    out = kits / target
    before = snapshot(kits)
    with pytest.raises(SystemExit) as exc:
        datalist_main([str(kits), "--out", str(out)])
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(out) in message, message
    assert snapshot(kits) == before
    assert not leftovers(kits)


def test_datalist_replaces_its_own_earlier_output(kits, tmp_path):
    out = tmp_path / "splits.json"
    datalist_main([str(kits), "--out", str(out), "--seed", "1"])
    first = json.loads(out.read_text())
    datalist_main([str(kits), "--out", str(out), "--seed", "2"])
    assert json.loads(out.read_text())["meta"]["seed"] == 2 and first["meta"]["created_by"] == "pipelines.datalist"
    assert not leftovers(tmp_path)


def test_datalist_unreadable_case_folder_is_a_clear_error(kits, tmp_path, monkeypatch, capsys):
    import pipelines.datalist as dl

    bad = kits / "case_00001"

    def unreadable(source):
        raise PermissionError(13, "Permission denied", str(bad))

    monkeypatch.setattr(dl, "build_datalist", lambda source, **kw: unreadable(source))
    with pytest.raises(SystemExit) as exc:
        datalist_main([str(kits), "--out", str(tmp_path / "s.json")])
    assert exc.value.code == 2
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(bad) in message and "Permission denied" in message
    assert not (tmp_path / "s.json").exists()


# ------------------------------------------------------------------------------------------------ training output


def _fake_run(out: Path, epoch: int = 1, splits_sha256: str = "") -> Path:
    ck = out / "checkpoints"
    ck.mkdir(parents=True)
    state = {"model": {"w": torch.ones(2)}, "epoch": epoch, "splits_sha256": splits_sha256, "settings": {}}
    torch.save(state, ck / "last.pt")
    torch.save(state, ck / "best.pt")
    return ck / "last.pt"


@pytest.mark.parametrize(
    "case, knobs, expect",
    [
        ("earlier_run", {}, ["last.pt", "--resume true", "--overwrite true"]),
        ("nothing_to_resume", {"resume": "true"}, ["last.pt", "does not exist", "--resume"]),
        ("both_knobs", {"resume": True, "overwrite": True}, ["--resume true", "--overwrite true"]),
        ("truncated_last", {"resume": "true"}, ["last.pt", "cannot load"]),
        ("output_dir_is_a_file", {}, ["output_dir", "cannot be created"]),
    ],
)
def test_training_refuses_to_start_over_an_earlier_run(case, knobs, expect, tmp_path, released):
    out = tmp_path / "run"
    if case in ("earlier_run", "both_knobs"):
        _fake_run(out)
    elif case == "truncated_last":
        last = _fake_run(out)
        last.write_bytes(last.read_bytes()[:100])
    elif case == "output_dir_is_a_file":
        out.write_text("not a folder")
    before = snapshot(tmp_path)
    with pytest.raises(BundleInputError) as err:
        guard_training_output(out, **knobs)
    message = str(err.value)
    assert all(e in message for e in expect), message
    assert one_line(message)
    assert {k: v for k, v in snapshot(tmp_path).items() if not k.endswith("/.lock")} == before


def test_overwrite_and_resume_are_explicit(tmp_path, released):
    _fake_run(tmp_path / "a", epoch=3)
    assert guard_training_output(tmp_path / "a", resume="true").epoch == 3
    release_output_dir(tmp_path / "a")
    g = guard_training_output(tmp_path / "a", overwrite="true")
    assert g.overwrite and not g.resume
    assert guard_training_output(tmp_path / "fresh").resume is False


def test_second_run_into_a_locked_output_dir_is_refused(tmp_path, released):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # "another run" (another open file description)
        os.write(fd, b"4242 otherhost\n")
        with pytest.raises(BundleInputError) as err:
            guard_training_output(out)
        assert str(out) in str(err.value) and "pid 4242" in str(err.value) and one_line(str(err.value))
    finally:
        os.close(fd)
    guard_training_output(out)  # released: the next run may start


def test_split_is_written_once_and_a_resumed_run_keeps_it(kits, tmp_path, released):
    out = tmp_path / "run"
    path = Path(resolve_splits(kits, out, seed=0, guard=guard_training_output(out)))
    stat = path.stat()
    assert Path(resolve_splits(kits, out, seed=0)) == path
    assert (path.stat().st_ino, path.stat().st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns), "an identical split is not rewritten"
    before = snapshot(path)
    # resuming a run whose checkpoint was trained on another split: refused, nothing rewritten
    guard = TrainingOutput(str(out), True, False, str(out / "checkpoints" / "last.pt"), splits_sha256="0" * 64, epoch=1)
    with pytest.raises(BundleInputError, match="SHA-256") as err:
        resolve_splits(kits, out, seed=0, guard=guard)
    assert str(path) in str(err.value) and one_line(str(err.value))
    # ... and the split changed since the run started (another seed): refused, not replaced
    with pytest.raises(BundleInputError, match="differs") as err:
        resolve_splits(kits, out, seed=7, guard=TrainingOutput(str(out), True, False, str(out / "checkpoints" / "last.pt")))
    assert str(path) in str(err.value)
    assert snapshot(path) == before
    assert not leftovers(tmp_path)


def test_overwrite_never_keeps_the_earlier_runs_best_checkpoint(tmp_path):
    """--overwrite true: the first epoch of the new run writes best.pt even when validation gave no metric yet."""
    ck = tmp_path / "checkpoints"
    _fake_run(tmp_path, epoch=9)
    net = torch.nn.Linear(2, 2)
    saver = TrainCheckpointer(str(ck), net, evaluator=SimpleNamespace(), key_metric="dsc_tumor")
    engine = SimpleNamespace(state=SimpleNamespace(epoch=1, max_epochs=2, epoch_length=1))
    saver(engine)
    assert load_checkpoint(ck / "best.pt")["epoch"] == 1


# ------------------------------------------------------------------------------------------------ temp files


class _Boom(RuntimeError):
    pass


def _fail_after_partial_write(tmp: Path) -> None:
    tmp.write_bytes(b"half a file")
    raise _Boom("disk full")


@pytest.mark.parametrize("writer", ["bytes", "json", "csv", "torch", "nifti_labels"])
def test_failed_write_leaves_no_temp_file_and_keeps_the_old_file(writer, tmp_path, monkeypatch, ct_volume):
    target = tmp_path / {"bytes": "a.bin", "json": "a.json", "csv": "a.csv", "torch": "a.pt", "nifti_labels": "out/scan_a.nii.gz"}[writer]
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(b"previous content")
    before = snapshot(target)
    real = atomic.atomic_write

    def failing(path, write, **kw):
        return real(path, _fail_after_partial_write, **kw)

    monkeypatch.setattr(atomic, "atomic_write", failing)
    with pytest.raises((_Boom, TypeError)):
        if writer == "bytes":
            atomic.atomic_write_bytes(target, b"new")
        elif writer == "json":
            atomic.atomic_write_json(target, {"unserialisable": object()})  # fails before any file is made
        elif writer == "csv":
            import pipelines.engine.metrics as metrics

            monkeypatch.setattr(metrics, "atomic_write", failing)
            write_csv_atomic(target, ["a"], [[1]])
        elif writer == "torch":
            import pipelines.engine.checkpoint as checkpoint

            monkeypatch.setattr(checkpoint, "atomic_write", failing)
            checkpoint.atomic_torch_save({"x": torch.ones(1)}, target)
        else:
            import pipelines.engine.inference as infer

            monkeypatch.setattr(infer, "atomic_write", failing)
            src = _scan(tmp_path / "in" / "scan_a.nii.gz", ct_volume)
            target.unlink()
            before = {}
            WriteLabelMapd(output_dir=str(target.parent))(_pred(src))
    assert {k: v for k, v in snapshot(target.parent).items() if k == str(target)} == before
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("case", ["earlier_run", "resume_without_last_pt"])
def test_training_bundle_refuses_an_earlier_run_before_any_work(case, cohort, tmp_path):
    """Through the bundle: existing checkpoints without --resume/--overwrite, or --resume true without last.pt (was:
    reported only after caching), stop in preflight with one ERROR line; nothing is written."""
    out = tmp_path / "run"
    if case == "earlier_run":
        last, knobs, expect = _fake_run(out), [], "--overwrite true"
    else:
        out.mkdir()
        last, knobs, expect = out / "checkpoints" / "last.pt", ["--resume", "true"], "does not exist"
    before = snapshot(out)
    proc = run_bundle(
        "training", "bundles/resnet18_student/configs/train.yaml", "--dataset_dir", str(cohort), "--output_dir", str(out),
        "--network_kwargs", TINY_WIDTHS["resnet18_student"], *TINY, *knobs, expect_ok=False, timeout=240,
    )  # fmt: skip
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert proc.returncode != 0 and len(errors) == 1, (proc.stdout + proc.stderr)[-3000:]
    assert str(last) in errors[0] and expect in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    assert {k: v for k, v in snapshot(out).items() if not k.endswith("/.lock")} == before
    assert not (out / "splits.json").exists() and not (out.parent / "mlruns.db").exists()


def test_training_bundle_refuses_a_folder_another_run_holds(cohort, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, f"{os.getpid()} thishost\n".encode())
        proc = run_bundle(
            "training", "bundles/resnet18_student/configs/train.yaml", "--dataset_dir", str(cohort), "--output_dir", str(out),
            "--network_kwargs", TINY_WIDTHS["resnet18_student"], *TINY, expect_ok=False, timeout=240,
        )  # fmt: skip
    finally:
        os.close(fd)
    log = proc.stdout + proc.stderr
    assert proc.returncode != 0 and f"pid {os.getpid()}" in log and str(out) in log, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == [".lock"], "nothing written: no split, no MLflow store"


def test_written_checkpoints_are_plain_and_load_weights_only(tmp_path):
    """Settings with numpy scalars/arrays and tuples are stored as plain Python: weights_only=True loads them."""
    net = torch.nn.Linear(2, 2)
    settings = {"network_name": "x", "network_kwargs": {"w": np.int64(4)}, "preprocessing": {"pixdim": (np.float64(1.5), 2.0), "a": np.arange(2)}, "flag": np.bool_(True)}
    saver = TrainCheckpointer(str(tmp_path), net, settings=settings)
    saver(SimpleNamespace(state=SimpleNamespace(epoch=1, max_epochs=1, epoch_length=1)))
    ck = load_checkpoint(tmp_path / "last.pt")
    assert ck["settings"]["preprocessing"]["pixdim"] == [1.5, 2.0] and type(ck["settings"]["network_kwargs"]["w"]) is int
