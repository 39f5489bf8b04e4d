"""Ignite handlers and helpers of the training and evaluation workflows that are neither checkpoints nor
tracking: per-epoch averages of the trainer output, the loss of an output, the optimised parameters, and extra
transforms (e.g. a prediction writer) applied after every iteration.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from ignite.engine import Engine, Events

from pipelines.engine.errors import BundleInputError, as_bool

__all__ = ["EpochAverager", "NonFiniteLossStop", "SaveOnIteration", "batch_cases", "loss_of", "trainable"]


def trainable(network: torch.nn.Module, distiller: torch.nn.Module | None = None) -> list[torch.nn.Parameter]:
    """Parameters for the optimizer: the student's plus the distiller's connectors (if any)."""
    if distiller is None:
        return [p for p in network.parameters() if p.requires_grad]
    import distill

    return list(distill.trainable_parameters(network, distiller))


class EpochAverager:
    """Average scalar entries of the trainer output over each epoch into ``engine.state.metrics``.

    Collects ``loss`` (as ``train_loss``) and every ``kd_*`` entry the distillation handler stores in the engine
    output, plus the learning rate the epoch trained with (read at ``EPOCH_STARTED``, before the per-epoch scheduler
    steps), so StatsHandler and MLflow log them once per epoch.

    Args:
        prefix_keys: output keys (or prefixes ending with ``*``) to average.
        optimizer: optimizer whose first group's lr is logged as ``lr``.
    """

    def __init__(self, prefix_keys: Sequence[str] = ("loss", "loss_seg", "kd_*"), optimizer: torch.optim.Optimizer | None = None) -> None:
        self.keys = tuple(prefix_keys)
        self.optimizer = optimizer
        self._sum: dict[str, float] = {}
        self._n: dict[str, int] = {}

    def attach(self, engine: Engine) -> None:
        """Register on EPOCH_STARTED / ITERATION_COMPLETED / EPOCH_COMPLETED."""
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _want(self, k: str) -> bool:
        return any(k == p or (p.endswith("*") and k.startswith(p[:-1])) for p in self.keys)

    def _reset(self, engine: Engine) -> None:
        self._sum, self._n = {}, {}
        # the lr this epoch trains with (the scheduler steps at EPOCH_COMPLETED, before this handler publishes)
        self._lr = float(self.optimizer.param_groups[0]["lr"]) if self.optimizer is not None else None

    def _collect(self, engine: Engine) -> None:
        out = engine.state.output
        items = out[0] if isinstance(out, list) and out else out
        if not isinstance(items, Mapping):
            return
        for k, v in items.items():
            if not isinstance(k, str) or not self._want(k):
                continue
            if isinstance(v, torch.Tensor):
                if v.numel() != 1:
                    continue
                v = v.detach().item()
            if isinstance(v, (int, float)):
                self._sum[k] = self._sum.get(k, 0.0) + float(v)
                self._n[k] = self._n.get(k, 0) + 1

    def __call__(self, engine: Engine) -> None:
        """Publish the epoch means (``loss`` -> ``train_loss``)."""
        for k, s in self._sum.items():
            engine.state.metrics["train_loss" if k == "loss" else k] = s / max(self._n[k], 1)
        if getattr(self, "_lr", None) is not None:
            engine.state.metrics["lr"] = self._lr


def loss_of(output: Any) -> float:
    """The scalar loss from a trainer's ``engine.state.output`` (dict, or decollated list of dicts)."""
    item = output[0] if isinstance(output, list) and output else output
    loss = item["loss"] if isinstance(item, Mapping) else item
    return float(loss.detach().item()) if isinstance(loss, torch.Tensor) else float(loss)


