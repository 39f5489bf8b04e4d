"""distill: knowledge distillation for ctdistill (HLFD, Gorade et al., ISBI 2024, and baselines).

Public API:

- ``create_distiller(method, student, teacher, *, student_taps=None, teacher_taps=None, **weights) -> Distiller``
- ``METHODS`` = ``("hlfd", "hinton", "skd", "imf", "emkd", "hifd", "cwd", "dist", "none")``; ``default_weights(method)``
- ``KD_MASKS`` = ``("none", "teacher_correct")`` (``create_distiller(..., kd_mask=...)`` for the methods in ``MASKABLE``)
- ``DistillationHandler(distiller, teacher=None, allow_untrained_teacher=False, ...)`` for a MONAI SupervisedTrainer
- ``trainable_parameters(student, distiller)``: student + connector parameters for the optimiser
- ``load_teacher(checkpoint_path, network_name=None, **network_kwargs)``; ``mark_trained``; ``trained_source``
- ``FeatureCapture`` (hooks by module path); ``attention_map``/``attention_distance``

The segmentation losses every role trains with (``SegLoss``, ``StructureLoss``) live in ``networks.losses``.

Wiring (a bundle does the same with ``_target_`` entries; the handler may go in ``train_handlers``)::

    teacher = distill.load_teacher("teacher.pt")  # {"model": state_dict, "network": {"name": ..., **create kwargs}}
    student = networks.create("resnet18_student", spatial_dims=2, in_channels=3, out_channels=3)
    distiller = distill.create_distiller("hlfd", student, teacher, beta=0.9, lam=0.1, temperature=4.0)
    optimizer = torch.optim.Adam(distill.trainable_parameters(student, distiller), lr=1e-3)
    trainer = SupervisedTrainer(..., network=student, optimizer=optimizer, loss_function=networks.SegLoss())
    distill.DistillationHandler(distiller, teacher=teacher).attach(trainer)

Save ``distiller.state_dict()`` (the connectors) next to the student only to resume training; export the student alone.
"""

from __future__ import annotations

from distill.attention import attention_distance, attention_map
from distill.capture import OUTPUT_PATH, FeatureCapture, resolve_module, unwrap
from distill.distiller import Distiller, freeze, trainable_parameters
from distill.handler import DistillationHandler
from distill.hlfd import HLFD, IFDLoss, IPDLoss, UFDLoss, UPDLoss
from distill.mask import KD_MASKS
from distill.method import KDMethod
from distill.registry import MASKABLE, METHODS, create_distiller, default_weights, method_class
from distill.teacher import load_teacher, mark_trained, read_checkpoint, trained_source

__all__ = [
    "METHODS",
    "MASKABLE",
    "KD_MASKS",
    "create_distiller",
    "default_weights",
    "method_class",
    "Distiller",
    "DistillationHandler",
    "KDMethod",
    "HLFD",
    "UFDLoss",
    "IFDLoss",
    "UPDLoss",
    "IPDLoss",
    "FeatureCapture",
    "OUTPUT_PATH",
    "resolve_module",
    "unwrap",
    "attention_map",
    "attention_distance",
    "freeze",
    "trainable_parameters",
    "load_teacher",
    "mark_trained",
    "read_checkpoint",
    "trained_source",
]
