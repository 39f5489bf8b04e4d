"""Inputs that used to end in a raw traceback or a late failure end in one clear line, before long work (issue 12)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from pipelines.dicom_to_nifti import main as dicom_main
from pipelines.workflow import BundleInputError, preflight, resolve_splits
from tests.pipelines.test_dicom_to_nifti import _z_positions, write_series
from tests.reliability.conftest import one_line, snapshot


@pytest.fixture
def splits(tmp_path) -> str:
    from pipelines.synthesize import synthesize

    synthesize("kits", cases=2, size=32, out=tmp_path / "kits", seed=2)
    return resolve_splits(tmp_path / "kits", tmp_path / "run", seed=0)


def test_in_plane_size_null_means_keep(splits):
    """``--in_plane_size null`` arrives as the string "null": the documented "keep the size", not int('null')."""
    assert preflight(splits, role="unetpp_teacher", cache_rate=1.0, in_plane_size="null", pixdim="None", check_integrity=False)


@pytest.mark.parametrize("store", ["unreachable_server", "corrupt_sqlite"])
def test_tracking_store_is_checked_in_preflight(store, splits, tmp_path, monkeypatch):
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)
    if store == "unreachable_server":
        uri, named = "http://127.0.0.1:9", "http://127.0.0.1:9"
    else:
        db = tmp_path / "run" / "mlruns.db"
        db.write_bytes(b"this is not an SQLite database" * 100)
        uri, named = f"sqlite:///{db}", str(db)
    before = snapshot(tmp_path / "run")
    t0 = time.perf_counter()
    with pytest.raises(BundleInputError) as err:
        preflight(splits, role="unetpp_teacher", check_integrity=False, tracking_uri=uri)
    assert time.perf_counter() - t0 < 10, "no minutes of retries"
    assert named in str(err.value) and one_line(str(err.value)), str(err.value)
    assert snapshot(tmp_path / "run") == before


def test_dicom_output_that_is_a_file_is_a_clear_error(tmp_path, capsys):
    src = tmp_path / "dicom"
    write_series(src, _z_positions([0.0, 2.0, 4.0]))
    out = tmp_path / "out.nii.gz"
    out.write_bytes(b"keep me")
    assert dicom_main([str(src), str(out)]) == 1
    message = capsys.readouterr().out.strip()
    assert str(out) in message and one_line(message)
    assert out.read_bytes() == b"keep me"


def test_series_listing_shows_hashes_not_uids(tmp_path, capsys):
    src = tmp_path / "dicom"
    uid = write_series(src, _z_positions([0.0, 2.0, 4.0]))
    assert dicom_main([str(src), str(tmp_path / "out"), "--series", "deadbeef"]) == 1
    message = capsys.readouterr().out
    assert "available" in message and uid not in message
    assert not Path(tmp_path / "out").exists() or not any(Path(tmp_path / "out").iterdir())
