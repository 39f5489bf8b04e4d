"""``networks.create``: build a ctdistill network by name (usable from MONAI bundle configs).

Bundle config example::

    network_def:
      _target_: networks.create
      name: resnet18_student
      spatial_dims: 2
      in_channels: 5
      out_channels: 3
"""

from __future__ import annotations

import importlib
import logging
from typing import Any

from networks.contract import TapNetwork

__all__ = ["NETWORKS", "create", "network_arguments"]

logger = logging.getLogger(__name__)

#: name -> "module:factory" (imported lazily)
_REGISTRY: dict[str, str] = {
    "unetpp_teacher": "networks.unetpp:UNetPlusPlus",
    "resnet18_student": "networks.student:ResNet18Student",
    "transfuse_s": "networks.transfuse:transfuse_s",
    "transfuse_l": "networks.transfuse:transfuse_l",
}

#: valid network names for ``create``
NETWORKS: tuple[str, ...] = tuple(_REGISTRY)


def network_arguments(name: str) -> tuple[str, ...] | None:
    """The keyword arguments :func:`create` accepts for ``name`` (None when the factory takes ``**kwargs``).

    Raises:
        ValueError: an unknown name (listing the valid ones).
    """
    import inspect

    if name not in _REGISTRY:
        raise ValueError(f"Unknown network {name!r}; valid names: {', '.join(NETWORKS)}.")
    module_name, attr = _REGISTRY[name].split(":")
    params = inspect.signature(getattr(importlib.import_module(module_name), attr)).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params):
        return None
    extra = ("encoder_weights",) if name == "resnet18_student" else ("cnn_weights", "vit_weights") if name.startswith("transfuse") else ()
    return tuple(p.name for p in params if p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)) + extra


def create(name: str, **kwargs: Any) -> TapNetwork:
    """Build the network ``name`` with keyword arguments in MONAI's naming.

    Args:
        name: one of ``NETWORKS``:

            - ``unetpp_teacher``: ``spatial_dims=2, in_channels=3, out_channels=3, features="paper"|(...),
              deep_supervision=False, norm="batch"`` (``networks.unetpp.UNetPlusPlus``).
            - ``resnet18_student``: ``spatial_dims=2, in_channels=3, out_channels=3, widths=(64, 128, 256, 512),
              base_width=None, decoder_channels=None, norm="batch", encoder_weights=None``
              (``networks.student.ResNet18Student``; ``encoder_weights``: a local torchvision ResNet-18 state dict).
            - ``transfuse_s`` / ``transfuse_l``: ``spatial_dims=2, in_channels=3, out_channels=1, img_size=352,
              fusion="bifusion", parallel_streams=False, dropout=0.2, embed_dim, depth, num_heads, cnn_widths,
              decoder_channels, head_channels, cnn_weights=None, vit_weights=None``
              (``networks.transfuse.TransFuse``; ``cnn_weights``: a local torchvision ResNet-34 / official
              Res2Net-50 state dict, ``vit_weights``: a local timm DeiT-S / DeiT-B checkpoint).
        **kwargs: passed to the network's constructor.

    Returns:
        the network (a ``TapNetwork``).

    Raises:
        ValueError: for an unknown name (listing the valid ones) or bad arguments (raised by the network).
        TypeError: for an argument the network does not take.
    """
    if name not in _REGISTRY:
        raise ValueError(f"Unknown network {name!r}; valid names: {', '.join(NETWORKS)}.")
    module_name, attr = _REGISTRY[name].split(":")
    factory = getattr(importlib.import_module(module_name), attr)
    if name == "resnet18_student":
        weights = {"source": kwargs.pop("encoder_weights", None)}
    elif name.startswith("transfuse"):
        weights = {"cnn": kwargs.pop("cnn_weights", None), "vit": kwargs.pop("vit_weights", None)}
    else:
        weights = {}
    net = factory(**kwargs)
    if any(v is not None for v in weights.values()):
        net.load_pretrained(**weights)
    logger.debug("created %s with %s", name, kwargs)
    return net
