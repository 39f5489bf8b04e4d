"""Dataset splits: which split JSON a bundle reads (written once into the output folder when the dataset has
none), the entries of a split section, and the loader batch size in volumes.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Sequence
from pathlib import Path

from pipelines.engine.atomic import same_bytes
from pipelines.engine.errors import BundleInputError
from pipelines.engine.output import TrainingOutput

__all__ = [
    "SPLIT_NAMES",
    "TASK_PRESETS",
    "resolve_splits",
    "refuse_dataset_file",
    "entry_path",
    "split_entries",
    "load_split",
    "check_eval_split",
    "volumes_per_batch",
]

logger = logging.getLogger(__name__)

SPLIT_NAMES = ("training", "validation", "test")

#: task -> datalist preset holding out the paper's test share (KiTS19 168:42, LiTS 131:70)
TASK_PRESETS = {"kits": "kits19", "lits": "lits"}


def resolve_splits(
    dataset_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    seed: int = 0,
    splits_file: str | None = None,
    task: str | None = "kits",
    guard: TrainingOutput | None = None,
    fold: int | str = 0,
) -> str:
    """Return the split JSON to use, writing one into ``output_dir`` when the dataset has none.

    Order: an explicit ``splits_file``; ``dataset_dir`` itself when it is a ``.json`` file;
    ``<dataset_dir>/splits.json``; else ``pipelines.datalist`` detects the layout and writes
    ``<output_dir>/splits.json`` (deterministic for a seed; the task's preset holds out the paper's test share,
    so training, evaluation and the demo agree on the held-out volumes). Nothing is written into ``dataset_dir``.
    The split is written once: an identical existing file is kept as it is.

    nnU-Net's ``splits_final.json`` (a list of ``{"train": [case ids], "val": [case ids]}`` folds) is read as a
    split of fold ``fold``: given as ``splits_file`` (its cases found in ``dataset_dir``, else in the JSON's own
    folder) or lying in ``dataset_dir``; either way ``pipelines.datalist`` writes ``<output_dir>/splits.json``.

    Args:
        dataset_dir: the user's data folder (KiTS19, LiTS, nnU-Net/MSD layouts, or a split JSON).
        output_dir: the bundle's output folder.
        seed: split seed.
        splits_file: an explicit split JSON, or None/"".
        task: ``kits`` or ``lits`` (selects the datalist preset), None for no test hold-out.
        guard: a training run's :func:`guard_training_output` result (a config reference, so the output folder is
            claimed before the split is written). When it resumes, the split must be the one the checkpoint was
            trained on (same SHA-256), and ``<output_dir>/splits.json`` is never rewritten.
        fold: the fold of an nnU-Net ``splits_final.json`` (``--fold``): its ``train`` cases train, its ``val`` cases
            validate.

    Returns:
        the path of the split JSON.

    Raises:
        BundleInputError: no dataset_dir, a missing or unreadable folder, a folder without recognisable data, a
            ``<output_dir>/splits.json`` not written by ``pipelines.datalist``, an nnU-Net split whose fold or case
            ids the dataset does not have, or (resuming) a split that differs from the checkpoint's.
    """
    try:
        fold = int(fold)
    except (TypeError, ValueError):
        raise BundleInputError(f"--fold {fold!r} is not a whole number; give the nnU-Net fold to train (0, 1, ...).") from None
    path = _resolve_split_path(dataset_dir, output_dir, seed, splits_file, task, guard, fold)
    if guard is not None and guard.resume and guard.splits_sha256:
        from pipelines.engine.tracking import file_sha256

        if file_sha256(path) != guard.splits_sha256:
            raise BundleInputError(
                f"the split {path} differs from the one {guard.last_path} was trained on (SHA-256 mismatch): resuming "
                "would mix training and held-out cases. Resume with --splits_file "
                f"{Path(guard.last_path).parent / 'splits.json'} (the split saved with the checkpoints), or start anew "
                "with --overwrite true."
            )
    return path


def _is_nnunet_splits(path: str | os.PathLike) -> bool:
    """Whether ``path`` holds nnU-Net's ``splits_final.json`` (a JSON list of folds, not a splits object)."""
    try:
        with open(path, "rb") as handle:
            head = handle.read(64).lstrip()
            return head.startswith(b"[") and isinstance(json.loads(head + handle.read()), list)
    except (OSError, ValueError):
        return False  # unreadable or not JSON: reported where the split is read


