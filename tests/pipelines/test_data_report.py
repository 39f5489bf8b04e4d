"""pipelines.data_report: the data-path benchmark measures the real cache content and rejects bad sources."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from pipelines.data_report import data_report, main
from pipelines.synthesize import synthesize
from transforms.sampling import MAX_INDICES_PER_CLASS


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    out = tmp_path_factory.mktemp("dr") / "kits"
    synthesize("kits", cases=2, size=32, out=out, seed=3)
    return out


def test_cached_bytes_match_an_independent_count(cohort):
    k = 3
    report = data_report(cohort, cases=1, draws=2, samples=2, num_slices=k, in_plane_size=None)
    assert report["cases"] == 1 and report["samples"] == 2
    # independent count: float32 image + float32 label of the volume padded by k//2 replicated slices at each end,
    # plus int64 indices of each class (at most MAX_INDICES_PER_CLASS per class)
    label = np.asarray(nib.load(cohort / "case_00000" / "segmentation.nii.gz").dataobj)
    padded = np.concatenate([label[..., :1]] * (k // 2) + [label] + [label[..., -1:]] * (k // 2), axis=-1)
    counts = np.bincount(padded.ravel().astype(int), minlength=3)[:3]
    expected = 2 * 4 * padded.size + 8 * int(np.minimum(counts, MAX_INDICES_PER_CLASS).sum())
    assert report["cached_mb_per_volume"] == pytest.approx(expected / 2**20, abs=0.006)
    assert report["estimated_mb_per_volume"] == pytest.approx(2 * 4 * label.size / 2**20, abs=0.006)
    for key in ("cache_s_per_volume", "draw_ms_median", "sampler_ms_median", "full_scan_sampler_ms_median", "crops_per_s"):
        assert report[key] > 0, key


def test_cli_json_and_errors(cohort, tmp_path, capsys):
    out = tmp_path / "r.json"
    main([str(cohort), "--cases", "1", "--draws", "1", "--samples", "1", "--in-plane-size", "32", "32", "--json", str(out)])
    assert json.loads(out.read_text())["in_plane_size"] == [32, 32]
    main([str(cohort / "dataset.json"), "--cases", "1", "--draws", "1", "--samples", "1"])  # relative paths in it
    assert "crop sampler" in capsys.readouterr().out
    unlabelled = tmp_path / "unlabelled" / "case_00000"
    unlabelled.mkdir(parents=True)
    (unlabelled / "imaging.nii.gz").write_bytes((cohort / "case_00000" / "imaging.nii.gz").read_bytes())
    (tmp_path / "empty").mkdir()
    for argv, message in (
        ([str(tmp_path / "missing")], "does not exist"),
        ([str(tmp_path / "empty")], "unknown dataset layout"),
        ([str(tmp_path / "unlabelled")], "no labelled case"),
        ([str(cohort), "--cases", "0"], "must be >= 1"),
    ):
        with pytest.raises(SystemExit) as exc:
            main(argv)
        assert exc.value.code == 2 and message in capsys.readouterr().err
