"""Feature contract shared by every ctdistill network.

Each network declares *named taps*: stable dotted module paths (as listed by ``named_modules()``) whose
outputs are the features and predictive maps that distillation losses and visualisation use. Capture
happens from outside, with forward hooks (see ``distill.capture``); ``forward()`` stays clean.

Tap names (the contract, after the HLFD paper, Fig. 1):

- ``early``: the student's/teacher's early encoder feature (the shallowest feature used by UFD/UPD).
- ``mid.0 .. mid.{n-1}``: middle features, shallow to deep (IFD/IPD student side; UFD teacher side).
- ``late``: the terminal representation (bottleneck), IFD teacher side and IMF/HIFD baselines.
- ``pred_mid.0 ..``: predictive maps (class logits) of intermediate decoder levels, where the network has
  them (UNet++ deep-supervision outputs of the middle levels; TransFuse transformer and f0 heads).
- ``pred_final``: the final class logits.

Strides are the downsampling factor along every spatial axis relative to the network input.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

__all__ = ["Tap", "FeatureContract", "TapNetwork", "TAP_GROUPS"]

TAP_GROUPS = ("early", "mid", "late", "pred_mid", "pred_final")


@dataclass(frozen=True)
class Tap:
    """One named feature tap.

    Args:
        path: dotted module path resolvable with ``dict(model.named_modules())``.
        channels: channels of the module's output.
        stride: spatial downsampling factor of the output relative to the input (same on every axis).
    """

    path: str
    channels: int
    stride: int

    def __post_init__(self) -> None:
        if not isinstance(self.path, str) or not self.path:
            raise ValueError(f"Tap.path must be a non-empty module path, got {self.path!r}.")
        if int(self.channels) < 1:
            raise ValueError(f"Tap.channels must be >= 1, got {self.channels} for {self.path!r}.")
        if int(self.stride) < 1:
            raise ValueError(f"Tap.stride must be >= 1, got {self.stride} for {self.path!r}.")


@dataclass(frozen=True)
class FeatureContract:
    """The taps of one network, grouped as the HLFD paper uses them.

    Args:
        early: early encoder feature.
        mid: middle features, shallow to deep (at least one).
        late: terminal representation.
        pred_mid: intermediate predictive maps (class logits), possibly empty.
        pred_final: final class logits, or None where the network output is the only final map.
    """

    early: Tap
    mid: tuple[Tap, ...]
    late: Tap
    pred_mid: tuple[Tap, ...] = ()
    pred_final: Tap | None = None

    def __post_init__(self) -> None:
        if len(self.mid) == 0:
            raise ValueError("FeatureContract.mid needs at least one tap.")

    def named(self) -> dict[str, Tap]:
        """Return ``{name: Tap}`` with names ``early``, ``mid.i``, ``late``, ``pred_mid.i``, ``pred_final``."""
        out: dict[str, Tap] = {"early": self.early}
        out.update({f"mid.{i}": t for i, t in enumerate(self.mid)})
        out["late"] = self.late
        out.update({f"pred_mid.{i}": t for i, t in enumerate(self.pred_mid)})
        if self.pred_final is not None:
            out["pred_final"] = self.pred_final
        return out

    def group(self, name: str) -> list[str]:
        """Tap names of one group (``early``, ``mid``, ``late``, ``pred_mid``, ``pred_final``), in order.

        Raises:
            ValueError: for a group name not in ``TAP_GROUPS``.
        """
        if name not in TAP_GROUPS:
            raise ValueError(f"Unknown tap group {name!r}; valid groups: {', '.join(TAP_GROUPS)}.")
        return [k for k in self.named() if k == name or k.startswith(name + ".")]


class TapNetwork(nn.Module):
    """Base class of every ctdistill network: encoder / decoder / head split and a feature contract.

    Subclasses set ``spatial_dims``, ``in_channels``, ``out_channels`` and implement ``feature_contract()``.
    ``forward`` returns logits ``(B, out_channels, *spatial)`` in eval mode; networks with deep supervision
    may return a tuple in training mode (documented per network; the first element is the final map).
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    #: every spatial size must be divisible by this (checked by ``check_input_size``)
    size_divisor: int = 1

    def feature_contract(self) -> FeatureContract:
        """Return this network's taps. Raises NotImplementedError in the base class."""
        raise NotImplementedError(f"{type(self).__name__} must implement feature_contract().")

    def supervised_taps(self) -> frozenset[str]:
        """Module paths of the prediction heads that receive a training loss (their logits are meaningful).

        By default every declared prediction tap (``pred_mid`` and ``pred_final``): the network's training forward
        returns all of them to the loss. Networks whose intermediate heads are only supervised in some
        configurations (UNet++ without deep supervision) override this. Distillation methods that read a teacher's
        intermediate predictions refuse heads outside this set (``distill.plan.build_plan``): an untrained head is a
        fixed random projection, not knowledge.
        """
        c = self.feature_contract()
        return frozenset(t.path for t in (*c.pred_mid, *((c.pred_final,) if c.pred_final is not None else ())))

    @property
    def ds_weights(self) -> tuple[float, ...] | None:
        """Deep-supervision loss weights of the training-mode output tuple (first = final map), or None when the
        training forward returns one tensor. Sized to the network's head count; the bundles pass it to the loss."""
        return None

    def check_input_size(self, spatial_size: Sequence[int]) -> None:
        """Raise ValueError naming the nearest valid size when a spatial size is not divisible by ``size_divisor``."""
        d = self.size_divisor
        bad = [int(s) for s in spatial_size if int(s) % d]
        if bad:
            nearest = [max(d, int(round(s / d)) * d) for s in spatial_size]
            raise ValueError(
                f"{type(self).__name__} needs every spatial size divisible by {d}; got {tuple(spatial_size)}. "
                f"Nearest valid size: {tuple(nearest)}."
            )

    @torch.no_grad()
    def describe_features(self, spatial_size: Sequence[int], batch_size: int = 1) -> list[dict]:
        """List every tap with its declared channels and stride and the shape observed on a zero input.

        Args:
            spatial_size: input spatial size, ``(H, W)`` or ``(H, W, D)``.
            batch_size: batch size of the probe input.

        Returns:
            one dict per tap: ``name, path, channels, stride, shape`` (shape is ``(B, C, *spatial)``).

        Raises:
            ValueError: if a declared path does not exist or the observed channels/stride disagree.
        """
        if len(spatial_size) != self.spatial_dims:
            raise ValueError(f"spatial_size {tuple(spatial_size)} has {len(spatial_size)} axes; this network is {self.spatial_dims}D.")
        self.check_input_size(spatial_size)
        modules = dict(self.named_modules())
        taps = self.feature_contract().named()
        missing = [t.path for t in taps.values() if t.path not in modules]
        if missing:
            raise ValueError(f"{type(self).__name__} declares taps on unknown module paths: {missing}.")
        seen: dict[str, torch.Tensor] = {}

        def hook_for(name: str):
            def hook(_m, _i, out):
                seen[name] = out[0] if isinstance(out, (tuple, list)) else out

            return hook

        handles = [modules[t.path].register_forward_hook(hook_for(n)) for n, t in taps.items()]
        was_training = self.training
        try:
            self.eval()
            p = next(self.parameters())
            self(torch.zeros(batch_size, self.in_channels, *spatial_size, device=p.device, dtype=p.dtype))
        finally:
            for h in handles:
                h.remove()
            self.train(was_training)
        rows = []
        for name, tap in taps.items():
            if name not in seen:
                raise ValueError(f"Tap {name!r} ({tap.path}) produced no output in forward().")
            shape = tuple(seen[name].shape)
            expected = tuple(int(s) // tap.stride for s in spatial_size)
            if shape[1] != tap.channels or shape[2:] != expected:
                raise ValueError(
                    f"Tap {name!r} ({tap.path}) declares {tap.channels} channels at stride {tap.stride} "
                    f"(spatial {expected}) but produced shape {shape}."
                )
            rows.append({"name": name, "path": tap.path, "channels": tap.channels, "stride": tap.stride, "shape": shape})
        return rows
