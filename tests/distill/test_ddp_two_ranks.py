"""Defect 3 of the HLFD review: under DDP the connectors' gradients are averaged ONCE per step, and stay identical.

Two gloo ranks on CPU, each with different data (and different initial connectors on rank 1): after several SGD
steps the distiller's connectors (outside DDP) and the DDP student must be identical across ranks, and the
handler must issue exactly one ``all_reduce`` (a flat buffer of all connector gradients) per step.

The run also balances the terms (``balance="grad"``, measured at steps 1 and 3): the measured gradient norms are
averaged over the ranks (one all-reduce of ``1 + terms`` numbers per measurement), so both ranks weight the terms
identically although their data differ.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from monai.data import DataLoader
from monai.engines import SupervisedTrainer
from torch import nn

import distill
from networks.losses import SegLoss
from tests.distill.tiny_nets import pair

STEPS = 3


def _data(rank: int, n: int = 2 * STEPS, size: int = 16) -> list[dict]:
    g = torch.Generator().manual_seed(100 + rank)  # different data on each rank
    return [
        {"image": torch.randn(1, size, size, generator=g), "label": torch.randint(0, 2, (1, size, size), generator=g)}
        for _ in range(n)
    ]


def _worker(rank: int, world: int, store: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        s_net, t_net = pair()
        ddp = nn.parallel.DistributedDataParallel(s_net, find_unused_parameters=True)
        d = distill.create_distiller("hlfd", ddp, t_net)
        if rank == 1:  # different initial connectors: the handler must broadcast rank 0's at STARTED
            with torch.no_grad():
                for p in d.parameters():
                    p.add_(1.0)
        opt = torch.optim.SGD(distill.trainable_parameters(s_net, d), lr=0.5)
        trainer = SupervisedTrainer(
            device=torch.device("cpu"), max_epochs=1, network=ddp, optimizer=opt, loss_function=SegLoss(),
            train_data_loader=DataLoader(_data(rank), batch_size=2, shuffle=False), decollate=False,
        )  # fmt: skip
        handler = distill.DistillationHandler(d, allow_untrained_teacher=True, balance="grad", balance_every=2)
        handler.attach(trainer)
        calls = []
        real = dist.all_reduce

        def counting(tensor, *args, **kwargs):
            calls.append(tensor.numel())
            return real(tensor, *args, **kwargs)

        dist.all_reduce = counting
        try:
            trainer.run()
        finally:
            dist.all_reduce = real
        torch.save(
            {
                "calls": calls, "connectors": d.state_dict(), "student": s_net.state_dict(),
                "iterations": trainer.state.iteration, "weights": handler.balancer.weights,
            },  # fmt: skip
            os.path.join(out, f"rank{rank}.pt"),
        )
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed not available")
def test_two_rank_gloo_connectors_identical_with_one_all_reduce_per_step(tmp_path):
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["iterations"] == r1["iterations"] == STEPS
    n_connector = sum(v.numel() for v in r0["connectors"].values())
    n_norms = 1 + 4  # L_seg and HLFD's four terms
    for r in (r0, r1):
        assert r["calls"] == [n_norms, n_connector, n_connector, n_norms, n_connector], (
            "expected one flat all-reduce of the connectors per step and one of the norms per measurement (steps 1, 3)"
        )
    assert r0["weights"] == r1["weights"] and all(w > 0 for w in r0["weights"].values())
    for k in r0["connectors"]:
        torch.testing.assert_close(r0["connectors"][k], r1["connectors"][k], rtol=0, atol=0)
    for k in r0["student"]:
        torch.testing.assert_close(r0["student"][k], r1["student"][k], rtol=0, atol=1e-7)
