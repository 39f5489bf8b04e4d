"""Issue 19, code execution: a path or string that reaches a bundle config from a file or a tool's command line is
passed as data, never run as a MONAI expression (``$``), reference (``@``) or macro (``%``)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from monai.bundle import ConfigParser

from pipelines.engine.config_values import config_literal, literal_overrides
from pipelines.engine.knobs import check_cli
from tests.reliability.conftest import one_line

REPO = Path(__file__).resolve().parents[2]
TRAIN = REPO / "bundles" / "resnet18_student" / "configs" / "train.yaml"


def _payload(marker: Path, data: str) -> str:
    """The issue's ``data_dir``: an expression that touches ``marker`` and then evaluates to the real folder."""
    return f"$__import__('pathlib').Path({str(marker)!r}).touch() or {data!r}"


@pytest.mark.parametrize(
    "value",
    ["/data/kits", "@kits", "@kits::x", "%other.yaml::key", "$1+1", "/runs/run#2", "a@b#c 'q\" \\ $x", "/x/\x40y"],
)
def test_config_literal_reads_back_as_exactly_the_string(value):
    """MONAI's own parser, fed the escaped value, gives back the string byte for byte (and a reference to it too)."""
    parser = ConfigParser({"dataset_dir": "x", "kits": 5, "use": "$str(@dataset_dir)"})
    parser.update(literal_overrides({"dataset_dir": value}))
    assert parser.get_parsed_content("dataset_dir") == value
    assert parser.get_parsed_content("use") == value


def test_config_literal_converts_nested_values_and_keeps_numbers():
    assert config_literal({"a": ["@x", 1, None], "b": 2.5, "c": True}) == {"a": ["$'\\x40x'", 1, None], "b": 2.5, "c": True}
    assert config_literal(Path("/data/kits")) == "/data/kits"
    with pytest.raises(ValueError, match="key '@x'"):
        config_literal({"@x": 1})


def test_experiment_resume_never_runs_the_data_dir_of_experiment_json(tmp_path, cohort, monkeypatch):
    """The issue's payload: ``data_dir`` of ``<out>/experiment.json`` read on ``--resume`` reaches the bundle as a
    string (the touch file must not exist), through ``pipelines.experiment.run_bundle`` and MONAI's parser."""
    import monai.bundle

    from pipelines import experiment as ex

    seen: list[object] = []

    class Stop(Exception):
        pass

    def fake_run(run_id, config_file, **overrides):  # MONAI's own parsing of the real role config, no training
        parser = ConfigParser()
        parser.read_config(config_file)
        parser.update(overrides)
        seen.append(parser.get_parsed_content("dataset_dir"))
        raise Stop

    monkeypatch.setattr(monai.bundle, "run", fake_run)
    out = tmp_path / "exp"
    cfg = ex.preset_config("toy", out=out, dataset_dir=cohort, seeds=(0,), methods=("hlfd",), epochs=1, num_workers=0)
    with pytest.raises(Stop):
        ex.run_experiment(cfg)
    assert seen == [str(cohort)]
    state = out / "experiment.json"
    marker = tmp_path / "PWNED"
    doc = json.loads(state.read_text())
    doc["data_dir"] = _payload(marker, str(cohort))
    state.write_text(json.dumps(doc))
    with pytest.raises(Stop):
        ex.run_experiment(ex.preset_config("toy", out=out, dataset_dir=cohort, seeds=(0,), methods=("hlfd",), epochs=1, num_workers=0, resume=True))
    assert not marker.exists(), "the data_dir of experiment.json ran as code"
    assert seen[-1] == doc["data_dir"]  # passed as the (odd) string it is, never evaluated


@pytest.mark.parametrize("value", ["@kits", "$__import__('os').getcwd()", "%x.yaml::a", "/data/run#2"])
def test_bundle_command_line_path_that_reads_as_config_syntax_is_refused(value):
    """On ``python -m monai.bundle run`` MONAI has parsed the values already: a path knob that it would read as an
    expression/reference/macro is refused by the first step (check_cli), one line naming the knob and the fix."""
    argv = [str(Path(sys.prefix) / "x/monai/bundle/__main__.py"), "run", "training", "--config_file", str(TRAIN), "--dataset_dir", value]
    with pytest.raises(ValueError, match="--dataset_dir") as err:
        check_cli(argv)
    assert one_line(str(err.value)) and ("./" in str(err.value) or "rename" in str(err.value))


@pytest.mark.slow
def test_relative_dataset_dir_at_kits_is_a_clear_error_not_a_reference(tmp_path):
    """``--dataset_dir @kits`` on the command line: one ``ERROR:`` line naming the knob, exit 1, nothing trained."""
    from tests.conftest import subprocess_env

    cmd = [sys.executable, "-m", "monai.bundle", "run", "training", "--config_file", str(TRAIN), "--dataset_dir", "@kits",
           "--output_dir", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tmp_path, env=subprocess_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    first = proc.stderr.strip().splitlines()[0] if proc.stderr.strip() else ""
    assert "ERROR: --dataset_dir '@kits'" in proc.stderr, proc.stderr[-2000:]
    assert first.startswith("ERROR:") or "ERROR: --dataset_dir" in proc.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()
