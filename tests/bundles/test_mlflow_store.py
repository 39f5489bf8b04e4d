"""Issue 11, done-when: a teacher training, an HLFD training and an evaluation in ONE shared MLflow store show the teacher
link, the logged models and the PNG artifacts, queried through ``MlflowClient``.

Every run uses the default store: the parent of its ``--output_dir`` (``<tmp>/runs/mlruns.db``)."""

from __future__ import annotations

import io
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from tests.bundles.conftest import REPO, TINY, TINY_WIDTHS, run_bundle

# ------------------------------------------------------------------------------------------------ the test


def _png(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        return img.size


def _artifact_bytes(client, run_id: str, name: str, dst: Path) -> bytes:
    return Path(client.download_artifacts(run_id, name, str(dst))).read_bytes()


@pytest.mark.slow
def test_teacher_hlfd_and_evaluation_share_one_store(cohort, tmp_path):
    import mlflow

    runs = tmp_path / "runs"
    teacher_dir, hlfd_dir = runs / "unetpp_teacher", runs / "hlfd"
    common = ["--dataset_dir", str(cohort), *TINY]
    run_bundle(
        "training", "bundles/unetpp_teacher/configs/train.yaml", *common, "--output_dir", str(teacher_dir),
        "--network_kwargs", TINY_WIDTHS["unetpp_teacher"], "--register_name", "ctdistill_tiny_teacher",
    )  # fmt: skip
    teacher_ckpt = teacher_dir / "checkpoints" / "best.pt"
    run_bundle(
        "training", "bundles/hlfd/configs/train.yaml", *common, "--output_dir", str(hlfd_dir),
        "--network_kwargs", TINY_WIDTHS["hlfd"], "--teacher_ckpt", str(teacher_ckpt),
    )  # fmt: skip
    run_bundle("evaluating", "bundles/hlfd/configs/evaluate.yaml", "--output_dir", str(hlfd_dir), "--num_workers", "0", "--sw_batch_size", "32")

    assert sorted(p.name for p in runs.iterdir()) == ["hlfd", "mlruns", "mlruns.db", "unetpp_teacher"], "one store for all"
    client = mlflow.MlflowClient(f"sqlite:///{runs / 'mlruns.db'}")
    exp = client.get_experiment_by_name("ctdistill")
    teacher_id = (teacher_dir / "checkpoints" / "mlflow_run_id").read_text().strip()
    hlfd_id = (hlfd_dir / "checkpoints" / "mlflow_run_id").read_text().strip()
    all_runs = {r.info.run_id: r for r in client.search_runs([exp.experiment_id])}
    assert len(all_runs) == 3 and {teacher_id, hlfd_id} < set(all_runs)
    [eval_id] = set(all_runs) - {teacher_id, hlfd_id}
    teacher, hlfd, evaluation = all_runs[teacher_id], all_runs[hlfd_id], all_runs[eval_id]
    assert all(r.info.status == "FINISHED" for r in all_runs.values())

    # links: the HLFD run names its teacher's run; the evaluation is a child of the training it evaluated
    assert hlfd.data.tags["teacher_run_id"] == teacher_id
    # the teacher run has no teacher: its config knob teacher is null (every knob is a param)
    assert hlfd.data.params["teacher"] == str(teacher_ckpt) and teacher.data.params.get("teacher", "None") == "None"
    assert "teacher_run_id" not in teacher.data.tags
    assert evaluation.data.tags["mlflow.parentRunId"] == hlfd_id == evaluation.data.tags["training_run_id"]
    in_git = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True).returncode == 0
    for run, role in ((teacher, "unetpp_teacher"), (hlfd, "hlfd"), (evaluation, "hlfd")):
        commit = run.data.tags["git_commit"]
        assert run.data.tags["role"] == role
        if not in_git:
            assert commit == "unknown"
            continue
        # a commit of this checkout (HEAD may have moved on while the test ran)
        assert len(commit) == 40 and subprocess.run(["git", "-C", str(REPO), "merge-base", "--is-ancestor", commit, "HEAD"]).returncode == 0

    # logged models: one per training run (none for the evaluation), the teacher's registered
    models = client.search_logged_models([exp.experiment_id])
    assert sorted(m.source_run_id for m in models) == sorted([teacher_id, hlfd_id])
    assert all(m.status.name == "READY" for m in models)
    [version] = client.search_model_versions("name = 'ctdistill_tiny_teacher'")
    assert version.run_id == teacher_id
    # issue 18: the version describes itself and carries the validation metrics; every knob of the executed config is
    # a param (the teacher recipe's included); MLflow's standard source tags
    assert "unetpp_teacher" in version.description and "epoch" in version.description
    assert version.tags["training_run_id"] == teacher_id and "val.dsc_tumor" in version.tags
    assert float(version.tags["val.dsc_tumor"]) == pytest.approx(teacher.data.metrics["dsc_tumor"], abs=1e-4)
    params = teacher.data.params
    assert (params["warmup_epochs"], params["grad_clip"], params["lr_min"], params["deep_supervision"]) == ("5", "1.0", "1e-06", "True")
    assert params["samples_per_volume"] == "2" and params["in_plane_size"] == "[64, 64]"
    for run in (teacher, hlfd, evaluation):
        assert run.data.tags["mlflow.source.name"].startswith("monai.bundle run ") and run.data.tags["mlflow.source.type"] == "LOCAL"
        assert run.data.tags.get("mlflow.source.git.commit", "unknown") == run.data.tags["git_commit"]

    # artifacts: the pictures (valid PNGs), the per-case CSVs, a weights-only best.pt
    def names(run_id):
        return {a.path for a in client.list_artifacts(run_id)}

    for run_id in (teacher_id, hlfd_id):
        assert {"best.pt", "val_cases.csv", "val_history.csv", "train_history.csv", "curves.png", "val_overlays.png", "val_case_metrics.png"} <= names(run_id)
        for png in ("curves.png", "val_overlays.png", "val_case_metrics.png"):
            w, h = _png(_artifact_bytes(client, run_id, png, tmp_path / "dl" / run_id))
            assert 150 <= w <= 4000 and 150 <= h <= 4000, (png, w, h)
    best = torch.load(client.download_artifacts(hlfd_id, "best.pt", str(tmp_path / "dl" / "best")), map_location="cpu", weights_only=True)
    assert "model" in best and "optimizer" not in best and best["settings"]["mlflow_run_id"] == hlfd_id
    assert {"cases.csv", "summary.csv", "overlays.png", "case_metrics.png"} <= names(eval_id)
    for png in ("overlays.png", "case_metrics.png"):
        _png(_artifact_bytes(client, eval_id, png, tmp_path / "dl" / eval_id))
        assert (hlfd_dir / "eval" / png).is_file(), "beside the CSV files"
    assert (hlfd_dir / "curves.png").is_file() and (hlfd_dir / "val_overlays.png").is_file()
