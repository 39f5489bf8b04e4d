"""pipelines.engine.optim: warm-up + cosine schedule against the closed form, gradient clipping against a hand norm."""

from __future__ import annotations

import math

import pytest
import torch
from ignite.engine import Events
from monai.data import DataLoader
from monai.engines import SupervisedTrainer

from pipelines.engine.optim import GradientClipper, build_lr_scheduler


def _lrs(epochs, warmup, lr=1e-3, lr_min=1e-6):
    opt = torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))], lr=lr)
    sched = build_lr_scheduler(opt, epochs, lr_min, warmup_epochs=warmup)
    seen = []
    for _ in range(epochs):
        seen.append(opt.param_groups[0]["lr"])  # the lr this epoch trains with
        opt.step()
        sched.step()
    return seen


def test_plain_cosine_is_the_papers_schedule():
    lr, lr_min, n = 1e-3, 1e-6, 6
    want = [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * e / n)) / 2 for e in range(n)]
    assert _lrs(n, 0) == pytest.approx(want, rel=1e-9)


def test_warmup_then_cosine_closed_form():
    lr, lr_min, n, w = 1e-3, 1e-6, 8, 2
    warm = [lr * (1 / (w + 1) + (1 - 1 / (w + 1)) * e / w) for e in range(w)]  # linear from lr/(w+1) to lr
    cos = [lr_min + (lr - lr_min) * (1 + math.cos(math.pi * e / (n - w))) / 2 for e in range(n - w)]
    assert _lrs(n, w) == pytest.approx(warm + cos, rel=1e-6)


@pytest.mark.parametrize("kw,match", [({"epochs": 0}, "epochs"), ({"warmup_epochs": -1}, "warmup_epochs"),
                                      ({"lr_min": -1.0}, "lr_min")])
def test_schedule_rejects_bad_knobs(kw, match):
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    args = {"epochs": 5, "lr_min": 0.0, "warmup_epochs": 0, **kw}
    with pytest.raises(ValueError, match=match):
        build_lr_scheduler(opt, args["epochs"], args["lr_min"], warmup_epochs=args["warmup_epochs"])


def _run(max_norm):
    torch.manual_seed(0)
    net = torch.nn.Conv2d(1, 2, 3, padding=1)
    opt = torch.optim.SGD(net.parameters(), lr=0.0)  # lr 0: weights stay put, gradients are what we inspect
    data = [{"image": 10 * torch.randn(1, 8, 8), "label": torch.randint(0, 2, (1, 8, 8))} for _ in range(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=1, train_data_loader=DataLoader(data, batch_size=2), network=net,
        optimizer=opt, loss_function=lambda p, y: (p**2).mean(), decollate=False,
    )  # fmt: skip
    GradientClipper(opt, max_norm).attach(trainer)
    trainer.run()
    # the same loss by hand: gradient norm before clipping
    net.zero_grad()
    x = torch.stack([d["image"] for d in data])
    (net(x) ** 2).mean().backward()
    hand = math.sqrt(sum(float((p.grad**2).sum()) for p in net.parameters()))
    return trainer, hand


def test_clipper_records_the_norm_and_clips_to_the_threshold():
    trainer, hand = _run(0.0)
    assert trainer.state.output["grad_norm"] == pytest.approx(hand, rel=1e-5)  # off: recorded, not clipped
    assert hand > 1.0
    torch.manual_seed(0)
    net = torch.nn.Linear(3, 1)
    net.weight.grad, net.bias.grad = torch.full((1, 3), 3.0), torch.full((1,), 4.0)  # norm sqrt(27 + 16)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)

    class _E:  # the clipper only reads engine.state.output and engine.scaler/amp
        scaler, amp = None, False
        state = type("S", (), {"output": {}})()

    GradientClipper(opt, 1.0)(_E)
    total = math.sqrt(float((net.weight.grad**2).sum() + (net.bias.grad**2).sum()))
    assert total == pytest.approx(1.0, rel=1e-5)
    assert _E.state.output["grad_norm"] == pytest.approx(math.sqrt(43.0), rel=1e-6)
    with pytest.raises(ValueError, match="grad_clip"):
        GradientClipper(opt, -1.0)


def test_logged_lr_is_the_lr_the_epoch_trained_with():
    """EpochAverager publishes the lr read at EPOCH_STARTED, not the scheduler's next value (issue 11)."""
    from monai.handlers import LrScheduleHandler

    from pipelines.engine import EpochAverager

    net = torch.nn.Conv2d(1, 1, 1)
    opt = torch.optim.SGD(net.parameters(), lr=1e-3)
    sched = build_lr_scheduler(opt, 4, 0.0, warmup_epochs=1)
    data = [{"image": torch.randn(1, 4, 4), "label": torch.zeros(1, 4, 4)}]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"), max_epochs=4, train_data_loader=DataLoader(data, batch_size=1), network=net,
        optimizer=opt, loss_function=lambda p, y: (p**2).mean(), decollate=False,
        train_handlers=[LrScheduleHandler(sched, print_lr=False), EpochAverager(optimizer=opt)],
    )  # fmt: skip
    logged = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda e: logged.append(e.state.metrics["lr"]))
    trainer.run()
    # warm-up epoch at lr/2, then cosine over 3 epochs: 1e-3, 1e-3 (1 + cos(pi/3)) / 2, 1e-3 (1 + cos(2 pi/3)) / 2
    want = [5e-4, 1e-3, 1e-3 * 0.75, 1e-3 * 0.25]
    assert logged == pytest.approx(want, rel=1e-6)


def test_warmup_longer_than_the_run_is_shortened():
    """A default warm-up of 5 epochs in a 1- or 3-epoch smoke run: warm up over epochs - 1 (none for 1 epoch)."""
    assert _lrs(1, 5) == pytest.approx([1e-3])
    lr, w, n = 1e-3, 2, 3  # reduced from 5 to 2
    warm = [lr * (1 / (w + 1) + (1 - 1 / (w + 1)) * e / w) for e in range(w)]
    assert _lrs(n, 5) == pytest.approx(warm + [lr], rel=1e-6)


@pytest.mark.parametrize("new_epochs,new_warmup", [(6, 2), (10, 3), (6, 0)])
def test_fast_forward_puts_a_rebuilt_schedule_at_the_saved_epoch(new_epochs, new_warmup):
    """Resume after 3 epochs of a (6, warm-up 2) run: the lr equals an uninterrupted run of the NEW settings."""
    from pipelines.engine.optim import fast_forward

    net = torch.nn.Linear(1, 1)
    old = torch.optim.Adam(net.parameters(), lr=1e-3)
    old_sched = build_lr_scheduler(old, 6, 1e-6, warmup_epochs=2)
    for _ in range(3):
        old.step()
        old_sched.step()
    saved = old.state_dict()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    sched = build_lr_scheduler(opt, new_epochs, 1e-6, warmup_epochs=new_warmup)
    peak = [g["initial_lr"] for g in opt.param_groups]
    opt.load_state_dict(saved)
    fast_forward(sched, opt, 3, peak)
    resumed = [opt.param_groups[0]["lr"]]
    for _ in range(new_epochs - 4):
        opt.step()
        sched.step()
        resumed.append(opt.param_groups[0]["lr"])
    assert resumed == pytest.approx(_lrs(new_epochs, new_warmup)[3:new_epochs - 1 + 1][: len(resumed)], rel=1e-6)
