"""Benchmark a ctdistill network: parameters, FLOPs, median forward latency and images/s (a benchmark, not a test).

Usage::

    python -m pipelines.model_report transfuse_s --size 352 352 --channels 3
    python -m pipelines.model_report unetpp_teacher --size 64 64 64 --channels 1 --classes 3 --runs 5 --json out.json
    python -m pipelines.model_report transfuse_s --device cuda --amp-dtype bf16 --channels-last --cuda-graphs

FLOPs are counted with ``torch.utils.flop_counter.FlopCounterMode`` on one eval-mode forward of the given batch
(multiply-adds count as 2 FLOPs; normalisation, activations and interpolation are not counted). Latency is the
median wall time of ``--runs`` eval-mode forwards under ``torch.inference_mode`` after ``--warmup`` untimed ones
(CUDA is synchronised around each run). On a shared CPU prefer ``--threads 1``: two intra-op threads on busy
cores can be an order of magnitude slower.

Fast batch-1 inference (all off by default, so the default figure stays the plain fp32 eager one): ``--amp-dtype``
(autocast, ``networks.perf``), ``--channels-last``, ``--compile MODE`` (``torch.compile``; ``reduce-overhead``
uses CUDA graphs through inductor) and ``--cuda-graphs`` (the forward captured once in a ``torch.cuda.CUDAGraph``
on a static input and replayed: one launch per forward instead of hundreds; CUDA only). FLOPs are counted on the
eager network before any of these apply.
"""

from __future__ import annotations

import argparse
import logging
import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import networks
from networks.perf import AMP_DTYPES, autocast_dtype, prepare_network, to_memory_format
from pipelines.benchmark_cli import add_benchmark_args, apply_benchmark_args, emit_report

__all__ = ["model_report", "format_report", "main"]

logger = logging.getLogger(__name__)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graphed(net: torch.nn.Module, x: torch.Tensor) -> Callable[[torch.Tensor], Any]:
    """Capture ``net(x)`` in a CUDA graph (after warm-up on a side stream); returns ``run(x)`` that replays it.

    The returned output tensors are the graph's static outputs: overwritten by the next replay.
    """
    static_x = x.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            net(static_x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_y = net(static_x)

    def run(inp: torch.Tensor) -> Any:
        static_x.copy_(inp)
        graph.replay()
        return static_y

    return run


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
    *,
    amp_dtype: str = "off",
    channels_last: bool = False,
    compile_kwargs: Mapping[str, Any] | None = None,
    cuda_graphs: bool = False,
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
        amp_dtype: autocast (``networks.perf.autocast_dtype``: ``"off"``, ``"auto"``, ``"bf16"``, ``"fp16"``).
        channels_last: channels-last network and input.
        compile_kwargs: ``torch.compile`` arguments (e.g. ``{"mode": "reduce-overhead"}``); None: eager.
        cuda_graphs: replay the forward from a captured CUDA graph (CUDA only).

    Returns:
        a JSON-serialisable dict: ``network, device, input_shape, params, params_m, trainable_params, flops,
        gflops, latency_ms_median, latency_ms (all runs), images_per_s, torch, threads, amp_dtype, channels_last,
        compile, cuda_graphs``.

    Raises:
        ValueError: unknown name, bad size / counts, an input size the network does not accept, CUDA requested
            where none is available, or CUDA graphs / fp16 autocast asked for off CUDA.
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
    if cuda_graphs and device != "cuda":
        raise ValueError("CUDA graphs need --device cuda (on CPU use --compile for a compiled forward).")
    dtype = autocast_dtype(device, amp_dtype)
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
    prepare_network(net, channels_last=channels_last, compile=compile_kwargs is not None, device=dev, compile_kwargs=compile_kwargs)
    x = to_memory_format(x, channels_last)
    with torch.inference_mode(), torch.autocast(dev.type, dtype=dtype, enabled=dtype is not None):
        forward = _graphed(net, x) if cuda_graphs else net
        for _ in range(warmup):
            forward(x)
        times = []
        for _ in range(runs):
            _sync(dev)
            t0 = time.perf_counter()
            forward(x)
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
        "amp_dtype": str(dtype).replace("torch.", "") if dtype is not None else None,
        "channels_last": bool(channels_last),
        "compile": dict(compile_kwargs) if compile_kwargs is not None else None,
        "cuda_graphs": bool(cuda_graphs),
    }


def format_report(report: dict[str, Any]) -> str:
    """Human-readable lines of a ``model_report`` result."""
    return "\n".join(
        [
            f"network        {report['network']} on {report['device']} ({report['threads']} threads, torch {report['torch']})",
            f"input          {tuple(report['input_shape'])} -> {report['out_channels']} classes",
            f"parameters     {report['params']:,} ({report['params_m']:.2f} M)",
            f"FLOPs          {report['gflops']:.2f} G per forward (multiply-add = 2)",
            f"mode           autocast {report['amp_dtype'] or 'off'}, channels_last {report['channels_last']}, "
            f"compile {report['compile'] or 'off'}, CUDA graphs {report['cuda_graphs']}",
            f"latency        {report['latency_ms_median']:.2f} ms median of {report['runs']} runs after {report['warmup']} warm-up",
            f"throughput     {report['images_per_s']:.2f} images/s",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m pipelines.model_report NAME [--size H W [D]] [--channels C] [--classes N] [--device cpu|cuda]
    [--runs N] [--warmup N] [--batch-size B] [--threads N] [--parallel-streams] [--amp-dtype D] [--channels-last]
    [--compile [MODE]] [--cuda-graphs] [--json PATH]``."""
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
    parser.add_argument("--amp-dtype", choices=AMP_DTYPES, default="off", help="autocast dtype (default off: fp32)")
    parser.add_argument("--channels-last", action="store_true", help="channels-last network and input")
    parser.add_argument(
        "--compile", nargs="?", const="default", default=None, metavar="MODE",
        choices=("default", "reduce-overhead", "max-autotune"), help="torch.compile the forward (MODE: default)",
    )  # fmt: skip
    parser.add_argument("--cuda-graphs", action="store_true", help="replay the forward from a CUDA graph (CUDA only)")
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
            amp_dtype=args.amp_dtype,
            channels_last=args.channels_last,
            compile_kwargs=None if args.compile is None else {"mode": args.compile},
            cuda_graphs=args.cuda_graphs,
        )
    except ValueError as err:
        parser.error(str(err))
    emit_report(format_report(report), report, args.json)
    return report


if __name__ == "__main__":
    logging.basicConfig(level=os.environ.get("LOGLEVEL", "WARNING"))
    main()
