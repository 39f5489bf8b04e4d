"""Capture intermediate outputs of a network by dotted module path, with forward hooks.

Paths are resolved when the capture is built, against ``model.named_modules()``; a model wrapped by
``DistributedDataParallel``/``DataParallel`` (or anything that prefixes names with ``module.``) is handled
transparently. Outputs are recorded only while the capture is open (``with capture: model(x)``); opening
clears what a previous pass recorded. Hooks exist only while open, so the model carries none otherwise.

``OUTPUT_PATH`` (``"<output>"``) names the model's own forward output (the first element when the model
returns a tuple, e.g. deep supervision).
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["OUTPUT_PATH", "unwrap", "resolve_module", "FeatureCapture"]

logger = logging.getLogger(__name__)

OUTPUT_PATH = "<output>"
_PREFIX = "module."


def unwrap(model: nn.Module | None) -> nn.Module | None:
    """Return the network inside ``DistributedDataParallel``/``DataParallel`` wrappers, else ``model`` itself.

    Args:
        model: a network, possibly wrapped (several levels are unwrapped), or None.

    Returns:
        the innermost network; None for None.
    """
    while isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        model = model.module
    return model


def resolve_module(model: nn.Module, path: str) -> nn.Module:
    """Find the submodule at a dotted path, also through a ``module.`` wrapper prefix.

    Args:
        model: the network (possibly wrapped).
        path: dotted path as listed by ``named_modules()`` of the unwrapped network, or ``OUTPUT_PATH``.

    Returns:
        the module (the unwrapped network itself for ``OUTPUT_PATH``).

    Raises:
        ValueError: for an unknown path, listing the closest existing names.
    """
    if path == OUTPUT_PATH:
        return unwrap(model)
    modules = dict(model.named_modules())
    for candidate in (path, _PREFIX + path, path[len(_PREFIX) :] if path.startswith(_PREFIX) else None):
        if candidate and candidate in modules:
            return modules[candidate]
    names = [n[len(_PREFIX) :] if n.startswith(_PREFIX) else n for n in modules if n]
    close = difflib.get_close_matches(path, names, n=5, cutoff=0.3)
    hint = f"closest: {', '.join(close)}" if close else f"some valid paths: {', '.join(names[:10])}"
    raise ValueError(f"No module {path!r} in {type(unwrap(model)).__name__}; {hint}.")


class FeatureCapture:
    """Record the outputs of named submodules during forward passes made inside a ``with`` block.

    Args:
        model: the network (plain or DDP/DataParallel-wrapped).
        paths: ``{name: dotted module path}``; ``OUTPUT_PATH`` captures the network output.

    Raises:
        ValueError: for an unknown path (see ``resolve_module``) or an empty mapping.

    Example::

        cap = FeatureCapture(net, {"early": "encoder.layer1", "out": OUTPUT_PATH})
        with cap:
            net(x)
        cap.outputs["early"]  # tensor (B, C, H/4, W/4)

    A module called several times in one forward keeps its last output. Multi-GPU ``DataParallel`` replicas are
    not supported (use DDP).
    """

    def __init__(self, model: nn.Module, paths: Mapping[str, str]) -> None:
        if not paths:
            raise ValueError("FeatureCapture needs at least one {name: path}.")
        self.model = model
        self.paths = dict(paths)
        self._modules = {name: resolve_module(model, p) for name, p in self.paths.items()}
        self._handles: list = []
        self._outputs: dict[str, torch.Tensor] = {}

    @property
    def is_open(self) -> bool:
        return bool(self._handles)

    @property
    def outputs(self) -> dict[str, torch.Tensor]:
        """``{name: tensor}`` recorded during the last open period (a copy of the dict, not of the tensors)."""
        return dict(self._outputs)

    def _hook(self, name: str):
        def hook(_module, _inputs, output):
            if isinstance(output, (tuple, list)):
                output = output[0]
            self._outputs[name] = output

        return hook

    def open(self) -> FeatureCapture:
        """Clear previous outputs and start recording (re-opening an open capture restarts it)."""
        self.close()
        self._outputs.clear()
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in self._modules.items()]
        return self

    def close(self) -> None:
        """Stop recording (remove the hooks); the recorded outputs stay readable until ``clear``/``open``."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def clear(self) -> None:
        """Drop recorded outputs (releases their autograd graphs)."""
        self._outputs.clear()

    def __enter__(self) -> FeatureCapture:
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()
