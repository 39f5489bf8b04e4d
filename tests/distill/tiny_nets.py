"""Tiny TapNetworks (2D or 3D) and numpy reference implementations for the distill tests."""

from __future__ import annotations

import numpy as np
import torch
from monai.networks.layers import Conv
from torch import nn

from networks.contract import FeatureContract, Tap, TapNetwork


class TinyNet(TapNetwork):
    """early (stride 2, w), mid1 (4, 2w), mid2 (8, 2w), late (8, 4w), pred_mid heads (4, 8), head (1)."""

    size_divisor = 8

    def __init__(self, spatial_dims: int = 2, in_channels: int = 1, out_channels: int = 2, width: int = 4,
                 deep_supervision: bool = False) -> None:
        super().__init__()
        self.spatial_dims, self.in_channels, self.out_channels = spatial_dims, in_channels, out_channels
        self.deep_supervision = deep_supervision
        conv, w, k = Conv[Conv.CONV, spatial_dims], width, out_channels
        self.early = nn.Sequential(conv(in_channels, w, 3, stride=2, padding=1), nn.ReLU())
        self.mid1 = nn.Sequential(conv(w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.mid2 = nn.Sequential(conv(2 * w, 2 * w, 3, stride=2, padding=1), nn.ReLU())
        self.late = nn.Sequential(conv(2 * w, 4 * w, 3, padding=1), nn.ReLU())
        self.head_mid1 = conv(2 * w, k, 1)
        self.head_mid2 = conv(2 * w, k, 1)
        self.up = nn.Upsample(scale_factor=8, mode="nearest")
        self.head = conv(4 * w, k, 1)
        self.width = w

    def forward(self, x):
        m1 = self.mid1(self.early(x))
        m2 = self.mid2(m1)
        out = self.head(self.up(self.late(m2)))
        p1, p2 = self.head_mid1(m1), self.head_mid2(m2)
        if self.deep_supervision and self.training:
            return out, p1, p2
        return out

    def feature_contract(self) -> FeatureContract:
        w, k = self.width, self.out_channels
        return FeatureContract(
            early=Tap("early", w, 2),
            mid=(Tap("mid1", 2 * w, 4), Tap("mid2", 2 * w, 8)),
            late=Tap("late", 4 * w, 8),
            pred_mid=(Tap("head_mid1", k, 4), Tap("head_mid2", k, 8)),
            pred_final=Tap("head", k, 1),
        )


def pair(spatial_dims: int = 2, out_channels: int = 2, seed: int = 0):
    """(student width 2, teacher width 4), seeded."""
    torch.manual_seed(seed)
    return TinyNet(spatial_dims, out_channels=out_channels, width=2), TinyNet(spatial_dims, out_channels=out_channels, width=4)


# ---------------- numpy references (independent of distill's code) ----------------

def np_linear_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1-D linear interpolation matrix (n_out, n_in), align_corners=False, as torch computes it."""
    m = np.zeros((n_out, n_in))
    scale = n_in / n_out
    for i in range(n_out):
        src = max((i + 0.5) * scale - 0.5, 0.0)
        i0 = min(int(np.floor(src)), n_in - 1)
        i1 = min(i0 + 1, n_in - 1)
        frac = src - i0
        m[i, i0] += 1 - frac
        m[i, i1] += frac
    return m


def np_area_matrix(n_in: int, n_out: int) -> np.ndarray:
    """1-D area (adaptive average) pooling matrix (n_out, n_in): output i averages [floor(i n_in/n_out), ceil((i+1) n_in/n_out))."""
    m = np.zeros((n_out, n_in))
    for i in range(n_out):
        lo, hi = (i * n_in) // n_out, -((-(i + 1) * n_in) // n_out)
        m[i, lo:hi] = 1.0 / (hi - lo)
    return m


def np_resize(a: np.ndarray, size) -> np.ndarray:
    """Separable resize of (B, C, *S) to size: area averaging along shrinking axes, linear along growing ones."""
    out = a
    for ax, n in enumerate(size):
        axis = 2 + ax
        if out.shape[axis] == n:
            continue
        grow = n > out.shape[axis]
        m = np_linear_matrix(out.shape[axis], n) if grow else np_area_matrix(out.shape[axis], n)
        out = np.moveaxis(np.tensordot(m, np.moveaxis(out, axis, 0), axes=(1, 0)), 0, axis)
    return out


def np_attention(z: np.ndarray, p: float = 4, size=None) -> np.ndarray:
    """HLFD Eq. 1-2 as the paper words it: rescale the representation z to ``size`` FIRST, then the channel mean of
    |z|^p of the rescaled representation, flattened and L2-normalised."""
    if size is not None:
        z = np_resize(z, size)
    a = (np.abs(z) ** p).mean(axis=1, keepdims=True)
    a = a.reshape(a.shape[0], -1)
    return a / np.linalg.norm(a, axis=1, keepdims=True)


def np_at_dist(s: np.ndarray, t: np.ndarray, p: float = 4) -> float:
    a_t = np_attention(t, p)
    a_s = np_attention(s, p, size=t.shape[2:])
    return float(((a_s - a_t) ** 2).sum(axis=1).mean())


def np_softmax(x: np.ndarray, axis: int = 1) -> np.ndarray:
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def np_kl(student_logits: np.ndarray, teacher_probs: np.ndarray, t: float) -> float:
    """T^2 * mean over batch and pixels of sum_c p log(p / q)."""
    s = np_resize(student_logits, teacher_probs.shape[2:])
    q = np_softmax(s / t)
    p = teacher_probs
    return float((p * (np.log(p) - np.log(q))).sum(axis=1).mean() * t * t)


def np_conv1x1(x: np.ndarray, conv: nn.Module) -> np.ndarray:
    """Apply a torch 1x1 conv's weights with numpy."""
    w = conv.weight.detach().double().numpy().reshape(conv.out_channels, conv.in_channels)
    b = conv.bias.detach().double().numpy()
    y = np.einsum("oc,bc...->bo...", w, x)
    return y + b.reshape(1, -1, *([1] * (x.ndim - 2)))


def np_hlfd_terms(sf, tf, connectors):
    """(UFD, IFD, UPD, IPD) in numpy for TinyNet taps (student early/mid1/mid2; teacher mid1/mid2/late/heads)."""
    f = {k: v.detach().double().numpy() for k, v in {**{"s_" + k: v for k, v in sf.items()}, **tf}.items()}
    small = f["mid2"].shape[2:]
    ufd = np_at_dist(f["s_early"], np.concatenate([np_resize(f["mid1"], small), f["mid2"]], 1))
    s_mid = [f["s_mid1"], f["s_mid2"]]
    ifd = sum(np_at_dist(m, f["late"]) for m in s_mid)
    big = f["head_mid1"].shape[2:]
    p_mid = (np_softmax(np_resize(f["head_mid1"], big) / 4) + np_softmax(np_resize(f["head_mid2"], big) / 4)) / 2
    upd = np_kl(np_conv1x1(f["s_early"], connectors["upd"]), p_mid, 4)
    p_fin = np_softmax(f["head"] / 4)
    ipd = float(np.mean([np_kl(np_conv1x1(m, h), p_fin, 4) for m, h in zip(s_mid, connectors["ipd"])]))
    return ufd, ifd, upd, ipd


def distill_once(method: str, seed: int = 0, **weights):
    """One forward of a TinyNet pair through a fresh distiller: ``(student, distiller, student taps, teacher taps)``."""
    import distill

    s_net, t_net = pair(seed=seed)
    x = torch.randn(2, 1, 16, 16)
    d = distill.create_distiller(method, s_net, t_net, **weights)
    with d.student_capture:
        s_net(x)
    return s_net, d, d.student_capture.outputs, d.teacher_features(x)
