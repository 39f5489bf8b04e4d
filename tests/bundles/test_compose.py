"""The composed bundles: generated files are current, equal MONAI's merge of base + overlays + role, and roles copy nothing."""

from __future__ import annotations

import subprocess
import sys
from itertools import combinations
from pathlib import Path

import pytest
import yaml

from pipelines.compose_bundles import KINDS, compose_role, parse_blocks, roles
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]
BUNDLES = REPO / "bundles"
ROLES = roles(BUNDLES)


def test_every_role_folder_has_a_role_file():
    folders = sorted(p.name for p in BUNDLES.iterdir() if (p / "configs").is_dir() and p.name != "common")
    assert ROLES == folders
    assert {"unetpp_teacher", "resnet18_student", "hlfd", "kd_baselines", "transfuse_ct", "transfuse_polyp"} <= set(ROLES)


@pytest.mark.parametrize("role", ROLES)
def test_generated_configs_are_current(role):
    stale = compose_role(role, BUNDLES, check=True)
    assert not stale, f"stale generated bundle files {stale}: run python -m pipelines.compose_bundles"


def _expected(role: str, kind: str) -> dict:
    """MONAI's rule for an ordered config list (a later file replaces top-level keys), done on dicts, not text."""
    spec = yaml.safe_load((BUNDLES / role / "role.yaml").read_text()) or {}
    common = BUNDLES / "common" / "configs"

    def load(text: str) -> dict:
        return yaml.safe_load(text.replace("{role}", role)) or {}

    merged = load((common / f"{kind}.yaml").read_text())
    for overlay in (spec.get("overlays") or {}).get(kind, []):
        merged.update(load((common / f"{overlay}.yaml").read_text()))
    for key in (spec.get("remove") or {}).get(kind, []):
        del merged[key]
    merged.update(load(spec.get(kind) or ""))
    return merged


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("role", ROLES)
def test_generated_config_equals_the_merge_of_its_sources(role, kind):
    generated = (BUNDLES / role / "configs" / f"{kind}.yaml").read_text()
    assert "%bundles" not in generated and "{role}" not in generated  # self-contained: runs from any folder
    assert yaml.safe_load(generated) == _expected(role, kind)


def test_roles_copy_no_section_of_each_other_or_of_the_base():
    blocks = {}
    for role in ROLES:
        spec = yaml.safe_load((BUNDLES / role / "role.yaml").read_text()) or {}
        blocks[role] = {(kind, b.key, "\n".join(b.body)) for kind in KINDS for b in parse_blocks(spec.get(kind) or "")[1] if b.key}
    for a, b in combinations(ROLES, 2):
        shared = {(k, key) for k, key, body in blocks[a] & blocks[b] if body.count("\n") >= 1}
        assert not shared, f"roles {a} and {b} both define the same multi-line sections {sorted(shared)}: move them to the base"
    for role in ROLES:
        for kind, key, body in blocks[role]:
            base = {b.key: "\n".join(b.body) for b in parse_blocks((BUNDLES / "common" / "configs" / f"{kind}.yaml").read_text())[1]}
            assert base.get(key) != body, f"{role}/role.yaml repeats the base's {kind} section {key!r} unchanged"


@pytest.mark.parametrize("role", [r for r in ROLES if r != "transfuse_polyp"])
def test_ct_role_files_are_short(role):
    assert len((BUNDLES / role / "role.yaml").read_text().splitlines()) <= 40


def test_help_from_another_folder_prints_the_knobs(tmp_path):
    """From a folder outside the repository, --help lists the role's knobs (with comments) and exits 0."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(BUNDLES / "hlfd" / "configs" / "train.yaml"), "--help"]
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = proc.stdout
    assert "--teacher_ckpt" in out and "REQUIRED" in out and "--epochs" in out and "--kd_warmup_epochs" in out
    assert not list(tmp_path.iterdir())  # --help writes nothing
