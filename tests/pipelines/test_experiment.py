"""``python -m pipelines.experiment``: the table by hand, knob validation, the orchestration (fake bundles) and one
tiny end-to-end run through the real bundles with MLflow parent/child runs and ``--resume``."""

from __future__ import annotations

import json
import logging
import math
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from pipelines import experiment as ex
from pipelines.experiment import ConfigError, build_table, format_markdown, main, parse_methods
from tests.conftest import subprocess_env

REPO = Path(__file__).resolve().parents[2]

#: Student's t quantile t_{0.975, 2} (two-sided 95 %, 2 degrees of freedom), from a printed t table
T_975_DF2 = 4.302653


def _cases(rows: dict[tuple[str, int], list[float]], rvd: dict[tuple[str, int], list[float]] | None = None) -> pd.DataFrame:
    out = []
    for (arm, seed), values in rows.items():
        for i, v in enumerate(values):
            r = (rvd or {}).get((arm, seed), [0.0] * len(values))[i]
            out.append({"arm": arm, "seed": seed, "case": f"c{i + 1}", "dsc_tumor": v, "rvd_tumor": r, "dsc_organ": 0.9})
    return pd.DataFrame(out)


HAND = {
    ("teacher", 0): [0.8, 0.6, 0.7],
    ("student", 0): [0.5, 0.3, 0.4],
    ("student", 1): [0.4, 0.4, 0.1],
    ("hlfd", 0): [0.6, 0.2, 0.5],
    ("hlfd", 1): [0.5, 0.6, 0.3],
}


def test_build_table_by_hand():
    cases = _cases(HAND, rvd={("teacher", 0): [0.1, -0.2, math.nan]})
    runs = pd.DataFrame(
        [
            {"arm": "teacher", "seed": 0, "train_s": 10.0, "eval_s": 1.0},
            {"arm": "student", "seed": 0, "train_s": 4.0, "eval_s": 1.0},
            {"arm": "student", "seed": 1, "train_s": 6.0, "eval_s": 1.0},
            {"arm": "hlfd", "seed": 0, "train_s": 8.0, "eval_s": 2.0},
            {"arm": "hlfd", "seed": 1, "train_s": 12.0, "eval_s": 2.0},
        ]
    )
    t = build_table(cases, runs).set_index("arm")
    assert list(t.index) == ["teacher", "student", "hlfd"]
    # per-seed means: student 1.2/3 = 0.4 and 0.9/3 = 0.3; hlfd 1.3/3 and 1.4/3; teacher 2.1/3 = 0.7
    assert t.loc["student", "dsc_tumor_mean"] == pytest.approx(0.35)
    assert t.loc["student", "dsc_tumor_std"] == pytest.approx(math.sqrt(2 * 0.05**2))  # sample std of 0.4, 0.3
    assert t.loc["hlfd", "dsc_tumor_mean"] == pytest.approx(0.45)
    assert t.loc["hlfd", "dsc_tumor_std"] == pytest.approx(math.sqrt(2 * (1 / 60) ** 2))
    assert t.loc["teacher", "dsc_tumor_mean"] == pytest.approx(0.7)
    assert math.isnan(t.loc["teacher", "dsc_tumor_std"])  # one seed
    assert t.loc["teacher", "rvd_tumor_mean"] == pytest.approx(-0.05)  # NaN volume left out
    assert t.loc["teacher", "seeds"] == 1 and t.loc["hlfd", "seeds"] == 2 and t.loc["hlfd", "cases_per_seed"] == 3
    # per VOLUME, each averaged over seeds: student 0.45, 0.35, 0.25; hlfd 0.55, 0.40, 0.40 -> differences 0.10,
    # 0.05, 0.15: n = 3 (not 6 volume x seed pairs), mean 0.1, sd 0.05, t interval with 2 degrees of freedom
    half = T_975_DF2 * 0.05 / math.sqrt(3)
    assert t.loc["hlfd", "n_volumes"] == 3
    assert t.loc["hlfd", "diff_mean"] == pytest.approx(0.1) and t.loc["hlfd", "diff_sd"] == pytest.approx(0.05)
    assert t.loc["hlfd", "diff_ci_low"] == pytest.approx(0.1 - half, abs=1e-6)
    assert t.loc["hlfd", "diff_ci_high"] == pytest.approx(0.1 + half, abs=1e-6)
    assert (t.loc["hlfd", "wins"], t.loc["hlfd", "ties"], t.loc["hlfd", "losses"]) == (3, 0, 0)
    assert t.loc["hlfd", "wilcoxon_p"] == pytest.approx(0.25)  # all 3 positive: 2 of 2^3 sign assignments as extreme
    assert 0.05 - 1e-9 <= t.loc["hlfd", "diff_boot_low"] <= 0.1 <= t.loc["hlfd", "diff_boot_high"] <= 0.15 + 1e-9
    # per-seed means listed apart: seed 0 (0.1 - 0.1 + 0.1) / 3, seed 1 (0.1 + 0.2 + 0.2) / 3
    assert t.loc["hlfd", "diff_per_seed"] == "0: +0.0333; 1: +0.1667"
    # the teacher (seed 0 only) against the student's seed mean per volume: 0.35, 0.25, 0.45
    assert t.loc["teacher", "n_volumes"] == 3 and t.loc["teacher", "diff_mean"] == pytest.approx(0.35)
    assert t.loc["teacher", "diff_per_seed"] == "0: +0.3000"
    assert t.loc["student", "n_volumes"] == 0 and math.isnan(t.loc["student", "diff_mean"])
    # gap closed = (0.45 - 0.35) / (0.7 - 0.35) of the per-volume means; undefined for the two references
    assert t.loc["hlfd", "gap_closed"] == pytest.approx(0.1 / 0.35)
    assert t.loc["hlfd", "gap_boot_low"] <= 0.1 / 0.35 <= t.loc["hlfd", "gap_boot_high"]
    assert math.isnan(t.loc["teacher", "gap_closed"]) and math.isnan(t.loc["student", "gap_closed"])
    assert t.attrs["teacher_minus_student"] == pytest.approx(0.35) and t.attrs["notes"] == []
    # wall times: train mean per seed, train + evaluation summed over seeds
    assert t.loc["hlfd", "train_s"] == pytest.approx(10.0) and t.loc["hlfd", "wall_s"] == pytest.approx(24.0)
    md = format_markdown(build_table(cases, runs), ["protocol line"])
    row = next(line for line in md.splitlines() if line.startswith("| HLFD |"))
    assert f"| +0.100 [{0.1 - half:+.3f}, {0.1 + half:+.3f}] |" in row and "| 0.250 | 3 | 3 / 0 / 0 |" in row
    assert "| 0: +0.0333; 1: +0.1667 |" in row and "| +0.29 [" in row and "| 0.450 ± 0.024 |" in row
    assert "the unit is the test VOLUME" in md and "exact two-sided Wilcoxon" in md and "protocol line" in md
    assert "WARNING" not in md


