"""Benchmark a ctdistill network: parameters, FLOPs, median forward latency and images/s (a benchmark, not a test).

Usage::

    python -m pipelines.model_report transfuse_s --size 352 352 --channels 3
    python -m pipelines.model_report unetpp_teacher --size 64 64 64 --channels 1 --classes 3 --runs 5 --json out.json

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eval-mode forward of the given batch
(multiply-adds count as 2 FLOPs; normalisation, activations and interpolation are not counted). Latency is the
median wall time of ``--runs`` eval-mode forwards under ``torch.inference_mode`` after ``--warmup`` untimed ones
(CUDA is synchronised around each run). On a shared CPU prefer ``--threads 1``: two intra-op threads on busy
cores can be an order of magnitude slower.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import networks
from pipelines.benchmark_cli import add_benchmark_args, apply_benchmark_args, emit_report

__all__ = ["model_report", "format_report", "main"]

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def model_report(
    name: str,
    size: Sequence[int] = (352, 352),
    channels: int = 3,
    classes: int | None = None,
    device: str = "cpu",
    runs: int = 10,
    warmup: int = 3,
    batch_size: int = 1,
    network_kwargs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Measure one network.

    Args:
        name: a name in ``networks.NETWORKS``.
        size: input spatial size ``(H, W)`` (2D; also the TransFuse ``img_size``) or ``(H, W, D)`` (3D).
        channels: input channels.
        classes: output channels (None: the network's default).
        device: ``"cpu"`` or ``"cuda"``.
        runs: timed forwards (>= 1).
        warmup: untimed forwards before timing (>= 0).
        batch_size: images per forward.
        network_kwargs: extra keyword arguments for ``networks.create``.

    Returns:
        a JSON-serialisable dict: ``network, device, input_shape, params, params_m, trainable_params, flops,
        gflops, latency_ms_median, latency_ms (all runs), images_per_s, torch, threads``.

    Raises:
        ValueError: unknown name, bad size / counts, an input size the network does not accept, or CUDA
            requested where none is available.
    """
    if name not in networks.NETWORKS:
        raise ValueError(f"Unknown network {name!r}; valid names: {', '.join(networks.NETWORKS)}.")
    size = tuple(int(s) for s in size)
    if len(size) not in (2, 3) or any(s < 1 for s in size):
        raise ValueError(f"--size needs 2 (H W) or 3 (H W D) positive values, got {size}.")
    if channels < 1 or (classes is not None and classes < 1) or runs < 1 or warmup < 0 or batch_size < 1:
        raise ValueError(
            f"channels ({channels}), classes ({classes}), runs ({runs}), batch_size ({batch_size}) must be >= 1 "
            f"and warmup ({warmup}) >= 0."
        )
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}.")
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but torch.cuda.is_available() is False; use --device cpu.")
    kwargs: dict[str, Any] = {"spatial_dims": len(size), "in_channels": channels}
    if classes is not None:
        kwargs["out_channels"] = classes
    if name.startswith("transfuse") and len(size) == 2:
        kwargs["img_size"] = size
    kwargs.update(network_kwargs or {})
    net = networks.create(name, **kwargs)
    net.check_input_size(size)
    dev = torch.device(device)
    net = net.to(dev).eval()
    x = torch.randn(batch_size, channels, *size, device=dev)
    params = sum(p.numel() for p in net.parameters())
    trainable = sum(p.numel() for p in net.parameters() if p.requires_grad)
    with torch.inference_mode():
        counter = FlopCounterMode(display=False)
        with counter:
            net(x)
        flops = int(counter.get_total_flops())
        for _ in range(warmup):
            net(x)
        times = []
        for _ in range(runs):
            _sync(dev)
            t0 = time.perf_counter()
            net(x)
            _sync(dev)
            times.append((time.perf_counter() - t0) * 1000.0)
    median = statistics.median(times)
    return {
        "network": name,
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        "input_shape": [batch_size, channels, *size],
        "out_channels": net.out_channels,
        "params": params,
        "params_m": round(params / 1e6, 3),
        "trainable_params": trainable,
        "flops": flops,
        "gflops": round(flops / 1e9, 3),
        "latency_ms_median": round(median, 3),
        "latency_ms": [round(t, 3) for t in times],
        "images_per_s": round(batch_size * 1000.0 / median, 3) if median > 0 else float("inf"),
        "runs": runs,
        "warmup": warmup,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines of a ``model_report`` result."""
    return "\n".join(
        [
            f"network        {report['network']} on {report['device']} ({report['threads']} threads, torch {report['torch']})",
            f"input          {tuple(report['input_shape'])} -> {report['out_channels']} classes",
            f"parameters     {report['params']:,} ({report['params_m']:.2f} M)",
            f"FLOPs          {report['gflops']:.2f} G per forward (multiply-add = 2)",
            f"latency        {report['latency_ms_median']:.2f} ms median of {report['runs']} runs after {report['warmup']} warm-up",
            f"throughput     {report['images_per_s']:.2f} images/s",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m pipelines.model_report NAME [--size H W [D]] [--channels C] [--classes N] [--device cpu|cuda]
    [--runs N] [--warmup N] [--batch-size B] [--threads N] [--parallel-streams] [--json PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.model_report", description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=networks.NETWORKS, help="network name")
    parser.add_argument(
        "--size", type=int, nargs="+", default=[352, 352], metavar="N", help="H W [D] (default 352 352)"
    )
    parser.add_argument("--channels", type=int, default=3, help="input channels (default 3)")
    parser.add_argument("--classes", type=int, default=None, help="output channels (default: the network's)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--runs", type=int, default=10, help="timed forwards (default 10)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed warm-up forwards (default 3)")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--parallel-streams", action="store_true", help="TransFuse: branches on two CUDA streams")
    add_benchmark_args(parser)
    args = parser.parse_args(argv)
    if len(args.size) not in (2, 3):
        parser.error(f"--size needs 2 (H W) or 3 (H W D) values, got {args.size}")
    apply_benchmark_args(parser, args)
    extra = {"parallel_streams": True} if args.parallel_streams else {}
    if extra and not args.name.startswith("transfuse"):
        parser.error("--parallel-streams applies to transfuse_s / transfuse_l only")
    try:
        report = model_report(
            args.name,
            args.size,
            args.channels,
            args.classes,
            args.device,
            args.runs,
            args.warmup,
            args.batch_size,
            extra,
        )
    except ValueError as err:
        parser.error(str(err))
    emit_report(format_report(report), report, args.json)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    main()
