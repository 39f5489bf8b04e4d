"""HUWindowd: exact values on hand-made arrays, presets from the HLFD paper, metadata kept, validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from transforms import WINDOW_PRESETS, HUWindow, HUWindowd, resolve_window

HU = [-1000.0, -200.0, -40.0, 0.0, 50.0, 60.0, 160.0, 300.0, 1000.0]


def _windowed(key_value, **kwargs):
    img = torch.tensor(HU).reshape(1, 3, 3, 1)
    out = HUWindowd(keys="image", **kwargs)({"image": img, "label": key_value})
    return out["image"].reshape(-1).tolist(), out


def test_presets_are_the_papers_windows():
    # HLFD (ISBI 2024, Sec. 3): -200..300 HU for the kidney, -40..160 HU for the liver
    assert WINDOW_PRESETS == {"kidney": (-200.0, 300.0), "liver": (-40.0, 160.0)}
    assert resolve_window("kits") == (-200.0, 300.0)
    assert resolve_window("LiTS") == (-40.0, 160.0)


def test_kidney_window_exact_values():
    values, _ = _windowed(None, window="kidney")
    # (clip(x, -200, 300) + 200) / 500, by hand
    expected = [0.0, 0.0, 160 / 500, 200 / 500, 250 / 500, 260 / 500, 360 / 500, 1.0, 1.0]
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_liver_window_exact_values():
    values, _ = _windowed(None, window="liver")
    # (clip(x, -40, 160) + 40) / 200
    expected = [0.0, 0.0, 0.0, 0.2, 0.45, 0.5, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(values, expected, atol=1e-6)


def test_explicit_window_and_output_range():
    values, _ = _windowed(None, window=(0, 100), output_range=(-1.0, 1.0))
    # clip to [0, 100], then -1 + 2 * x / 100
    expected = [-1.0, -1.0, -1.0, -1.0, 0.0, 0.2, 1.0, 1.0, 1.0]
    np.testing.assert_allclose(values, expected, atol=1e-6)
    values, _ = _windowed(None, window=[-200, 300], output_range=(0, 255))
    np.testing.assert_allclose(values[4], 127.5, atol=1e-4)


def test_clipping_bounds_and_dtype_on_random_hu():
    rng = np.random.default_rng(0)
    hu = rng.integers(-1024, 3071, size=(1, 8, 8, 4)).astype(np.int16)
    out = HUWindow("kidney")(torch.from_numpy(hu))
    assert out.dtype == torch.float32 and out.shape == (1, 8, 8, 4)
    expected = (np.clip(hu.astype(np.float64), -200, 300) + 200) / 500
    np.testing.assert_allclose(out.numpy(), expected, atol=1e-6)


def test_label_untouched_and_meta_kept():
    affine = torch.tensor([[0.0, 0, -0.8, 10], [0, -0.8, 0, 20], [-2.5, 0, 0, 30], [0, 0, 0, 1]], dtype=torch.float64)
    img = MetaTensor(torch.tensor(HU).reshape(1, 3, 3, 1), affine=affine, meta={"filename_or_obj": "case.nii.gz"})
    img.applied_operations.append({"class": "Fake", "id": 1})
    label = torch.tensor([[[[2]]]], dtype=torch.uint8)
    out = HUWindowd(keys="image", window="liver")({"image": img, "label": label})
    assert isinstance(out["image"], MetaTensor)
    torch.testing.assert_close(out["image"].affine, affine)
    assert out["image"].meta["filename_or_obj"] == "case.nii.gz"
    assert [op["class"] for op in out["image"].applied_operations] == ["Fake"]
    assert out["label"] is label  # labels are never windowed


@pytest.mark.parametrize("window", [(300, -200), (100, 100), "spleen", (1, 2, 3), (0, float("nan"))])
def test_bad_window_names_the_presets(window):
    with pytest.raises(ValueError) as err:
        HUWindowd(keys="image", window=window)
    assert "kidney" in str(err.value) and "liver" in str(err.value)


def test_bad_output_range_and_type():
    with pytest.raises(ValueError, match="output_range"):
        HUWindowd(keys="image", output_range=(1, 1))
    with pytest.raises(TypeError):
        HUWindowd(keys="image", window=200)
