"""Load a trained teacher from a checkpoint, and the marker that says a network holds trained weights.

Accepted checkpoint formats (``torch.load(..., weights_only=True)``):

1. the bundles' dict: ``{"model": state_dict, "network": {create() kwargs, optionally "name"}, ...}``
   (other keys such as ``"optimizer"``, ``"epoch"`` are ignored);
2. ``{"state_dict": state_dict, ...}``;
3. a raw state dict ``{parameter name: tensor}``.

A ``module.`` prefix on every key (a DDP-saved model) is stripped. Loading is strict: missing or unexpected keys and
shape mismatches are errors that name the keys.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distill.capture import unwrap
from distill.distiller import freeze

__all__ = ["TRAINED_ATTR", "mark_trained", "trained_source", "read_checkpoint", "load_teacher"]

logger = logging.getLogger(__name__)

#: attribute set on a network whose weights were loaded from a checkpoint (value: the source path)
TRAINED_ATTR = "ctdistill_checkpoint"


def mark_trained(model: nn.Module, source: str) -> nn.Module:
    """Record that ``model`` holds trained weights from ``source`` (e.g. a checkpoint path); returns the model."""
    setattr(unwrap(model), TRAINED_ATTR, str(source))
    return model


def trained_source(model: nn.Module) -> str | None:
    """The source recorded by ``mark_trained``/``load_teacher``, or None for a network with untrained weights."""
    return getattr(unwrap(model), TRAINED_ATTR, None)


def read_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read a checkpoint file into ``(state_dict, network kwargs)``.

    Args:
        path: a ``.pt``/``.pth`` file in one of the module's accepted formats.

    Returns:
        the state dict (``module.`` prefix stripped) and the ``"network"`` kwargs (empty when absent).

    Raises:
        FileNotFoundError: missing file. ValueError: unreadable file or no weights in it.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Teacher checkpoint {str(path)!r} does not exist; train the teacher bundle first.")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle/zip errors have many types
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]  # torch's own message spans many lines
        raise ValueError(
            f"Cannot read teacher checkpoint {str(path)!r} as a weights-only torch file (truncated, not a PyTorch "
            f"file, or holding objects other than weights, which are never run) [{type(e).__name__}: {first}]"
        ) from e
    net_kwargs: dict[str, Any] = {}
    state: Any = obj
    if isinstance(obj, Mapping) and ("model" in obj or "state_dict" in obj):
        state = obj.get("model", obj.get("state_dict"))
        net_kwargs = dict(obj.get("network") or {})
    if not isinstance(state, Mapping) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        keys = list(obj)[:10] if isinstance(obj, Mapping) else type(obj).__name__
        raise ValueError(
            f"Teacher checkpoint {str(path)!r} holds no weights (expected {{'model': state_dict}} or a state dict; "
            f"found {keys})."
        )
    state = dict(state)
    if all(k.startswith("module.") for k in state):
        state = {k[len("module.") :]: v for k, v in state.items()}
    return state, net_kwargs


def load_teacher(
    checkpoint_path: str | Path, network_name: str | Mapping[str, Any] | None = None, **network_kwargs: Any
) -> nn.Module:
    """Build a network with ``networks.create`` and load trained weights into it (strict), frozen and marked trained.

    Args:
        checkpoint_path: checkpoint file (formats in the module docstring).
        network_name: a ``networks.NETWORKS`` name; None takes ``checkpoint["network"]["name"]``. A mapping is read
            as network kwargs (optionally with ``"name"``), i.e. ``load_teacher(path, {"name": ..., **kwargs})``.
        network_kwargs: ``networks.create`` kwargs; they update the checkpoint's ``"network"`` kwargs.

    Returns:
        the teacher in eval mode with ``requires_grad=False`` and ``trained_source(teacher) == str(checkpoint_path)``.

    Raises:
        FileNotFoundError: missing file. ValueError: no weights, no network name, or keys/shapes that do not match
        the network (the message lists some of them).
    """
    import networks  # local import: networks is a sibling package built concurrently
    from networks.weights import state_mismatch

    if isinstance(network_name, Mapping):
        network_kwargs = {**{k: v for k, v in network_name.items() if k != "name"}, **network_kwargs}
        network_name = network_name.get("name")
    state, saved = read_checkpoint(checkpoint_path)
    kwargs = {k: v for k, v in saved.items() if k != "name"}
    kwargs.update(network_kwargs)
    name = network_name or saved.get("name")
    if not name:
        raise ValueError(
            f"No network name for teacher checkpoint {str(checkpoint_path)!r}: pass network_name (one of "
            f"{', '.join(getattr(networks, 'NETWORKS', ()))})."
        )
    model = networks.create(name, **kwargs)
    missing, unexpected, shapes = state_mismatch(model, state)
    if missing or unexpected or shapes:
        expected = model.state_dict()
        raise ValueError(
            f"Teacher checkpoint {str(checkpoint_path)!r} does not match network {name!r} with {kwargs}: "
            f"{len(missing)} missing keys {missing[:5]}, {len(unexpected)} unexpected keys {unexpected[:5]}, "
            f"{len(shapes)} shape mismatches {[(k, tuple(state[k].shape), tuple(expected[k].shape)) for k in shapes[:5]]}."
        )
    model.load_state_dict(state, strict=True)
    logger.info("Loaded teacher %s from %s", name, checkpoint_path)
    return mark_trained(freeze(model), str(checkpoint_path))
