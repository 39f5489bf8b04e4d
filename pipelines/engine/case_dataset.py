"""The bundles' dataset: MONAI's ``CacheDataset`` whose unreadable cases are one clear error naming the file.

With ``--check_data false`` a truncated or corrupt volume is only found when it is loaded: while caching
(``--cache_rate`` > 0) or at the first iteration that reads it (``--cache_rate 0``, or the items beyond the cached
share). MONAI reports that as ``RuntimeError: applying transform <LoadImaged ...>`` around nibabel's ``EOFError`` or
``ImageFileError``, which often do not name the file. :class:`CaseDataset` turns such a failure into a
:class:`~pipelines.engine.errors.BundleInputError` naming the unreadable file and what to do; the bundles print it as
their one ``ERROR:`` line and the MLflow run ends FAILED. Failures that are not reading a file (a bug in a transform)
propagate unchanged, with their traceback.

This module imports MONAI; :func:`pipelines.engine.data.build_dataset` imports it lazily.
"""

from __future__ import annotations

import os
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import nibabel as nib
import numpy as np
from monai.data import CacheDataset
from nibabel.filebasedimages import ImageFileError

from pipelines.engine.errors import BundleInputError

__all__ = ["CaseDataset", "case_read_error", "reading_case", "CHECK_DATASET_HINT"]

#: what a user does about an unreadable case
CHECK_DATASET_HINT = (
    "run `python -m pipelines.check_dataset <dataset folder or splits file>` to list every unreadable file, "
    "then re-export (or remove) that case"
)
#: the ``RuntimeError`` MONAI raises around a failing loader (``LoadImage`` / ``LoadImaged``)
_MONAI_LOADER = "applying transform <monai.transforms.io."
_READ_ERRORS = (OSError, EOFError, zlib.error, ImageFileError)


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes, outermost first (cycles cut)."""
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    return chain


def _item_files(item: Mapping[str, Any]) -> list[str]:
    """The file paths of a datalist item (string values, or lists of them, that look like paths)."""
    files: list[str] = []
    for value in item.values():
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, (str, os.PathLike)) and (os.sep in str(v) or "." in os.path.basename(str(v))):
                files.append(str(v))
    return files


def _unreadable(files: list[str], message: str) -> list[str]:
    """The file(s) of a case that cannot be read: the one the error names, else the first a full read fails on."""
    named = [f for f in files if f in message]
    if named:
        return named[:1]
    for f in files:
        if not os.path.isfile(f):
            return [f]
        if f.endswith((".nii", ".nii.gz")):
            try:
                np.asarray(nib.load(f).dataobj)
            except Exception:  # noqa: BLE001 - whatever nibabel raises, this is the damaged file
                return [f]
    return files


def case_read_error(item: Mapping[str, Any], exc: BaseException) -> BundleInputError | None:
    """The clear error for a case whose file(s) cannot be read, or None when ``exc`` is not a read failure.

    Args:
        item: the datalist item (``{"image": path, "label": path, ...}``).
        exc: what loading/transforming the item raised.

    Returns:
        a one-line ``BundleInputError`` naming the unreadable file, the reader's error and the remedy; None when
        ``exc`` already is a project error or is not a failure to read a file (it is then re-raised unchanged).
    """
    chain = _chain(exc)
    if any(isinstance(e, BundleInputError) for e in chain):
        return None
    loader = any(isinstance(e, RuntimeError) and str(e).startswith(_MONAI_LOADER) for e in chain)
    if not loader and not any(isinstance(e, _READ_ERRORS) for e in chain):
        return None
    root = chain[-1]
    detail = " ".join(f"{type(root).__name__}: {root}".split())  # nibabel's messages hold newlines
    files = _unreadable(_item_files(item), str(root))
    what = " / ".join(files) if files else f"the case {dict(item)}"
    return BundleInputError(f"cannot read {what} ({detail}); {CHECK_DATASET_HINT}")


@contextmanager
def reading_case(item: Mapping[str, Any]) -> Iterator[None]:
    """Context in which ``item`` is loaded: a read failure leaves it as :func:`case_read_error`, others unchanged.

    Raises:
        BundleInputError: a file of ``item`` cannot be read.
    """
    try:
        yield
    except Exception as e:
        error = case_read_error(item, e)
        if error is None:
            raise
        raise error from e


class CaseDataset(CacheDataset):
    """``monai.data.CacheDataset`` raising :func:`case_read_error` for a case that cannot be read.

    Same arguments and behaviour as ``CacheDataset``; both the caching (``_load_cache_item``, also the worker threads
    of ``num_workers``) and the uncached path (``_transform``, in DataLoader workers too) are covered.

    Raises:
        BundleInputError: a file of a case cannot be read (truncated, not NIfTI, missing, unreadable).
    """

    def _load_cache_item(self, idx: int) -> Any:
        with reading_case(self.data[idx]):
            return super()._load_cache_item(idx)

    def _transform(self, index: int) -> Any:
        with reading_case(self.data[index]):
            return super()._transform(index)
