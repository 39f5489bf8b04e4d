"""A full disk (issue 12): refused before long work when the checkpoints cannot fit, and a checkpoint write that hits a
full disk is a clear error that keeps the previous checkpoint and leaves no temporary file. The disk is a real 1 MB
tmpfs (skipped, with the reason, where it cannot be mounted)."""

from __future__ import annotations

import errno
import gc
import subprocess
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from pipelines.engine import BundleInputError, TrainCheckpointer, check_free_disk, checkpoint_bytes, load_checkpoint
from tests.reliability.conftest import leftovers, one_line, snapshot


@pytest.fixture
def small_disk(tmp_path) -> Iterator[Path]:
    """A 1 MB tmpfs mounted at ``tmp_path/disk``."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1M", "tmpfs", str(disk)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a 1 MB tmpfs to simulate a full disk: {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a 1 MB tmpfs to simulate a full disk (needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield disk
    finally:
        gc.collect()  # a failed torch.save's traceback may still hold its (deleted) temporary file open
        if subprocess.run(["umount", str(disk)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(disk)], capture_output=True, timeout=30)


def test_preflight_refuses_an_output_dir_without_room_for_the_checkpoints(small_disk):
    import networks

    net = networks.create("resnet18_student", spatial_dims=2, in_channels=3, out_channels=3, base_width=4)
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
