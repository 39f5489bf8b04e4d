"""Training augmentation as in HLFD: random rotation and flips, no Gaussian noise unless asked for."""

from __future__ import annotations

import math

from monai.transforms import Compose, RandFlipd, RandGaussianNoised, RandRotated

__all__ = ["build_augmentation"]


def build_augmentation(
    spatial_dims: int = 2,
    *,
    rotate_degrees: float = 15.0,
    rotate_prob: float = 0.5,
    flip_prob: float = 0.5,
    noise_std: float = 0.0,
    noise_prob: float = 0.0,
    image_key: str = "image",
    label_key: str | None = "label",
) -> Compose:
    """Random in-plane rotation, random flips along both in-plane axes, optional Gaussian noise (off by default).

    HLFD (ISBI 2024, Sec. 3) trains with random rotation and flipping and reports Gaussian-noise augmentation as
    unsuitable for medical images, hence ``noise_prob=0`` by default. Images are resampled bilinearly, labels with
    nearest neighbour (values stay integer classes). Rotation is always in the axial (H, W) plane.

    Args:
        spatial_dims: 2 for 2.5D crops (C, H, W), 3 for patches (C, H, W, D).
        rotate_degrees: maximum absolute rotation angle in degrees (uniform in [-a, a]); 0 disables rotation.
        rotate_prob: probability of rotating a sample.
        flip_prob: probability of flipping, separately for each in-plane axis.
        noise_std: Gaussian noise standard deviation (in output intensity units) when enabled.
        noise_prob: probability of adding noise (0: never, the paper's choice).
        image_key: image key.
        label_key: label key or None (image only).

    Returns:
        A Compose of MONAI random dict transforms; shapes unchanged.

    Raises:
        ValueError: bad ``spatial_dims``, negative angle or std, or probabilities outside [0, 1].
    """
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    if rotate_degrees < 0 or noise_std < 0:
        raise ValueError(f"rotate_degrees and noise_std must be >= 0, got {rotate_degrees}, {noise_std}")
    for name, p in (("rotate_prob", rotate_prob), ("flip_prob", flip_prob), ("noise_prob", noise_prob)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {p}")
    keys = [image_key] if label_key is None else [image_key, label_key]
    modes = ["bilinear"] if label_key is None else ["bilinear", "nearest"]
    ops = []
    if rotate_degrees > 0 and rotate_prob > 0:
        angle = math.radians(rotate_degrees)
        # 2D: range_x is the (H, W) plane; 3D: range_z rotates about the last (axial) axis, i.e. in (H, W).
        plane = {"range_x": angle} if spatial_dims == 2 else {"range_z": angle}
        ops.append(RandRotated(keys=keys, prob=rotate_prob, mode=modes, padding_mode="border", keep_size=True, **plane))
    if flip_prob > 0:
        ops += [RandFlipd(keys=keys, prob=flip_prob, spatial_axis=axis) for axis in (0, 1)]
    if noise_prob > 0 and noise_std > 0:
        ops.append(RandGaussianNoised(keys=image_key, prob=noise_prob, std=noise_std))
    return Compose(ops)
