"""Session fixtures for the bundle tests: one tiny synthetic cohort and one trained tiny teacher, shared."""

from __future__ import annotations

import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]

#: overrides that make every CT bundle tiny: 64^2 slices (no resize), 2 samples per volume, one epoch
TINY = [
    "--in_plane_size", "[64,64]",
    "--samples_per_volume", "2",
    "--batch_size", "4",
    "--num_workers", "0",
    "--epochs", "1",
    "--sw_batch_size", "32",
]  # fmt: skip
TINY_WIDTHS = {
    "unetpp_teacher": "{'features': [4, 8, 16, 32]}",
    "resnet18_student": "{'base_width': 8}",
    "hlfd": "{'base_width': 8}",
    "kd_baselines": "{'base_width': 8}",
    "transfuse_ct": "{'embed_dim': 16, 'depth': 1, 'num_heads': 2, 'cnn_widths': [4, 8, 16], 'cnn_layers': [1, 1, 1], 'decoder_channels': [8, 4], 'head_channels': 4}",
}


#: working folder of the bundle runs: OUTSIDE the repository, so every bundle test also checks that the composed
#: configs run from any folder (they name no other file)
RUN_CWD = Path(tempfile.mkdtemp(prefix="ctdistill_bundle_cwd_"))


def run_bundle(run_id: str, config: str | list[str], *args: str, expect_ok: bool = True, timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run <run_id> --config_file <config> <args>`` from a folder outside the repo.

    Args:
        run_id: the bundle entry (training, evaluating, inferring).
        config: one config path relative to the repository root (or a list of them, merged in order).
        args: further command-line overrides.
        expect_ok: raise with the output's tail when the command fails.
        timeout: seconds.
    """
    paths = [config] if isinstance(config, str) else list(config)
    absolute = [str(REPO / c) for c in paths]
    cfg = absolute[0] if isinstance(config, str) else "[" + ",".join(f"'{c}'" for c in absolute) + "]"
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", cfg, *args]
    env = subprocess_env()
    proc = subprocess.run(cmd, cwd=RUN_CWD, env=env, capture_output=True, text=True, timeout=timeout)
    if expect_ok and proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-6000:]
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}:\n{tail}")
    return proc


@pytest.fixture(scope="session")
def cohort(tmp_path_factory) -> Path:
    """A KiTS-like synthetic cohort: 2 cases, 64 voxels a side (training 1, validation 1)."""
    from pipelines.synthesize import synthesize

    out = tmp_path_factory.mktemp("cohort") / "kits"
    synthesize("kits", cases=2, size=64, out=out, seed=3)
    return out


@pytest.fixture(scope="session")
def teacher_run(cohort, tmp_path_factory) -> Path:
    """Output folder of a one-epoch tiny UNet++ teacher run (checkpoints, CSVs, MLflow store)."""
    out = tmp_path_factory.mktemp("teacher_run")
    run_bundle(
        "training",
        "bundles/unetpp_teacher/configs/train.yaml",
        "--dataset_dir", str(cohort),
        "--output_dir", str(out),
        "--network_kwargs", TINY_WIDTHS["unetpp_teacher"],
        *TINY,
    )  # fmt: skip
    return out
