"""Issue 19, data lost or leaked between splits: datalist split values, hand-edited split files, output folders
with symlinks, evaluation after the dataset changed, ``synthesize --out`` over someone's folder."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from pipelines.datalist import main as datalist_main
from tests.reliability.conftest import one_line, snapshot, write_nifti


def _csv_cohort(root: Path, splits: list[str], header: str = "image,label,split") -> Path:
    """A CSV dataset of len(splits) tiny labelled cases, row i with split value splits[i]."""
    rows = [header]
    for i, split in enumerate(splits):
        img = write_nifti(root / f"img{i}.nii.gz", np.zeros((8, 8, 4), np.int16))
        lab = write_nifti(root / f"lab{i}.nii.gz", np.zeros((8, 8, 4), np.uint8))
        rows.append(f"{img.name},{lab.name},{split}")
    csv = root / "data.csv"
    csv.write_text("\n".join(rows) + "\n")
    return csv


@pytest.mark.parametrize("values", [["train", "Test", "testing", "VAL"], ["training", " TESTING ", "Validation", "Train"]])
def test_datalist_csv_split_aliases_keep_held_out_cases_out_of_training(values, tmp_path):
    """``Test``/``testing`` (any case) are the test split: no held-out case reaches training or validation."""
    csv = _csv_cohort(tmp_path, values)
    out = tmp_path / "splits.json"
    datalist_main([str(csv), "--out", str(out)])
    result = json.loads(out.read_text())
    where = {Path(e["image"]).name: name for name in ("training", "validation", "test") for e in result[name]}
    expected = {f"img{i}.nii.gz": {"train": "training", "training": "training", "test": "test", "testing": "test",
                                     "val": "validation", "validation": "validation"}[v.strip().lower()] for i, v in enumerate(values)}  # fmt: skip
    assert where == expected


def test_datalist_unknown_csv_split_value_names_it_and_the_valid_ones(tmp_path, capsys):
    csv = _csv_cohort(tmp_path, ["train", "tst", "train"])
    with pytest.raises(SystemExit):
        datalist_main([str(csv), "--out", str(tmp_path / "splits.json")])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "'tst'" in err and "test" in err and "training" in err and "row 3" in err and str(csv) in err
    assert not (tmp_path / "splits.json").exists()


def test_datalist_refuses_to_replace_a_split_file_edited_by_hand(tmp_path, capsys):
    """Re-running datalist onto its own file after the user moved a case to test: refused, the edit kept."""
    csv = _csv_cohort(tmp_path, ["", "", "", ""])
    out = tmp_path / "splits.json"
    datalist_main([str(csv), "--out", str(out)])
    data = json.loads(out.read_text())
    data["test"].append(data["training"].pop(0))  # the clinician's edit; the file still says datalist wrote it
    out.write_text(json.dumps(data, indent=2) + "\n")
    before = snapshot(out)
    with pytest.raises(SystemExit):
        datalist_main([str(csv), "--out", str(out)])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(out) in err and "edited" in err
    assert snapshot(out) == before
    out2 = tmp_path / "fresh.json"
    datalist_main([str(csv), "--out", str(out2)])
    datalist_main([str(csv), "--out", str(out2), "--seed", "3"])  # its own unedited output is still replaced
    assert json.loads(out2.read_text())["meta"]["seed"] == 3


# ------------------------------------------------------------------------------------------------ symlinks


@pytest.mark.parametrize("name", [".lock", "splits.json", "checkpoints"])
def test_training_output_dir_with_symlinks_never_writes_through_them(name, tmp_path):
    """A training output folder pre-seeded with links: refused (one line naming the link); the targets unchanged."""
    from pipelines.engine import BundleInputError, guard_training_output, release_output_dir

    out = tmp_path / "run"
    out.mkdir()
    victim = tmp_path / "user_file.txt"
    victim.write_text("a clinician's notes\n")
    (out / name).symlink_to(victim if name != "checkpoints" else tmp_path)
    before = snapshot(victim)
    try:
        with pytest.raises(BundleInputError) as err:
            guard_training_output(out)
    finally:
        release_output_dir(out)
    assert str(out / name) in str(err.value) and "link" in str(err.value) and one_line(str(err.value))
    assert snapshot(victim) == before


def test_atomic_writes_never_replace_a_symlink(tmp_path):
    """The one place that writes files refuses a destination that is a link (never follows or replaces it)."""
    from pipelines.engine.atomic import atomic_write_text

    victim = tmp_path / "user_file.txt"
    victim.write_text("keep me\n")
    link = tmp_path / "out.json"
    link.symlink_to(victim)
    with pytest.raises(OSError, match="link"):
        atomic_write_text(link, "{}")
    assert victim.read_text() == "keep me\n" and link.is_symlink()


# ------------------------------------------------------------------------------------------------ synthesize --out


def test_synthesize_refuses_a_non_empty_folder_it_did_not_create(tmp_path):
    """``synthesize --out`` an existing dataset: refused before any write; the real cases stay byte-identical."""
    from pipelines.synthesize import main as synthesize_main

    real = tmp_path / "kits"
    (real / "case_00000").mkdir(parents=True)
    write_nifti(real / "case_00000" / "imaging.nii.gz", np.full((8, 8, 4), 40, np.int16))
    (real / "dataset.json").write_text('{"name": "real"}\n')
    before = snapshot(real)
    with pytest.raises(SystemExit) as exit_info:
        synthesize_main(["--task", "kits", "--cases", "2", "--size", "32", "--out", str(real)])
    assert exit_info.value.code not in (0, None)
    assert snapshot(real) == before and sorted(os.listdir(real)) == ["case_00000", "dataset.json"]


# ------------------------------------------------------------------------------------------------ evaluation split


def test_evaluation_after_cases_were_added_never_scores_a_training_case(tmp_path):
    """The dataset folder gained cases after training: the recomputed split moves cases between sections; evaluating
    it is refused, naming the moved cases and the checkpoint's own split (which still evaluates)."""
    import shutil

    from pipelines.engine import BundleInputError, check_eval_split, load_split, resolve_splits
    from pipelines.synthesize import synthesize

    data = tmp_path / "kits"
    synthesize("kits", cases=5, size=32, out=data, seed=1)
    ckpt_dir = tmp_path / "run" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    trained = resolve_splits(data, tmp_path / "run", seed=0, task="kits")
    shutil.copy(trained, ckpt_dir / "splits.json")  # what the trainer keeps beside best.pt
    training = {Path(e["image"]).parent.name for e in load_split(trained, "training")}
    synthesize("kits", cases=6, size=32, out=data, seed=1)  # a new case in the same folder
    recomputed = resolve_splits(data, tmp_path / "eval", seed=0, task="kits")
    evaluated = {Path(e["image"]).parent.name for e in load_split(recomputed, ["test", "validation"])}
    assert evaluated & training, "the fault needs a training case that the recomputed split evaluates"
    with pytest.raises(BundleInputError) as err:
        check_eval_split(recomputed, ckpt_dir / "best.pt", ["test", "validation"])
    message = str(err.value)
    assert one_line(message) and str(ckpt_dir / "splits.json") in message and "(was training)" in message
    assert all(case in message for case in sorted(evaluated & training)[:5])
    assert check_eval_split(str(ckpt_dir / "splits.json"), ckpt_dir / "best.pt", ["test"]) == str(ckpt_dir / "splits.json")


