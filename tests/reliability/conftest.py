"""Fault-injection helpers: file snapshots (inputs must stay byte-identical), leftover temp files, crafted NIfTI headers.

The tiny bundle settings and the shared synthetic cohort come from ``tests/bundles/conftest.py`` (re-exported here,
not copied).
"""

from __future__ import annotations

import gc
import gzip
import hashlib
import os
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.bundles.conftest import TINY, TINY_WIDTHS, cohort, run_bundle  # noqa: F401 - fixtures and helpers reused

__all__ = ["TINY", "TINY_WIDTHS", "run_bundle", "snapshot", "leftovers", "write_nifti", "one_line", "tmpfs"]


def snapshot(*roots: Path) -> dict[str, str]:
    """SHA-256 of every file below (or at) each root: compare before/after a fault to prove nothing was modified."""
    out: dict[str, str] = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(root: Path) -> list[Path]:
    """Temporary files left below ``root`` (every atomic write's temp name holds ``.tmp``)."""
    return sorted(p for p in root.rglob("*") if ".tmp" in p.name)


def one_line(message: str) -> bool:
    """A message a user can read at a glance: one line."""
    return "\n" not in message.strip()


def write_nifti(
    path: Path,
    data: np.ndarray,
    affine: np.ndarray | None = None,
    *,
    pixdim: Sequence[float] | None = None,
    sform_code: int = 1,
    qform_code: int = 1,
) -> Path:
    """Write a NIfTI-1 file, optionally with a raw ``pixdim[1:4]`` that nibabel would refuse to save (0, negative).

    nibabel "fixes" a zero or negative pixdim when it saves (and when it loads), so the bytes are patched after saving.
    """
    affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
    image = nib.Nifti1Image(np.asarray(data), None)  # a singular affine cannot become a qform: set the forms below
    image.set_sform(affine if sform_code else None, code=sform_code)
    image.set_qform(affine if qform_code else None, code=qform_code)
    raw_path = path.with_name(path.name[: -len(".gz")]) if path.name.endswith(".gz") else path
    nib.save(image, str(raw_path))
    if pixdim is not None:
        raw = bytearray(raw_path.read_bytes())
        raw[80:92] = np.asarray(pixdim, dtype="<f4").tobytes()  # pixdim[1..3] (pixdim starts at byte 76)
        raw_path.write_bytes(bytes(raw))
    if raw_path != path:
        path.write_bytes(gzip.compress(raw_path.read_bytes()))
        raw_path.unlink()
    return path


@pytest.fixture
def ct_volume() -> np.ndarray:
    """A small int16 volume in Hounsfield units (air, soft tissue and bone present)."""
    rng = np.random.default_rng(0)
    data = rng.integers(-1000, 400, size=(16, 16, 8)).astype(np.int16)
    data[0, 0, 0], data[1, 1, 1] = -1000, 1200
    return data


@contextmanager
def tmpfs(mount_point: Path, options: str) -> Iterator[Path]:
    """Mount a tmpfs with ``options`` (e.g. ``size=1M``, ``ro``) at ``mount_point`` for the block.

    Skips the test, with the reason, where it cannot be mounted (it needs root / CAP_SYS_ADMIN).
    """
    mount_point.mkdir(parents=True, exist_ok=True)
    cmd = ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount_point)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs ({options}): {e}")
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs ({options}; needs root/CAP_SYS_ADMIN): {proc.stderr.strip()}")
    try:
        yield mount_point
    finally:
        gc.collect()  # a failed write's traceback may still hold its (deleted) temporary file open
        if subprocess.run(["umount", str(mount_point)], capture_output=True, timeout=30).returncode != 0:
            subprocess.run(["umount", "-l", str(mount_point)], capture_output=True, timeout=30)


@pytest.fixture
def read_only_dir(tmp_path) -> Iterator[Path]:
    """An existing folder nobody may write to: mode 0555 for a normal user; root ignores modes, so a read-only
    tmpfs there (skipped, with the reason, where it cannot be mounted)."""
    folder = tmp_path / "read_only"
    if os.geteuid() != 0:
        folder.mkdir()
        folder.chmod(0o555)
        try:
            yield folder
        finally:
            folder.chmod(0o755)
        return
    with tmpfs(folder, "ro,size=64k") as mounted:
        yield mounted
