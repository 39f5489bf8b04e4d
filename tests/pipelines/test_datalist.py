"""pipelines.datalist: layout detection (KiTS19, LiTS, nnU-Net, MSD, CSV) on trees of empty-but-named files,
deterministic splits, --val-fraction / --folds, the paper presets (KiTS 168:42, LiTS 131:70), clear errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipelines.datalist import (
    detect_layout,
    find_cases,
    load_split,
    main,
    make_splits,
    read_declared_labels,
    write_datalist,
)


def _touch(path):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def _kits(root, labelled=210, unlabelled=0):
    for i in range(labelled + unlabelled):
        _touch(root / f"case_{i:05d}" / "imaging.nii.gz")
        if i < labelled:
            _touch(root / f"case_{i:05d}" / "segmentation.nii.gz")
    return root


def _lits(root, labelled=131, test=70):
    for i in range(labelled):  # the official release: two training batches, test volumes apart
        batch = root / ("Training Batch 1" if i < 28 else "Training Batch 2")
        _touch(batch / f"volume-{i}.nii")
        _touch(batch / f"segmentation-{i}.nii")
    for i in range(test):
        _touch(root / "Test" / f"test-volume-{i}.nii")
    return root


def _names(entries):
    return [e["case"] for e in entries]


def test_kits19_layout_and_paper_preset(tmp_path):
    root = _kits(tmp_path / "kits")
    layout, cases = find_cases(root)
    assert layout == "kits19" and len(cases) == 210 and all(c["labelled"] for c in cases)
    assert _names(cases)[:3] == ["case_00000", "case_00001", "case_00002"]
    assert cases[7]["label"] == str((root / "case_00007" / "segmentation.nii.gz").resolve())
    splits = make_splits(cases, preset="kits19", val_fraction=0.2, seed=0)
    n_train, n_val, n_test = (len(splits[s]) for s in ("training", "validation", "test"))
    assert n_test == 42 and n_train + n_val == 168 and n_val == round(168 * 0.2)
    all_cases = _names(splits["training"]) + _names(splits["validation"]) + _names(splits["test"])
    assert sorted(all_cases) == _names(cases)  # a partition: nothing lost, nothing twice
    assert all("label" in e for e in splits["test"])


def test_kits19_unlabelled_cases_are_test_only(tmp_path):
    root = _kits(tmp_path / "kits", labelled=8, unlabelled=3)
    _, cases = find_cases(root)
    splits = make_splits(cases, val_fraction=0.25, seed=1)
    assert _names(splits["test"]) == ["case_00008", "case_00009", "case_00010"]
    assert all("label" not in e for e in splits["test"])
    assert len(splits["validation"]) == 2 and len(splits["training"]) == 6


def test_kits19_full_release_preset_keeps_test_evaluable(tmp_path):
    # the KiTS19 release: 210 labelled cases + 90 whose labels were never published
    root = _kits(tmp_path / "kits", labelled=210, unlabelled=90)
    _, cases = find_cases(root)
    splits = make_splits(cases, preset="kits19", val_fraction=0.2, seed=0)
    assert len(splits["test"]) == 42 and all("label" in e for e in splits["test"])
    assert len(splits["training"]) + len(splits["validation"]) == 168
    assert _names(splits["unlabelled"]) == [f"case_{i:05d}" for i in range(210, 300)]
    data = write_datalist(root, tmp_path / "s.json", preset="kits19", seed=0)
    assert data["meta"]["counts"] == {"training": 134, "validation": 34, "test": 42, "unlabelled": 90}
    assert len(load_split(tmp_path / "s.json", "unlabelled")) == 90


def test_lits_layout_and_paper_preset(tmp_path):
    root = _lits(tmp_path / "lits")
    layout, cases = find_cases(root)
    assert layout == "lits" and len(cases) == 201
    assert sum(c["labelled"] for c in cases) == 131
    splits = make_splits(cases, preset="lits", val_fraction=0.2, seed=0)
    assert len(splits["test"]) == 70 and len(splits["training"]) + len(splits["validation"]) == 131
    assert all(e["case"].startswith("test-volume-") and "label" not in e for e in splits["test"])
    labelled = {e["case"]: e for e in splits["training"] + splits["validation"]}
    assert labelled["volume-30"]["label"].endswith("Training Batch 2/segmentation-30.nii")
    # without the test volumes, 70 of the 201 labelled cases are held out
    _, only_labelled = find_cases(_lits(tmp_path / "lits201", labelled=201, test=0))
    splits = make_splits(only_labelled, preset="lits", val_fraction=0.0, seed=0)
    assert (len(splits["training"]), len(splits["validation"]), len(splits["test"])) == (131, 0, 70)


def test_nnunet_layout(tmp_path):
    root = tmp_path / "Dataset001_KiTS"
    for case in ("kits_000", "kits_001", "kits_002"):
        _touch(root / "imagesTr" / f"{case}_0000.nii.gz")
        _touch(root / "labelsTr" / f"{case}.nii.gz")
    _touch(root / "imagesTs" / "kits_900_0000.nii.gz")
    (root / "dataset.json").write_text(
        json.dumps(
            {"channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": 1, "tumor": 2}, "numTraining": 3}
        )
    )
    assert detect_layout(root) == "nnunet"
    layout, cases = find_cases(root)
    assert [(c["case"], c["labelled"]) for c in cases] == [
        ("kits_000", True), ("kits_001", True), ("kits_002", True), ("kits_900", False)
    ]  # fmt: skip
    assert cases[1]["label"] == str((root / "labelsTr" / "kits_001.nii.gz").resolve())
    assert read_declared_labels(root) == {"background": 0, "kidney": 1, "tumor": 2}


def test_msd_layout(tmp_path):
    root = tmp_path / "Task03_Liver"
    training = []
    for i in (0, 1, 2, 3):
        _touch(root / "imagesTr" / f"liver_{i}.nii.gz")
        _touch(root / "labelsTr" / f"liver_{i}.nii.gz")
        training.append({"image": f"./imagesTr/liver_{i}.nii.gz", "label": f"./labelsTr/liver_{i}.nii.gz"})
    _touch(root / "imagesTs" / "liver_9.nii.gz")
    meta = {
        "labels": {"0": "background", "1": "liver", "2": "cancer"},
        "training": training,
        "test": ["./imagesTs/liver_9.nii.gz"],
    }
    (root / "dataset.json").write_text(json.dumps(meta))
    assert detect_layout(root) == "msd"
    _, cases = find_cases(root)
    assert [c["case"] for c in cases] == ["liver_0", "liver_1", "liver_2", "liver_3", "liver_9"]
    assert cases[2]["label"] == str((root / "labelsTr" / "liver_2.nii.gz").resolve())
    assert not cases[4]["labelled"]
    assert read_declared_labels(root) == {"background": 0, "liver": 1, "cancer": 2}


def test_csv_layout_relative_paths_and_split_column(tmp_path):
    root = tmp_path / "csvdata"
    rows = ["image,label,split"]
    for i in range(5):
        _touch(root / "img" / f"{i}.nii.gz")
        _touch(root / "lab" / f"{i}.nii.gz")
        rows.append(f"img/{i}.nii.gz,lab/{i}.nii.gz,{'test' if i == 4 else ''}")
    (root / "cases.csv").write_text("\n".join(rows) + "\n")
    assert detect_layout(root / "cases.csv") == "csv" and detect_layout(root) == "csv"
    _, cases = find_cases(root / "cases.csv")
    assert cases[0]["image"] == str((root / "img" / "0.nii.gz").resolve())
    assert cases[3]["label"] == str((root / "lab" / "3.nii.gz").resolve())
    splits = make_splits(cases, val_fraction=0.25, seed=0)
    assert [e["image"] for e in splits["test"]] == [str((root / "img" / "4.nii.gz").resolve())]
    assert len(splits["validation"]) == 1 and len(splits["training"]) == 3
    (root / "bad.csv").write_text("path,mask\nx,y\n")
    with pytest.raises(ValueError, match="bad.csv"):
        find_cases(root / "bad.csv")


def test_splits_are_deterministic_per_seed(tmp_path):
    _, cases = find_cases(_kits(tmp_path / "kits", labelled=20))
    a = make_splits(cases, val_fraction=0.3, seed=3)
    assert a == make_splits(cases, val_fraction=0.3, seed=3)
    b = make_splits(cases, val_fraction=0.3, seed=4)
    assert _names(a["validation"]) != _names(b["validation"])
    assert len(a["validation"]) == 6 and len(a["training"]) == 14
    assert sorted(_names(a["validation"]) + _names(a["training"])) == _names(cases)


def test_folds_partition_the_cases(tmp_path):
    _, cases = find_cases(_kits(tmp_path / "kits", labelled=10))
    seen = []
    train_sets = []
    for fold in range(5):
        splits = make_splits(cases, folds=5, fold=fold, seed=0)
        assert len(splits["validation"]) == 2 and len(splits["training"]) == 8
        assert {e["fold"] for e in splits["validation"]} == {fold}
        seen += _names(splits["validation"])
        train_sets.append(set(_names(splits["training"])))
    assert sorted(seen) == _names(cases)  # every case validated exactly once
    for fold in range(5):
        assert train_sets[fold] == set(_names(cases)) - set(seen[2 * fold : 2 * fold + 2])
    with pytest.raises(ValueError, match="fold"):
        make_splits(cases, folds=5, fold=5)
    with pytest.raises(ValueError, match="folds"):
        make_splits(cases, folds=11)


def test_write_datalist_and_cli(tmp_path, capsys):
    root = _kits(tmp_path / "kits", labelled=10)
    out = tmp_path / "out" / "splits.json"
    main([str(root), "--out", str(out), "--folds", "5", "--fold", "1", "--seed", "2"])
    assert "kits19 layout: 8 training, 2 validation, 0 test" in capsys.readouterr().out
    data = json.loads(out.read_text())
    assert set(data) == {"training", "validation", "test", "meta"}
    assert data["meta"]["layout"] == "kits19" and data["meta"]["folds"] == 5 and data["meta"]["seed"] == 2
    assert load_split(out, "validation") == data["validation"]
    again = write_datalist(root, tmp_path / "again.json", folds=5, fold=1, seed=2)
    assert again["validation"] == data["validation"]
    main([str(root), "--out", str(tmp_path / "v.json"), "--val-fraction", "0.3"])
    assert json.loads((tmp_path / "v.json").read_text())["meta"]["counts"] == {
        "training": 7,
        "validation": 3,
        "test": 0,
    }
    with pytest.raises(SystemExit):
        main([str(root), "--out", str(out), "--folds", "2", "--val-fraction", "0.1"])
    with pytest.raises(ValueError, match="split"):
        load_split(out, "train")


def test_clear_errors_name_the_folder(tmp_path, capsys):
    empty = tmp_path / "empty_folder"
    empty.mkdir()
    with pytest.raises(ValueError, match="empty_folder.*unknown dataset layout"):
        find_cases(empty)
    junk = tmp_path / "junk_folder"
    _touch(junk / "notes.txt")
    _touch(junk / "scan.nii.gz")
    with pytest.raises(ValueError, match="junk_folder"):
        detect_layout(junk)
    with pytest.raises(FileNotFoundError, match="missing_folder"):
        detect_layout(tmp_path / "missing_folder")
    with pytest.raises(SystemExit):
        main([str(empty), "--out", str(tmp_path / "s.json")])
    assert "empty_folder" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()
    with pytest.raises(ValueError, match="no labelled case"):
        make_splits([{"image": "a", "label": None, "case": "a", "labelled": False}])
    with pytest.raises(ValueError, match="preset"):
        make_splits([], preset="brats")


def _nnunet_raw(folder: Path, cases=("kid_001", "kid_002", "kid_003", "kid_004")) -> Path:
    """An nnU-Net raw dataset folder: imagesTr/<case>_0000.nii.gz, labelsTr/<case>.nii.gz, dataset.json."""
    import json as _json

    import nibabel as _nib
    import numpy as _np

    for sub in ("imagesTr", "labelsTr"):
        (folder / sub).mkdir(parents=True)
    for case in cases:
        _nib.save(_nib.Nifti1Image(_np.zeros((4, 4, 4), _np.int16), _np.eye(4)), str(folder / "imagesTr" / f"{case}_0000.nii.gz"))
        _nib.save(_nib.Nifti1Image(_np.zeros((4, 4, 4), _np.uint8), _np.eye(4)), str(folder / "labelsTr" / f"{case}.nii.gz"))
    (folder / "dataset.json").write_text(_json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0, "kidney": 1, "tumor": 2}, "file_ending": ".nii.gz"}))
    return folder


def test_nnunet_splits_final_is_read_as_the_split(tmp_path):
    """An nnU-Net raw dataset folder with splits_final.json: fold 0's train/val cases become training/validation."""
    import json as _json

    from pipelines.datalist import build_datalist

    _nnunet_raw(tmp_path)
    folds = [{"train": ["kid_001", "kid_003", "kid_004"], "val": ["kid_002"]}, {"train": ["kid_002"], "val": ["kid_001"]}]
    (tmp_path / "splits_final.json").write_text(_json.dumps(folds))
    result = build_datalist(tmp_path, seed=0, preset="kits19")
    assert [e["case"] for e in result["training"]] == ["kid_001", "kid_003", "kid_004"]
    assert [e["case"] for e in result["validation"]] == ["kid_002"] and result["test"] == []
    assert result["validation"][0]["label"].endswith("labelsTr/kid_002.nii.gz")
    assert [e["case"] for e in build_datalist(tmp_path, fold=1)["training"]] == ["kid_002"]
    (tmp_path / "splits_final.json").write_text(_json.dumps([{"train": ["kid_009"], "val": []}]))
    with pytest.raises(ValueError, match="kid_009"):
        build_datalist(tmp_path)