def test_build_table_six_volumes_three_seeds_two_folds():
    """6 volumes x 3 seeds in 2 folds: 6 paired volumes; the differences are those of the seed means."""
    rows = []
    for arm, base in (("teacher", 0.8), ("student", 0.3), ("hlfd", 0.35)):
        for seed in (0,) if arm == "teacher" else (0, 1, 2):
            for v in range(6):
                rows.append({"arm": arm, "fold": v // 3, "seed": seed, "case": f"v{v}", "dsc_tumor": base + 0.01 * v * (seed + 1) * (arm == "hlfd"),
                             "rvd_tumor": 0.0, "dsc_organ": 0.9})  # fmt: skip
    t = build_table(pd.DataFrame(rows)).set_index("arm")
    # hlfd - student of volume v: 0.05 + 0.01 v (1 + 2 + 3) / 3 = 0.05 + 0.02 v
    d = [0.05 + 0.02 * v for v in range(6)]
    assert t.loc["hlfd", "n_volumes"] == 6 and t.loc["hlfd", "folds"] == 2
    assert t.loc["hlfd", "diff_mean"] == pytest.approx(sum(d) / 6)
    assert t.loc["hlfd", "diff_sd"] == pytest.approx(pd.Series(d).std(ddof=1))
    assert t.loc["hlfd", "wilcoxon_p"] == pytest.approx(2 / 2**6) and t.loc["hlfd", "wins"] == 6
    assert t.attrs["folds"] == 2 and "folds drawn with replacement" in format_markdown(build_table(pd.DataFrame(rows)))
    with pytest.raises(ValueError, match="volume 'v0' .*appears twice for arm 'hlfd' seed 0"):
        build_table(pd.concat([pd.DataFrame(rows), pd.DataFrame(rows[-18:-17])]))


def test_validation_gate_by_hand(caplog):
    """The runner's gate: a KD run whose best validation tumor DSC is below the student's of its seed is named."""
    runs = pd.DataFrame(
        [
            {"arm": "teacher", "seed": 0, "train_s": 1.0, "eval_s": 1.0, "best_val": 0.9},
            {"arm": "student", "seed": 0, "train_s": 1.0, "eval_s": 1.0, "best_val": 0.50},
            {"arm": "student", "seed": 1, "train_s": 1.0, "eval_s": 1.0, "best_val": 0.40},
            {"arm": "hlfd", "seed": 0, "train_s": 1.0, "eval_s": 1.0, "best_val": 0.45},
            {"arm": "hlfd", "seed": 1, "train_s": 1.0, "eval_s": 1.0, "best_val": 0.48},
        ]
    )
    gate = ex.validation_gate(runs)
    assert list(gate["arm"]) == ["hlfd", "hlfd"] and list(gate["lost"]) == [True, False]
    assert list(gate["val_diff"]) == [pytest.approx(-0.05), pytest.approx(0.08)]
    with caplog.at_level(logging.WARNING, logger="pipelines.experiment"):
        t = build_table(_cases(HAND), runs)
    assert "distillation lost on validation: hlfd seed 0 best validation tumor DSC 0.4500 < student 0.5000" in caplog.text
    row = t.set_index("arm").loc["hlfd"]
    assert row["val_vs_student"] == pytest.approx(0.015) and row["val_lost"] == 1
    assert math.isnan(t.set_index("arm").loc["teacher", "val_vs_student"])  # the teacher is not gated
    md = format_markdown(t)
    assert "**WARNING**: distillation lost on validation: hlfd seed 0" in md and "| +0.015 (lost 1) |" in md


