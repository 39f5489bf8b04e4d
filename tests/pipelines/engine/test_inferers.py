"""SliceBatchInferer: batched 2.5D whole-volume inference equals an independent per-slice loop and MONAI's SliceInferer."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.inferers import SliceInferer

import networks
from pipelines.engine.inferers import SliceBatchInferer, make_inferer, slab_indices

TINY_STUDENT = {"base_width": 8, "decoder_channels": [16, 8, 8, 8, 8]}


def _net(in_channels: int = 3) -> torch.nn.Module:
    torch.manual_seed(0)
    return networks.create("resnet18_student", spatial_dims=2, in_channels=in_channels, out_channels=3, **TINY_STUDENT).eval()


def _per_slice(net: torch.nn.Module, stacked: torch.Tensor) -> torch.Tensor:
    """The reference: one network call per (volume, slice)."""
    b, _, _, _, depth = stacked.shape
    rows = []
    for i in range(b):
        rows.append(torch.stack([net(stacked[i : i + 1, :, :, :, z])[0] for z in range(depth)], dim=-1))
    return torch.stack(rows)


def test_slab_indices_replicate_the_edges():
    expected = np.clip(np.arange(4)[:, None] + np.arange(5)[None, :] - 2, 0, 3)
    np.testing.assert_array_equal(slab_indices(4, 5).numpy(), expected)
    assert slab_indices(3, 1).tolist() == [[0], [1], [2]]


@pytest.mark.parametrize("sw_batch_size", [1, 4, 64])
def test_stacked_volumes_equal_the_per_slice_loop(sw_batch_size):
    net = _net()
    x = torch.randn(2, 3, 32, 32, 7)
    calls = []
    net.register_forward_pre_hook(lambda m, a: calls.append(a[0].shape[0]))
    with torch.no_grad():
        got = SliceBatchInferer(sw_batch_size=sw_batch_size)(x, net)
        n_batched = len(calls)
        expected = _per_slice(net, x)
    assert got.shape == (2, 3, 32, 32, 7)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert n_batched == -(-14 // sw_batch_size)  # one network call per chunk of the 2 x 7 slices
    assert calls[:n_batched] == [min(sw_batch_size, 14 - i * sw_batch_size) for i in range(n_batched)]


def test_unstacked_volume_gathers_the_slabs():
    """num_slices=5 on a (B, 1, H, W, D) volume: the slabs stacked independently with numpy (edge replication)."""
    net = _net(in_channels=5)
    vol = torch.randn(1, 1, 32, 32, 6)
    idx = np.clip(np.arange(6)[:, None] + np.arange(5)[None, :] - 2, 0, 5)  # (D, k)
    stacked = torch.from_numpy(np.stack([vol[0, 0].numpy()[:, :, idx[:, i]] for i in range(5)])[None])
    with torch.no_grad():
        got = SliceBatchInferer(sw_batch_size=4, num_slices=5)(vol, net)
        expected = _per_slice(net, stacked)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_same_result_and_meta_as_monai_slice_inferer():
    net = _net()
    x = MetaTensor(torch.randn(1, 3, 32, 32, 5), affine=torch.diag(torch.tensor([0.8, 0.8, 3.0, 1.0])))
    x.meta["filename_or_obj"] = "case_00000/imaging.nii.gz"
    with torch.no_grad():
        old = SliceInferer(roi_size=(-1, -1), spatial_dim=2, sw_batch_size=2, progress=False)(x, net)
        new = make_inferer(2, sw_batch_size=2)(x, net)
    assert isinstance(new, MetaTensor) and isinstance(make_inferer(2), SliceBatchInferer)
    assert new.meta["filename_or_obj"] == "case_00000/imaging.nii.gz"
    torch.testing.assert_close(new.affine, x.affine)
    torch.testing.assert_close(new.as_tensor(), old.as_tensor(), rtol=1e-4, atol=1e-5)


def test_output_size_may_differ_from_the_input():
    def half(batch: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.avg_pool2d(batch[:, :2], 2)

    x = torch.arange(2 * 4 * 4 * 3, dtype=torch.float32).reshape(1, 2, 4, 4, 3)
    got = SliceBatchInferer(sw_batch_size=2)(x, half)
    expected = torch.stack([torch.nn.functional.avg_pool2d(x[..., z], 2) for z in range(3)], dim=-1)
    assert got.shape == (1, 2, 2, 2, 3)
    torch.testing.assert_close(got, expected)


def test_errors():
    with pytest.raises(ValueError, match="sw_batch_size must be >= 1"):
        SliceBatchInferer(sw_batch_size=0)
    with pytest.raises(ValueError, match="num_slices must be one of"):
        SliceBatchInferer(num_slices=4)
    inf = SliceBatchInferer()
    with pytest.raises(ValueError, match=r"\(B, C, H, W, D\)"):
        inf(torch.zeros(1, 3, 8, 8), lambda b: b)
    with pytest.raises(ValueError, match="empty"):
        inf(torch.zeros(1, 3, 8, 8, 0), lambda b: b)
    with pytest.raises(ValueError, match="single-channel"):
        SliceBatchInferer(num_slices=3)(torch.zeros(1, 3, 8, 8, 2), lambda b: b)
    with pytest.raises(TypeError, match="one tensor"):
        inf(torch.zeros(1, 3, 8, 8, 2), lambda b: (b, b))
