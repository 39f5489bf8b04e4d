"""pipelines.engine.tracking: the shared store, git/role tags, teacher and training-run links, the logged model, and
the weights-only best.pt that records its MLflow run."""

from __future__ import annotations

import logging
import os
import subprocess
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import torch
from ignite.engine import Engine

from pipelines.engine import tracking
from pipelines.engine.checkpoint import TrainCheckpointer, load_checkpoint
from pipelines.engine.tracking import (
    TaggedMLFlowHandler,
    default_tracking_uri,
    git_commit,
    model_input_shape,
    run_id_of_checkpoint,
)
from tests.conftest import REPO

#: a 4-wide ResNet18 student on 3 slices of 32^2
SETTINGS = {
    "role": "unetpp_teacher",
    "network_name": "resnet18_student",
    "network_kwargs": {"spatial_dims": 2, "in_channels": 3, "out_channels": 3, "base_width": 8},
    "preprocessing": {"spatial_dims": 2, "num_slices": 3, "in_plane_size": [32, 32], "roi_size": None},
}


def test_default_store_is_shared_by_the_roles(tmp_path):
    runs = tmp_path / "runs"
    uris = {default_tracking_uri(runs / role) for role in ("unetpp_teacher", "hlfd", "resnet18_student")}
    assert uris == {f"sqlite:///{runs.resolve() / 'mlruns.db'}"}
    assert (runs / "hlfd").is_dir()
    assert default_tracking_uri(runs / "hlfd", "http://srv:5000") == "http://srv:5000"
    with pytest.raises(ValueError, match="file store"):
        default_tracking_uri(runs / "hlfd", str(tmp_path))


def test_git_commit_of_this_checkout_or_unknown(monkeypatch):
    git_commit.cache_clear()
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True)
        commit, dirty = git_commit()
        if head.returncode == 0:
            assert commit == head.stdout.strip() and dirty in ("true", "false")
        git_commit.cache_clear()

        def no_git(*args, **kwargs):
            raise FileNotFoundError("git")

        monkeypatch.setattr(tracking.subprocess, "run", no_git)
        assert git_commit() == ("unknown", "unknown")
    finally:
        git_commit.cache_clear()


def test_model_input_shape_from_settings():
    assert model_input_shape(SETTINGS) == (3, 32, 32)
    three_d = {"network_kwargs": {"spatial_dims": 3, "in_channels": 1}, "preprocessing": {"spatial_dims": 3, "in_plane_size": [256, 256], "roi_size": [96, 96, 32]}}
    assert model_input_shape(three_d) == (1, 96, 96, 32)
    polyp = {"network_kwargs": {"spatial_dims": 2, "in_channels": 3, "img_size": 352}, "preprocessing": {"size": 352}}
    assert model_input_shape(polyp) == (3, 352, 352)
    assert model_input_shape({"network_kwargs": {"in_channels": 5}, "preprocessing": {"in_plane_size": None}}) == (5, 256, 256)


def _train(ckpt_dir, handler=None, epochs=1):
    """One no-op 'training' of the tiny network: the checkpointer writes best.pt/last.pt; the handler tracks it."""
    import networks

    net = networks.create(SETTINGS["network_name"], **SETTINGS["network_kwargs"])
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    net(torch.rand(2, 3, 32, 32)).sum().backward()
    opt.step()  # optimizer state exists
    engine = Engine(lambda e, b: None)
    TrainCheckpointer(str(ckpt_dir), net, optimizer=opt, settings=SETTINGS).attach(engine)
    if handler is not None:
        handler.attach(engine)
    engine.run([0], max_epochs=epochs)
    return net


def test_best_checkpoint_is_weights_only_and_names_its_run(tmp_path):
    ckpt_dir = tmp_path / "checkpoints"
    ckpt_dir.mkdir()
    (ckpt_dir / "mlflow_run_id").write_text("0123abcd\n")
    _train(ckpt_dir)
    best, last = load_checkpoint(ckpt_dir / "best.pt"), load_checkpoint(ckpt_dir / "last.pt")
    assert "optimizer" not in best and "lr_scheduler" not in best
    assert last["optimizer"]["state"], "resume state stays in last.pt"
    assert best["settings"]["mlflow_run_id"] == last["settings"]["mlflow_run_id"] == "0123abcd"
    assert (ckpt_dir / "best.pt").stat().st_size < (ckpt_dir / "last.pt").stat().st_size / 2
    assert run_id_of_checkpoint(ckpt_dir / "best.pt", "teacher checkpoint") == "0123abcd"


