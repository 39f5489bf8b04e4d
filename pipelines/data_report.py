"""Benchmark the training data path on a dataset: cache time and size per volume, crop draw time, crops/s.

Usage::

    python -m pipelines.data_report /data/kits19 --in-plane-size 256 256 --cases 4 --json data_report.json

For the first ``--cases`` labelled cases it builds the same ``train`` pipeline the bundles use
(``transforms.build_transforms``), caches them as ``CacheDataset`` does, and measures:

- the deterministic part per volume (load, orient, window, resize, pad, per-class voxel indices): seconds and the
  bytes actually cached, next to the header-only estimate the bundles' preflight uses (``pipelines.engine.data``);
- the random part per draw (``--samples`` 2.5D slabs or 3D patches from one cached volume, then augmentation):
  median milliseconds over ``--draws`` draws, and crops per second;
- the crop sampler alone, from the cached per-class indices and, for comparison, scanning the whole label on every
  draw (MONAI's default without cached indices).

It is a benchmark command, not a test: figures depend on the machine; nothing is written except ``--json``.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from pipelines.benchmark_cli import add_benchmark_args, apply_benchmark_args, emit_report

__all__ = ["data_report", "format_report", "main"]

logger = logging.getLogger(__name__)


def _nbytes(obj: Any) -> int:
    """Bytes held by the tensors / arrays of a (nested) cached item."""
    if isinstance(obj, torch.Tensor):
        return obj.element_size() * obj.numel()
    if hasattr(obj, "nbytes"):
        return int(obj.nbytes)
    if isinstance(obj, Mapping):
        return sum(_nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_nbytes(v) for v in obj)
    return 0


def _labelled_cases(source: str | Path, cases: int) -> list[dict[str, Any]]:
    """The first ``cases`` labelled entries of a dataset folder (any layout ``pipelines.datalist`` reads) or of a
    splits JSON / ``dataset.json`` (its ``training`` section)."""
    from pipelines.datalist import find_cases, load_split

    src = Path(source)
    if not src.exists():
        raise ValueError(f"{src} does not exist; give a dataset folder or a splits JSON.")
    if src.is_file():  # a splits JSON or an MSD / nnU-Net dataset.json: relative paths are relative to it

        def resolve(value: Any) -> str:
            p = Path(str(value).removeprefix("./"))
            return str(p if p.is_absolute() else src.parent / p)

        entries = [{"image": resolve(e["image"]), "label": resolve(e["label"])} for e in load_split(src, "training") if e.get("label")]
    else:
        _, found = find_cases(src)
        entries = [{"image": c["image"], "label": c["label"]} for c in found if c.get("label") and Path(c["label"]).is_file()]
    if not entries:
        raise ValueError(f"{src}: no labelled case found (image + label); run python -m pipelines.check_dataset {src}.")
    return entries[:cases]


def data_report(
    source: str | Path,
    *,
    cases: int = 2,
    draws: int = 5,
    samples: int = 4,
    spatial_dims: int = 2,
    num_slices: int = 3,
    task: str = "kits",
    in_plane_size: Sequence[int] | None = (256, 256),
    pixdim: Sequence[float] | None = None,
    roi_size: Sequence[int] | None = None,
    tumor_share: float = 0.5,
    seed: int = 0,
) -> dict[str, Any]:
    """Measure the training data path on the first ``cases`` labelled cases of ``source``.

    Args:
        source: dataset folder (KiTS19, LiTS, nnU-Net/MSD, CSV layouts) or splits JSON.
        cases: labelled cases to cache (>= 1).
        draws: timed draws per case (>= 1).
        samples: crops per draw (the bundles' ``samples_per_volume``).
        spatial_dims: 2 (2.5D slabs) or 3 (3D patches).
        num_slices: 2.5D slice stack.
        task: HU window preset by task (``kits`` | ``lits``).
        in_plane_size: in-plane resize before caching (None: keep).
        pixdim: optional resampling spacing.
        roi_size: 3D patch size (None: the default).
        tumor_share: share of tumor-centred crops.
        seed: random state of the draws.

    Returns:
        A JSON-serialisable dict: ``cases, samples, cache_s_per_volume, cached_mb_per_volume,
        estimated_mb_per_volume, draw_ms_median (crops + augmentation), crops_per_s, sampler_ms_median (crops from
        the cached indices), full_scan_sampler_ms_median (crops, label scanned each draw), threads, torch`` (medians
        over cases / draws).

    Raises:
        ValueError: a missing source, no labelled case, or bad counts / sizes (from ``build_transforms``).
    """
    from monai.data import CacheDataset
    from monai.transforms import RandCropByLabelClassesd

    import transforms
    from pipelines.engine.data import cached_item_bytes

    if cases < 1 or draws < 1 or samples < 1:
        raise ValueError(f"cases ({cases}), draws ({draws}) and samples ({samples}) must be >= 1.")
    entries = _labelled_cases(source, cases)
    pipeline = transforms.build_transforms(
        "train",
        spatial_dims=spatial_dims,
        num_slices=num_slices,
        task=task,
        in_plane_size=in_plane_size,
        pixdim=pixdim,
        roi_size=roi_size,
        num_samples=samples,
        tumor_share=tumor_share,
    )
    pipeline.set_random_state(seed=seed)
    # the crop sampler is the first random transform of the train pipeline; its twin without cached indices scans
    # the label on every draw (MONAI's default)
    sampler = next(t for t in pipeline.transforms if isinstance(t, RandCropByLabelClassesd))
    scanning = copy.deepcopy(sampler)
    scanning.indices_key = None
    scanning.set_random_state(seed=seed)

    cache_s, cached_b, estimated_b, draw_ms, sampler_ms, scan_ms = [], [], [], [], [], []
    for entry in entries:
        t0 = time.perf_counter()
        ds = CacheDataset([entry], transform=pipeline, cache_rate=1.0, num_workers=0, progress=False)
        cache_s.append(time.perf_counter() - t0)
        item = ds._cache[0]  # the cached dict (MONAI keeps it in _cache)
        cached_b.append(_nbytes(item))
        estimated_b.append(cached_item_bytes(entry["image"], pixdim=pixdim, in_plane_size=in_plane_size))
        for _ in range(draws):
            t0 = time.perf_counter()
            ds[0]
            draw_ms.append((time.perf_counter() - t0) * 1000.0)
        for _ in range(draws):
            t0 = time.perf_counter()
            sampler(dict(item))
            sampler_ms.append((time.perf_counter() - t0) * 1000.0)
        plain = {k: v for k, v in item.items() if k != sampler.indices_key}
        for _ in range(draws):
            t0 = time.perf_counter()
            scanning(dict(plain))
            scan_ms.append((time.perf_counter() - t0) * 1000.0)
        del ds, item, plain
        logger.info("%s: cached in %.2f s", Path(entry["image"]).name, cache_s[-1])
    draw = statistics.median(draw_ms)
    return {
        "source": str(source),
        "cases": len(entries),
        "samples": samples,
        "spatial_dims": spatial_dims,
        "in_plane_size": list(in_plane_size) if in_plane_size is not None else None,
        "cache_s_per_volume": round(statistics.median(cache_s), 3),
        "cached_mb_per_volume": round(statistics.median(cached_b) / 2**20, 2),
        "estimated_mb_per_volume": round(statistics.median(estimated_b) / 2**20, 2),
        "draw_ms_median": round(draw, 3),
        "crops_per_s": round(samples * 1000.0 / draw, 1) if draw > 0 else float("inf"),
        "sampler_ms_median": round(statistics.median(sampler_ms), 3),
        "full_scan_sampler_ms_median": round(statistics.median(scan_ms), 3),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
    }


def format_report(report: Mapping[str, Any]) -> str:
    """Human-readable lines of a :func:`data_report` result."""
    return "\n".join(
        [
            f"source         {report['source']} ({report['cases']} case(s), {report['spatial_dims']}D path, in-plane {report['in_plane_size']})",
            f"cache          {report['cache_s_per_volume']:.2f} s per volume; {report['cached_mb_per_volume']:.1f} MB cached per volume (header estimate {report['estimated_mb_per_volume']:.1f} MB)",
            f"draw           {report['draw_ms_median']:.1f} ms median for {report['samples']} crops + augmentation ({report['crops_per_s']:.1f} crops/s, {report['threads']} threads)",
            f"crop sampler   {report['sampler_ms_median']:.1f} ms per draw from the cached class indices; "
            f"{report['full_scan_sampler_ms_median']:.1f} ms when it scans the label every draw (MONAI's default)",
        ]
    )


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """CLI: ``python -m pipelines.data_report SOURCE [--cases N] [--draws N] [--samples N] [--spatial-dims 2|3]
    [--num-slices K] [--task kits|lits] [--in-plane-size H W | --no-resize] [--pixdim X Y Z] [--threads N]
    [--json PATH]``."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.data_report", description=__doc__.splitlines()[0])
    parser.add_argument("source", help="dataset folder or splits JSON")
    parser.add_argument("--cases", type=int, default=2, help="labelled cases to cache (default 2)")
    parser.add_argument("--draws", type=int, default=5, help="timed draws per case (default 5)")
    parser.add_argument("--samples", type=int, default=4, help="crops per draw (default 4)")
    parser.add_argument("--spatial-dims", type=int, choices=(2, 3), default=2)
    parser.add_argument("--num-slices", type=int, default=3)
    parser.add_argument("--task", default="kits")
    parser.add_argument("--in-plane-size", type=int, nargs=2, default=[256, 256], metavar=("H", "W"))
    parser.add_argument("--no-resize", action="store_true", help="keep the in-plane size (no resize before caching)")
    parser.add_argument("--pixdim", type=float, nargs=3, default=None, metavar=("X", "Y", "Z"))
    add_benchmark_args(parser)
    args = parser.parse_args(argv)
    apply_benchmark_args(parser, args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        report = data_report(
            args.source,
            cases=args.cases,
            draws=args.draws,
            samples=args.samples,
            spatial_dims=args.spatial_dims,
            num_slices=args.num_slices,
            task=args.task,
            in_plane_size=None if args.no_resize else args.in_plane_size,
            pixdim=args.pixdim,
        )
    except ValueError as err:
        parser.error(str(err))
    emit_report(format_report(report), report, args.json)
    return report


if __name__ == "__main__":
    main()
