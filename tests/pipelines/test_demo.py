"""The demo (``make demo``): its table, the paired HLFD-vs-student difference, its CLI checks, and a tiny end-to-end run."""

from __future__ import annotations

import math
import re
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from pipelines.demo import MethodResult, format_table, main, paired_difference
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]


def _cases(path: Path, rows: list[tuple[str, float]]) -> Path:
    path.write_text("case,dsc_tumor\n" + "".join(f"{c},{v}\n" for c, v in rows))
    return path


def test_paired_difference_by_hand(tmp_path):
    a = _cases(tmp_path / "a.csv", [("c1", 0.5), ("c2", 0.2), ("c3", 0.9), ("only_a", 1.0)])
    b = _cases(tmp_path / "b.csv", [("c3", 0.6), ("c1", 0.4), ("c2", 0.4), ("only_b", 0.0)])
    mean, sd, n, better = paired_difference(a, b)
    # common cases c1, c2, c3: differences 0.1, -0.2, 0.3 -> mean 0.2/3, sample sd sqrt(((1/30)^2+(4/15)^2+(7/30)^2)/2)
    assert n == 3 and better == 2
    assert mean == pytest.approx(0.2 / 3)
    assert sd == pytest.approx(math.sqrt(((0.1 - 0.2 / 3) ** 2 + (-0.2 - 0.2 / 3) ** 2 + (0.3 - 0.2 / 3) ** 2) / 2))
    with pytest.raises(ValueError, match="dsc_organ"):
        paired_difference(a, b, "dsc_organ")
    mean, sd, n, _ = paired_difference(a, _cases(tmp_path / "c.csv", [("other", 0.1)]))
    assert n == 0 and math.isnan(mean) and math.isnan(sd)


def _result(method: str, role: str, dsc: float, cases_csv: Path | None = None) -> MethodResult:
    return MethodResult(method, role, (dsc, 0.1), (math.nan, math.nan), (0.9, 0.01), 3, 1, 1_290_000, 2.5, 60.0, cases_csv)


def test_format_table_rows_and_paired_line(tmp_path):
    a = _cases(tmp_path / "a.csv", [("c1", 0.5), ("c2", 0.2), ("c3", 0.9)])
    b = _cases(tmp_path / "b.csv", [("c1", 0.4), ("c2", 0.4), ("c3", 0.6)])
    table = format_table(
        [
            _result("UNet++ teacher", "unetpp_teacher", 0.61),
            _result("ResNet18 student (no KD)", "resnet18_student", 0.5, b),
            _result("ResNet18 student + HLFD", "hlfd", 0.533, a),
        ]
    )
    lines = table.splitlines()
    assert lines[2] == "| UNet++ teacher | 0.610 ± 0.100 | n/a | 0.900 ± 0.010 | 1.290M | 2.50 | 60 |"
    assert "undefined for 1 volume(s) without tumor" in table
    assert "paired over the same 3 volumes: +0.067" in table and "higher on 2 of 3" in table
    # without the two student rows there is no paired line
    assert "paired" not in format_table([_result("UNet++ teacher", "unetpp_teacher", 0.61)])


@pytest.mark.parametrize(
    "argv, message",
    [(["--cases", "4"], "--cases must be >= 5"), (["--size", "40"], "--size must be divisible by 16"),
     (["--from-labels", "/nonexistent/labels"], "--from-labels /nonexistent/labels is not a folder")],
)
def test_cli_rejects_bad_sizes_before_any_work(argv, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(tmp_path / "out"), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_tiny_demo_end_to_end(tmp_path):
    """The whole demo through the bundles at toy size: three rows of measured values and one MLflow store."""
    import networks

    out = tmp_path / "demo"
    env = subprocess_env()
    cmd = [sys.executable, "-m", "pipelines.demo", "--out", str(out), "--cases", "5", "--size", "32", "--epochs", "1"]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| ") and not line.startswith("| method")]
    assert [r.split(" | ")[0] for r in rows] == ["| UNet++ teacher", "| ResNet18 student (no KD)", "| ResNet18 student + HLFD"]
    # the params column equals the parameter count of the networks the demo configures, counted here
    teacher = networks.create("unetpp_teacher", spatial_dims=2, in_channels=3, out_channels=3, features=[12, 24, 48, 96, 192])
    student = networks.create(
        "resnet18_student", spatial_dims=2, in_channels=3, out_channels=3, base_width=16, decoder_channels=[32, 24, 16, 16, 16]
    )
    expected = [sum(p.numel() for p in m.parameters()) / 1e6 for m in (teacher, student, student)]
    shown = [float(re.search(r"\| ([0-9.]+)M \|", r).group(1)) for r in rows]
    assert shown == pytest.approx(expected, abs=5e-4)
    for role in ("unetpp_teacher", "resnet18_student", "hlfd"):
        assert (out / "runs" / role / "checkpoints" / "best.pt").is_file()
        assert (out / "runs" / role / "eval" / "cases.csv").is_file()
    con = sqlite3.connect(out / "mlruns.db")
    names = [n for (n,) in con.execute("select name from runs where name not like '%_eval_%'")]
    con.close()
    assert sorted(n.rsplit("_", 2)[0] for n in names) == ["hlfd", "resnet18_student", "unetpp_teacher"]