def test_run_id_of_checkpoint_unknown_with_warning(tmp_path, caplog):
    ckpt_dir = tmp_path / "old"
    _train(ckpt_dir)  # no MLflow run recorded
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.tracking"):
        assert run_id_of_checkpoint(ckpt_dir / "best.pt", "teacher checkpoint") == "unknown"
        assert run_id_of_checkpoint(tmp_path / "missing.pt", "teacher checkpoint") == "unknown"
    assert "records no MLflow run" in caplog.text and "cannot read the MLflow run" in caplog.text
    (ckpt_dir / "mlflow_run_id").write_text("feed\n")  # an older checkpoint: the file beside it is read
    assert run_id_of_checkpoint(ckpt_dir / "best.pt", "teacher checkpoint") == "feed"


def _handler(uri, ckpt_dir, role, **kwargs):
    return TaggedMLFlowHandler(
        tracking_uri=uri,
        experiment_name="ctdistill",
        run_name=tracking.unique_run_name(role),
        iteration_log=False,
        experiment_param={"role": role},
        close_on_complete=True,
        run_id_file=ckpt_dir / "mlflow_run_id",
        **kwargs,
    )


def test_teacher_student_evaluation_links_and_logged_model(tmp_path, caplog, monkeypatch):
    import mlflow

    monkeypatch.chdir(tmp_path)  # a store MLflow would create by default lands here, and is checked for below

    uri = default_tracking_uri(tmp_path / "runs" / "unetpp_teacher")
    teacher_dir, student_dir = tmp_path / "runs" / "unetpp_teacher" / "checkpoints", tmp_path / "runs" / "hlfd" / "checkpoints"
    best = teacher_dir / "best.pt"
    teacher = _handler(uri, teacher_dir, "unetpp_teacher", log_model=True, model_checkpoint=best, register_name="tiny_teacher")
    env_before = os.environ.get("MLFLOW_TRACKING_URI")
    net = _train(teacher_dir, teacher)
    assert os.environ.get("MLFLOW_TRACKING_URI") == env_before, "logging the model leaves the global tracking URI alone"
    teacher_id = (teacher_dir / "mlflow_run_id").read_text().strip()
    assert load_checkpoint(best)["settings"]["mlflow_run_id"] == teacher_id

    student = _handler(uri, student_dir, "hlfd", teacher_checkpoint=best)
    _train(student_dir, student)
    evaluation = TaggedMLFlowHandler(
        tracking_uri=uri, experiment_name="ctdistill", run_name="eval", iteration_log=False, close_on_complete=True,
        experiment_param={"role": "unetpp_teacher", "stage": "evaluate"}, parent_checkpoint=best,
    )  # fmt: skip
    engine = Engine(lambda e, b: None)
    evaluation.attach(engine)
    engine.run([0], max_epochs=1)

    client = mlflow.MlflowClient(uri)
    t_run, s_run = client.get_run(teacher_id), client.get_run((student_dir / "mlflow_run_id").read_text().strip())
    [e_run] = client.search_runs([t_run.info.experiment_id], "attributes.run_name = 'eval'")
    assert s_run.data.tags["teacher_run_id"] == teacher_id
    assert e_run.data.tags["mlflow.parentRunId"] == teacher_id == e_run.data.tags["training_run_id"]
    assert "teacher_run_id" not in t_run.data.tags
    for run, role in ((t_run, "unetpp_teacher"), (s_run, "hlfd"), (e_run, "unetpp_teacher")):
        assert run.data.tags["git_commit"] == git_commit()[0] and run.data.tags["role"] == role
        assert run.info.status == "FINISHED"
    # the model: logged for the teacher run, registered, with a free batch/spatial signature; it loads and segments
    [model] = client.search_logged_models([t_run.info.experiment_id])
    assert model.source_run_id == teacher_id and teacher.model_uri == f"models:/{model.model_id}"
    [version] = client.search_model_versions("name = 'tiny_teacher'")
    assert version.run_id == teacher_id
    model_dir = urlparse(model.artifact_location).path  # the model's files, read without any tracking URI
    assert (Path(model_dir) / "MLmodel").is_file() and (Path(model_dir) / "input_example.json").is_file()
    signature = mlflow.models.Model.load(model_dir).signature
    assert [tuple(s.shape) for s in signature.inputs.inputs] == [(-1, 3, -1, -1)]
    assert [tuple(s.shape) for s in signature.outputs.inputs] == [(-1, 3, -1, -1)]
    loaded = mlflow.pytorch.load_model(model_dir)
    x = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        np.testing.assert_allclose(loaded.eval()(x).numpy(), net.eval()(x).numpy(), rtol=1e-5, atol=1e-6)
    _loads_outside_the_repository(model_dir, x, net, tmp_path / "elsewhere_empty")
    # the registered version: a description and the run's validation metrics as tags; standard source tags
    assert "unetpp_teacher" in version.description and teacher_id in version.description
    assert version.tags["training_run_id"] == teacher_id and version.tags["network"] == "resnet18_student"
    assert t_run.data.tags["mlflow.source.type"] == "LOCAL" and t_run.data.tags["mlflow.source.name"]
    assert t_run.data.tags.get("mlflow.source.git.commit", "unknown") == git_commit()[0]
    # an evaluated checkpoint whose training is in another store: the id is kept, the run is not nested
    other = default_tracking_uri(tmp_path / "elsewhere" / "x")
    with caplog.at_level(logging.WARNING, logger="pipelines.engine.tracking"):
        lone = TaggedMLFlowHandler(tracking_uri=other, experiment_name="ctdistill", run_name="e2", iteration_log=False, close_on_complete=True, parent_checkpoint=best)
        engine = Engine(lambda e, b: None)
        lone.attach(engine)
        engine.run([0], max_epochs=1)
    [e2] = mlflow.MlflowClient(other).search_runs([mlflow.MlflowClient(other).get_experiment_by_name("ctdistill").experiment_id])
    assert e2.data.tags["training_run_id"] == teacher_id and "mlflow.parentRunId" not in e2.data.tags
    assert "not in this tracking store" in caplog.text
    assert not list(tmp_path.glob("*.db")), "nothing was tracked in a default store of the working directory"


