"""Find the cases of a CT dataset in any common layout and write deterministic train/val/test splits.

Layouts: KiTS19 (``case_XXXXX/imaging.nii.gz`` + ``segmentation.nii.gz``), LiTS (``volume-N.nii`` +
``segmentation-N.nii``, ``test-volume-N.nii`` unlabelled, any sub-folders), nnU-Net v2 (``imagesTr/<case>_0000.nii.gz``
+ ``labelsTr/<case>.nii.gz`` + ``dataset.json``), MSD (``dataset.json`` listing ``training``/``test``) and a CSV file
with ``image,label`` columns (optional ``split`` column; relative paths are relative to the CSV).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipelines.engine.atomic import atomic_write_text

__all__ = [
    "LAYOUTS",
    "PRESETS",
    "SPLITS",
    "UNLABELLED",
    "detect_layout",
    "read_declared_labels",
    "find_cases",
    "make_splits",
    "SPLIT_ALIASES",
    "split_name",
    "CREATED_BY",
    "build_datalist",
    "NNUNET_SPLITS",
    "nnunet_splits",
    "datalist_text",
    "is_own_datalist",
    "save_datalist",
    "write_datalist",
    "load_split",
    "main",
]

logger = logging.getLogger(__name__)

LAYOUTS: tuple[str, ...] = ("kits19", "lits", "nnunet", "msd", "csv")
SPLITS: tuple[str, ...] = ("training", "validation", "test")
#: Extra section, written only when non-empty: unlabelled cases kept out of a preset's labelled test set.
UNLABELLED = "unlabelled"
#: Paper splits (HLFD, ISBI 2024, Sec. 3): KiTS 210 cases -> 168 train : 42 test; LiTS 201 -> 131 labelled : 70 test.
PRESETS: dict[str, dict[str, int]] = {"kits19": {"train": 168, "test": 42}, "lits": {"train": 131, "test": 70}}
#: ``meta.created_by`` of every file this module writes: the only files ``--out`` may replace
CREATED_BY = "pipelines.datalist"
#: ``meta.content_sha256``: SHA-256 of the file's text as written, without this field (a hand edit changes it)
_CONTENT_KEY = "content_sha256"
#: the values a CSV ``split`` column may hold (any case), and the split each one means
SPLIT_ALIASES: dict[str, str] = {
    "train": "training", "training": "training", "tr": "training",
    "val": "validation", "valid": "validation", "validation": "validation",
    "test": "test", "testing": "test", "ts": "test", "holdout": "test", "held-out": "test",
}  # fmt: skip

_NII = r"\.nii(?:\.gz)?$"
_KITS_CASE = re.compile(r"^case_(\d+)$")
_LITS_VOLUME = re.compile(r"^volume-(\d+)" + _NII)
_LITS_TEST = re.compile(r"^test-volume-(\d+)" + _NII)
_NNUNET_IMAGE = re.compile(r"^(.+)_0000" + _NII)


def _nii_in(folder: Path, stem: str) -> Path | None:
    found = [folder / f"{stem}{suffix}" for suffix in (".nii.gz", ".nii") if (folder / f"{stem}{suffix}").exists()]
    if len(found) > 1:  # which one is the case? never pick one silently
        raise ValueError(f"{folder} holds both {found[0].name} and {found[1].name}; keep one (remove or rename the other)")
    return found[0] if found else None


def detect_layout(source: str | Path) -> str:
    """Name the layout of ``source`` (a folder, or a CSV file).

    Returns:
        One of :data:`LAYOUTS`.

    Raises:
        FileNotFoundError: ``source`` does not exist.
        ValueError: no known layout found (the message lists what was looked for).
    """
    source = Path(source)
    if not source.exists():
        raise FileNotFoundError(f"{source} does not exist")
    if source.is_file():
        if source.suffix.lower() == ".csv":
            return "csv"
        raise ValueError(f"{source} is a file but not a .csv; give a dataset folder or a CSV with image,label columns")
    if (source / "imagesTr").is_dir():
        dataset_json = source / "dataset.json"
        if dataset_json.exists() and isinstance(json.loads(dataset_json.read_text()).get("training"), list):
            return "msd"
        return "nnunet"
    if any(_KITS_CASE.match(p.name) and p.is_dir() for p in source.iterdir()):
        return "kits19"
    if any(_LITS_VOLUME.match(p.name) or _LITS_TEST.match(p.name) for p in source.rglob("*volume-*")):
        return "lits"
    csvs = sorted(source.glob("*.csv"))
    if len(csvs) == 1:
        return "csv"
    raise ValueError(
        f"{source}: unknown dataset layout; expected KiTS19 case_XXXXX/imaging.nii.gz folders, LiTS volume-N.nii files, "
        "imagesTr/labelsTr with dataset.json (nnU-Net/MSD), or a CSV with image,label columns"
    )


def read_declared_labels(source: str | Path) -> dict[str, int] | None:
    """Label values declared in ``dataset.json`` beside the data (nnU-Net v2 ``{name: value}`` or MSD ``{value: name}``).

    Returns:
        ``{name: value}``, or None when there is no dataset.json with labels.
    """
    source = Path(source)
    path = source / "dataset.json" if source.is_dir() else source.parent / "dataset.json"
    if not path.exists():
        return None
    labels = json.loads(path.read_text()).get("labels")
    if not isinstance(labels, dict) or not labels:
        return None
    first_key = next(iter(labels))
    if str(first_key).lstrip("-").isdigit():  # MSD: {"0": "background", ...}
        return {str(name): int(value) for value, name in labels.items()}
    out = {}
    for name, value in labels.items():  # nnU-Net v2 regions ([1, 2]) count by their values
        for v in value if isinstance(value, list) else [value]:
            out[f"{name}" if not isinstance(value, list) else f"{name}:{v}"] = int(v)
    return out


def _listed_in_dataset_json(source: Path) -> set[str] | None:
    """Relative image paths a dataset.json declares as labelled training cases (authoritative when present)."""
    path = source / "dataset.json"
    if not path.exists():
        return None
    training = json.loads(path.read_text()).get("training")
    if not isinstance(training, list):
        return None
    return {Path(str(t["image"])).as_posix().removeprefix("./") for t in training if isinstance(t, dict) and "image" in t}


def _case(image: Path, label: Path | None, case: str, labelled: bool) -> dict[str, Any]:
    return {"image": str(image.resolve()), "label": str(label.resolve()) if label else None, "case": case, "labelled": labelled}


def find_cases(source: str | Path) -> tuple[str, list[dict[str, Any]]]:
    """List every case of a dataset, whatever its layout.

    Each case is ``{"image": abs path, "label": abs path or None, "case": id, "labelled": bool}``. ``labelled`` says a
    label is EXPECTED (training case); the label file may still be missing, which :mod:`pipelines.check_dataset`
    reports. A KiTS19 case folder without ``segmentation.nii.gz`` is an unlabelled test case unless ``dataset.json``
    lists it for training.

    Args:
        source: dataset folder or CSV file.

    Returns:
        ``(layout, cases)`` with cases sorted by id (numeric ids numerically).

    Raises:
        FileNotFoundError, ValueError: see :func:`detect_layout`; also a CSV without an ``image`` column.
    """
    source = Path(source)
    layout = detect_layout(source)
    cases: list[dict[str, Any]] = []
    if layout == "kits19":
        listed = _listed_in_dataset_json(source)
        for folder in sorted(p for p in source.iterdir() if p.is_dir() and _KITS_CASE.match(p.name)):
            image = _nii_in(folder, "imaging") or folder / "imaging.nii.gz"
            label = _nii_in(folder, "segmentation")
            expected = label is not None or (listed is not None and image.relative_to(source).as_posix() in listed)
            cases.append(_case(image, label or folder / "segmentation.nii.gz", folder.name, expected))
    elif layout == "lits":
        for path in sorted(source.rglob("*volume-*")):
            if path.name.startswith("."):
                continue
            match = _LITS_VOLUME.match(path.name)
            if match:
                suffix = path.name[len(f"volume-{match.group(1)}") :]
                label = path.with_name(f"segmentation-{match.group(1)}{suffix}")
                cases.append(_case(path, label, f"volume-{match.group(1)}", True))
            elif _LITS_TEST.match(path.name):
                cases.append(_case(path, None, path.name.split(".")[0], False))
    elif layout == "msd":
        meta = json.loads((source / "dataset.json").read_text())
        for item in meta.get("training", []):
            image = source / str(item["image"]).removeprefix("./")
            label = source / str(item["label"]).removeprefix("./")
            cases.append(_case(image, label, image.name.split(".")[0], True))
        for item in meta.get("test", []):
            image = source / str(item["image"] if isinstance(item, dict) else item).removeprefix("./")
            cases.append(_case(image, None, image.name.split(".")[0], False))
    elif layout == "nnunet":
        for folder, labelled in (("imagesTr", True), ("imagesTs", False)):
            for image in sorted((source / folder).glob("*_0000.nii*")) if (source / folder).is_dir() else []:
                match = _NNUNET_IMAGE.match(image.name)
                if not match or image.name.startswith("."):
                    continue
                suffix = image.name[len(match.group(1)) + len("_0000") :]
                label = source / "labelsTr" / f"{match.group(1)}{suffix}" if labelled else None
                cases.append(_case(image, label, match.group(1), labelled))
    else:
        csv_path = source if source.is_file() else sorted(source.glob("*.csv"))[0]
        with csv_path.open(newline="") as handle:
            reader = csv.DictReader(handle)
            if reader.fieldnames:  # "image, label": the header's spaces are not part of the names
                reader.fieldnames = [(f or "").strip().lower() for f in reader.fieldnames]
            if not reader.fieldnames or "image" not in reader.fieldnames:
                raise ValueError(f"{csv_path}: CSV needs an 'image' column (and 'label'), found {reader.fieldnames}")
            for row_number, row in enumerate(reader, start=2):
                image = Path(row["image"].strip())
                image = image if image.is_absolute() else csv_path.parent / image
                raw_label = (row.get("label") or "").strip()
                label = None
                if raw_label:
                    label = Path(raw_label) if Path(raw_label).is_absolute() else csv_path.parent / raw_label
                entry = _case(image, label, row.get("case") or f"row{row_number}", label is not None)
                if (row.get("split") or "").strip():
                    entry["split"] = split_name(row["split"], f"{csv_path} row {row_number}")
                cases.append(entry)

    if layout != "csv":
        cases.sort(key=_case_order)
    return layout, cases


def split_name(value: str, where: str = "split") -> str:
    """The split a ``split`` value names (:data:`SPLIT_ALIASES`, case and surrounding spaces ignored).

    Args:
        value: e.g. ``"Test"``, ``"testing"``, ``" val "``.
        where: what to name in the error (the CSV file and row).

    Returns:
        ``"training"``, ``"validation"`` or ``"test"``.

    Raises:
        ValueError: any other value (a held-out case must never fall into the training pool), naming it and the
            valid values.
    """
    name = SPLIT_ALIASES.get(str(value).strip().lower())
    if name is None:
        raise ValueError(
            f"{where}: unknown split {value!r}; valid (any case): {', '.join(sorted(SPLIT_ALIASES))}, or empty to let "
            "datalist choose."
        )
    return name


def _case_order(case: dict[str, Any]) -> tuple[int, str]:
    """Sort key: the last number in the case id (numerically), then the id."""
    digits = re.findall(r"\d+", case["case"])
    return (int(digits[-1]) if digits else -1, case["case"])


def _entry(case: dict[str, Any], with_label: bool = True) -> dict[str, Any]:
    entry = {"image": case["image"], "case": case["case"]}
    if with_label and case.get("label"):
        entry["label"] = case["label"]
    if "fold" in case:
        entry["fold"] = case["fold"]
    return entry


def make_splits(
    cases: Sequence[dict[str, Any]],
    *,
    val_fraction: float | None = 0.2,
    folds: int | None = None,
    fold: int = 0,
    preset: str | None = None,
    seed: int = 0,
) -> dict[str, list[dict[str, Any]]]:
    """Deterministic train/val/test lists.

    Unlabelled cases go to ``test``. With a ``preset`` a test set is held out from the labelled cases first:
    ``kits19`` 42 of 210 (the paper's 168:42), ``lits`` the unlabelled ``test-volume`` files when present (131:70)
    or else 70/201 of the labelled ones; with another number of cases the same proportion is used (logged). When a
    preset holds out labelled test cases, unlabelled ones (e.g. KiTS19 cases 210-299, whose labels were never
    released) go to a separate ``"unlabelled"`` list instead, so ``test`` stays evaluable. The
    remaining labelled cases are split into training/validation by ``val_fraction`` or into ``folds`` (every entry
    gets a ``fold``; ``validation`` is fold ``fold``). A CSV ``split`` column, when present, wins.

    Args:
        cases: from :func:`find_cases`.
        val_fraction: share of the labelled (non-test) cases used for validation, in [0, 1).
        folds: K-fold cross-validation instead of ``val_fraction`` (K >= 2).
        fold: which fold is ``validation``.
        preset: None, ``"kits19"`` or ``"lits"``.
        seed: shuffling seed.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` of ``{"image", "label", "case"[, "fold"]}``, plus
        ``"unlabelled"`` when a preset moved unlabelled cases out of ``test``.

    Raises:
        ValueError: unknown preset, both or bad ``val_fraction``/``folds``, ``fold`` out of range, more folds than
            cases, or no labelled case.
    """
    if preset is not None and preset not in PRESETS:
        raise ValueError(f"preset must be one of {sorted(PRESETS)} or None, got {preset!r}")
    if folds is not None:
        if int(folds) < 2:
            raise ValueError(f"folds must be >= 2, got {folds}")
        if not 0 <= int(fold) < int(folds):
            raise ValueError(f"fold must be within [0, {folds}), got {fold}")
    elif val_fraction is None or not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be within [0, 1), got {val_fraction}")
    if int(seed) < 0:
        raise ValueError(f"--seed must be >= 0, got {seed}")
    rng = np.random.default_rng(int(seed))
    fixed = {name: [] for name in SPLITS}
    pool = []
    for case in cases:
        split = case.get("split")
        if split is not None and str(split).strip():
            name = split_name(split, f"case {case.get('case')}")
            fixed[name].append(_entry(case, name != "test" or case["labelled"]))
        elif not case["labelled"]:
            fixed["test"].append(_entry(case, False))
        else:
            pool.append(case)
    if not pool and not fixed["training"]:
        raise ValueError("no labelled case found: nothing to train on")
    order = [pool[i] for i in rng.permutation(len(pool))]
    test: list[dict[str, Any]] = []
    if preset is not None:
        spec = PRESETS[preset]
        if preset == "lits" and fixed["test"]:
            n_test = 0
        elif len(pool) == spec["train"] + spec["test"]:
            n_test = spec["test"]
        else:
            n_test = int(round(len(pool) * spec["test"] / (spec["train"] + spec["test"])))
            logger.info("preset %s with %d labelled cases: holding out %d for test (paper proportion)", preset, len(pool), n_test)
        n_test = min(n_test, max(0, len(order) - 1))
        test, order = order[:n_test], order[n_test:]
    if folds is not None:
        if int(folds) > len(order):
            raise ValueError(f"folds={folds} but only {len(order)} labelled cases remain for cross-validation")
        for index, case in enumerate(order):
            case = dict(case, fold=index % int(folds))
            order[index] = case
        validation = [c for c in order if c["fold"] == fold]
        training = [c for c in order if c["fold"] != fold]
    else:
        n_val = int(round(len(order) * float(val_fraction)))
        if val_fraction > 0 and len(order) >= 2:
            n_val = min(max(1, n_val), len(order) - 1)
        validation, training = order[:n_val], order[n_val:]

    def by_case(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        return sorted(entries, key=_case_order)

    result = {
        "training": fixed["training"] + by_case([_entry(c) for c in training]),
        "validation": fixed["validation"] + by_case([_entry(c) for c in validation]),
        "test": fixed["test"] + by_case([_entry(c) for c in test]),
    }
    if test and fixed["test"]:  # never mix labelled and unlabelled cases in the preset's test set
        unlabelled = [e for e in fixed["test"] if "label" not in e]
        if unlabelled:
            result["test"] = [e for e in result["test"] if "label" in e]
            result[UNLABELLED] = unlabelled
            logger.info("preset %s: %d unlabelled cases listed apart under %r, not in test", preset, len(unlabelled), UNLABELLED)
    return result


#: nnU-Net's cross-validation split file: a list of folds ``[{"train": [case, ...], "val": [case, ...]}, ...]``
NNUNET_SPLITS = "splits_final.json"


def nnunet_splits(path: str | Path, cases: Sequence[dict[str, Any]], fold: int = 0) -> dict[str, list[dict[str, Any]]]:
    """Read nnU-Net's ``splits_final.json`` as a split: its fold's ``train`` cases -> training, ``val`` -> validation;
    unlabelled cases (``imagesTs``) -> test.

    Args:
        path: the ``splits_final.json`` (in the dataset folder, or given: :func:`build_datalist`).
        cases: :func:`find_cases` of the dataset (case ids: nnU-Net's, ``<case>`` of ``<case>_0000.nii.gz``).
        fold: the fold to use.

    Returns:
        ``{"training": [...], "validation": [...], "test": [...]}`` entries as :func:`make_splits` writes them.

    Raises:
        ValueError: not a list of ``{"train", "val"}`` folds, a fold out of range, or case ids absent from the
            dataset (naming them).
    """
    path = Path(path)
    try:
        folds = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: cannot read nnU-Net's split ({e})") from e
    if not isinstance(folds, list) or not all(isinstance(f, dict) and {"train", "val"} <= set(f) for f in folds):
        raise ValueError(f"{path} is not nnU-Net's splits_final.json (a list of {{'train': [...], 'val': [...]}} folds)")
    if not 0 <= int(fold) < len(folds):
        raise ValueError(f"{path} has {len(folds)} folds; fold {fold} does not exist")
    by_id = {c["case"]: c for c in cases}
    chosen = folds[int(fold)]
    missing = sorted(str(c) for c in [*chosen["train"], *chosen["val"]] if str(c) not in by_id)
    if missing:
        raise ValueError(f"{path} names cases the dataset does not hold: {missing[:5]} ({len(missing)} in all)")
    return {
        "training": [_entry(by_id[str(c)]) for c in chosen["train"]],
        "validation": [_entry(by_id[str(c)]) for c in chosen["val"]],
        "test": [_entry(c, with_label=False) for c in cases if not c.get("labelled")],
    }


def build_datalist(
    source: str | Path,
    *,
    val_fraction: float | None = 0.2,
    folds: int | None = None,
    fold: int = 0,
    preset: str | None = None,
    seed: int = 0,
    nnunet_splits_file: str | Path | None = None,
) -> dict[str, Any]:
    """Detect the layout of ``source`` and split it (:func:`make_splits`), without writing anything.

    nnU-Net's ``splits_final.json`` gives the split instead (:func:`nnunet_splits`, fold ``fold``): the one given as
    ``nnunet_splits_file`` (nnU-Net keeps it in ``nnUNet_preprocessed/<dataset>``, away from the raw data), else
    one in ``source`` itself (unless ``folds`` asks for a new K-fold split).

    Returns:
        ``training``, ``validation``, ``test`` [, ``unlabelled``] (absolute paths) and ``meta`` (``created_by`` =
        :data:`CREATED_BY`, layout, source, seed, split options, declared labels, counts; ``nnunet_splits``, the
        file read, when the split is nnU-Net's).

    Raises:
        see :func:`find_cases`, :func:`make_splits` and :func:`nnunet_splits`; ValueError for ``folds`` together with
        ``nnunet_splits_file``; OSError for an unreadable folder.
    """
    source = Path(source)
    layout, cases = find_cases(source)
    nnunet = Path(nnunet_splits_file) if nnunet_splits_file else None
    if nnunet is not None and folds is not None:
        raise ValueError(f"{nnunet} fixes the folds (nnU-Net's split); pass --fold to choose one, not --folds")
    if nnunet is None and folds is None and source.is_dir() and (source / NNUNET_SPLITS).is_file():
        nnunet = source / NNUNET_SPLITS
    if nnunet is not None:
        splits = nnunet_splits(nnunet, cases, fold=fold)
        logger.info("split from nnU-Net's %s (fold %d)", nnunet, fold)
    else:
        splits = make_splits(cases, val_fraction=val_fraction, folds=folds, fold=fold, preset=preset, seed=seed)
    result: dict[str, Any] = dict(splits)
    result["meta"] = {
        "created_by": CREATED_BY,
        "layout": layout,
        "source": str(source.resolve()),
        "preset": preset,
        "seed": int(seed),
        "val_fraction": None if folds is not None else val_fraction,
        "folds": folds,
        "fold": fold if folds is not None or nnunet is not None else None,
        "labels": read_declared_labels(source),
        "counts": {name: len(splits[name]) for name in (*SPLITS, UNLABELLED) if name in splits},
    }
    if nnunet is not None:
        result["meta"]["nnunet_splits"] = str(nnunet.resolve())
    return result


def _content_sha256(result: dict[str, Any]) -> str:
    """SHA-256 of ``result``'s JSON text without ``meta.content_sha256`` (what :func:`save_datalist` records)."""
    import hashlib

    meta = {k: v for k, v in (result.get("meta") or {}).items() if k != _CONTENT_KEY}
    return hashlib.sha256((json.dumps({**result, "meta": meta}, indent=2) + "\n").encode()).hexdigest()


def datalist_text(result: dict[str, Any]) -> str:
    """The exact JSON text :func:`save_datalist` writes for ``result`` (deterministic: equal splits, equal bytes),
    with ``meta.content_sha256`` recording that content (a later hand edit is detected by :func:`is_own_datalist`)."""
    meta = {k: v for k, v in (result.get("meta") or {}).items() if k != _CONTENT_KEY}
    meta[_CONTENT_KEY] = _content_sha256({**result, "meta": meta})
    return json.dumps({**result, "meta": meta}, indent=2) + "\n"


def is_own_datalist(path: str | Path) -> bool:
    """Whether ``path`` is a JSON file this module wrote and nobody changed since.

    Its ``meta.created_by`` is :data:`CREATED_BY` and its content still hashes to the ``meta.content_sha256``
    recorded at write time: a split file a user edited by hand (a case moved to test) is not the tool's any more.

    Returns:
        False for a missing, unreadable, non-JSON, foreign or edited file.
    """
    try:
        with open(path, "rb") as handle:
            head = handle.read(1)
            if head not in (b"{", b" ", b"\n", b"\t", b"\r"):
                return False  # not JSON (e.g. a NIfTI volume): never read further
            data = json.loads(head + handle.read())
    except (OSError, ValueError):
        return False
    meta = data.get("meta") if isinstance(data, dict) else None
    if not isinstance(meta, dict) or meta.get("created_by") != CREATED_BY:
        return False
    return meta.get(_CONTENT_KEY) == _content_sha256(data)


def save_datalist(result: dict[str, Any], out: str | Path) -> Path:
    """Write a :func:`build_datalist` result to ``out`` atomically, replacing only this module's own earlier output.

    Args:
        result: the splits dict.
        out: destination JSON file.

    Returns:
        ``out``.

    Raises:
        ValueError: ``out`` is a folder, lies below a file, or is an existing file this module did not write (a
            dataset.json, a volume, someone's splits): it is never replaced.
        OSError: the folder cannot be created or written (no temporary file is left behind).
    """
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the JSON file to write, e.g. {out / 'splits.json'}")
    for parent in out.parents:
        if parent.exists() and not parent.is_dir():
            raise ValueError(f"--out {out}: {parent} is a file, not a folder")
    if out.exists() and not is_own_datalist(out):
        raise ValueError(
            f"--out {out} exists and was not written by pipelines.datalist, or was edited since (its content no longer "
            f"matches meta.{_CONTENT_KEY}); refusing to replace it: choose another --out"
        )
    atomic_write_text(out, datalist_text(result))
    return out


def write_datalist(
    source: str | Path,
    out: str | Path,
    *,
    val_fraction: float | None = 0.2,
    folds: int | None = None,
    fold: int = 0,
    preset: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Detect the layout of ``source``, split it (:func:`make_splits`) and write ``out`` (JSON, atomically).

    The file holds ``training``, ``validation``, ``test`` [, ``unlabelled``] (absolute paths) and ``meta`` (layout,
    source, seed, split options, declared labels, counts, ``created_by``). Nothing in ``source`` is modified, and
    ``out`` replaces only an earlier output of this module (:func:`save_datalist`).

    Returns:
        The written dict.

    Raises:
        see :func:`find_cases`, :func:`make_splits` and :func:`save_datalist`.
    """
    result = build_datalist(source, val_fraction=val_fraction, folds=folds, fold=fold, preset=preset, seed=seed)
    save_datalist(result, out)
    return result


def load_split(splits_file: str | Path, split: str = "training") -> list[dict[str, Any]]:
    """Read one split of a splits file, as a datalist for ``build_dataset``.

    Raises:
        ValueError: unknown split name, or a file without it.
    """
    if split not in (*SPLITS, UNLABELLED):
        raise ValueError(f"split must be one of {(*SPLITS, UNLABELLED)}, got {split!r}")
    data = json.loads(Path(splits_file).read_text())
    if split not in data:
        raise ValueError(f"{splits_file} has no {split!r} list (found {sorted(data)})")
    return list(data[split])


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m pipelines.datalist DIR --out splits.json [--val-fraction F | --folds K] [--preset P] --seed K``."""
    parser = argparse.ArgumentParser(prog="ctdistill-datalist", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="dataset folder (KiTS19, LiTS, nnU-Net, MSD) or CSV file")
    parser.add_argument("--out", required=True, help="splits JSON to write")
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--val-fraction", type=float, default=None, help="validation share of the labelled cases (0.2)")
    group.add_argument("--folds", type=int, default=None, help="K-fold cross-validation instead")
    parser.add_argument("--fold", type=int, default=0, help="with --folds: the fold used as validation")
    parser.add_argument("--preset", choices=sorted(PRESETS), default=None, help="paper splits: kits19 168/42, lits 131/70")
    parser.add_argument("--seed", type=int, default=0, help="shuffling seed")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    val_fraction = 0.2 if args.val_fraction is None and args.folds is None else args.val_fraction
    try:
        result = write_datalist(
            args.source, args.out, val_fraction=val_fraction, folds=args.folds, fold=args.fold, preset=args.preset, seed=args.seed
        )
    except (ValueError, FileNotFoundError) as err:
        parser.error(str(err))
    except OSError as err:  # an unreadable case folder, a read-only --out folder, a full disk
        where = err.filename or args.out
        parser.error(f"cannot access {where}: {err.strerror or err}")
    counts = result["meta"]["counts"]
    print(f"{result['meta']['layout']} layout: {counts['training']} training, {counts['validation']} validation, {counts['test']} test -> {args.out}")


if __name__ == "__main__":
    main()