def _resolve_split_path(
    dataset_dir: str | os.PathLike | None,
    output_dir: str | os.PathLike,
    seed: int,
    splits_file: str | None,
    task: str | None,
    guard: TrainingOutput | None,
    fold: int,
) -> str:
    if splits_file:
        if not Path(splits_file).is_file():
            raise BundleInputError(f"splits_file {splits_file} does not exist.")
        if not _is_nnunet_splits(splits_file):
            return str(splits_file)
        source = Path(dataset_dir) if dataset_dir else Path(splits_file).parent
        return _write_split(source, output_dir, seed, task, guard, fold, nnunet=Path(splits_file), given=bool(dataset_dir))
    if not dataset_dir:
        raise BundleInputError("no dataset given: pass --dataset_dir <folder with the CT volumes> (or --splits_file <json>).")
    d = Path(dataset_dir)
    if d.is_file() and d.suffix == ".json":
        if _is_nnunet_splits(d):
            raise BundleInputError(
                f"dataset_dir {d} is nnU-Net's splits_final.json, which lists case ids only: pass it as --splits_file "
                "and the nnU-Net raw dataset folder (imagesTr, labelsTr) as --dataset_dir."
            )
        return str(d)
    refuse_dataset_file(d)
    csv_list = d.is_file()  # a datalist CSV (image,label[,split]): the only other file refuse_dataset_file lets by
    if not d.is_dir() and not csv_list:
        raise BundleInputError(f"dataset_dir {d} does not exist; pass the folder holding the CT volumes and labels.")
    if not csv_list and (d / "splits.json").is_file():
        return str(d / "splits.json")
    return _write_split(d, output_dir, seed, task, guard, fold)


def _write_split(
    d: Path,
    output_dir: str | os.PathLike,
    seed: int,
    task: str | None,
    guard: TrainingOutput | None,
    fold: int,
    nnunet: Path | None = None,
    given: bool = True,
) -> str:
    """``pipelines.datalist``'s split of the dataset ``d`` (of nnU-Net's ``nnunet`` when given), written once to
    ``<output_dir>/splits.json``; ``given``: ``d`` is the user's ``--dataset_dir`` (else the folder of ``nnunet``)."""
    from pipelines import datalist

    out = Path(output_dir) / "splits.json"
    try:
        result = datalist.build_datalist(d, seed=int(seed), preset=TASK_PRESETS.get(task or ""), fold=fold, nnunet_splits_file=nnunet)
    except OSError as e:
        raise BundleInputError(f"dataset_dir {d}: cannot read {e.filename or d} ({e.strerror or e}).") from e
    except ValueError as e:
        if nnunet is not None and str(nnunet) in str(e):  # the nnU-Net split itself: its format, fold or case ids
            raise BundleInputError(f"--splits_file {e} (--dataset_dir {d}, --fold {fold}).") from e
        if nnunet is not None and not given:
            raise BundleInputError(
                f"--splits_file {nnunet} is nnU-Net's splits_final.json, which lists case ids: pass --dataset_dir "
                f"<the nnU-Net raw dataset folder (imagesTr, labelsTr)> ({d}: {e})."
            ) from e
        raise BundleInputError(f"dataset_dir {d} holds no dataset this product reads: {e}") from e
    if fold and "nnunet_splits" not in result["meta"]:  # never ignored silently
        raise BundleInputError(
            f"--fold {fold} selects a fold of nnU-Net's splits_final.json, and {d} has none: pass it as --splits_file "
            "(with this --dataset_dir), or leave --fold at 0."
        )
    text = datalist.datalist_text(result)
    if same_bytes(out, text.encode()):
        logger.info("split %s unchanged (kept as written before)", out)
        return str(out)
    if guard is not None and guard.resume and out.exists():
        raise BundleInputError(
            f"{out}, the split this run started with, differs from the split computed now from {d} (the dataset "
            f"changed?): resume with --splits_file {out} to keep it, or start anew with --overwrite true."
        )
    try:
        datalist.save_datalist(result, out)
    except (ValueError, OSError) as e:
        raise BundleInputError(f"cannot write the split {out}: {e}") from e
    return str(out)


