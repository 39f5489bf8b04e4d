"""``DistillationHandler``: adds a distillation loss to a MONAI ``SupervisedTrainer``'s loss.

Event timeline of ``SupervisedTrainer._iteration`` (monai 1.6) and what the handler does:

- ``ITERATION_STARTED``: open the student capture (hooks on the student's tapped modules; outputs cleared).
- forward (inside ``torch.autocast`` when ``amp=True``): the trainer's own student forward fills the capture.
- ``FORWARD_COMPLETED``, then the trainer sets ``output["loss"] = loss_function(pred, label).mean()``.
- ``LOSS_COMPLETED`` (still inside autocast, before backward): run the frozen teacher on ``output["image"]`` under
  ``no_grad``, compute the method's terms in float32 and set ``output["loss"] = L_seg + kd_total``; the trainer then
  back-propagates that loss, so gradients reach the student and the connectors (never the teacher).
- ``BACKWARD_COMPLETED`` (distributed runs): all-reduce (average) the connectors' gradients, which DDP does not see
  because the connectors live outside the DDP-wrapped student; at ``STARTED`` they are broadcast from rank 0, so the
  connectors stay identical on every rank.
- ``ITERATION_COMPLETED``: close the capture and drop the recorded tensors.

Values written into ``engine.state.output`` (floats, for ``StatsHandler``/MLflow): ``loss_seg`` (the segmentation loss),
every term of the method (``kd_ufd``, ``kd_ifd``, ``kd_upd``, ``kd_ipd``, ``kd_feature``, ``kd_pixel`` for HLFD; see each
method) and ``kd_total``; ``loss`` stays a tensor (the combined loss). With ``balance="grad"`` also ``kd_weight_<term>``
(e.g. ``kd_weight_ifd``), the weight each term had this step, and ``kd_gradratio_<term>``, the running ratio of the
encoder gradient norm the term would carry at its fixed (paper) weight to the segmentation loss's (e.g. 30 when 0.9
IFD pulls 30x harder than L_seg); ``kd_total`` is then the balanced sum.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from ignite.engine import Engine, Events
from monai.engines.utils import IterationEvents
from monai.utils import CommonKeys
from torch import nn

from distill.balance import GradientBalancer, check_kd_balance, encoder_parameters
from distill.capture import unwrap
from distill.distiller import Distiller
from distill.teacher import trained_source

__all__ = ["DistillationHandler"]

logger = logging.getLogger(__name__)


class DistillationHandler:
    """Adds ``kd_total`` of a ``Distiller`` to a ``SupervisedTrainer``'s loss every iteration.

    Args:
        distiller: from ``distill.create_distiller``; its student must be the trainer's network.
        teacher: optional, must be the distiller's teacher when given (a consistency check).
        allow_untrained_teacher: accept a teacher without loaded weights (tests only). Otherwise the teacher must come
            from ``distill.load_teacher`` or be marked by ``distill.mark_trained``.
        image_key: key of the input batch in ``engine.state.output``.
        label_key: key of the labels (passed to methods that use them).
        loss_key: key of the loss.
        warmup_epochs: ramp the distillation weight linearly from 0 to 1 over this many epochs (counted in
            iterations: ``scale = min(1, (iteration - 1) / (warmup_epochs * epoch_length))``); 0 (default) applies
            the method's full weights from the first step, as the papers do. The terms are logged unscaled; the
            scale is logged as ``kd_scale``.
        balance: ``"none"`` (the method's fixed weights, the papers') or ``"grad"``: every term of
            ``method.term_weights()`` is weighted so that its gradient norm on the student's encoder is, on running
            average, ``balance_ratio`` times the segmentation loss's (``distill.balance.GradientBalancer``).
        balance_ratio: ``r`` of ``balance="grad"`` (> 0, e.g. 0.25).
        balance_every: measure the gradient norms every this many iterations (the first included).
        balance_momentum: EMA momentum of the measured norms.

    Raises:
        TypeError: distiller is not a ``Distiller``.
        ValueError: a teacher different from the distiller's, an untrained teacher, bad balance options, or
            ``balance="grad"`` for the method ``none``.
    """

    def __init__(
        self,
        distiller: Distiller,
        teacher: nn.Module | None = None,
        allow_untrained_teacher: bool = False,
        image_key: str = CommonKeys.IMAGE,
        label_key: str = CommonKeys.LABEL,
        loss_key: str = CommonKeys.LOSS,
        warmup_epochs: float = 0.0,
        balance: str = "none",
        balance_ratio: float = 0.25,
        balance_every: int = 10,
        balance_momentum: float = 0.9,
    ) -> None:
        if not isinstance(distiller, Distiller):
            raise TypeError(f"distiller must be a distill.Distiller, got {type(distiller).__name__}.")
        own = distiller.teacher
        if teacher is not None and (own is None or unwrap(teacher) is not unwrap(own)):
            raise ValueError("The teacher given to DistillationHandler is not the distiller's teacher.")
        if distiller.needs_teacher and not allow_untrained_teacher and trained_source(own) is None:
            raise ValueError(
                f"The teacher ({type(unwrap(own)).__name__}) has no loaded weights: load it with "
                "distill.load_teacher(checkpoint, network_name) (or mark it with distill.mark_trained). A freshly built "
                "teacher may even equal the student. allow_untrained_teacher=True is for tests only."
            )
        warmup_epochs = float(warmup_epochs)
        if not warmup_epochs >= 0:
            raise ValueError(f"warmup_epochs must be >= 0 (0 = no ramp), got {warmup_epochs}.")
        self.distiller = distiller
        self.image_key, self.label_key, self.loss_key = image_key, label_key, loss_key
        self.warmup_epochs = warmup_epochs
        self.balancer: GradientBalancer | None = None
        if check_kd_balance(balance, balance_ratio, balance_every, balance_momentum) == "grad":
            if not distiller.needs_teacher:
                raise ValueError(f"balance='grad' weights distillation terms; method {distiller.name!r} has none.")
            self.balancer = GradientBalancer(
                encoder_parameters(distiller.student), distiller.method.term_weights(),
                balance_ratio, balance_every, balance_momentum,
            )  # fmt: skip

    def attach(self, engine: Engine) -> None:
        """Register on the trainer's events.

        Works both when called directly and from ``SupervisedTrainer(train_handlers=[...])`` (which attaches before
        the trainer has its ``network``): the network check and the move of the distiller and the teacher to the
        trainer's device then happen at ``STARTED``.

        Raises:
            ValueError: the engine's network is not the distiller's student.
        """
        if getattr(engine, "network", None) is not None:
            self._prepare(engine)
        engine.add_event_handler(Events.STARTED, self._prepare)
        engine.add_event_handler(Events.ITERATION_STARTED, self._open)
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self._sync_connector_grads)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._close)
        engine.add_event_handler(Events.COMPLETED, self._close)

    def _prepare(self, engine: Engine) -> None:
        """Check the trainer's network, move the distiller and teacher to its device, sync connectors across ranks."""
        network = getattr(engine, "network", None)
        if network is None or unwrap(network) is not unwrap(self.distiller.student):
            raise ValueError("DistillationHandler: the trainer's network is not the distiller's student.")
        device = getattr(engine.state, "device", None)
        if device is not None:
            self.distiller.to(device)
            if self.distiller.teacher is not None:
                self.distiller.teacher.to(device)
        if self._distributed():
            for p in self.distiller.parameters():
                dist.broadcast(p.data, src=0)

    @staticmethod
    def _distributed() -> bool:
        return dist.is_available() and dist.is_initialized()

    def _sync_connector_grads(self, engine: Engine) -> None:
        """Average the connectors' gradients across ranks with ONE all-reduce of a flat buffer per step.

        DDP reduces the student's gradients itself; the connectors live outside the DDP-wrapped student, so this
        handler is their only reducer (no other handler may all-reduce them again). Parameters without a gradient
        this step contribute zeros, so every rank issues the same collective.
        """
        if not self._distributed() or dist.get_world_size() == 1:
            return
        params = [p for p in self.distiller.parameters() if p.requires_grad]
        if not params:
            return
        had = [p.grad is not None for p in params]
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= dist.get_world_size()
        offset = 0
        for p, local in zip(params, had):
            n = p.numel()
            g = flat[offset : offset + n].view_as(p)
            offset += n
            if local or bool(g.any()):  # a parameter no rank used keeps grad None (the optimiser skips it)
                p.grad = g.clone()

    def _open(self, engine: Engine) -> None:
        if self.distiller.student_capture is not None:
            self.distiller.student_capture.open()

    def _close(self, engine: Engine) -> None:
        if self.distiller.student_capture is not None:
            self.distiller.student_capture.close()
            self.distiller.student_capture.clear()

    def scale(self, engine: Engine) -> float:
        """The distillation weight of the current iteration (1 without warm-up)."""
        if self.warmup_epochs <= 0:
            return 1.0
        length = int(getattr(engine.state, "epoch_length", 0) or 0)
        if length <= 0:
            return 1.0
        return min(1.0, (int(engine.state.iteration) - 1) / (self.warmup_epochs * length))

    def __call__(self, engine: Engine) -> None:
        """Replace ``output[loss_key]`` with ``L_seg + scale * kd_total`` and store the components as floats."""
        output = engine.state.output
        seg = output[self.loss_key]
        if self.distiller.needs_teacher:
            images = output[self.image_key]
            s_feats = self.distiller.student_capture.outputs if self.distiller.student_capture is not None else {}
            t_feats = self.distiller.teacher_features(images)
            terms = self.distiller(s_feats, t_feats, output.get(self.label_key), input_size=images.shape[2:])
        else:
            terms = {"kd_total": torch.zeros((), device=seg.device)}
        if self.balancer is not None:
            terms["kd_total"] = self.balancer(seg, terms)
            terms.update({f"kd_weight_{k.removeprefix('kd_')}": torch.tensor(w) for k, w in self.balancer.weights.items()})
            ratios = self.balancer.fixed_ratios()
            terms.update({f"kd_gradratio_{k.removeprefix('kd_')}": torch.tensor(v) for k, v in ratios.items()})
        scale = self.scale(engine)
        output[self.loss_key] = seg + scale * terms["kd_total"]
        if self.warmup_epochs > 0:
            terms["kd_scale"] = torch.tensor(scale, device=seg.device)
        names = ["loss_seg", *terms]
        values = torch.stack([seg.detach().float().reshape(()), *(v.detach().to(seg.device) for v in terms.values())])
        output.update(zip(names, values.tolist()))  # one device sync for all the logged floats