def test_teacher_not_better_warns(caplog):
    worse = dict(HAND)
    worse[("teacher", 0)] = [0.3, 0.3, 0.3]  # 0.3 < student 0.35
    with caplog.at_level(logging.WARNING, logger="pipelines.experiment"):
        t = build_table(_cases(worse))
    assert "the teacher is not better than the student" in caplog.text
    assert t.attrs["teacher_minus_student"] == pytest.approx(-0.05)
    assert t["gap_closed"].isna().all()
    md = format_markdown(t)
    assert "**WARNING**: the teacher is not better than the student" in md and "distillation has nothing to teach" in md


def test_build_table_needs_the_metric_columns():
    with pytest.raises(ValueError, match="dsc_organ"):
        build_table(_cases(HAND).drop(columns="dsc_organ"))


def test_parse_methods():
    assert parse_methods("hlfd, hinton") == ("teacher", "student", "hinton", "hlfd")
    assert parse_methods("student") == ("teacher", "student")
    assert parse_methods(["all"]) == tuple(ex.ARMS)
    with pytest.raises(ConfigError, match=r"--methods: unknown method\(s\) \['dkd', 'foo'\]; valid: student, hinton"):
        parse_methods("hlfd,foo,dkd")


def test_ablation_arms_switch_one_term_on():
    for term in ("ufd", "ifd", "upd", "ipd"):
        arm = ex.ARMS[f"hlfd_{term}"]
        assert arm.role == "hlfd" and arm.distils
        assert arm.overrides["kd_weights"] == {t: (1.0 if t == term else 0.0) for t in ("ufd", "ifd", "upd", "ipd")}
    assert ex.ARMS["skd"].overrides == {"kd_method": "skd"} and ex.ARMS["skd"].role == "kd_baselines"
    # leave-one-out arms: the other three terms at full weight
    assert ex.ARMS["hlfd_wo_ifd"].overrides["kd_weights"] == {"ufd": 1.0, "ifd": 0.0, "upd": 1.0, "ipd": 1.0}
    assert parse_methods("hlfd_wo_ufd,hlfd_wo_upd") == ("teacher", "student", "hlfd_wo_ufd", "hlfd_wo_upd")


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--methods", "hlfd,nope"], "--methods: unknown method(s) ['nope']"),
        (["--size", "48"], "--size: must be divisible by 32"),
        (["--seeds", "0"], "--seeds: must be an integer >= 1"),
        (["--seed-list", "1,1"], "--seed-list: seeds must be distinct"),
        (["--epochs", "0"], "--epochs: must be an integer >= 1"),
        (["--teacher-epochs", "-3"], "--teacher-epochs: must be an integer >= 1"),
        (["--cases", "4"], "--cases: must be an integer >= 5"),
        (["--samples-per-volume", "16"], "--samples-per-volume: 16 exceeds --batch-size 8"),
        (["--teacher-features", "4", "8", "16", "32", "64", "128", "256"], "--teacher-features: UNet++ needs 3 to 6 levels"),
        (["--teacher-features", "huge"], "--teacher-features: unknown UNet++ preset 'huge'"),
        (["--student-width", "0"], "--student-width: must be an integer >= 1"),
        (["--dataset_dir", "/nonexistent/ct"], "--dataset_dir: /nonexistent/ct is neither a folder nor a splits JSON"),
        (["--from-labels", "/nonexistent/labels"], "--from-labels: /nonexistent/labels is not a folder"),
        (["--teacher-ckpt", "/nonexistent/best.pt"], "--teacher-ckpt: /nonexistent/best.pt does not exist"),
        (["--tracking-uri", "some/folder"], "--tracking-uri: 'some/folder' is a folder"),
        (["--epochs", "10", "--teacher-warmup-epochs", "10"], "--teacher-warmup-epochs: must be in [0, teacher epochs)"),
        (["--teacher-grad-clip", "-1"], "--teacher-grad-clip: must be a number >= 0"),
        (["--kd-warmup-epochs", "nan"], "--kd-warmup-epochs: must be a number >= 0"),
        (["--folds", "1"], "--folds: must be an integer >= 2"),
        (["--folds", "7", "--cases", "6"], "--folds: 7 folds of 6 labelled case(s)"),
        (["--kd-balance-ratio", "-1"], "--kd-balance-ratio: must be a number > 0"),
    ],
)
def test_cli_rejects_bad_knobs_before_any_work(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        main(["--out", str(out), *argv])
    assert exc.value.code == 2 and message in capsys.readouterr().err
    assert not out.exists()


def test_paper_preset_and_explicit_knobs(tmp_path):
    cfg = ex.config_from_args(ex._parser().parse_args(["--preset", "paper", "--epochs", "7", "--out", str(tmp_path / "o")]))
    assert (cfg.size, cfg.epochs, cfg.teacher_features, cfg.student_base_width, cfg.student_decoder_channels) == (256, 7, "paper", None, None)
    assert ex.validate_config(cfg) == ("teacher", "student", *ex.DEFAULT_METHODS)
    toy = ex.config_from_args(ex._parser().parse_args(["--teacher-features", "4", "8", "16", "--seed-list", "3,5"]))
    assert toy.teacher_features == (4, 8, 16) and toy.seeds == (3, 5) and toy.size == 64


def _fake_bundles(monkeypatch, calls: list[tuple[str, str, dict]], crash: dict) -> None:
    """Replace the bundle runs by a recorder writing a checkpoint (with the split beside it, as the checkpointer
    does), a ``val_history.csv`` and a per-case CSV (seeded values per role); the training of ``crash["arm"]``
    (arm, seed[, fold]) raises."""
    import shutil

    import torch

    from pipelines.engine.tracking import file_sha256

    def fake(run_id: str, role: str, config: str, **kw):
        calls.append((run_id, role, kw))
        out = Path(kw["output_dir"])
        if run_id == "training":
            arm = kw["run_tags"]["ctdistill_arm"]
            fold = kw["run_tags"].get("ctdistill_fold")
            if (arm, kw["seed"]) == crash.get("arm") or (arm, kw["seed"], fold) == crash.get("arm"):
                (out / "partial.txt").write_text("interrupted")
                raise RuntimeError("simulated crash")
            (out / "checkpoints").mkdir(parents=True, exist_ok=True)
            torch.save({"model": {}, "splits_sha256": file_sha256(kw["splits_file"])}, out / "checkpoints" / "best.pt")
            shutil.copy(kw["splits_file"], out / "checkpoints" / "splits.json")
            best = {"resnet18_student": 0.5, "kd_baselines": 0.45, "hlfd": 0.55}.get(role, 0.8)
            (out / "val_history.csv").write_text(f"epoch,dsc_tumor,dsc_organ\n1,{best - 0.1},0.9\n2,{best},0.9\n")
            return
        split = json.loads(Path(kw["splits_file"]).read_text())
        base = {"unetpp_teacher": 0.7, "resnet18_student": 0.3, "kd_baselines": 0.4, "hlfd": 0.5}[role] + 0.01 * kw["seed"]
        rows = [f"{Path(e['image']).parent.name},{base + 0.01 * i},0.1,0.9,0.2,1.0,1.0" for i, e in enumerate(split["test"])]
        (out / "eval").mkdir(parents=True, exist_ok=True)
        (out / "eval" / "cases.csv").write_text("case,dsc_tumor,rvd_tumor,dsc_organ,rvd_organ,tumor_ml_pred,tumor_ml_gt\n" + "\n".join(rows) + "\n")

    monkeypatch.setattr(ex, "run_bundle", fake)


class _FakeTracker:
    """Stands in for the MLflow parent run (a new SQLite store costs seconds; the end-to-end test uses the real one)."""

    def __init__(self, uri: str, experiment_name: str) -> None:
        self.parent_id, self.client = "parent0", None

    def open_parent(self, previous, params) -> str:
        return self.parent_id

    def child_tags(self, arm: str, seed: int, stage: str, fold: int | None = None) -> dict[str, str]:
        tags = {"mlflow.parentRunId": self.parent_id, "ctdistill_arm": arm, "ctdistill_seed": str(seed), "ctdistill_stage": stage}
        return tags if fold is None else {**tags, "ctdistill_fold": str(fold)}

    def fail_open(self, arm: str, seed: int, fold: int | None = None) -> None:
        pass

    def run_id(self, arm: str, seed: int, stage: str, fold: int | None = None) -> str:
        return ""

    def finish(self, table, files, status: str = "FINISHED") -> None:
        assert all(Path(f).is_file() for f in files)


def test_orchestration_equal_protocol_resume_and_reused_teacher(tmp_path, monkeypatch):
    """Fake bundles: one split and equal epochs for every arm, one teacher for every KD arm, resume after a crash."""
    monkeypatch.setattr(ex, "_Tracker", _FakeTracker)
    tmp_path = tmp_path.resolve()
    calls: list = []
    crash = {"arm": ("hinton", 1)}
    _fake_bundles(monkeypatch, calls, crash)
    cfg = ex.preset_config(
        out=tmp_path / "exp", methods=("hinton", "hlfd_ipd"), seeds=(0, 1), cases=6, size=32, epochs=3, teacher_epochs=5,
        teacher_features=(4, 8, 16, 32), student_base_width=8,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        ex.run_experiment(cfg)
    trains = [kw for run_id, _, kw in calls if run_id == "training"]
    assert len({kw["splits_file"] for run_id, _, kw in calls}) == 1  # one split file for every run
    assert [kw["epochs"] for kw in trains] == [5, 3, 3, 3, 3, 3]  # teacher, then student/hinton/hlfd_ipd per seed
    student_knobs = {json.dumps({k: v for k, v in kw.items() if k not in ("seed", "output_dir", "run_tags", "teacher_ckpt", "kd_method", "kd_weights")}, sort_keys=True) for kw in trains[1:]}
    assert len(student_knobs) == 1  # equal data, epochs, batch, sizes, widths
    teacher_ckpt = str(tmp_path / "exp/runs/teacher/seed0/checkpoints/best.pt")
    kd = [kw for kw in trains if "teacher_ckpt" in kw]
    assert len(kd) == 3 and {kw["teacher_ckpt"] for kw in kd} == {teacher_ckpt}
    assert kd[1]["kd_weights"] == {"ufd": 0.0, "ifd": 0.0, "upd": 0.0, "ipd": 1.0}
    assert all(kw["run_tags"]["mlflow.parentRunId"] for _, _, kw in calls)
    # without --resume: refused (finished arms are never overwritten)
    with pytest.raises(ConfigError, match="--out: .* finished arm\\(s\\).*--resume"):
        ex.run_experiment(cfg)
    # --resume: the five finished arms are skipped, the crashed one is cleared and rerun, the last one runs
    calls.clear()
    crash.clear()
    table = ex.run_experiment(ex.replace(cfg, resume=True))
    assert [(r, kw["run_tags"]["ctdistill_arm"], kw["seed"]) for r, _, kw in calls] == [
        ("training", "hinton", 1), ("evaluating", "hinton", 1), ("training", "hlfd_ipd", 1), ("evaluating", "hlfd_ipd", 1),
    ]  # fmt: skip
    assert not (tmp_path / "exp/runs/hinton/seed1/partial.txt").exists()
    assert list(table["arm"]) == ["teacher", "student", "hinton", "hlfd_ipd"]
    cases = pd.read_csv(tmp_path / "exp/cases.csv")
    n_test = len(json.loads((tmp_path / "exp/splits.json").read_text())["test"])
    assert len(cases) == (1 + 3 * 2) * n_test
    # fake means: teacher 0.7 + x, student 0.305 + x, hlfd_ipd 0.505 + x (x: the case offsets) -> 0.2 / 0.395
    assert table.set_index("arm").loc["hlfd_ipd", "gap_closed"] == pytest.approx(0.2 / 0.395)
    # --resume with other epochs: refused
    with pytest.raises(ConfigError, match="--resume: .*epochs: 3 -> 4"):
        ex.validate_config(ex.replace(cfg, resume=True, epochs=4))
    # a reused teacher is evaluated (its checkpoint), not trained, and every KD arm distils from it
    calls.clear()
    monkeypatch.setattr(ex, "_check_teacher", lambda cfg, arms: None)
    ex.run_experiment(ex.replace(cfg, out=tmp_path / "exp2", teacher_ckpt=Path(teacher_ckpt), methods=("hinton",), seeds=(0,)))
    assert [(r, kw["run_tags"]["ctdistill_arm"]) for r, _, kw in calls] == [
        ("evaluating", "teacher"), ("training", "student"), ("evaluating", "student"), ("training", "hinton"), ("evaluating", "hinton"),
    ]  # fmt: skip
    assert calls[0][2]["checkpoint"] == teacher_ckpt and calls[3][2]["teacher_ckpt"] == teacher_ckpt


def test_from_labels_hook(tmp_path, monkeypatch):
    import pipelines.synthesize as syn

    monkeypatch.delattr(syn, "synthesize_from_labels", raising=False)
    with pytest.raises(ConfigError, match="--from-labels: .*no synthesize_from_labels"):
        ex.validate_config(ex.preset_config(out=tmp_path / "o", from_labels=tmp_path))
    seen = {}

    def fake(labels, out, seed=0, size=64):
        seen.update(labels=labels, out=out, seed=seed, size=size)
        return syn.synthesize("kits", cases=5, size=32, out=out, seed=seed)

    monkeypatch.setattr(syn, "synthesize_from_labels", fake, raising=False)
    if hasattr(syn, "find_label_files"):  # an empty label folder is refused before any work
        with pytest.raises(ConfigError, match="--from-labels: "):
            ex.validate_config(ex.preset_config(out=tmp_path / "o", from_labels=tmp_path))
    with pytest.raises(ConfigError, match="--from-labels: synthesizes KiTS-style CT"):
        ex.validate_config(ex.preset_config(out=tmp_path / "o", from_labels=tmp_path, task="lits"))
    data = ex._prepare_data(ex.preset_config(out=tmp_path / "o", from_labels=tmp_path, size=32, data_seed=4), tmp_path / "o")
    assert seen == {"labels": tmp_path.resolve(), "out": tmp_path / "o" / "data", "seed": 4, "size": 32}
    assert (data / "dataset.json").is_file()


@pytest.mark.slow
def test_tiny_experiment_end_to_end(tmp_path, capsys):
    """Teacher, student and Hinton KD over 2 seeds through the real bundles; MLflow parent with 10 children; resume."""
    import mlflow

    out = tmp_path / "exp"
    argv = ["--out", str(out), "--methods", "student,hinton", "--seeds", "2", "--epochs", "1", "--cases", "5", "--size", "32",
            "--teacher-features", "4", "8", "16", "32", "--student-width", "4", "--student-decoder", "8", "8", "4", "4", "4"]  # fmt: skip
    env = subprocess_env()
    proc = subprocess.run([sys.executable, "-m", "pipelines.experiment", *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]
    n_test = len(json.loads((out / "splits.json").read_text())["test"])
    cases = pd.read_csv(out / "cases.csv")
    assert len(cases) == 5 * n_test  # teacher once + (student, hinton) x 2 seeds
    assert {"dsc_tumor", "rvd_tumor", "dsc_organ", "rvd_organ", "tumor_ml_pred", "tumor_ml_gt"} <= set(cases.columns)
    assert sorted(cases.groupby(["arm", "seed"]).size().index) == [("hinton", 0), ("hinton", 1), ("student", 0), ("student", 1), ("teacher", 0)]
    md = (out / "table.md").read_text()
    assert "| Hinton KD | hinton | 2 |" in md and md.splitlines()[0] in proc.stdout
    assert list(pd.read_csv(out / "table.csv")["arm"]) == ["teacher", "student", "hinton"]
    # MLflow: one parent; every training and evaluation run is its child
    state = json.loads((out / "experiment.json").read_text())
    client = mlflow.MlflowClient(f"sqlite:///{out / 'mlruns.db'}")
    exp = client.get_experiment_by_name("ctdistill_experiment")
    parent = client.get_run(state["parent_run_id"])
    assert parent.info.status == "FINISHED" and parent.data.params["seeds"] == "0,1" and parent.data.params["splits_sha256"]
    assert "hinton.dsc_tumor_mean" in parent.data.metrics and "hinton.wilcoxon_p" in parent.data.metrics
    assert parent.data.tags["validation_gate"] == "passed" or "distillation lost on validation" in parent.data.tags["validation_gate"]
    runs = pd.read_csv(out / "runs.csv")
    assert "best_val" in runs.columns
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"table.md", "table.csv", "cases.csv"}
    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 10 and all(r.info.status == "FINISHED" for r in children)
    assert sorted((r.data.tags["ctdistill_arm"], r.data.tags["ctdistill_stage"]) for r in children).count(("hinton", "train")) == 2
    assert len(client.search_runs([exp.experiment_id])) == 11
    # --resume (in this process: nothing is trained) runs nothing new and rebuilds the same table
    markers = sorted(out.glob("runs/*/seed*/done.json"))
    mtimes = [m.stat().st_mtime_ns for m in markers]
    assert len(markers) == 5
    main([*argv, "--resume"])
    assert [m.stat().st_mtime_ns for m in sorted(out.glob("runs/*/seed*/done.json"))] == mtimes
    assert len(client.search_runs([exp.experiment_id])) == 11
    assert (out / "table.md").read_text() == md
    assert "| ResNet18 student (no KD) | student | 2 |" in capsys.readouterr().out


def test_recipe_knobs_reach_only_their_arms(tmp_path, monkeypatch):
    """Teacher warm-up/clipping go to the teacher run only, the KD ramp to the distilling arms only."""
    monkeypatch.setattr(ex, "_Tracker", _FakeTracker)
    calls: list = []
    _fake_bundles(monkeypatch, calls, {})
    cfg = ex.preset_config(
        out=tmp_path.resolve() / "exp", methods=("hinton",), seeds=(0,), cases=6, size=32, epochs=3,
        teacher_features=(4, 8, 16, 32), student_base_width=8, teacher_warmup_epochs=2, teacher_grad_clip=0.5,
        kd_warmup_epochs=1.5,
    )  # fmt: skip
    ex.run_experiment(cfg)
    trains = {kw["run_tags"]["ctdistill_arm"]: kw for run_id, _, kw in calls if run_id == "training"}
    assert (trains["teacher"]["warmup_epochs"], trains["teacher"]["grad_clip"]) == (2, 0.5)
    assert "kd_warmup_epochs" not in trains["teacher"] and "kd_warmup_epochs" not in trains["student"]
    assert "warmup_epochs" not in trains["student"] and "grad_clip" not in trains["hinton"]
    assert trains["hinton"]["kd_warmup_epochs"] == 1.5


def test_folds_every_volume_tested_once_teacher_per_fold_and_resume(tmp_path, monkeypatch):
    """--folds 3 on 9 cases (fake bundles): 3 disjoint test folds covering every case, one teacher per fold that the
    fold's KD arms distil from, each volume once per arm and seed in cases.csv, 9 paired volumes; resume after a crash."""
    monkeypatch.setattr(ex, "_Tracker", _FakeTracker)
    tmp_path = tmp_path.resolve()
    calls: list = []
    crash = {"arm": ("hinton", 1, "1")}
    _fake_bundles(monkeypatch, calls, crash)
    cfg = ex.preset_config(
        out=tmp_path / "exp", methods=("hinton",), seeds=(0, 1), cases=9, size=32, epochs=2, folds=3,
        teacher_features=(4, 8, 16, 32), student_base_width=8,
    )  # fmt: skip
    with pytest.raises(RuntimeError, match="simulated crash"):
        ex.run_experiment(cfg)
    record = json.loads((tmp_path / "exp/folds.json").read_text())
    assert record["folds"] == 3 and len(record["cases"]) == 9
    assert sorted(list(record["cases"].values()).count(f) for f in range(3)) == [3, 3, 3]
    tests = []
    for f, entry in enumerate(record["splits"]):
        split = json.loads(Path(entry["file"]).read_text())
        test = {e["case"] for e in split["test"]}
        seen = {e["case"] for e in split["training"] + split["validation"]}
        assert test == {c for c, k in record["cases"].items() if k == f} and not test & seen and len(test | seen) == 9
        assert split["validation"] and split["meta"]["cross_validation"] == {"folds": 3, "test_fold": f}
        tests.append(test)
    assert set().union(*tests) == set(record["cases"])  # every case is a test case exactly once
    trains = [kw for r, _, kw in calls if r == "training"]
    teachers = [kw for kw in trains if kw["run_tags"]["ctdistill_arm"] == "teacher"]
    assert [kw["splits_file"] for kw in teachers] == [e["file"] for e in record["splits"][:2]]  # crashed in fold 1
    for kw in trains:  # every run of fold f reads split f; KD arms distil from fold f's teacher
        f = int(kw["run_tags"]["ctdistill_fold"])
        assert kw["splits_file"] == record["splits"][f]["file"] and Path(kw["output_dir"]).parent.name == f"fold{f}"
        if "teacher_ckpt" in kw:
            assert kw["teacher_ckpt"] == str(tmp_path / f"exp/runs/teacher/fold{f}/seed0/checkpoints/best.pt")
    calls.clear()
    crash.clear()
    table = ex.run_experiment(ex.replace(cfg, resume=True))
    ran = [(r, kw["run_tags"]["ctdistill_arm"], kw["seed"], kw["run_tags"]["ctdistill_fold"]) for r, _, kw in calls]
    assert ran[:2] == [("training", "hinton", 1, "1"), ("evaluating", "hinton", 1, "1")]
    assert all(f == "2" for *_, f in ran[2:]) and len(ran) == 2 + 2 * 5  # fold 2: teacher, 2 x (student, hinton)
    cases = pd.read_csv(tmp_path / "exp/cases.csv", dtype={"case": str})
    assert len(cases) == (1 + 2 * 2) * 9 and not cases.duplicated(["arm", "seed", "case"]).any()
    assert set(cases.groupby(["arm", "seed"])["case"].nunique()) == {9}
    t = table.set_index("arm")
    assert t.loc["hinton", "n_volumes"] == 9 and t.loc["hinton", "folds"] == 3
    runs = pd.read_csv(tmp_path / "exp/runs.csv")
    assert len(runs) == 3 * 5 and set(runs["fold"]) == {0, 1, 2}
    assert t.loc["hinton", "val_vs_student"] == pytest.approx(-0.05) and t.loc["hinton", "val_lost"] == 6  # fake best 0.45 < 0.5
    assert "3-fold cross-validation" in (tmp_path / "exp/table.md").read_text()
    # a teacher trained on fold 0's split saw the test cases of folds 1 and 2: refused before any training
    calls.clear()
    monkeypatch.setattr(ex, "_check_teacher", lambda cfg, arms: None)
    teacher = tmp_path / "exp/runs/teacher/fold0/seed0/checkpoints/best.pt"
    with pytest.raises(ConfigError, match=r"--teacher-ckpt: .*trained or validated on 3 test case\(s\) of fold 1 of this experiment \("):
        ex.run_experiment(ex.replace(cfg, out=tmp_path / "exp3", teacher_ckpt=teacher))
    assert calls == []


def _split(path: Path, training: list[str], validation: list[str], test: list[str]) -> Path:
    def entries(names):
        return [{"image": f"/data/{n}/imaging.nii.gz", "label": f"/data/{n}/segmentation.nii.gz", "case": n} for n in names]

    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"training": entries(training), "validation": entries(validation), "test": entries(test)}))
    return path


