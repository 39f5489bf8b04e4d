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


# ------------------------------------------------------------------------------------------------ issue 12 table

#: outcome of every reliability test that ran: node id relative to this folder -> passed / failed / skipped
_OUTCOMES: dict[str, str] = {}
_FOLDER = Path(__file__).parent


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record each test's outcome (also on the xdist controller, which receives the workers' reports)."""
    _, found, relative = report.nodeid.partition(f"{_FOLDER.name}/")
    if not found:
        return
    if report.failed:
        _OUTCOMES[relative] = "failed"
    elif report.skipped:
        _OUTCOMES.setdefault(relative, "skipped")
    elif report.when == "call" and _OUTCOMES.get(relative) != "failed":
        _OUTCOMES[relative] = "passed"


def case_outcome(tests: Sequence[str], outcomes: dict[str, str]) -> str:
    """``handled`` (a matched test passed, none failed), ``failing`` (one failed), or ``uncovered`` (none ran)."""
    matched = [o for node, o in outcomes.items() if any(node.startswith(t) for t in tests)]
    if "failed" in matched:
        return "failing"
    return "handled" if "passed" in matched else "uncovered"


#: the registries whose table ends a run of the folder: (title, module)
REGISTRIES: tuple[tuple[str, str], ...] = (
    ("issue 12: listed faults (tests/reliability/issue12_cases.py)", "tests.reliability.issue12_cases"),
    ("issue 19: second probe (tests/reliability/issue19_cases.py)", "tests.reliability.issue19_cases"),
)


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """After a run of the whole folder: each registry's listed cases per class, handled / failing / uncovered."""
    import importlib

    files = {p.name for p in _FOLDER.glob("test_*.py")}
    if not files or not files <= {node.split("::")[0] for node in _OUTCOMES}:
        return  # a subset of the folder ran: the table would count cases as uncovered that were only not run
    for title, module in REGISTRIES:
        registry = importlib.import_module(module)
        _registry_table(terminalreporter, title, registry.CLASSES, registry.CASES, registry.EXTRA)


def _registry_table(tr, title: str, classes: dict[str, str], cases_all: Sequence, extra: Sequence) -> None:
    tr.section(title)
    tr.write_line(f"{'class':<16}{'listed':>7}{'handled':>9}{'failing':>9}{'uncovered':>11}   tests passed/failed/skipped")
    bad: dict[str, int] = {}
    for kind in classes:
        cases = [c for c in cases_all if c.kind == kind]
        states = [case_outcome(c.tests, _OUTCOMES) for c in cases]
        nodes = {n: o for n, o in _OUTCOMES.items() if any(n.startswith(t) for c in cases for t in c.tests)}
        counts = "/".join(str(sum(o == s for o in nodes.values())) for s in ("passed", "failed", "skipped"))
        bad[kind] = states.count("failing") + states.count("uncovered")
        tr.write_line(
            f"{kind:<16}{len(cases):>7}{states.count('handled'):>9}{states.count('failing'):>9}"
            f"{states.count('uncovered'):>11}   {counts}"
        )
        for case, state in zip(cases, states):
            if state != "handled":
                tr.write_line(f"  {case.key} {state}: {case.reported}")
    tr.write_line("outcome: " + ", ".join(f"{bad[k]} {classes[k]}" for k in classes) + " (listed cases not handled)")
    for case in extra:
        tr.write_line(f"{case.key} {case.reported}: {case_outcome(case.tests, _OUTCOMES)}")
