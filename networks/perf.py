"""Fast models: memory format, autocast dtype and optional ``torch.compile`` for a ctdistill network.

What each knob does, and where it is on by default (measured with ``python -m pipelines.train_report``):

- ``channels_last`` (NHWC, ``channels_last_3d`` for 3D networks): cuDNN's tensor-core convolutions run natively in
  it (issue 10: the paper teacher's train step on an H200 went from 124 to 212 slices/s), and on this project's
  2-core CPU (oneDNN, AVX-512) the demo-size 2.5D train steps were faster with it too (paired A/B, batch 8 at
  64x64: student x1.26, UNet++ teacher x1.27; README "Speed"), so ``"auto"`` enables it on every device. ``"off"``
  restores NCHW.
- autocast dtype: ``"auto"`` is bfloat16 on a GPU that supports it, float16 on an older GPU, and off on CPU (CPU
  bfloat16 autocast is slower than float32 without AMX and changes the numbers); ``"bf16"``/``"fp16"`` force it.
- ``compile``: ``nn.Module.compile`` (in place, so ``state_dict`` keys stay unprefixed and checkpoints load into a
  plain network). Off by default: the first steps pay the compilation, and the distillation captures add and remove
  forward hooks every iteration, which can make dynamo recompile.

Bundle use (the knobs ``channels_last``, ``amp_dtype``, ``compile``)::

    network: "$networks.perf.prepare_network(@network_def, channels_last=@channels_last, compile=@compile, device=@device)"
    amp: "$networks.perf.autocast_dtype(@device, @amp_dtype) is not None"
    amp_kwargs: "$networks.perf.amp_kwargs(@device, @amp_dtype)"
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

__all__ = [
    "AMP_DTYPES",
    "CHANNELS_LAST_MODES",
    "resolve_device",
    "autocast_dtype",
    "amp_kwargs",
    "use_channels_last",
    "network_spatial_dims",
    "memory_format",
    "prepare_network",
    "to_memory_format",
    "onednn_unsafe_convs",
    "channels_last_for",
]

logger = logging.getLogger(__name__)

#: values of the ``amp_dtype`` knob
AMP_DTYPES: tuple[str, ...] = ("auto", "bf16", "fp16", "off")
#: values of the ``channels_last`` knob (booleans are accepted too)
CHANNELS_LAST_MODES: tuple[str, ...] = ("auto", "on", "off")

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    """``device`` as a ``torch.device``; None means CUDA when available, else CPU.

    Raises:
        ValueError: CUDA requested where ``torch.cuda.is_available()`` is False.
    """
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {str(device)!r} requested but torch.cuda.is_available() is False; use 'cpu'.")
    return dev


def autocast_dtype(device: str | torch.device | None, amp: str | bool | None = "auto") -> torch.dtype | None:
    """The autocast dtype to train and infer with, or None for float32.

    Args:
        device: the device the network runs on (None: CUDA when available).
        amp: ``"auto"`` (bfloat16 on a CUDA device that supports it, float16 on other CUDA devices, off on CPU),
            ``"bf16"``, ``"fp16"``, ``"off"``; ``True`` means ``"auto"``, ``False``/None ``"off"``.

    Returns:
        ``torch.bfloat16``, ``torch.float16`` or None.

    Raises:
        ValueError: an unknown ``amp`` value, or float16 asked for on CPU (no CPU float16 kernels worth using).
    """
    if amp is True:
        amp = "auto"
    if amp is False or amp is None:
        amp = "off"
    if amp not in AMP_DTYPES:
        raise ValueError(f"amp_dtype must be one of {AMP_DTYPES} (or a bool), got {amp!r}.")
    dev = resolve_device(device)
    if amp == "off":
        return None
    if amp == "auto":
        if dev.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and dev.type != "cuda":
        raise ValueError("amp_dtype 'fp16' needs a CUDA device; on CPU use 'bf16' or 'off'.")
    return _DTYPES[amp]


def amp_kwargs(device: str | torch.device | None, amp: str | bool | None = "auto") -> dict[str, Any]:
    """Keyword arguments of ``torch.autocast`` for MONAI engines' ``amp_kwargs`` (empty when autocast is off).

    MONAI's ``SupervisedTrainer``/``SupervisedEvaluator`` autocast on CUDA only; pass ``amp=autocast_dtype(...) is
    not None`` next to these.
    """
    dtype = autocast_dtype(device, amp)
    return {} if dtype is None else {"dtype": dtype}


def use_channels_last(device: str | torch.device | None, channels_last: str | bool | None = "auto") -> bool:
    """Whether to use the channels-last memory format.

    Args:
        device: the device the network runs on.
        channels_last: ``"auto"`` (on: measured faster on CUDA and on this project's CPU), ``"on"``/True,
            ``"off"``/False/None.

    Raises:
        ValueError: an unknown value, or CUDA requested where none is available.
    """
    resolve_device(device)
    if channels_last is None or channels_last is False or channels_last == "off":
        return False
    if channels_last is True or channels_last in ("on", "auto"):
        return True
    raise ValueError(f"channels_last must be one of {CHANNELS_LAST_MODES} (or a bool), got {channels_last!r}.")


def network_spatial_dims(net: nn.Module) -> int:
    """2 or 3: the spatial dimensions of the network's convolutions (2 when it has none).

    Raises:
        ValueError: a network mixing 2D and 3D convolutions (no single memory format fits it).
    """
    dims = {m.weight.ndim - 2 for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Conv3d, nn.ConvTranspose2d, nn.ConvTranspose3d))}
    if len(dims) > 1:
        raise ValueError(f"{type(net).__name__} mixes 2D and 3D convolutions; channels_last needs one of them.")
    return dims.pop() if dims else 2


def memory_format(spatial_dims: int) -> torch.memory_format:
    """``torch.channels_last`` (2D) or ``torch.channels_last_3d`` (3D).

    Raises:
        ValueError: spatial_dims not 2 or 3.
    """
    if spatial_dims == 2:
        return torch.channels_last
    if spatial_dims == 3:
        return torch.channels_last_3d
    raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}.")


#: oneDNN's CPU 1x1 convolution backward-weights in channels-last writes past its workspace (segfault, heap
#: corruption or silently wrong weight gradients) when a strided 1x1 convolution has fewer input channels per group
#: than its vector block of 8; seen on AVX2 and AVX-512 machines with torch 2.13.0+cpu (issue 19).
ONEDNN_MIN_CHANNELS = 8


def onednn_unsafe_convs(net: nn.Module) -> list[str]:
    """Module paths of the convolutions that oneDNN's CPU channels-last kernels mishandle.

    Those are strided 1x1 (1x1x1) convolutions with fewer than :data:`ONEDNN_MIN_CHANNELS` input channels per group,
    e.g. the layer2 downsample of a ResNet18 student with ``base_width`` 4.

    Args:
        net: any module.

    Returns:
        the module paths (empty when channels-last is safe for the network on CPU).
    """
    unsafe = []
    for name, m in net.named_modules():
        if not isinstance(m, (nn.Conv2d, nn.Conv3d)):
            continue
        pointwise = all(int(k) == 1 for k in m.kernel_size)
        strided = any(int(s) > 1 for s in m.stride)
        if pointwise and strided and m.in_channels // m.groups < ONEDNN_MIN_CHANNELS:
            unsafe.append(name or type(m).__name__)
    return unsafe


def channels_last_for(net: nn.Module, device: str | torch.device | None, channels_last: str | bool | None = "auto") -> bool:
    """Whether ``net`` runs channels-last on ``device``: :func:`use_channels_last`, except on CPU for a network with
    :func:`onednn_unsafe_convs` (then False, with one warning naming the convolutions).

    Callers that also convert the input batch (a channels-last input makes oneDNN pick channels-last kernels even
    for a contiguous network) must use this answer, not the knob.

    Raises:
        ValueError: an unknown knob value, or CUDA requested where none is available.
    """
    dev = resolve_device(device)
    if not use_channels_last(dev, channels_last):
        return False
    unsafe = onednn_unsafe_convs(net) if dev.type == "cpu" else []
    if unsafe:
        logger.warning(
            "channels_last disabled for %s on CPU: %d strided 1x1 convolution(s) with fewer than %d input channels "
            "(%s) hit a oneDNN channels-last bug (crash or wrong weight gradients); widen the network to use it.",
            type(net).__name__, len(unsafe), ONEDNN_MIN_CHANNELS, ", ".join(unsafe[:3]) + (", ..." if len(unsafe) > 3 else ""),
        )
        return False
    return True


def to_memory_format(x: torch.Tensor, channels_last: bool) -> torch.Tensor:
    """A ``(B, C, H, W)`` / ``(B, C, H, W, D)`` batch in channels-last layout when asked (other ranks unchanged)."""
    if not channels_last or x.ndim not in (4, 5):
        return x
    return x.contiguous(memory_format=memory_format(x.ndim - 2))


def prepare_network(
    net: nn.Module,
    *,
    channels_last: str | bool | None = "auto",
    compile: bool = False,
    device: str | torch.device | None = None,
    compile_kwargs: Mapping[str, Any] | None = None,
) -> nn.Module:
    """Move a network to its device and memory format, and optionally compile it, in place.

    Args:
        net: the network (its parameters keep their identity, so an optimizer built before or after still works).
        channels_last: see :func:`use_channels_last`.
        compile: compile with ``nn.Module.compile`` (in place: ``state_dict`` keys stay those of the plain network).
        device: target device (None: CUDA when available).
        compile_kwargs: extra ``torch.compile`` arguments, e.g. ``{"mode": "max-autotune"}``.

    Returns:
        the same module object.

    Raises:
        TypeError: ``net`` is not an ``nn.Module``.
        ValueError: a bad knob value, or CUDA requested where none is available.
    """
    if not isinstance(net, nn.Module):
        raise TypeError(f"prepare_network expects an nn.Module, got {type(net).__name__}.")
    dev = resolve_device(device)
    net.to(dev)
    if channels_last_for(net, dev, channels_last):
        net.to(memory_format=memory_format(network_spatial_dims(net)))
    if compile:
        net.compile(**dict(compile_kwargs or {}))
    logger.debug("prepared %s on %s (channels_last=%s, compile=%s)", type(net).__name__, dev, channels_last, compile)
    return net
