"""Local pretrained weights: torchvision ResNet / official Res2Net / timm DeiT layouts built here by hand."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest
import torch
from torch.nn import functional as F

import networks
from networks.resnet import ResNetEncoder
from networks.student import ResNet18Student
from networks.transfuse import transfuse_s
from networks.vit import VisionTransformerEncoder
from networks.weights import adapt_input_channels, load_deit_weights, load_resnet_weights, read_state_dict
from tests.networks.test_transfuse import TINY


def _bn(prefix, c):
    return {
        f"{prefix}.weight": torch.rand(c) + 0.5,
        f"{prefix}.bias": torch.randn(c),
        f"{prefix}.running_mean": torch.randn(c),
        f"{prefix}.running_var": torch.rand(c) + 0.5,
        f"{prefix}.num_batches_tracked": torch.tensor(7),
    }


def torchvision_resnet_basic(layers=(2, 2, 2, 2), widths=(64, 128, 256, 512), num_classes=1000):
    """State dict with torchvision's ``resnet18/34`` key layout and shapes (written from torchvision's definition)."""
    sd = {"conv1.weight": torch.randn(widths[0], 3, 7, 7)} | _bn("bn1", widths[0])
    inplanes = widths[0]
    for li, (n, planes) in enumerate(zip(layers, widths), start=1):
        for b in range(n):
            p = f"layer{li}.{b}"
            sd[f"{p}.conv1.weight"] = torch.randn(planes, inplanes, 3, 3)
            sd |= _bn(f"{p}.bn1", planes)
            sd[f"{p}.conv2.weight"] = torch.randn(planes, planes, 3, 3)
            sd |= _bn(f"{p}.bn2", planes)
            if b == 0 and (li > 1 or inplanes != planes):
                sd[f"{p}.downsample.0.weight"] = torch.randn(planes, inplanes, 1, 1)
                sd |= _bn(f"{p}.downsample.1", planes)
            inplanes = planes
    sd["fc.weight"] = torch.randn(num_classes, inplanes)
    sd["fc.bias"] = torch.randn(num_classes)
    return sd


def official_res2net50(widths=(64, 128, 256, 512), base_width=26, scale=4):
    """State dict with the official Res2Net ``res2net50_26w_4s`` key layout and shapes."""
    sd = {"conv1.weight": torch.randn(widths[0], 3, 7, 7)} | _bn("bn1", widths[0])
    inplanes = widths[0]
    for li, (n, planes) in enumerate(zip((3, 4, 6, 3), widths), start=1):
        width = int(math.floor(planes * base_width / 64))
        for b in range(n):
            p = f"layer{li}.{b}"
            sd[f"{p}.conv1.weight"] = torch.randn(width * scale, inplanes, 1, 1)
            sd |= _bn(f"{p}.bn1", width * scale)
            for i in range(scale - 1):
                sd[f"{p}.convs.{i}.weight"] = torch.randn(width, width, 3, 3)
                sd |= _bn(f"{p}.bns.{i}", width)
            sd[f"{p}.conv3.weight"] = torch.randn(planes * 4, width * scale, 1, 1)
            sd |= _bn(f"{p}.bn3", planes * 4)
            if b == 0:
                sd[f"{p}.downsample.0.weight"] = torch.randn(planes * 4, inplanes, 1, 1)
                sd |= _bn(f"{p}.downsample.1", planes * 4)
            inplanes = planes * 4
    sd["fc.weight"] = torch.randn(1000, inplanes)
    sd["fc.bias"] = torch.randn(1000)
    return sd


def timm_deit(embed_dim=16, depth=3, heads=2, grid=4, in_chans=3, distilled=False):
    """timm ``VisionTransformer`` / DeiT state dict (cls token, optional dist token, heads)."""
    d = embed_dim
    prefix = 2 if distilled else 1
    sd = {
        "cls_token": torch.randn(1, 1, d),
        "pos_embed": torch.randn(1, prefix + grid * grid, d),
        "patch_embed.proj.weight": torch.randn(d, in_chans, 16, 16) * 0.02,
        "patch_embed.proj.bias": torch.randn(d),
        "norm.weight": torch.rand(d) + 0.5,
        "norm.bias": torch.randn(d),
        "head.weight": torch.randn(1000, d),
        "head.bias": torch.randn(1000),
    }
    if distilled:
        sd |= {
            "dist_token": torch.randn(1, 1, d),
            "head_dist.weight": torch.randn(1000, d),
            "head_dist.bias": torch.randn(1000),
        }
    for i in range(depth):
        p = f"blocks.{i}"
        sd |= {
            f"{p}.norm1.weight": torch.rand(d) + 0.5, f"{p}.norm1.bias": torch.randn(d) * 0.1,
            f"{p}.attn.qkv.weight": torch.randn(3 * d, d) * 0.2, f"{p}.attn.qkv.bias": torch.randn(3 * d) * 0.1,
            f"{p}.attn.proj.weight": torch.randn(d, d) * 0.2, f"{p}.attn.proj.bias": torch.randn(d) * 0.1,
            f"{p}.norm2.weight": torch.rand(d) + 0.5, f"{p}.norm2.bias": torch.randn(d) * 0.1,
            f"{p}.mlp.fc1.weight": torch.randn(4 * d, d) * 0.2, f"{p}.mlp.fc1.bias": torch.randn(4 * d) * 0.1,
            f"{p}.mlp.fc2.weight": torch.randn(d, 4 * d) * 0.2, f"{p}.mlp.fc2.bias": torch.randn(d) * 0.1,
        }  # fmt: skip
    return sd


def test_torchvision_resnet18_layout_loads_into_student():
    sd = torchvision_resnet_basic()
    assert len(sd) == 122  # torchvision resnet18().state_dict() has 122 entries
    net = ResNet18Student(in_channels=3, out_channels=2)
    report = net.load_pretrained(sd)
    assert report.missing == [] and report.unexpected == ["fc.bias", "fc.weight"]
    assert len(report.loaded) == 120
    enc = net.encoder.state_dict()
    for key in ("conv1.weight", "layer3.1.conv2.weight", "layer4.0.downsample.1.running_var", "bn1.bias"):
        assert torch.equal(enc[key], sd[key])


@pytest.mark.parametrize("k", [1, 3, 5])
def test_first_conv_adaptation_numpy(k):
    w = torch.randn(8, 3, 7, 7)
    out = adapt_input_channels(w, k).numpy()
    wn = w.numpy()
    if k == 1:
        expected = wn.sum(axis=1, keepdims=True)
    elif k == 3:
        expected = wn
    else:
        expected = np.stack([wn[:, i % 3] for i in range(k)], axis=1) * 3 / k
    np.testing.assert_allclose(out, expected, rtol=1e-6)


def test_student_five_channel_first_conv_and_create_kwarg(tmp_path):
    sd = torchvision_resnet_basic(widths=(8, 16, 32, 64), num_classes=10)
    path = tmp_path / "resnet18-tiny.pth"
    torch.save(sd, path)
    net = networks.create("resnet18_student", in_channels=5, out_channels=2, base_width=8, encoder_weights=str(path))
    w = net.encoder.conv1.weight.detach()
    torch.testing.assert_close(w[:, 3], sd["conv1.weight"][:, 0] * 3 / 5)
    torch.testing.assert_close(w[:, 4], sd["conv1.weight"][:, 1] * 3 / 5)


def test_resnet34_layout_into_transfuse_cnn_drops_layer4():
    sd = torchvision_resnet_basic(layers=(3, 4, 6, 3), widths=(4, 8, 16, 32))
    net = transfuse_s(in_channels=1, out_channels=1, img_size=32, **{**TINY, "cnn_layers": (3, 4, 6)})
    report = net.load_pretrained(cnn=sd)["cnn"]
    assert report.missing == []
    assert {k.split(".")[0] for k in report.unexpected} == {"layer4", "fc"}
    torch.testing.assert_close(net.cnn.conv1.weight.detach(), sd["conv1.weight"].sum(1, keepdim=True))


def test_official_res2net50_layout_loads():
    enc = ResNetEncoder(2, 3, "res2net", (3, 4, 6), (64, 128, 256))
    sd = official_res2net50()
    report = load_resnet_weights(enc, sd)
    assert report.missing == []
    assert {k.split(".")[0] for k in report.unexpected} == {"layer4", "fc"}
    assert torch.equal(enc.state_dict()["layer3.5.convs.2.weight"], sd["layer3.5.convs.2.weight"])


def _reference_vit(sd, x, depth, heads):
    """Plain-torch forward of a timm ViT without class token (independent of networks.vit)."""
    d = sd["norm.weight"].shape[0]
    tokens = (
        F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=16).flatten(2).transpose(1, 2)
    )
    tokens = tokens + sd["pos_embed"]
    mha = torch.nn.MultiheadAttention(d, heads, batch_first=True)
    for i in range(depth):
        p = f"blocks.{i}"
        with torch.no_grad():
            mha.in_proj_weight.copy_(sd[f"{p}.attn.qkv.weight"])
            mha.in_proj_bias.copy_(sd[f"{p}.attn.qkv.bias"])
            mha.out_proj.weight.copy_(sd[f"{p}.attn.proj.weight"])
            mha.out_proj.bias.copy_(sd[f"{p}.attn.proj.bias"])
        h = F.layer_norm(tokens, (d,), sd[f"{p}.norm1.weight"], sd[f"{p}.norm1.bias"], eps=1e-6)
        tokens = tokens + mha(h, h, h, need_weights=False)[0]
        h = F.layer_norm(tokens, (d,), sd[f"{p}.norm2.weight"], sd[f"{p}.norm2.bias"], eps=1e-6)
        h = F.linear(
            F.gelu(F.linear(h, sd[f"{p}.mlp.fc1.weight"], sd[f"{p}.mlp.fc1.bias"])),
            sd[f"{p}.mlp.fc2.weight"],
            sd[f"{p}.mlp.fc2.bias"],
        )
        tokens = tokens + h
    return F.layer_norm(tokens, (d,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)


@pytest.mark.parametrize("distilled", [False, True])
def test_deit_layout_loads_maps_and_computes_like_timm(distilled, caplog):
    sd = timm_deit(depth=3, grid=4, distilled=distilled)
    vit = VisionTransformerEncoder(3, img_size=(32, 48), embed_dim=16, depth=2, num_heads=2).eval()
    with caplog.at_level(logging.INFO, logger="networks.weights"):
        report = load_deit_weights(vit, {"model": sd})
    assert report.missing == []
    dropped = {"cls_token", "head.weight", "head.bias"} | (
        {"dist_token", "head_dist.weight", "head_dist.bias"} if distilled else set()
    )
    assert set(report.unexpected) == dropped | {k for k in sd if k.startswith("blocks.2.")}
    assert any("blocks 2..2" in n for n in report.adapted) and "loaded" in caplog.text
    # position embeddings: class tokens dropped, 4x4 grid bicubically resampled to 2x3 (torch reference)
    grid = sd["pos_embed"][:, 2 if distilled else 1 :].reshape(1, 4, 4, 16).permute(0, 3, 1, 2)
    expected = (
        F.interpolate(grid, size=(2, 3), mode="bicubic", align_corners=False).permute(0, 2, 3, 1).reshape(1, 6, 16)
    )
    torch.testing.assert_close(vit.pos_embed.detach(), expected)
    x = torch.randn(2, 3, 32, 48)
    ref = dict(sd, pos_embed=expected)
    with torch.no_grad():
        out = vit(x)
        want = _reference_vit(ref, x, depth=2, heads=2).transpose(1, 2).reshape(2, 16, 2, 3)
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)


def test_transfuse_vit_weights_from_file_with_channel_adaptation(tmp_path):
    sd = timm_deit(embed_dim=16, depth=2, grid=14)
    path = tmp_path / "deit_tiny_like.pth"
    torch.save({"model": sd}, path)
    net = networks.create("transfuse_s", in_channels=2, out_channels=1, img_size=32, vit_weights=path, **TINY)
    w = net.transformer.patch_embed.proj.weight.detach()
    torch.testing.assert_close(w, sd["patch_embed.proj.weight"][:, [0, 1]] * 1.5)


def test_missing_file_is_named(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        read_state_dict(path)
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        networks.create("resnet18_student", base_width=4, encoder_weights=path)


def test_unreadable_file_is_named(tmp_path):
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="garbage.pth"):
        read_state_dict(path)


def test_incompatible_files_are_named(tmp_path):
    # ResNet-18 widths into a student of other widths: shape mismatch
    path = tmp_path / "resnet18.pth"
    torch.save(torchvision_resnet_basic(widths=(8, 16, 32, 64), num_classes=2), path)
    with pytest.raises(
        ValueError, match=r"resnet18.pth is not a compatible ResNet checkpoint: conv1.weight has shape \(8, 3, 7, 7\)"
    ):
        ResNet18Student(base_width=4).load_pretrained(path)
    # 2D kernels into a 3D encoder
    with pytest.raises(ValueError, match="not a compatible ResNet"):
        ResNet18Student(spatial_dims=3, base_width=8).load_pretrained(path)
    # a DeiT-S file into a branch of another width
    deit = tmp_path / "deit.pth"
    torch.save(timm_deit(embed_dim=24, heads=2), deit)
    vit = VisionTransformerEncoder(3, img_size=32, embed_dim=16, depth=1, num_heads=2)
    with pytest.raises(ValueError, match="deit.pth is not a compatible DeiT checkpoint"):
        load_deit_weights(vit, deit)
    # no key in common (a ViT file given as CNN weights)
    with pytest.raises(ValueError, match="deit.pth has no key of a ResNet state dict"):
        ResNet18Student(base_width=4).load_pretrained(deit)
