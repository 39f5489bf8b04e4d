"""pipelines.engine.knobs: --help lists a role's knobs, a typo is an error naming the closest knob (issue 11 guard rails)."""

from __future__ import annotations

import pytest

from pipelines.engine.knobs import check_cli, role_knobs

MAIN = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"
HLFD = "bundles/hlfd/configs/train.yaml"


def test_role_knobs_reads_the_knob_lines_with_their_comments(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    knobs = role_knobs([HLFD])
    assert knobs["epochs"].startswith("120") and knobs["beta"].startswith("0.9")
    assert "kd_warmup_epochs" in knobs and knobs["trainer"] == ""  # a macro'd section: valid, not a knob
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        role_knobs(["nope.yaml"])


def test_typo_is_an_error_with_the_closest_knob(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    with pytest.raises(ValueError, match=r"unknown setting 'epoch'; did you mean 'epochs'"):
        check_cli([MAIN, "run", "training", "--config_file", HLFD, "--dataset_dir", "d", "--epoch", "1"])
    with pytest.raises(ValueError, match=r"unknown setting 'teacher_ckp'"):
        check_cli([MAIN, "run", "training", "--config_file", f"['{HLFD}']", "--teacher_ckp=x.pt"])


def test_valid_command_lines_pass(repo_root, monkeypatch):
    monkeypatch.chdir(repo_root)
    ok = [MAIN, "run", "training", "--config_file", HLFD, "--epochs", "1", "--trainer#max_epochs", "2", "--meta_file", "m.json"]
    assert check_cli(ok)
    assert check_cli(["python", "-m", "pipelines.experiment", "--epoch", "3"])  # not a bundle command line
    multi = f"['{HLFD}','bundles/hlfd/configs/multi_gpu_train.yaml']"
    assert check_cli([MAIN, "run", "training", "--config_file", multi, "--train_sampler", "null"])


def test_help_prints_the_knobs_and_exits_0(repo_root, monkeypatch, capsys):
    monkeypatch.chdir(repo_root)
    with pytest.raises(SystemExit) as exc:
        check_cli([MAIN, "run", "training", "--config_file", HLFD, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--epochs" in out and "--teacher_ckpt" in out and "REQUIRED" in out and "--trainer" not in out
