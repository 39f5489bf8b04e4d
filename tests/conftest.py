"""Shared fixtures: the real data beside the checkout (../shared/data) and small synthetic cohorts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("CTDISTILL_SHARED_DATA", REPO.parent / "shared" / "data"))

# The test models are tiny: one intra-op thread beats two (thread overhead dominates, and the bundle tests run
# their own subprocesses beside pytest). Measured on the 2-core machine: tests/networks 12 s vs 88 s.
torch.set_num_threads(1)


def subprocess_env(**extra: str) -> dict[str, str]:
    """Environment for a test's subprocess (a bundle run, a CLI): intra-op threads capped so that pytest workers and
    their subprocesses never oversubscribe the cores (2 threads alone; 1 per process under pytest-xdist, where two
    workers already fill a 2-core machine). Oversubscribed torch threads were measured 10x slower here."""
    threads = os.environ.get("CTDISTILL_TEST_THREADS") or ("1" if os.environ.get("PYTEST_XDIST_WORKER") else "2")
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads, PYTHONWARNINGS="ignore")
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update(extra)
    return env


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Root of ../shared/data; skips the test, with the reason, when it is absent (a user's clone)."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data not found at {SHARED_DATA} (set CTDISTILL_SHARED_DATA); research data is not in the repo")
    return SHARED_DATA
