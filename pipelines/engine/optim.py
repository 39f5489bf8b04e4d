"""Optimisation recipe pieces the bundles share: learning-rate schedule with warm-up, gradient clipping.

The HLFD paper (Gorade et al., ISBI 2024, Sec. 3) trains every network with Adam (0.9, 0.999) at 1e-3 and cosine
annealing to 1e-6. For the paper-size UNet++ teacher that recipe was unstable (validation tumor DSC falling between
epochs); the two standard remedies are available as knobs, off unless a role turns them on:

- ``warmup_epochs``: linear warm-up of the learning rate from ``lr / (warmup_epochs + 1)`` to ``lr`` over the first
  epochs, then cosine annealing over the remaining ones (``build_lr_scheduler``);
- ``grad_clip``: clip the global L2 norm of the gradients before every optimiser step (``GradientClipper``); with
  AMP the gradients are unscaled first, so the threshold is in true gradient units. The norm before clipping is
  written to ``engine.state.output["grad_norm"]`` (epoch mean logged as a metric by ``EpochAverager``).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from ignite.engine import Engine

__all__ = ["build_lr_scheduler", "fast_forward", "GradientClipper"]

logger = logging.getLogger(__name__)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer, epochs: int, lr_min: float = 1e-6, warmup_epochs: int = 0
) -> torch.optim.lr_scheduler.LRScheduler:
    """Cosine annealing to ``lr_min`` over ``epochs`` (stepped once per epoch), optionally after a linear warm-up.

    Args:
        optimizer: the optimiser (its ``lr`` is the peak learning rate).
        epochs: total training epochs (>= 1).
        lr_min: final learning rate (>= 0).
        warmup_epochs: epochs of linear warm-up (0 = none, the paper's plain cosine); a value >= ``epochs`` (e.g.
            the teacher's default 5 in a 1-epoch smoke run) is reduced to ``epochs - 1`` with a warning.

    Returns:
        ``CosineAnnealingLR(T_max=epochs)`` without warm-up; else ``SequentialLR`` of ``LinearLR`` (start factor
        ``1 / (warmup_epochs + 1)``) for ``warmup_epochs`` epochs and ``CosineAnnealingLR(T_max=epochs -
        warmup_epochs)``.

    Raises:
        ValueError: epochs < 1, lr_min < 0, warmup_epochs < 0.
    """
    epochs, warmup_epochs, lr_min = int(epochs), int(warmup_epochs), float(lr_min)
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}.")
    if lr_min < 0 or math.isnan(lr_min):
        raise ValueError(f"lr_min must be >= 0, got {lr_min}.")
    if warmup_epochs < 0:
        raise ValueError(f"warmup_epochs must be >= 0 (0 = no warm-up), got {warmup_epochs}.")
    if warmup_epochs >= epochs:
        logger.warning("warmup_epochs %d >= epochs %d: warming up over %d epoch(s) instead", warmup_epochs, epochs, epochs - 1)
        warmup_epochs = epochs - 1
    sched = torch.optim.lr_scheduler
    if warmup_epochs == 0:
        return sched.CosineAnnealingLR(optimizer, T_max=epochs, eta_min=lr_min)
    warm = sched.LinearLR(optimizer, start_factor=1.0 / (warmup_epochs + 1), end_factor=1.0, total_iters=warmup_epochs)
    cosine = sched.CosineAnnealingLR(optimizer, T_max=epochs - warmup_epochs, eta_min=lr_min)
    return sched.SequentialLR(optimizer, [warm, cosine], milestones=[warmup_epochs])


def fast_forward(
    scheduler: Any, optimizer: torch.optim.Optimizer, epochs_done: int, initial_lrs: Sequence[float] | None = None
) -> None:
    """Position a freshly built per-epoch scheduler after ``epochs_done`` epochs (resume).

    The schedule is rebuilt for THIS run's settings (a resumed run with a new ``--epochs``, ``--warmup_epochs`` or
    ``--lr`` continues on the new curve) rather than restored from the checkpoint: every group's lr is reset to its
    peak value and the scheduler is stepped ``epochs_done`` times, which reproduces exactly the lr an uninterrupted
    run with these settings would have at that epoch.

    Args:
        scheduler: a torch lr scheduler stepped once per epoch, built on ``optimizer`` and not stepped since.
        optimizer: its optimiser (after ``load_state_dict``, whose saved lr values are overwritten).
        epochs_done: epochs already trained (>= 0).
        initial_lrs: the peak lr of each group as this run configured it (read BEFORE loading the optimiser state);
            None: each group's ``initial_lr``.

    Raises:
        ValueError: negative ``epochs_done`` or one lr per group not given.
    """
    if int(epochs_done) < 0:
        raise ValueError(f"epochs_done must be >= 0, got {epochs_done}.")
    groups = optimizer.param_groups
    lrs = [g.get("initial_lr", g["lr"]) for g in groups] if initial_lrs is None else [float(x) for x in initial_lrs]
    if len(lrs) != len(groups):
        raise ValueError(f"initial_lrs has {len(lrs)} values for {len(groups)} parameter groups.")
    for g, lr in zip(groups, lrs):
        g["initial_lr"] = g["lr"] = lr
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "lr_scheduler.step() before optimizer.step()": intended here
        for _ in range(int(epochs_done)):
            scheduler.step()


class GradientClipper:
    """Clip the global gradient norm of the optimiser's parameters after backward, before the step.

    Attached to ``IterationEvents.BACKWARD_COMPLETED`` of a MONAI ``SupervisedTrainer`` (after the distillation
    handler's connector all-reduce, which is registered earlier). With AMP (``engine.scaler``) the gradients are
    unscaled first (``GradScaler.unscale_``; the scaler's ``step`` then skips a second unscale).

    Args:
        optimizer: the trainer's optimiser (its parameters are clipped together).
        max_norm: threshold of the global L2 norm; 0 (or None) disables clipping (the norm is still recorded).

    Raises:
        ValueError: a negative or NaN ``max_norm``.
    """

    def __init__(self, optimizer: torch.optim.Optimizer, max_norm: float | None = 0.0) -> None:
        max_norm = 0.0 if max_norm is None else float(max_norm)
        if max_norm < 0 or math.isnan(max_norm):
            raise ValueError(f"grad_clip must be >= 0 (0 = off), got {max_norm}.")
        self.optimizer, self.max_norm = optimizer, max_norm

    def attach(self, engine: Engine) -> None:
        """Register on ``BACKWARD_COMPLETED``."""
        from monai.engines.utils import IterationEvents

        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        """Unscale (AMP), clip to ``max_norm`` (when > 0) and store the pre-clip norm as ``output["grad_norm"]``."""
        scaler = getattr(engine, "scaler", None)
        if scaler is not None and getattr(engine, "amp", False):
            scaler.unscale_(self.optimizer)
        params = [p for g in self.optimizer.param_groups for p in g["params"] if p.grad is not None]
        if not params:
            return
        limit = self.max_norm if self.max_norm > 0 else math.inf
        norm = torch.nn.utils.clip_grad_norm_(params, limit)
        output: Any = engine.state.output
        if isinstance(output, dict):
            output["grad_norm"] = float(norm)
