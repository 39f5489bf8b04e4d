"""A full disk (issue 12): refused before long work when the checkpoints cannot fit, and a checkpoint write that hits a
full disk is a clear error that keeps the previous checkpoint and leaves no temporary file. The disk is a real 1 MB
tmpfs (skipped, with the reason, where it cannot be mounted)."""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.engine import BundleInputError, TrainCheckpointer, check_free_disk, checkpoint_bytes, load_checkpoint
from tests.reliability.conftest import leftovers, one_line, snapshot, tmpfs


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MB tmpfs mounted at ``tmp_path/disk``."""
    with tmpfs(tmp_path / "disk", "size=1M") as disk:
        yield disk


def test_preflight_refuses_an_output_dir_without_room_for_the_checkpoints(small_disk):
    import networks

    net = networks.create("resnet18_student", spatial_dims=2, in_channels=3, out_channels=3, base_width=8)
    with pytest.raises(BundleInputError) as err:
        check_free_disk(small_disk, net)
    message = str(err.value)
    assert str(small_disk) in message and "MB free" in message and "needs about" in message and one_line(message), message
    assert checkpoint_bytes(net) > 3 * sum(p.numel() * 4 for p in net.parameters()) - 1


def test_checkpoint_write_on_a_full_disk_keeps_the_previous_one(small_disk):
    ck = small_disk / "checkpoints"
    small = TrainCheckpointer(str(ck), torch.nn.Linear(4, 4))
    small(SimpleNamespace(state=SimpleNamespace(epoch=1, max_epochs=2, epoch_length=1)))
    before = snapshot(ck)
    big = TrainCheckpointer(str(ck), torch.nn.Linear(512, 512))  # 1 MB of weights: cannot fit
    with pytest.raises(OSError) as err:
        big(SimpleNamespace(state=SimpleNamespace(epoch=2, max_epochs=2, epoch_length=1)))
    assert err.value.errno == errno.ENOSPC
    message = str(err.value)
    assert "disk is full" in message and "best.pt" in message and "--resume true" in message and one_line(message), message
    assert snapshot(ck) == before, "the previous checkpoints are intact"
    assert not leftovers(small_disk), "no temporary file left on the full disk"
    assert load_checkpoint(ck / "last.pt")["epoch"] == 1


def _fill(disk: Path, leave: int = 250 * 1024) -> None:
    """Fill ``disk`` up to ``leave`` bytes: the next few cases of a cohort cannot all fit."""
    free = shutil.disk_usage(disk).free
    (disk / "filler.bin").write_bytes(b"\0" * max(0, free - leave))


@pytest.mark.parametrize("folder", ["new", "existing"])
@pytest.mark.parametrize("source", ["procedural", "from_labels"])
def test_synthesize_on_a_full_disk_leaves_nothing_partial(source, folder, small_disk, tmp_path, capsys):
    """Was: 8 case folders and no dataset.json. Now: one line naming the file, exit 1, and the output folder as it
    was (a new one removed; in an existing one the user's file and an earlier run's case stay byte-identical)."""
    from pipelines.synthesize import main, synthesize_from_labels
    from tests.pipelines.test_synthesize_from_labels import _kidney_label, _save

    out = small_disk / "cohort"
    if source == "from_labels":
        label, affine = _kidney_label()
        for i in range(4):
            _save(label, affine, tmp_path / "labels" / f"case_0000{i}" / "segmentation.nii.gz")
        argv = ["--from-labels", str(tmp_path / "labels"), "--size", "64", "--out", str(out)]
        if folder == "existing":  # an earlier synthesize run of the first case; this run adds three
            synthesize_from_labels(tmp_path / "labels", out, cases=1, size=64)
    else:
        argv = ["--task", "kits", "--cases", "8", "--size", "64", "--out", str(out)]
        if folder == "existing":  # an earlier synthesize run (a folder synthesize did not create is refused: issue 19)
            from pipelines.synthesize import synthesize

            synthesize("kits", cases=1, size=64, out=out)
    _fill(small_disk)
    before = snapshot(small_disk, tmp_path / "labels") if source == "from_labels" else snapshot(small_disk)
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 1
    message = capsys.readouterr().err.strip()
    assert one_line(message) and f"cannot write {out}{os.sep}" in message and "the disk is full" in message, message
    after = snapshot(small_disk, tmp_path / "labels") if source == "from_labels" else snapshot(small_disk)
    assert after == before, "nothing partial left, nothing that was there (nor the label folder) changed"
    assert out.exists() is (folder == "existing")
    assert not leftovers(small_disk)


@pytest.mark.parametrize("fails_at", ["case_00001/segmentation.nii.gz", "dataset.json"])
def test_synthesize_write_error_without_a_small_disk(fails_at, tmp_path, monkeypatch, capsys):
    """The same guarantee where no tmpfs can be mounted: the write of ``fails_at`` raises ENOSPC (as a full disk
    does); the run's new cases are removed, an earlier synthesize run's case and dataset.json are kept."""
    import pipelines.engine.atomic as atomic
    from pipelines.synthesize import main, synthesize

    real_replace = os.replace

    def replace(src, dst):
        if str(dst).endswith(fails_at):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_replace(src, dst)

    out = tmp_path / "cohort"
    synthesize("kits", cases=1, size=32, out=out)  # a folder synthesize did not create is refused (issue 19)
    monkeypatch.setattr(atomic.os, "replace", replace)
    before = snapshot(tmp_path)
    with pytest.raises(SystemExit) as exc:
        main(["--task", "kits", "--cases", "3", "--size", "32", "--out", str(out)])
    assert exc.value.code == 1
    message = capsys.readouterr().err.strip()
    assert one_line(message) and f"cannot write {out / fails_at}: the disk is full" in message, message
    assert snapshot(tmp_path) == before and not leftovers(tmp_path)


def test_remove_new_files_on_error_keeps_what_existed(tmp_path):
    """The undo of a failed multi-file write: new files, links and folders go; old ones stay, even when replaced."""
    from pipelines.engine.atomic import remove_new_files_on_error

    root = tmp_path / "out"
    (root / "old_dir").mkdir(parents=True)
    (root / "old_dir" / "old.txt").write_text("old")
    (root / "kept.txt").write_text("kept")
    with pytest.raises(KeyboardInterrupt):  # any exception, Ctrl-C included
        with remove_new_files_on_error(root):
            (root / "old_dir" / "new.txt").write_text("new")
            (root / "new_dir" / "deeper").mkdir(parents=True)
            (root / "new_dir" / "deeper" / "x.bin").write_bytes(b"x")
            (root / "link").symlink_to(root / "kept.txt")
            (root / "kept.txt").write_text("replaced in place")
            raise KeyboardInterrupt
    assert sorted(p.relative_to(root).as_posix() for p in root.rglob("*")) == ["kept.txt", "old_dir", "old_dir/old.txt"]
    assert (root / "kept.txt").read_text() == "replaced in place"  # documented: existing files are not restored
    fresh = tmp_path / "a" / "b" / "c"
    with pytest.raises(OSError):
        with remove_new_files_on_error(fresh):
            fresh.mkdir(parents=True)
            raise OSError(errno.ENOSPC, "full")
    assert not (tmp_path / "a").exists(), "the parent folders the write created are removed too"
    with remove_new_files_on_error(fresh):  # success: nothing undone
        fresh.mkdir(parents=True)
    assert fresh.is_dir()


def test_dicom_to_nifti_on_a_full_disk(small_disk, tmp_path, capsys):
    """Was: a raw error. Now: exit 1, one line naming the NIfTI it could not write; no partial or temporary file."""
    from pipelines.dicom_to_nifti import main
    from tests.pipelines.test_dicom_to_nifti import _z_positions, write_series

    write_series(tmp_path / "dicom", _z_positions([2.0 * z for z in range(40)]))
    _fill(small_disk, leave=0)
    before = snapshot(small_disk, tmp_path / "dicom")
    assert main([str(tmp_path / "dicom"), str(small_disk / "nifti")]) == 1
    message = capsys.readouterr().out.strip()
    assert one_line(message) and f"cannot write {small_disk / 'nifti'}" in message, message
    assert "No space left on device" in message and ".tmp" not in message, message
    assert snapshot(small_disk, tmp_path / "dicom") == before
    assert not leftovers(small_disk) and not list(small_disk.rglob("*.nii*"))


@pytest.mark.parametrize("store", ["new", "existing"])
def test_mlflow_store_on_a_full_disk_is_one_line_before_training(store, tmp_path):
    """Was (issue 19): MLflow's first write raised sqlalchemy's "database or disk is full" traceback after the data were
    cached. Now the preflight names the store, the free space and the remedy, writes nothing, and passes with room."""
    import sqlite3

    from pipelines.engine.preflight import _check_store_writable, preflight

    with tmpfs(tmp_path / "disk", "size=4M") as disk:
        db = disk / "mlruns.db"
        if store == "existing":  # an earlier run's store (any SQLite database passes the store's integrity check)
            con = sqlite3.connect(db)
            con.execute("CREATE TABLE runs (id TEXT)")
            con.commit()
            con.close()
        uri = f"sqlite:///{db}"
        _check_store_writable(uri)  # 4 MB free: room for a new store (about 1 MB) and a run
        _fill(disk, leave=100 * 1024)  # a new MLflow store failed creating its tables with 100 KB free
        before = snapshot(disk)
        with pytest.raises(BundleInputError) as err:  # the split is never read: the store is checked first
            preflight(str(tmp_path / "split_not_read.json"), role="r", tracking_uri=uri)
        message = str(err.value)
        assert one_line(message) and f"MLflow store {db}" in message and "full disk" in message, message
        assert "MB free" in message and "--tracking_uri" in message, message
        assert snapshot(disk) == before and not leftovers(disk), "no store created, no probe file left"
        assert db.is_file() is (store == "existing")
