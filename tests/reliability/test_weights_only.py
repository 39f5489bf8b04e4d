"""Weights only (issue 12): no checkpoint a user passes is ever unpickled as code; a bad file is one clear error naming it."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.engine import (
    BundleInputError,
    TrainCheckpointer,
    check_teacher_checkpoint,
    checkpoint_settings,
    guard_training_output,
    load_checkpoint,
    network_from_checkpoint,
    release_output_dir,
)
from tests.reliability.conftest import one_line, snapshot


class RunsCode:
    """Unpickling this object calls ``open(marker, "w")``: a stand-in for any payload a crafted checkpoint carries."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _good_state() -> dict:
    net = torch.nn.Conv2d(3, 3, 1)
    return {"model": net.state_dict(), "epoch": 1, "settings": {"network_name": "resnet18_student", "network_kwargs": {}}}


def _bad_file(kind: str, path: Path, marker: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if kind == "pickle_with_code":
        torch.save({**_good_state(), "payload": RunsCode(marker)}, path)
    elif kind == "truncated":
        torch.save(_good_state(), path)
        path.write_bytes(path.read_bytes()[:300])
    elif kind == "not_a_torch_file":
        path.write_bytes(b"\x89PNG this is not a checkpoint at all" * 4)
    elif kind == "empty":
        path.write_bytes(b"")
    return path


def _resume_checkpointer(path: Path) -> None:
    saver = TrainCheckpointer(str(path.parent), torch.nn.Conv2d(3, 3, 1), resume=True)
    saver._started(SimpleNamespace(state=SimpleNamespace(epoch=0, iteration=0, max_epochs=2, epoch_length=1)))


LOADERS = {
    "load_checkpoint": load_checkpoint,  # --checkpoint of evaluating / inferring
    "checkpoint_settings": checkpoint_settings,
    "network_from_checkpoint": network_from_checkpoint,
    "resume_preflight": lambda p: guard_training_output(p.parent.parent, resume=True),
    "resume_checkpointer": _resume_checkpointer,
    "teacher_checkpoint": lambda p: check_teacher_checkpoint(p, "hlfd"),  # --teacher_ckpt of the KD roles
}


@pytest.mark.parametrize("kind", ["pickle_with_code", "truncated", "not_a_torch_file", "empty"])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_bad_checkpoint_is_a_clear_error_and_never_runs_code(loader, kind, tmp_path):
    marker = tmp_path / "PAYLOAD_RAN"
    path = _bad_file(kind, tmp_path / "run" / "checkpoints" / "last.pt", marker)
    before = snapshot(path)
    try:
        with pytest.raises(BundleInputError) as err:
            LOADERS[loader](path)
    finally:
        release_output_dir(tmp_path / "run")
    assert not marker.exists(), "the checkpoint's code ran"
    assert str(path) in str(err.value) and one_line(str(err.value)), str(err.value)
    assert snapshot(path) == before


def test_good_checkpoint_still_loads(tmp_path):
    path = tmp_path / "best.pt"
    torch.save(_good_state(), path)
    assert load_checkpoint(path)["epoch"] == 1