def refuse_dataset_file(dataset_dir: str | os.PathLike, knob: str = "dataset_dir") -> None:
    """THE check that a ``dataset_dir`` which is a file is one the splits can come from: a splits ``.json`` or a
    datalist ``.csv`` (``image,label[,split]``); a folder, or a path that does not exist, passes (checked later).

    Args:
        dataset_dir: the knob's value.
        knob: its name in the message (``--dataset_dir`` on the command line).

    Raises:
        BundleInputError: any other file (a CT volume, say), naming it.
    """
    d = Path(dataset_dir)
    if d.is_file() and d.suffix != ".json" and d.suffix.lower() != ".csv":
        raise BundleInputError(
            f"{knob} {d} is a file, not a dataset: give the folder holding the CT volumes, a splits .json or a "
            "datalist .csv."
        )


def entry_path(value: str | os.PathLike, splits_file: str | os.PathLike) -> str:
    """THE resolution of a path listed in a splits JSON: absolute as it is, relative to the JSON's own folder.

    Never relative to the working directory (a split next to its data would otherwise read "does not exist" from
    one folder and silently another dataset's ``case_*`` files from another).

    Args:
        value: an ``image``/``label`` entry.
        splits_file: the JSON that lists it.

    Returns:
        the absolute path as a string.
    """
    p = Path(str(value).removeprefix("./")).expanduser()
    return str(p if p.is_absolute() else Path(splits_file).resolve().parent / p)


def split_entries(splits_file: str | os.PathLike, section: str) -> list[dict]:
    """The entries of one section of a splits JSON, ``image``/``label`` resolved by :func:`entry_path`.

    Raises:
        BundleInputError: the file cannot be read as a splits JSON.
    """
    try:
        data = json.loads(Path(splits_file).read_text())
    except (OSError, ValueError) as e:
        raise BundleInputError(f"cannot read the splits file {splits_file} ({e}).") from e
    if not isinstance(data, dict):
        raise BundleInputError(f"{splits_file} is not a splits JSON (expected {{'training': [...], ...}}).")
    out = []
    for entry in data.get(section) or []:
        item = dict(entry) if isinstance(entry, dict) else {"image": entry}
        for key in ("image", "label"):
            if item.get(key):
                item[key] = entry_path(item[key], splits_file)
        out.append(item)
    return out


def load_split(splits_file: str | os.PathLike, section: str | Sequence[str], labelled: bool = True) -> list[dict]:
    """Entries of one split section (the first usable of ``section`` when a list is given).

    Args:
        splits_file: splits JSON written by ``pipelines.datalist`` (or by the user).
        section: a section name, or several tried in order (e.g. ``["test", "validation"]``).
        labelled: keep only entries with a ``label`` (training, validation and evaluation need one). A section
            with no labelled entry is skipped: the LiTS preset's ``test`` section holds the 70 unlabelled test
            volumes, so evaluation falls through to ``validation``.

    Returns:
        ``[{"image": ..., "label": ...}, ...]``.

    Raises:
        BundleInputError: every listed section is missing or empty (or has no labelled entry).
    """
    data = json.loads(Path(splits_file).read_text())
    for s in [section] if isinstance(section, str) else list(section):
        entries = [{k: v for k, v in e.items() if k in ("image", "label")} for e in split_entries(splits_file, s)]
        kept = [e for e in entries if e.get("label")] if labelled else entries
        if len(kept) < len(entries):
            logger.warning("%s: %d of %d entries in %r have no label and are left out", splits_file, len(entries) - len(kept), len(entries), s)
        if kept:
            return kept
    what = "labelled entries" if labelled else "entries"
    raise BundleInputError(f"{splits_file} has no {what} in {section!r}; sections present: {[k for k in data if k != 'meta']}.")


