"""Pretrained weights from local files only: torchvision / official Res2Net CNN encoders and timm DeiT ViTs.

Nothing is downloaded. The CNN encoders (``networks.resnet.ResNetEncoder``) use torchvision's ResNet and the official
Res2Net module names, and the ViT branch (``networks.vit.VisionTransformerEncoder``) timm's, so keys map one to
one; what does not fit is reported, not silently ignored:

- ``fc.*`` (classifier), ``layer4.*`` for TransFuse's three-stage CNN, DeiT's ``cls_token``, ``dist_token``,
  ``head*`` and the blocks beyond the branch depth end up in ``unexpected`` (dropped);
- DeiT position embeddings lose their class/distillation tokens and are bicubically resampled to the branch's grid;
- the first convolution (``conv1.weight`` / ``patch_embed.proj.weight``) is adapted to k input channels as
  segmentation_models_pytorch does: k = 1 sums the RGB kernels, otherwise the kernels are cycled
  (channel i takes pretrained channel i mod 3) and rescaled by 3 / k.

Every load logs and returns a ``LoadReport``. A missing file is FileNotFoundError and an unreadable or
incompatible one (no matching key, a shape that cannot be adapted) a ValueError, both naming the file.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from networks.vit import resample_pos_embed

__all__ = [
    "LoadReport",
    "Source",
    "read_state_dict",
    "state_mismatch",
    "adapt_input_channels",
    "load_resnet_weights",
    "load_deit_weights",
]

logger = logging.getLogger(__name__)

Source = str | Path | Mapping[str, torch.Tensor]
_WRAPPER_KEYS = ("model", "state_dict", "model_state", "model_state_dict", "module")


@dataclass
class LoadReport:
    """What a weight load did.

    Attributes:
        source: the file (or "<state dict>").
        loaded: target keys that received a tensor.
        missing: target keys left at their initial values.
        unexpected: file keys that were not used (dropped).
        adapted: human-readable notes (first conv channel adaptation, position-embedding resampling).
    """

    source: str
    loaded: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    adapted: list[str] = field(default_factory=list)

    def log(self, what: str) -> None:
        logger.info("%s: loaded %d tensors from %s", what, len(self.loaded), self.source)
        for note in self.adapted:
            logger.info("%s: %s", what, note)
        if self.missing:
            logger.warning("%s: %d keys missing from %s: %s", what, len(self.missing), self.source, self.missing)
        if self.unexpected:
            logger.info("%s: %d unused keys in %s: %s", what, len(self.unexpected), self.source, self.unexpected)


def read_state_dict(source: Source) -> tuple[dict[str, torch.Tensor], str]:
    """Read a state dict from a local file (or pass a mapping through).

    Unwraps ``{"model": ...}`` / ``{"state_dict": ...}`` checkpoints and strips a ``module.`` prefix.

    Returns:
        ``(state_dict, source_name)``.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the file cannot be read with ``torch.load(weights_only=True)`` or holds no tensors.
    """
    if isinstance(source, Mapping):
        raw, name = dict(source), "<state dict>"
    else:
        path = Path(source).expanduser()
        name = str(path)
        if not path.is_file():
            raise FileNotFoundError(
                f"Pretrained weights file not found: {path}. Weights are never downloaded; give a local file."
            )
        try:
            raw = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - any unpickling failure means "not a weights file"
            raise ValueError(f"Cannot read pretrained weights from {path}: {type(err).__name__}: {err}") from err
    for key in _WRAPPER_KEYS:
        if isinstance(raw, Mapping) and key in raw and isinstance(raw[key], Mapping):
            raw = raw[key]
            break
    if not isinstance(raw, Mapping):
        raise ValueError(f"{name} does not hold a state dict (got {type(raw).__name__}).")
    state = {re.sub(r"^module\.", "", str(k)): v for k, v in raw.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{name} holds no tensors; is it a weights file?")
    return state, name


def state_mismatch(model: nn.Module, state: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str], list[str]]:
    """How a state dict fails a strict ``load_state_dict`` into ``model``.

    Returns:
        ``(missing, unexpected, shapes)``: sorted keys the model has and the state lacks, keys the state has and the
        model lacks, and shared keys whose shapes differ (all empty when a strict load will succeed).
    """
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state) if tuple(expected[k].shape) != tuple(state[k].shape))
    return missing, unexpected, shapes


def adapt_input_channels(weight: torch.Tensor, in_channels: int) -> torch.Tensor:
    """Adapt a first-layer kernel ``(out, c, *k)`` to ``in_channels`` inputs (segmentation_models_pytorch's rule).

    ``in_channels == c``: unchanged; ``1``: sum over the input channels; otherwise channel ``i`` takes pretrained
    channel ``i % c`` and the result is scaled by ``c / in_channels`` (keeps the response to a constant image).
    """
    c = weight.shape[1]
    if in_channels == c:
        return weight
    if in_channels == 1:
        return weight.sum(dim=1, keepdim=True)
    idx = torch.arange(in_channels) % c
    return weight[:, idx] * (c / in_channels)


def _load(
    module: nn.Module,
    state: Mapping[str, torch.Tensor],
    name: str,
    what: str,
    first_conv: str,
    in_channels: int,
    report: LoadReport,
) -> LoadReport:
    target = module.state_dict()
    new: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if key not in target:
            report.unexpected.append(key)
            continue
        want = target[key].shape
        if key == first_conv and value.ndim == len(want) and value.shape[1] != want[1]:
            value = adapt_input_channels(value, in_channels)
            report.adapted.append(f"{key}: adapted from {state[key].shape[1]} to {in_channels} input channels")
        if value.shape != want:
            raise ValueError(
                f"{name} is not a compatible {what} checkpoint: {key} has shape {tuple(value.shape)}, "
                f"the network expects {tuple(want)}."
            )
        new[key] = value
    if not new:
        raise ValueError(
            f"{name} has no key of a {what} state dict (first keys: {list(state)[:5]}); expected e.g. {list(target)[:3]}."
        )
    module.load_state_dict(new, strict=False)
    report.loaded = sorted(new)
    report.missing = sorted(k for k in target if k not in new)
    report.unexpected.sort()
    report.log(what)
    return report


def load_resnet_weights(encoder: nn.Module, source: Source) -> LoadReport:
    """Load a torchvision ResNet (or official Res2Net) state dict into a ``ResNetEncoder``.

    Args:
        encoder: a ``networks.resnet.ResNetEncoder`` (the student's ``encoder``, TransFuse's ``cnn``).
        source: a local ``.pth`` file or a state dict with torchvision keys (``conv1.weight``, ``bn1.*``,
            ``layer1.0.conv1.weight``, ..., ``fc.*``) or official Res2Net keys (``layer1.0.convs.0.weight``, ...).

    Returns:
        the ``LoadReport`` (``fc.*`` and stages the encoder lacks are in ``unexpected``).

    Raises:
        FileNotFoundError, ValueError: see ``read_state_dict``; ValueError for a shape that does not fit.
    """
    state, name = read_state_dict(source)
    in_channels = encoder.conv1.weight.shape[1]
    what = "Res2Net" if getattr(encoder, "block", "basic") == "res2net" else "ResNet"
    return _load(encoder, state, name, what, "conv1.weight", in_channels, LoadReport(name))


def load_deit_weights(vit: nn.Module, source: Source) -> LoadReport:
    """Load a timm-format DeiT / ViT checkpoint into a ``VisionTransformerEncoder``.

    Drops ``cls_token``/``dist_token``, their position embeddings, the heads and blocks beyond ``vit.depth``;
    resamples the patch position embeddings to ``vit.grid``; adapts ``patch_embed.proj.weight`` to the input
    channels.

    Args:
        vit: the TransFuse ``transformer`` branch.
        source: a local file (DeiT's ``{"model": state_dict}`` checkpoints are unwrapped) or a state dict.

    Returns:
        the ``LoadReport``.

    Raises:
        FileNotFoundError, ValueError: see ``read_state_dict``; ValueError for an embedding width or position
        embedding that does not fit.
    """
    state, name = read_state_dict(source)
    state = dict(state)
    report = LoadReport(name)
    if "pos_embed" in state:
        pos = state["pos_embed"]
        prefix = int("cls_token" in state) + int("dist_token" in state)
        n = pos.shape[1] - prefix
        side = math.isqrt(max(n, 0))
        if pos.ndim != 3 or side * side != n:
            raise ValueError(
                f"{name}: pos_embed {tuple(pos.shape)} is not a square patch grid after {prefix} class tokens."
            )
        if pos.shape[-1] != vit.embed_dim:
            raise ValueError(
                f"{name} is not a compatible DeiT checkpoint: embedding width {pos.shape[-1]}, the branch has {vit.embed_dim}."
            )
        state["pos_embed"] = resample_pos_embed(pos[:, prefix:], (side, side), vit.grid)
        report.adapted.append(
            f"pos_embed: dropped {prefix} class token(s), resampled {side}x{side} -> {vit.grid[0]}x{vit.grid[1]}"
        )
    extra = sorted(
        {int(m.group(1)) for k in state if (m := re.match(r"blocks\.(\d+)\.", k)) and int(m.group(1)) >= vit.depth}
    )
    if extra:
        report.adapted.append(f"dropped transformer blocks {extra[0]}..{extra[-1]} (the branch has {vit.depth} layers)")
    in_channels = vit.patch_embed.proj.weight.shape[1]
    return _load(vit, state, name, "DeiT", "patch_embed.proj.weight", in_channels, report)