def test_splits_json_paths_are_relative_to_the_json_not_the_working_directory(tmp_path, monkeypatch):
    """A splits JSON listing ``case_*/imaging.nii.gz`` relative to itself: read from another folder that holds other
    ``case_*`` folders, the JSON's own files are used (never the working directory's)."""
    from pipelines.engine import load_split, preflight

    ours, other = tmp_path / "data", tmp_path / "elsewhere"
    for root, value in ((ours, 100), (other, -900)):
        for i in range(2):
            (root / f"case_{i:05d}").mkdir(parents=True)
            write_nifti(root / f"case_{i:05d}" / "imaging.nii.gz", np.full((8, 8, 4), value, np.int16))
            write_nifti(root / f"case_{i:05d}" / "segmentation.nii.gz", np.zeros((8, 8, 4), np.uint8))
    rel = [{"image": f"case_{i:05d}/imaging.nii.gz", "label": f"case_{i:05d}/segmentation.nii.gz"} for i in range(2)]
    splits = ours / "splits.json"
    splits.write_text(json.dumps({"training": rel[:1], "validation": rel[1:], "test": []}))
    monkeypatch.chdir(other)
    entries = load_split(str(splits), "training")
    assert entries == [{"image": str(ours / "case_00000/imaging.nii.gz"), "label": str(ours / "case_00000/segmentation.nii.gz")}]
    monkeypatch.chdir(tmp_path)  # no case_* here: the preflight used to say "do not exist"
    assert preflight(str(splits), role="resnet18_student", sections=("training", "validation"), cache_rate=0.0, check_integrity=False)


def test_datalist_csv_header_with_spaces_is_read(tmp_path):
    """``image, label`` (a space after the comma) names the label column (it was "needs an 'image' column"-like)."""
    csv = _csv_cohort(tmp_path, ["train", "test", "val"], header="image, label, split")
    out = tmp_path / "splits.json"
    datalist_main([str(csv), "--out", str(out)])
    result = json.loads(out.read_text())
    assert [len(result[s]) for s in ("training", "validation", "test")] == [1, 1, 1]
    assert all(e.get("label") for s in ("training", "validation", "test") for e in result[s])


def test_datalist_negative_seed_names_the_knob(tmp_path, capsys):
    csv = _csv_cohort(tmp_path, ["", "", ""])
    with pytest.raises(SystemExit):
        datalist_main([str(csv), "--out", str(tmp_path / "s.json"), "--seed", "-1"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert "--seed must be >= 0" in err and "numpy" not in err.lower()