def batch_cases(batch: Any, key: str = "image") -> list[str]:
    """The source files of a batch (``filename_or_obj`` of its MetaTensor or meta dict), unique, in order.

    Returns:
        the file names (the device path's batches list them under ``cases``); ``[]`` when the batch carries none.
    """
    items = batch if isinstance(batch, list) else [batch]
    names: list[str] = []
    for item in items:
        if not isinstance(item, Mapping):
            continue
        meta = getattr(item.get(key), "meta", None) or item.get(f"{key}_meta_dict") or {}
        value = meta.get("filename_or_obj") if isinstance(meta, Mapping) else None
        value = list(item["cases"]) if value is None and item.get("cases") is not None else value  # the device path
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if v and str(v) not in names:
                names.append(str(v))
    return names


class NonFiniteLossStop:
    """Stop training at the first non-finite loss, before the optimizer step, naming the batch's cases.

    A NaN/inf voxel that reached training (``--check_data false``) makes the loss NaN; one optimizer step then turns
    every weight NaN, and a run that goes on saves and logs that model with exit 0. This handler checks the loss
    when it is complete (MONAI's ``IterationEvents.LOSS_COMPLETED``: after the KD terms are added, before
    ``backward``) and again at ``ITERATION_COMPLETED`` (for iteration functions that fire no loss event); it raises
    before anything of that step is saved: ``last.pt``/``best.pt`` keep the last finite epoch, the MLflow run ends
    FAILED and no model is logged. An iteration whose loss was checked at ``LOSS_COMPLETED`` is not checked again
    (the check reads the loss back from the device).
    """

    def __init__(self) -> None:
        self._checked = -1  # the iteration whose loss LOSS_COMPLETED checked

    def attach(self, engine: Engine) -> None:
        """Register on ``LOSS_COMPLETED`` (when the engine fires it) and ``ITERATION_COMPLETED``."""
        from monai.engines.utils import IterationEvents

        if IterationEvents.LOSS_COMPLETED in getattr(engine, "_allowed_events", []):
            engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Raise when the current loss is NaN or infinite.

        Raises:
            BundleInputError: naming the epoch, the iteration, the value and the cases of the batch.
        """
        if engine.last_event_name == Events.ITERATION_COMPLETED and self._checked == engine.state.iteration:
            return  # this loss passed at LOSS_COMPLETED
        if engine.last_event_name != Events.ITERATION_COMPLETED:
            self._checked = engine.state.iteration
        out = engine.state.output
        item = out[0] if isinstance(out, list) and out else out
        loss = item.get("loss") if isinstance(item, Mapping) else item
        if not isinstance(loss, torch.Tensor) or bool(torch.isfinite(loss.detach()).all()):
            return
        cases = batch_cases(engine.state.batch)
        listed = ", ".join(cases[:8]) + (", ..." if len(cases) > 8 else "") if cases else "not recorded by this data path"
        raise BundleInputError(
            f"training loss is {loss.detach().float().reshape(-1)[0].item()} at epoch {engine.state.epoch}, iteration "
            f"{engine.state.iteration}; the batch's cases: {listed}. Stopped before the weights were updated (the "
            "checkpoints keep the last finite epoch): check the data with python -m pipelines.check_dataset "
            "(NaN/inf voxels?) or lower --lr."
        )


class SaveOnIteration:
    """Apply extra transforms (e.g. ``Invertd`` + a writer) to a copy of each output item after every iteration.

    Keeps the metrics in the network's grid while the saved label maps go back to each input's geometry.

    Args:
        transforms: callables applied in order to a shallow copy of each decollated output dict.
        enabled: False turns the handler into a no-op (``--save_predictions false``).
    """

    def __init__(self, transforms: Sequence[Any], enabled: bool = True) -> None:
        self.transforms = list(transforms)
        self.enabled = as_bool(enabled)

    def attach(self, engine: Engine) -> None:
        """Register on ITERATION_COMPLETED."""
        if self.enabled:
            engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Run the transforms on every item of ``engine.state.output``."""
        out = engine.state.output
        for item in out if isinstance(out, list) else [out]:
            d = dict(item)
            for t in self.transforms:
                d = t(d)
