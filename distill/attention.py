"""Attention maps of feature tensors (Zagoruyko & Komodakis, ICLR 2017), as HLFD (Gorade et al., ISBI 2024, Eq. 1-2) uses them.

``A(z)`` is the mean over channels of ``|z|^p``, flattened over the spatial axes and L2-normalised. Where the student
and teacher sizes differ, the student's REPRESENTATION ``z`` is rescaled (area-averaged where it shrinks, bi/trilinear where it
grows) to the teacher's spatial size first and the attention map is built from the rescaled representation, as the paper states
("operation A(.) is employed first to rescale the student's representation z_early^s to match the spatial dimension
of the teacher's z_mid^t", Sec. 2) and as the authors' ``importance_maps_distillation`` does (interpolate ``s``,
then ``at(s)``). Resizing the map after the channel mean is NOT equivalent (``|.|^p`` does not commute with
interpolation). The distance is the squared L2 norm of the difference, summed over positions and averaged over the
batch (the authors' ``sum(dim=1).mean()``).

Two deliberate numeric choices (neither changes the paper's value where the paper's arithmetic is exact):

- Shrinking a representation uses area averaging (``networks.blocks.resize_to``), not plain bilinear sampling, so
  every student position receives gradient (bilinear without antialiasing reaches only 25 % of a 2D map in a 4x
  shrink). Enlarging stays (bi/tri)linear.
- ``A`` is scale-invariant (``A(c z) = A(z)`` for ``c > 0``), so each sample's representation is divided by its
  largest ``|z|`` (over channels and positions) before ``|z|^p``: the result is the same, but with ``p = 4`` and
  small activations ``|z|^p`` no longer underflows to 0 in float32 (which silently made the term constant with zero
  gradient). The scale is detached: since ``A`` does not depend on it, its exact gradient is zero.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from networks.blocks import resize_to

__all__ = ["resize_to", "unit_scaled", "spatial_attention", "attention_map", "attention_distance"]


def unit_scaled(z: torch.Tensor) -> torch.Tensor:
    """``z`` divided, per sample, by its largest absolute value over channels and positions (detached).

    Exact for scale-invariant functions such as ``A``; an all-zero sample stays zero.

    Args:
        z: ``(B, C, *spatial)``.

    Returns:
        same shape, ``max |z| = 1`` per non-zero sample.
    """
    scale = z.detach().abs().flatten(1).amax(dim=1).clamp_min(torch.finfo(z.dtype).tiny)
    return z / scale.view(-1, *([1] * (z.ndim - 1)))

def spatial_attention(z: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """Un-normalised attention ``mean_c |z_c|^p``.

    Args:
        z: features ``(B, C, *spatial)``.
        p: exponent (default 4, as EMKD and the HLFD authors' code use).

    Returns:
        ``(B, 1, *spatial)``.
    """
    return z.abs().pow(p).mean(dim=1, keepdim=True)


def attention_map(z: torch.Tensor, p: float = 4.0, size: Sequence[int] | None = None) -> torch.Tensor:
    """``A(z)``: the representation optionally rescaled to ``size``, then channel-mean of ``|z|^p``, flattened and
    L2-normalised (HLFD Eq. 1-2: rescale first, attention of the rescaled representation).

    ``z`` is divided by its per-sample maximum ``|z|`` before the power (``unit_scaled``): the same map, without
    float underflow for small activations (``A(1e-6 z) == A(z)``).

    Args:
        z: features ``(B, C, *spatial)`` (2D or 3D).
        p: exponent.
        size: spatial size to rescale the representation to (the teacher's size for a student map), or None.

    Returns:
        ``(B, N)`` with unit L2 norm per sample, ``N`` the number of positions (of ``size`` when given).
    """
    if size is not None:
        z = resize_to(z, size)
    return F.normalize(spatial_attention(unit_scaled(z), p).flatten(1), p=2, dim=1)


def attention_distance(student: torch.Tensor, teacher: torch.Tensor, p: float = 4.0) -> torch.Tensor:
    """``mean_b sum_n (A(s)_bn - A(t)_bn)^2`` with the student representation rescaled to the teacher's spatial size.

    Args:
        student: ``(B, Cs, *spatial_s)``.
        teacher: ``(B, Ct, *spatial_t)``; channels may differ from the student's.
        p: exponent of ``A``.

    Returns:
        scalar tensor (0 when both maps agree after resizing; at most 4, since both maps are unit vectors).

    Raises:
        ValueError: when batch sizes or numbers of spatial axes differ.
    """
    if student.shape[0] != teacher.shape[0] or student.ndim != teacher.ndim:
        raise ValueError(f"Cannot compare student {tuple(student.shape)} with teacher {tuple(teacher.shape)}.")
    a_t = attention_map(teacher, p)
    a_s = attention_map(student, p, size=teacher.shape[2:])
    return (a_s - a_t).pow(2).sum(dim=1).mean()