def _evaluated(splits_file: str | os.PathLike, sections: Sequence[str]) -> tuple[str, list[dict]]:
    """The section :func:`load_split` evaluates (the first with labelled entries) and its entries."""
    for s in sections:
        entries = [e for e in split_entries(splits_file, s) if e.get("label")]
        if entries:
            return s, entries
    return "", []


def check_eval_split(splits_file: str, checkpoint: str | os.PathLike, sections: str | Sequence[str]) -> str:
    """Evaluation never scores a case the checkpoint was trained or selected on.

    The split a checkpoint was trained on lies beside it (``splits.json``, copied by the trainer). When the split
    evaluated now is another file (the dataset folder gained cases, so the split was recomputed; another
    ``--splits_file``), every evaluated case that the checkpoint's split puts in another section (``training``,
    or ``validation`` when ``test`` is evaluated) is a leak: refused, naming the cases and the recorded split.
    A changed split without such a case is evaluated, with a warning.

    Args:
        splits_file: the split evaluation resolved (:func:`resolve_splits`).
        checkpoint: the evaluated checkpoint.
        sections: the sections evaluated (the first labelled one is used).

    Returns:
        ``splits_file`` (so the bundle config chains it).

    Raises:
        BundleInputError: evaluated cases that moved from another section of the checkpoint's split.
    """
    from pipelines.engine.checkpoint import sidecar
    from pipelines.engine.metrics import case_id
    from pipelines.engine.tracking import file_sha256

    recorded = sidecar(checkpoint, "splits.json")
    if not Path(recorded).is_file() or Path(recorded).resolve() == Path(splits_file).resolve():
        return splits_file
    if file_sha256(recorded) == file_sha256(splits_file):
        return splits_file
    section, entries = _evaluated(splits_file, [sections] if isinstance(sections, str) else list(sections))
    before = {
        os.path.realpath(e["image"]): (name, str(e.get("case") or case_id(e["image"])))
        for name in SPLIT_NAMES
        for e in split_entries(recorded, name)
    }
    moved = [(before[k][1], before[k][0]) for e in entries if (k := os.path.realpath(e["image"])) in before and before[k][0] != section]
    if moved:
        listed = ", ".join(f"{case} (was {name})" for case, name in moved[:5]) + (", ..." if len(moved) > 5 else "")
        raise BundleInputError(
            f"the split {splits_file} differs from the one {checkpoint} was trained on ({recorded}): {len(moved)} case(s) "
            f"evaluated as {section!r} were not {section!r} there: {listed}. Evaluate with --splits_file {recorded}."
        )
    logger.warning(
        "the split %s differs from the one %s was trained on (%s); no evaluated case was a training or validation case "
        "there", splits_file, checkpoint, recorded,
    )  # fmt: skip
    return splits_file


def volumes_per_batch(batch_size: int, samples_per_volume: int) -> int:
    """DataLoader batch size in VOLUMES for a training batch of ``batch_size`` slices/patches.

    Each cached volume yields ``samples_per_volume`` crops that MONAI's ``list_data_collate`` flattens into the batch,
    so a loader batch of ``v`` volumes trains on ``v * samples_per_volume`` crops. The result is
    ``max(1, batch_size // samples_per_volume)``; a batch that is not a multiple is rounded down (logged), and
    ``samples_per_volume > batch_size`` gives batches of ``samples_per_volume`` crops.

    Raises:
        ValueError: non-positive values.
    """
    if int(batch_size) < 1 or int(samples_per_volume) < 1:
        raise ValueError(f"batch_size and samples_per_volume must be >= 1, got {batch_size} and {samples_per_volume}.")
    v = max(1, int(batch_size) // int(samples_per_volume))
    if v * int(samples_per_volume) != int(batch_size):
        logger.warning(
            "batch_size %d is not a multiple of samples_per_volume %d: training batches hold %d crops",
            batch_size, samples_per_volume, v * int(samples_per_volume),
        )  # fmt: skip
    return v
