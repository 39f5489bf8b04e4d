"""TransFuse-S/L: contract (tiny widths), fusion variants, position-embedding resampling, streams, sizes, errors."""

from __future__ import annotations

import pytest
import torch

import networks
from networks.transfuse import BiFusion, ConcatFusion, TransFuse, transfuse_l, transfuse_s
from networks.vit import resample_pos_embed
from tests.networks.contract_case import NetworkContract

TINY = {
    "embed_dim": 16,
    "depth": 1,
    "num_heads": 2,
    "cnn_widths": (4, 8, 16),
    "cnn_layers": (1, 1, 1),
    "decoder_channels": (8, 4),
    "head_channels": 4,
}


def _taps(c, d0, n):
    c2, c1, c0 = c
    return {
        "early": (c2, 4), "mid.0": (c1, 8), "mid.1": (c0, 16), "mid.2": (d0, 16), "late": (c0, 16),
        "pred_mid.0": (n, 1), "pred_mid.1": (n, 1), "pred_final": (n, 1),
    }  # fmt: skip


class TestTransFuseS(NetworkContract):
    spatial_size = (48, 80)  # token grid 3 x 5, not the img_size grid: position embeddings are resampled
    bad_size = (48, 72)
    expected_taps = _taps((4, 8, 16), 16, 2)
    train_outputs = 3

    def make(self):
        return transfuse_s(in_channels=5, out_channels=2, img_size=64, **TINY)


class TestTransFuseConcat(NetworkContract):
    spatial_size = (32, 32)
    bad_size = (32, 33)
    expected_taps = _taps((4, 8, 16), 16, 1)
    train_outputs = 3

    def make(self):
        return transfuse_s(in_channels=1, out_channels=1, img_size=32, fusion="concat", dropout=0.0, **TINY)

    def test_uses_concat_fusion(self, net):
        assert all(isinstance(getattr(net, f"fuse{i}"), ConcatFusion) for i in range(3))


class TestTransFuseL(NetworkContract):
    spatial_size = (32, 48)
    bad_size = (40, 48)
    expected_taps = _taps((16, 32, 64), 24, 3)  # Res2Net bottlenecks: planes x 4
    train_outputs = 3

    def make(self):
        return transfuse_l(in_channels=3, out_channels=3, img_size=32, **{**TINY, "embed_dim": 24, "num_heads": 3})

    def test_res2net_cnn_branch(self, net):
        assert net.cnn.block == "res2net" and isinstance(net.fuse0, BiFusion)


def test_transfuse_s_parameter_count_paper():
    """Paper Table 2: TransFuse-S has 26.3M parameters (3 -> 1 channels, 352 x 352); within 3 %."""
    net = networks.create("transfuse_s", in_channels=3, out_channels=1, img_size=352)
    n = sum(p.numel() for p in net.parameters())
    assert abs(n - 26.3e6) / 26.3e6 < 0.03, n
    assert net.transformer.depth == 8 and net.transformer.embed_dim == 384 and net.transformer.num_heads == 6
    assert net.cnn.layers == (3, 4, 6)


def test_transfuse_l_configuration():
    """Paper Sec. 3.2: TransFuse-L = Res2Net-50 + DeiT-B with 10 layers (checked on the config, not built)."""
    from networks.transfuse import TRANSFUSE_CONFIGS

    cfg = TRANSFUSE_CONFIGS["l"]
    assert (cfg["cnn_block"], cfg["embed_dim"], cfg["depth"], cfg["num_heads"]) == ("res2net", 768, 10, 12)


def test_parallel_streams_cpu_path_is_identical():
    torch.manual_seed(0)
    a = transfuse_s(in_channels=2, out_channels=1, img_size=32, **TINY).eval()
    b = transfuse_s(in_channels=2, out_channels=1, img_size=32, parallel_streams=True, **TINY).eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(1, 2, 32, 64)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_parallel_streams_cuda_matches_sequential():
    torch.manual_seed(0)
    a = transfuse_s(in_channels=3, out_channels=1, img_size=64, **TINY).cuda().eval()
    b = transfuse_s(in_channels=3, out_channels=1, img_size=64, parallel_streams=True, **TINY).cuda().eval()
    b.load_state_dict(a.state_dict())
    x = torch.randn(2, 3, 64, 64, device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x))
    b.train()
    out = b(x)
    sum(o.mean() for o in out).backward()
    torch.cuda.synchronize()
    assert all(p.grad is not None for p in b.transformer.parameters())


def test_resample_pos_embed():
    pos = torch.randn(1, 12, 8)
    assert resample_pos_embed(pos, (3, 4), (3, 4)) is pos
    const = torch.full((1, 6, 4), 0.5)  # a constant field stays constant under bicubic resampling
    out = resample_pos_embed(const, (2, 3), (5, 7))
    assert out.shape == (1, 35, 4)
    torch.testing.assert_close(out, torch.full((1, 35, 4), 0.5))
    with pytest.raises(ValueError, match="3x3"):
        resample_pos_embed(pos, (3, 3), (4, 4))


def test_heads_are_upsampled_feature_maps():
    """The final head's output equals the bilinear x4 upsampling of its conv stack's output (Sec. 2.4)."""
    net = transfuse_s(in_channels=1, out_channels=2, img_size=32, **TINY).eval()
    seen = {}
    net.head[-2].register_forward_hook(lambda m, i, o: seen.setdefault("low", o))
    with torch.no_grad():
        y = net(torch.randn(1, 1, 32, 32))
    expected = torch.nn.functional.interpolate(seen["low"], scale_factor=4, mode="bilinear", align_corners=False)
    torch.testing.assert_close(y, expected)
    assert seen["low"].shape[-2:] == (8, 8)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"spatial_dims": 3}, "spatial_dims must be 2"),
        ({"fusion": "sum"}, "bifusion, concat"),
        ({"img_size": 350}, "Nearest valid size: \\(352, 352\\)"),
        ({"embed_dim": 30, "num_heads": 4}, "divisible by num_heads"),
        ({"decoder_channels": (8,)}, "needs 2 values"),
        ({"dropout": 1.5}, "dropout"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TransFuse(**{**TINY, **kwargs})


def test_bad_input_size_message_names_nearest():
    net = transfuse_s(in_channels=1, out_channels=1, img_size=32, **TINY).eval()
    with pytest.raises(ValueError, match=r"Nearest valid size: \(352, 256\)"):
        net(torch.zeros(1, 1, 350, 250))