def test_splits_file_that_is_nnunet_splits_final_json_is_resolved_as_a_split(tmp_path):
    """Was: --splits_file <nnUNet_preprocessed/...>/splits_final.json was passed on as a splits JSON (a list, read
    later as a dict). Now resolve_splits reads its --fold's case ids against --dataset_dir (nnU-Net keeps the raw
    data elsewhere) and writes <output_dir>/splits.json; the user's file is left as it was."""
    from pipelines.engine import BundleInputError, load_split, resolve_splits

    raw = _nnunet_raw(tmp_path / "nnUNet_raw" / "Dataset001_KiTS")
    pre = tmp_path / "nnUNet_preprocessed" / "Dataset001_KiTS"
    pre.mkdir(parents=True)
    final = pre / "splits_final.json"
    final.write_text(json.dumps([{"train": ["kid_001", "kid_003"], "val": ["kid_002"]}, {"train": ["kid_002", "kid_004"], "val": ["kid_003"]}]))
    given = final.read_bytes()
    run = tmp_path / "run"
    out = resolve_splits(raw, run, splits_file=str(final), fold="1")  # the CLI passes --fold 1 as fire parses it
    assert out == str(run / "splits.json") and final.read_bytes() == given
    assert [Path(e["image"]).name for e in load_split(out, "training")] == ["kid_002_0000.nii.gz", "kid_004_0000.nii.gz"]
    assert load_split(out, "validation") == [{"image": str(raw / "imagesTr" / "kid_003_0000.nii.gz"), "label": str(raw / "labelsTr" / "kid_003.nii.gz")}]
    meta = json.loads(Path(out).read_text())["meta"]
    assert meta["nnunet_splits"] == str(final) and meta["fold"] == 1
    assert resolve_splits(raw, run, splits_file=str(final), fold=1) == out  # written once: the same split is kept
    assert [Path(e["image"]).name for e in load_split(resolve_splits(raw, tmp_path / "run0", splits_file=str(final)), "training")] == [
        "kid_001_0000.nii.gz", "kid_003_0000.nii.gz"]  # fmt: skip
    with pytest.raises(BundleInputError, match=r"splits_final.json has 2 folds; fold 2 does not exist") as err:
        resolve_splits(raw, tmp_path / "run2", splits_file=str(final), fold=2)
    assert "\n" not in str(err.value)
    with pytest.raises(BundleInputError, match=r"--fold 'x' is not a whole number"):
        resolve_splits(raw, tmp_path / "run2", splits_file=str(final), fold="x")
    with pytest.raises(BundleInputError, match=r"lists case ids: pass --dataset_dir"):  # the JSON's folder holds no data
        resolve_splits(None, tmp_path / "run2", splits_file=str(final))
    with pytest.raises(BundleInputError, match=r"pass it as --splits_file"):
        resolve_splits(final, tmp_path / "run2")
    other = _nnunet_raw(tmp_path / "other", cases=("kid_001", "kid_002"))
    with pytest.raises(BundleInputError, match=r"names cases the dataset does not hold: \['kid_003'\]"):
        resolve_splits(other, tmp_path / "run2", splits_file=str(final))
    assert final.read_bytes() == given
    final.unlink()
    with pytest.raises(BundleInputError, match=r"--fold 1 selects a fold of nnU-Net's splits_final.json, and .* has none"):
        resolve_splits(raw, tmp_path / "run2", fold=1)  # a dataset without one: --fold is never ignored silently
    assert not (tmp_path / "run2" / "splits.json").exists()
    assert Path(resolve_splits(raw, tmp_path / "run2")).is_file()  # fold 0 (the default): the seeded split
