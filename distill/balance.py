"""``kd_balance="grad"``: weight every distillation term by gradient norms on the student's encoder.

A fixed weight says nothing about how hard a term pulls on the network: with a trained teacher, HLFD's 0.9-weighted
IFD gradient on the student encoder is tens of times the segmentation gradient (README: "Why IFD hurts"). The
balancer keeps exponential moving averages of ``G_seg = ||d L_seg / d theta_enc||`` and of each term's
``G_i = ||d L_i / d theta_enc||`` (``theta_enc``: the student's encoder parameters) and weights term ``i`` by::

    w_i = r * EMA(G_seg) / EMA(G_i)

so that, on average, the weighted term's gradient on the encoder is ``r`` times the segmentation gradient (``r``:
``kd_balance_ratio``, e.g. 0.25). The norms are measured with ``torch.autograd.grad`` (no ``.grad`` is touched) every
``every`` iterations, from the first on; in between the weights stay. Each measurement costs one extra backward pass
through the encoder per term plus one for ``L_seg``, so ``every = 10`` adds about ``(terms + 1) / 10`` backward passes
per step. Terms whose paper weight is 0 stay off; a term whose gradient does not reach the encoder (norm 0) keeps its
fixed weight. The averages are not checkpointed: a resumed run measures afresh from its first step. In distributed runs the measured norms are averaged over the ranks,
so every rank uses the same weights.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["KD_BALANCES", "check_kd_balance", "encoder_parameters", "GradientBalancer"]

#: valid values of ``kd_balance``
KD_BALANCES: tuple[str, ...] = ("none", "grad")


def check_kd_balance(kd_balance: str, ratio: float = 0.25, every: int = 10, momentum: float = 0.9) -> str:
    """Validate the balancing options; return ``kd_balance`` normalised.

    Raises:
        ValueError: an unknown mode, a ratio that is not a finite number > 0, ``every`` < 1, or a momentum
            outside ``[0, 1)``, each naming the value.
    """
    key = kd_balance.strip().lower() if isinstance(kd_balance, str) else kd_balance
    if key not in KD_BALANCES:
        raise ValueError(f"Unknown kd_balance {kd_balance!r}; valid: {', '.join(KD_BALANCES)}.")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not (0 < ratio < math.inf):
        raise ValueError(f"kd_balance_ratio must be a finite number > 0 (e.g. 0.25), got {ratio!r}.")
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise ValueError(f"kd_balance_every must be an integer >= 1, got {every!r}.")
    if isinstance(momentum, bool) or not isinstance(momentum, (int, float)) or not (0 <= momentum < 1):
        raise ValueError(f"kd_balance_momentum must be in [0, 1), got {momentum!r}.")
    return key


def encoder_parameters(student: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``student.encoder`` (every ctdistill student has one), else of the whole student."""
    module = getattr(student, "module", student)  # DDP / DataParallel
    encoder = getattr(module, "encoder", None)
    source = encoder if isinstance(encoder, nn.Module) else module
    return [p for p in source.parameters() if p.requires_grad]


def _grad_norm(loss: torch.Tensor, params: list[nn.Parameter]) -> torch.Tensor:
    """``||d loss / d params||_2`` (0 when ``loss`` does not reach them), keeping the graph for the real backward."""
    if not loss.requires_grad:
        return torch.zeros((), device=loss.device)
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    sq = [g.detach().float().pow(2).sum() for g in grads if g is not None]
    return torch.stack(sq).sum().sqrt() if sq else torch.zeros((), device=loss.device)


class GradientBalancer:
    """Running gradient-norm balance of distillation terms against the segmentation loss (see the module docstring).

    Args:
        params: the parameters the norms are measured on (``encoder_parameters(student)``).
        base_weights: ``{term: paper weight}`` (``KDMethod.term_weights()``); a term with weight 0 stays off.
        ratio: ``r``, the share of the segmentation gradient norm each term carries (> 0).
        every: measure every this many calls (>= 1; the first call always measures).
        momentum: EMA momentum in ``[0, 1)`` (``ema = m * ema + (1 - m) * measured``; the first measurement sets it).

    Raises:
        ValueError: bad ``ratio``/``every``/``momentum``, or no parameters to measure on.
    """

    def __init__(
        self,
        params: Iterable[nn.Parameter],
        base_weights: Mapping[str, float],
        ratio: float = 0.25,
        every: int = 10,
        momentum: float = 0.9,
    ) -> None:
        check_kd_balance("grad", ratio, every, momentum)
        self.params = list(params)
        if not self.params:
            raise ValueError("GradientBalancer: no trainable parameters to measure gradient norms on.")
        self.base = {k: float(v) for k, v in base_weights.items()}
        self.ratio, self.every, self.momentum = float(ratio), int(every), float(momentum)
        self.ema: dict[str, float] = {}
        self.weights: dict[str, float] = dict(self.base)
        self.calls = 0

    def _average(self, norms: torch.Tensor) -> torch.Tensor:
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            norms = norms.clone()
            dist.all_reduce(norms, op=dist.ReduceOp.SUM)
            norms /= dist.get_world_size()
        return norms

    def measure(self, seg: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> dict[str, float]:
        """Measure the gradient norms now and update the averages and weights.

        Args:
            seg: the segmentation loss (with its graph).
            terms: ``{term: loss}`` for the terms in ``base_weights`` (with their graphs).

        Returns:
            the norms measured this time, ``{"seg": G_seg, term: G_i}``.
        """
        names = [k for k in self.base if self.base[k] != 0]
        norms = torch.stack([_grad_norm(seg, self.params), *(_grad_norm(terms[k], self.params) for k in names)])
        values = self._average(norms).tolist()  # one device sync
        measured = dict(zip(["seg", *names], values))
        for k, v in measured.items():
            self.ema[k] = v if k not in self.ema else self.momentum * self.ema[k] + (1 - self.momentum) * v
        for k in names:
            if self.ema[k] > 0:
                self.weights[k] = self.ratio * self.ema["seg"] / self.ema[k]
        return measured

    def fixed_ratios(self) -> dict[str, float]:
        """``base_i * EMA(G_i) / EMA(G_seg)``: the encoder gradient each term would carry, relative to the segmentation
        loss's, at its fixed (paper) weight; the balanced weight is ``w_i = r * base_i / fixed_ratio_i``."""
        seg = self.ema.get("seg", 0.0)
        return {k: self.base[k] * self.ema[k] / seg for k in self.base if k in self.ema and seg > 0}

    def __call__(self, seg: torch.Tensor, terms: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The balanced distillation loss ``sum_i w_i L_i`` (measuring first on every ``every``-th call).

        Args:
            seg: the segmentation loss (with its graph).
            terms: the method's terms (must hold every key of ``base_weights``).

        Returns:
            scalar tensor.

        Raises:
            KeyError: a term of ``base_weights`` missing from ``terms``.
        """
        missing = sorted(set(self.base) - set(terms))
        if missing:
            raise KeyError(f"GradientBalancer: the method returned no {missing} (got {sorted(terms)}).")
        if self.calls % self.every == 0:
            self.measure(seg, terms)
        self.calls += 1
        return sum((self.weights[k] * terms[k] for k in self.base if self.base[k] != 0), torch.zeros((), device=seg.device))