def _teacher(folder: Path, split: Path | None, recorded: str | None = None) -> Path:
    import shutil

    import torch

    from pipelines.engine.tracking import file_sha256

    folder.mkdir(parents=True, exist_ok=True)
    sha = recorded if recorded is not None else (file_sha256(split) if split else "")
    torch.save({"model": {}, "splits_sha256": sha}, folder / "best.pt")
    if split is not None:
        shutil.copy(split, folder / "splits.json")
    return folder / "best.pt"


def test_reused_teacher_that_saw_a_test_case_is_refused(tmp_path):
    from pipelines.engine.tracking import file_sha256

    experiment = _split(tmp_path / "exp/splits.json", ["c1", "c2", "c3"], ["c4"], ["c5", "c6"])
    # trained on c5 (validated on c6): both are test cases of the experiment
    leaky = _teacher(tmp_path / "t1", _split(tmp_path / "s1.json", ["c1", "c5"], ["c6"], ["c2"]))
    with pytest.raises(ConfigError, match=r"^--teacher-ckpt: .*t1/best.pt was trained or validated on 2 test case\(s\) of this experiment \(c5, c6;"):
        ex.check_teacher_split(leaky, [experiment])
    # its own split, disjoint from the test cases: accepted
    ex.check_teacher_split(_teacher(tmp_path / "t2", _split(tmp_path / "s2.json", ["c1", "c2"], ["c3"], ["c5", "c6"])), [experiment])
    # no split beside it, but it records this very split's SHA-256: accepted
    ex.check_teacher_split(_teacher(tmp_path / "t3", None, recorded=file_sha256(experiment)), [experiment])
    # no split beside it and another split recorded: cannot be verified, refused
    with pytest.raises(ConfigError, match=r"--teacher-ckpt: .*cannot tell which cases it was trained on \(its recorded split sha256 abc"):
        ex.check_teacher_split(_teacher(tmp_path / "t4", None, recorded="abc" * 20), [experiment])
    # a split beside it that is not the one it records: not trusted
    mismatched = _teacher(tmp_path / "t5", _split(tmp_path / "s5.json", ["c1"], ["c2"], []), recorded="f" * 64)
    with pytest.raises(ConfigError, match="cannot tell which cases"):
        ex.check_teacher_split(mismatched, [experiment])
    # folds: the overlapping fold is named
    fold1 = _split(tmp_path / "exp/folds/fold1.json", ["c5", "c6", "c4"], ["c3"], ["c1", "c2"])
    with pytest.raises(ConfigError, match=r"on 1 test case\(s\) of fold 1 of this experiment \(c1;"):
        ex.check_teacher_split(_teacher(tmp_path / "t6", _split(tmp_path / "s6.json", ["c1", "c3"], ["c4"], ["c5", "c6"])), [experiment, fold1])