#: run in a fresh ``python -I`` (no PYTHONPATH, no user site, no script folder on sys.path) from an empty folder: the
#: editable-install finder of ctdistill (which would map ``networks`` to a checkout) and every sys.path entry inside a
#: checkout are removed, and the test first proves that ``networks`` is then not importable; only after that is the
#: MLflow model loaded, which must bring its own copy of ``networks`` (logged with code_paths)
_ISOLATED_LOAD = """
import importlib.util, sys
roots = {roots!r}
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in repr(f).lower()]
sys.path_hooks[:] = [h for h in sys.path_hooks if "editable" not in repr(h).lower()]
sys.path_importer_cache.clear()
sys.path[:] = [p for p in sys.path if p and p.rstrip("/") not in roots]  # a checkout root (site-packages stays)
for name in ("networks", "pipelines", "distill", "transforms"):
    assert importlib.util.find_spec(name) is None, name + " is still importable from the repository"
import numpy as np, torch, mlflow.pytorch
model = mlflow.pytorch.load_model({model_dir!r}).eval()
import networks
assert networks.__file__.startswith({model_dir!r}), networks.__file__
with torch.no_grad():
    np.save("y.npy", model(torch.from_numpy(np.load("x.npy"))).numpy())
"""


def _loads_outside_the_repository(model_dir: str, x: torch.Tensor, net: torch.nn.Module, folder: Path) -> None:
    """The logged model loads and predicts identically in a process that cannot import the repository."""
    import sys

    import networks

    folder.mkdir()
    np.save(folder / "x.npy", x.numpy())
    roots = sorted({str(REPO), str(Path(networks.__file__).resolve().parents[1]), "/work/main"})
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "MLFLOW_TRACKING_URI")}
    proc = subprocess.run([sys.executable, "-I", "-c", _ISOLATED_LOAD.format(roots=roots, model_dir=model_dir)], cwd=folder, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    with torch.no_grad():
        # equal up to float32 summation order (the subprocess runs its own number of threads)
        np.testing.assert_allclose(np.load(folder / "y.npy"), net.eval()(x).numpy(), rtol=1e-5, atol=1e-6)


def test_log_model_needs_a_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="model_checkpoint"):
        TaggedMLFlowHandler(tracking_uri=default_tracking_uri(tmp_path / "o"), log_model="true")
