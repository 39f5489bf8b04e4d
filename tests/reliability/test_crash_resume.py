"""Crashed and killed trainings (issue 12): a crash ends the MLflow run as FAILED (never left RUNNING); a SIGKILL, even
in the middle of a checkpoint write, then ``--resume true`` continues from the last full epoch in the SAME MLflow run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipelines.engine import load_checkpoint
from tests.conftest import REPO, subprocess_env
from tests.reliability.conftest import TINY_WIDTHS, leftovers, run_bundle, snapshot

#: a 32^2 cohort and a 4-wide ResNet18: one epoch takes a fraction of a second
SMALL = [
    "--network_kwargs", TINY_WIDTHS["resnet18_student"],
    "--in_plane_size", "[32,32]",
    "--samples_per_volume", "2",
    "--batch_size", "4",
    "--num_workers", "0",
    "--sw_batch_size", "32",
    "--check_data", "false",
]  # fmt: skip
CONFIG = "bundles/resnet18_student/configs/train.yaml"


@pytest.fixture
def kits(tmp_path) -> Path:
    """A private 2-case KiTS-layout cohort, 32 voxels a side."""
    from pipelines.synthesize import synthesize

    synthesize("kits", cases=2, size=32, out=tmp_path / "kits", seed=5)
    return tmp_path / "kits"


def _runs(out: Path) -> list:
    """Every MLflow run in the run folder's default store (beside the run folder)."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlruns.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return list(client.search_runs(ids)) if ids else []


def test_crash_during_training_marks_the_mlflow_run_failed(kits, tmp_path):
    """Images truncated after the (skipped) integrity check, nothing cached: the headers still read (the plan reads
    them before the run starts), the voxels do not, so the first iteration cannot read a case."""
    for image in kits.rglob("imaging.nii.gz"):
        data = image.read_bytes()
        image.write_bytes(data[: len(data) // 2])
    out = tmp_path / "run"
    before = snapshot(kits)
    proc = run_bundle(
        "training", CONFIG, "--dataset_dir", str(kits), "--output_dir", str(out), "--epochs", "1", "--cache_rate", "0",
        *SMALL, expect_ok=False, timeout=240,
    )  # fmt: skip
    assert proc.returncode != 0
    runs = _runs(out)
    assert runs, (proc.stdout + proc.stderr)[-3000:]
    assert [r.info.status for r in runs] == ["FAILED"], [(r.info.run_name, r.info.status) for r in runs]
    # the error still reaches the user (re-raised after marking the run): one line naming the file and the remedy
    errors = [line for line in proc.stderr.splitlines() if line.startswith("ERROR: ")]
    assert len(errors) == 1 and errors[0].startswith(f"ERROR: cannot read {kits}"), proc.stderr[-3000:]
    assert "imaging.nii.gz" in errors[0] and "pipelines.check_dataset" in errors[0]
    assert "Traceback" not in proc.stderr and "Failed to evaluate" not in proc.stderr
    assert snapshot(kits) == before


def _epoch(path: Path) -> int:
    try:
        return int(load_checkpoint(path)["epoch"])
    except Exception:  # noqa: BLE001 - being written (atomic rename: only before it exists)
        return 0


def test_sigkill_then_resume_continues_the_same_mlflow_run(kits, tmp_path):
    epochs = 8
    out = tmp_path / "run"
    args = ["--dataset_dir", str(kits), "--output_dir", str(out), "--epochs", str(epochs), *SMALL]
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", CONFIG, *args]
    last = out / "checkpoints" / "last.pt"
    with open(tmp_path / "first.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, (tmp_path / "first.log").read_text()[-3000:]
    killed_at = _epoch(last)
    assert 1 <= killed_at < epochs
    [run] = _runs(out)
    assert run.info.status == "RUNNING"  # SIGKILL: nothing could end it
    # a kill in the middle of the next checkpoint write: its temporary file stays beside the intact last.pt
    partial = last.parent / ".last.pt.k1ll3d.tmp.pt"
    partial.write_bytes(last.read_bytes()[:1000])

    resumed = run_bundle("training", CONFIG, *args, "--resume", "true", timeout=240)
    assert f"resumed from {last} at epoch {killed_at}" in resumed.stdout + resumed.stderr
    assert _epoch(last) == epochs
    assert not leftovers(out), "the interrupted write's temporary file is removed on resume"
    [after] = _runs(out)
    assert after.info.run_id == run.info.run_id and after.info.status == "FINISHED"
    assert after.data.tags.get("resumed_from_epoch") == str(killed_at)
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=f"sqlite:///{out.parent / 'mlruns.db'}")
    steps = {m.step for m in client.get_metric_history(run.info.run_id, "train_loss")}
    assert steps == set(range(1, epochs + 1)), sorted(steps)