def test_new_arms_and_their_overrides(tmp_path, monkeypatch):
    """The issue's arms: knob names the KD roles read (kd_method cwd/dist, kd_balance grad, kd_mask teacher_correct);
    --kd-balance-ratio reaches the balanced arms only."""
    assert (ex.ARMS["cwd"].role, ex.ARMS["cwd"].overrides) == ("kd_baselines", {"kd_method": "cwd"})
    assert (ex.ARMS["dist"].role, ex.ARMS["dist"].overrides) == ("kd_baselines", {"kd_method": "dist"})
    assert (ex.ARMS["hinton_masked"].role, ex.ARMS["hinton_masked"].overrides) == ("kd_baselines", {"kd_method": "hinton", "kd_mask": "teacher_correct"})
    assert (ex.ARMS["hlfd_balanced"].role, ex.ARMS["hlfd_balanced"].overrides) == ("hlfd", {"kd_balance": "grad"})
    assert ex.ARMS["hlfd_wo_ifd_balanced"].overrides == {"kd_weights": {"ufd": 1.0, "ifd": 0.0, "upd": 1.0, "ipd": 1.0}, "kd_balance": "grad"}
    assert all(ex.ARMS[a].distils for a in ("cwd", "dist", "hinton_masked", "hlfd_balanced", "hlfd_wo_ifd_balanced"))
    monkeypatch.setattr(ex, "_Tracker", _FakeTracker)
    calls: list = []
    _fake_bundles(monkeypatch, calls, {})
    cfg = ex.preset_config(
        out=tmp_path.resolve() / "exp", methods=("hlfd_balanced", "hinton_masked", "dist"), seeds=(0,), cases=6, size=32,
        epochs=2, teacher_features=(4, 8, 16, 32), student_base_width=8, kd_balance_ratio=0.5,
    )  # fmt: skip
    ex.run_experiment(cfg)
    trains = {kw["run_tags"]["ctdistill_arm"]: kw for r, _, kw in calls if r == "training"}
    assert trains["hlfd_balanced"]["kd_balance"] == "grad" and trains["hlfd_balanced"]["kd_balance_ratio"] == 0.5
    assert trains["hinton_masked"]["kd_mask"] == "teacher_correct" and "kd_balance_ratio" not in trains["hinton_masked"]
    assert trains["dist"]["kd_method"] == "dist" and "kd_balance_ratio" not in trains["student"]
    with pytest.raises(ConfigError, match="--kd-balance-ratio: must be a number > 0"):
        ex.validate_config(ex.replace(cfg, out=tmp_path / "x", kd_balance_ratio=0.0))


def test_best_validation_reads_val_history(tmp_path):
    assert math.isnan(ex.best_validation(tmp_path))  # never validated
    (tmp_path / "val_history.csv").write_text("epoch,dsc_tumor,dsc_organ\n1,0.2,0.9\n2,,0.9\n3,0.35,0.8\n4,0.3,0.95\n")
    assert ex.best_validation(tmp_path) == pytest.approx(0.35)
