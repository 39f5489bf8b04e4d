"""HLFD augmentation (random in-plane rotation, random flips) applied to a whole batch on its device at once.

The per-sample MONAI pipeline of :func:`transforms.augment.build_augmentation` rotates each sample with probability
``rotate_prob`` by an angle uniform in ``[-rotate_degrees, rotate_degrees]`` about the image centre (image bilinear,
label nearest, border padding, same size), then flips along H and along W, each with probability ``flip_prob``.
:class:`BatchRotateFlip` draws the same parameters for a batch from one ``torch.Generator`` and applies them with one
``affine_grid`` / ``grid_sample`` call per key on the rotated sub-batch and ``torch.flip`` on the flipped samples.

Geometry (the same as MONAI's ``Rotate``): output pixel ``p = (i, j)`` reads the input at
``R(angle) @ (p - c) + c`` with ``c = ((H - 1) / 2, (W - 1) / 2)`` and ``R = [[cos, -sin], [sin, cos]]`` over the
(H, W) index axes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

__all__ = ["AugmentParams", "BatchRotateFlip", "rotation_theta"]


@dataclass
class AugmentParams:
    """Augmentation parameters drawn for one batch (all tensors of shape (B,) on the batch's device).

    Attributes:
        rotate: which samples are rotated.
        angles: rotation angles in radians (0 where ``rotate`` is False).
        flip_h: which samples are flipped along H (MONAI ``spatial_axis=0``).
        flip_w: which samples are flipped along W (MONAI ``spatial_axis=1``).
    """

    rotate: torch.Tensor
    angles: torch.Tensor
    flip_h: torch.Tensor
    flip_w: torch.Tensor


def rotation_theta(angles: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """``affine_grid`` matrices (``align_corners=True``) rotating (H, W) images about their centre.

    Args:
        angles: (B,) angles in radians.
        height: H (>= 2).
        width: W (>= 2).

    Returns:
        (B, 2, 3) float tensor on ``angles``' device: normalised output (x = W axis, y = H axis) to normalised input.

    Raises:
        ValueError: an image side below 2 pixels.
    """
    if int(height) < 2 or int(width) < 2:
        raise ValueError(f"rotation needs images of at least 2x2 pixels, got {height}x{width}")
    cos, sin = torch.cos(angles), torch.sin(angles)
    # pixel index (i, j) -> normalised (y, x) = (2 i / (H - 1) - 1, 2 j / (W - 1) - 1): M = D R D^-1 in (i, j) order
    sh, sw = (height - 1) / 2.0, (width - 1) / 2.0
    m_ii, m_ij, m_ji, m_jj = cos, -sin * sw / sh, sin * sh / sw, cos
    zeros = torch.zeros_like(angles)
    # affine_grid works in (x, y) = (j, i) order
    row_x = torch.stack([m_jj, m_ji, zeros], dim=-1)
    row_y = torch.stack([m_ij, m_ii, zeros], dim=-1)
    return torch.stack([row_x, row_y], dim=1)


class BatchRotateFlip:
    """Random rotation and flips of a (B, C, H, W) image batch and its (B, 1, H, W) label, on their device.

    Same parameter ranges and probabilities as :func:`transforms.augment.build_augmentation` (2D), defaults from the
    HLFD recipe. Every call draws exactly ``4 * B`` uniforms from the generator (whatever the outcome), so the stream
    of crops and augmentation parameters is a function of the seed alone.

    Args:
        rotate_degrees: maximum absolute rotation angle in degrees; 0 disables rotation.
        rotate_prob: probability of rotating a sample.
        flip_prob: probability of flipping a sample, separately along H and along W.

    Raises:
        ValueError: a negative angle or a probability outside [0, 1].
    """

    def __init__(self, rotate_degrees: float = 15.0, rotate_prob: float = 0.5, flip_prob: float = 0.5) -> None:
        if float(rotate_degrees) < 0:
            raise ValueError(f"rotate_degrees must be >= 0, got {rotate_degrees}")
        for name, p in (("rotate_prob", rotate_prob), ("flip_prob", flip_prob)):
            if not 0.0 <= float(p) <= 1.0:
                raise ValueError(f"{name} must be within [0, 1], got {p}")
        self.max_angle = math.radians(float(rotate_degrees))
        self.rotate_prob = float(rotate_prob) if rotate_degrees > 0 else 0.0
        self.flip_prob = float(flip_prob)

    def draw(self, batch_size: int, generator: torch.Generator) -> AugmentParams:
        """Draw one batch's parameters on the generator's device.

        Args:
            batch_size: B.
            generator: the run's generator (its device is where the parameters live).

        Returns:
            :class:`AugmentParams`.
        """
        u = torch.rand(4, int(batch_size), generator=generator, device=generator.device)
        rotate = u[0] < self.rotate_prob
        angles = torch.where(rotate, (2.0 * u[1] - 1.0) * self.max_angle, torch.zeros_like(u[1]))
        return AugmentParams(rotate=rotate, angles=angles, flip_h=u[2] < self.flip_prob, flip_w=u[3] < self.flip_prob)

    @staticmethod
    def apply(
        image: torch.Tensor, label: torch.Tensor | None, params: AugmentParams
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Apply drawn parameters: rotation (image bilinear, label nearest, border padding), then the flips.

        Args:
            image: (B, C, H, W) floating tensor.
            label: (B, 1, H, W) floating tensor of class values, or None.
            params: from :meth:`draw` for this B.

        Returns:
            ``(image, label)`` of the same shapes and dtypes (new tensors; the inputs are not modified).

        Raises:
            ValueError: not a 4-D floating batch, or parameters for another batch size.
        """
        if image.ndim != 4 or not image.is_floating_point():
            raise ValueError(f"image must be a floating (B, C, H, W) batch, got {tuple(image.shape)} {image.dtype}")
        if params.rotate.shape[0] != image.shape[0]:
            raise ValueError(f"parameters drawn for {params.rotate.shape[0]} samples, batch has {image.shape[0]}")
        if label is not None and (label.shape[0] != image.shape[0] or label.shape[-2:] != image.shape[-2:]):
            raise ValueError(f"label {tuple(label.shape)} does not match image {tuple(image.shape)}")
        image = image.clone()
        label = None if label is None else label.clone()
        idx = params.rotate.nonzero().squeeze(1)
        if idx.numel() > 0:
            h, w = image.shape[-2:]
            theta = rotation_theta(params.angles[idx].to(torch.float32), h, w)
            grid = F.affine_grid(theta, [idx.numel(), 1, h, w], align_corners=True)
            sub = image[idx]
            image[idx] = F.grid_sample(sub.float(), grid, "bilinear", "border", align_corners=True).to(sub.dtype)
            if label is not None:
                sub = label[idx]
                label[idx] = F.grid_sample(sub.float(), grid, "nearest", "border", align_corners=True).to(sub.dtype)
        fh, fw = params.flip_h.view(-1, 1, 1, 1), params.flip_w.view(-1, 1, 1, 1)
        image = torch.where(fh, image.flip(-2), image)
        image = torch.where(fw, image.flip(-1), image)
        if label is not None:
            label = torch.where(fh, label.flip(-2), label)
            label = torch.where(fw, label.flip(-1), label)
        return image, label

    def __call__(
        self, image: torch.Tensor, label: torch.Tensor | None, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Draw parameters for ``image.shape[0]`` samples and apply them (see :meth:`apply`)."""
        return self.apply(image, label, self.draw(image.shape[0], generator))
