"""The product demo (``make demo``): synthetic KiTS-like cohort -> teacher, student, HLFD student -> evaluation table.

Everything runs through the bundles (``monai.bundle run training|evaluating``, in this process) and is tracked in
one MLflow store (``sqlite:///<out>/mlruns.db``):

1. ``pipelines.synthesize`` writes a small KiTS19-layout cohort to ``<out>/data`` (the split holds out the paper's
   test share, 20 %, for evaluation);
2. ``bundles/unetpp_teacher`` trains the UNet++ teacher, ``bundles/resnet18_student`` the ResNet18 student without
   distillation, ``bundles/hlfd`` the same student distilled from the teacher's best checkpoint;
3. each ``evaluate.yaml`` scores its best checkpoint on the held-out volumes (DSC and RVD per volume, all slices);
4. the table printed at the end is read from the evaluation CSVs and from timings taken here (inference ms per
   slice: median over repeated whole-volume inferences divided by the number of slices). Nothing is hard-coded.

Sizes default to what trains in a few minutes on 2 CPU cores with tiny widths; ``--epochs``, ``--cases``,
``--size`` scale it up.
"""

from __future__ import annotations

import argparse
import csv
import logging
import math
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pipelines.experiment import paired_difference, run_bundle

__all__ = ["DemoConfig", "MethodResult", "run_demo", "format_table", "main", "paired_difference"]

logger = logging.getLogger(__name__)


@dataclass
class DemoConfig:
    """Demo sizes (defaults: about 14 minutes on 2 CPU cores; about 1200 training steps per model).

    Args:
        out: output folder (data, runs, MLflow store).
        cases: synthetic cases (20 % held out for the test table, 20 % of the rest for validation).
        size: voxels per in-plane side of the synthetic volumes (also the network's in-plane size).
        epochs: training epochs of every model.
        samples_per_volume: 2.5D slices drawn per training volume per epoch.
        batch_size: training batch (slices).
        val_interval: validate (and maybe save best.pt) every this many epochs.
        teacher_features: UNet++ widths.
        student_base_width: ResNet18 base width (widths base * (1, 2, 4, 8)).
        student_decoder_channels: ResNet18 decoder widths at strides 16, 8, 4, 2, 1 (None: the network's default,
            scaled with the base width).
        lr: learning rate of every run (the paper's 1e-3).
        seed: data and training seed.
    """

    out: Path = Path("demo_out")
    cases: int = 24
    size: int = 64
    epochs: int = 150
    samples_per_volume: int = 4
    batch_size: int = 8
    val_interval: int = 10
    # the paper's sizes scaled down: a 5-level UNet++ at 3/16 of its widths (1.29M parameters) and a ResNet18 at 1/4
    # of its widths (0.78M), so the teacher stays the larger network, as in the paper (36.1M vs 11.6M)
    teacher_features: Sequence[int] = (12, 24, 48, 96, 192)
    student_base_width: int = 16
    # the default decoder scaled by 16/64 would leave 4 channels at full resolution, too few for 1-2 pixel tumors
    student_decoder_channels: Sequence[int] | None = (32, 24, 16, 16, 16)
    lr: float = 1e-3
    seed: int = 0
    #: a folder of real label maps (e.g. KiTS19 case_XXXXX/segmentation.nii.gz): the cohort is built around them with
    #: ``pipelines.synthesize.synthesize_from_labels`` (its first ``cases`` label maps) instead of procedurally
    from_labels: Path | None = None


@dataclass
class MethodResult:
    """One row of the demo table."""

    method: str
    role: str
    dsc_tumor: tuple[float, float]
    rvd_tumor: tuple[float, float]
    dsc_organ: tuple[float, float]
    n_cases: int
    rvd_undefined: int
    params: int
    ms_per_slice: float
    train_s: float
    cases_csv: Path | None = None


def _summary(path: Path) -> dict[str, dict[str, str]]:
    with open(path) as f:
        return {r["column"]: r for r in csv.DictReader(f)}


def _pair(row: dict[str, str]) -> tuple[float, float]:
    return float(row["mean"]), float(row["std"])


def _ms_per_slice(checkpoint: Path, image: str, repeats: int = 3) -> tuple[int, float]:
    """Parameters of the checkpoint's network and median whole-volume inference time per slice (ms)."""
    import torch
    from monai.data import MetaTensor

    import transforms
    from pipelines.engine import checkpoint_settings, make_inferer, network_from_checkpoint

    settings = checkpoint_settings(checkpoint)
    net = network_from_checkpoint(checkpoint, "cpu")
    params = sum(p.numel() for p in net.parameters())
    pre = settings["preprocessing"]
    data = transforms.build_transforms("infer", **pre)({"image": image})
    x = torch.as_tensor(data["image"] if not isinstance(data["image"], MetaTensor) else data["image"].as_tensor())[None]
    inferer = make_inferer(pre["spatial_dims"], pre.get("roi_size"), sw_batch_size=16, in_plane_size=pre.get("in_plane_size"))
    times = []
    with torch.no_grad():
        inferer(x, net)  # warm-up
        for _ in range(repeats):
            t0 = time.perf_counter()
            inferer(x, net)
            times.append(time.perf_counter() - t0)
    return params, 1000.0 * statistics.median(times) / int(x.shape[-1])


def run_demo(cfg: DemoConfig) -> list[MethodResult]:
    """Synthesize, train the three models, evaluate them; return the measured rows.

    Raises:
        RuntimeError: when the repository's bundles are not found (run from the repository root).
    """
    from pipelines.synthesize import synthesize

    if not Path("bundles/common/configs/train.yaml").is_file():
        raise RuntimeError("run the demo from the repository root (bundles/ not found in the working directory).")
    out = cfg.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    data = out / "data"
    t0 = time.perf_counter()
    if cfg.from_labels is not None:
        from pipelines.synthesize import find_label_files, synthesize_from_labels

        n = min(cfg.cases, len(find_label_files(Path(cfg.from_labels))))
        synthesize_from_labels(Path(cfg.from_labels), data, cases=n, size=cfg.size, seed=cfg.seed)
        logger.info("synthesized %d cases around the label maps of %s (%d^2 in-plane) in %.1f s -> %s", n, cfg.from_labels, cfg.size, time.perf_counter() - t0, data)
    else:
        synthesize("kits", cases=cfg.cases, size=cfg.size, out=data, seed=cfg.seed)
        logger.info("synthesized %d cases (%d^2 in-plane) in %.1f s -> %s", cfg.cases, cfg.size, time.perf_counter() - t0, data)
    uri = f"sqlite:///{out / 'mlruns.db'}"
    common = dict(
        dataset_dir=str(data),
        epochs=cfg.epochs,
        lr=cfg.lr,
        seed=cfg.seed,
        in_plane_size=[cfg.size, cfg.size],
        samples_per_volume=cfg.samples_per_volume,
        batch_size=cfg.batch_size,
        val_interval=cfg.val_interval,
        num_workers=0,
        sw_batch_size=32,
        tracking_uri=uri,
        experiment_name="ctdistill_demo",
    )
    runs = out / "runs"
    student = {"base_width": cfg.student_base_width}
    if cfg.student_decoder_channels is not None:
        student["decoder_channels"] = list(cfg.student_decoder_channels)
    plan = [
        ("UNet++ teacher", "unetpp_teacher", {"network_kwargs": {"features": list(cfg.teacher_features)}}),
        ("ResNet18 student (no KD)", "resnet18_student", {"network_kwargs": student}),
        ("ResNet18 student + HLFD", "hlfd", {"network_kwargs": student}),
    ]
    results = []
    teacher_ckpt = runs / "unetpp_teacher" / "checkpoints" / "best.pt"
    for method, role, extra in plan:
        # the demo owns <out>/runs: a second `make demo` retrains into it (--overwrite true), it never resumes
        kw = dict(common, output_dir=str(runs / role), overwrite=True, **extra)
        if role == "hlfd":
            kw["teacher_ckpt"] = str(teacher_ckpt)
        t0 = time.perf_counter()
        run_bundle("training", role, "train", **kw)
        train_s = time.perf_counter() - t0
        run_bundle("evaluating", role, "evaluate", dataset_dir=str(data), output_dir=str(runs / role), tracking_uri=uri, experiment_name="ctdistill_demo", num_workers=0)
        summ = _summary(runs / role / "eval" / "summary.csv")
        ckpt = runs / role / "checkpoints" / "best.pt"
        from pipelines.engine import load_split, sidecar

        test_image = load_split(sidecar(ckpt, "splits.json"), ["test", "validation"])[0]["image"]
        params, ms = _ms_per_slice(ckpt, test_image)
        results.append(
            MethodResult(
                method=method,
                role=role,
                dsc_tumor=_pair(summ["dsc_tumor"]),
                rvd_tumor=_pair(summ["rvd_tumor"]),
                dsc_organ=_pair(summ["dsc_organ"]),
                n_cases=int(summ["dsc_tumor"]["n"]),
                rvd_undefined=int(summ["rvd_tumor"]["n_undefined"]),
                params=params,
                ms_per_slice=ms,
                train_s=train_s,
                cases_csv=runs / role / "eval" / "cases.csv",
            )
        )
        if role == "unetpp_teacher" and results[-1].dsc_tumor[0] < 0.05:
            logger.warning(
                "the teacher reached a tumor DSC of only %.3f: distillation has little to transfer; try --epochs %d",
                results[-1].dsc_tumor[0],
                cfg.epochs * 2,
            )
    return results


def _pm(v: tuple[float, float], fmt: str = "{:.3f}") -> str:
    mean, std = v
    if math.isnan(mean):
        return "n/a"
    return f"{fmt.format(mean)} ± {fmt.format(std)}"


def format_table(results: Sequence[MethodResult]) -> str:
    """The demo table (markdown), one row per method, from measured values only."""
    head = "| method | tumor DSC | tumor RVD | organ DSC | params | ms / slice | train s |"
    lines = [head, "|" + "---|" * 7]
    for r in results:
        lines.append(
            f"| {r.method} | {_pm(r.dsc_tumor)} | {_pm(r.rvd_tumor)} | {_pm(r.dsc_organ)} | {r.params / 1e6:.3f}M "
            f"| {r.ms_per_slice:.2f} | {r.train_s:.0f} |"
        )
    n = results[0].n_cases if results else 0
    undefined = max((r.rvd_undefined for r in results), default=0)
    lines.append("")
    lines.append(f"mean ± std over {n} held-out volumes (all slices); RVD = (V_pred - V_gt) / V_gt" + (f", undefined for {undefined} volume(s) without tumor" if undefined else ""))
    by_role = {r.role: r for r in results}
    kd, plain = by_role.get("hlfd"), by_role.get("resnet18_student")
    if kd is not None and plain is not None and kd.cases_csv is not None and plain.cases_csv is not None:
        mean, sd, m, better = paired_difference(kd.cases_csv, plain.cases_csv)
        if m:
            lines.append(
                f"HLFD - no KD, tumor DSC paired over the same {m} volumes: {mean:+.3f} (sd {'n/a' if math.isnan(sd) else f'{sd:.3f}'}); HLFD higher on "
                f"{better} of {m}. One seed on a small synthetic cohort: a difference within its sd is noise."
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: ``python -m pipelines.demo --out demo_out``."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    d = DemoConfig()
    p.add_argument("--out", type=Path, default=d.out, help="output folder (data, runs, MLflow store)")
    p.add_argument("--cases", type=int, default=d.cases)
    p.add_argument("--size", type=int, default=d.size)
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--samples-per-volume", type=int, default=d.samples_per_volume)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--teacher-features", type=int, nargs="+", default=list(d.teacher_features), help="UNet++ teacher widths per level")
    p.add_argument("--student-width", type=int, default=d.student_base_width, help="ResNet18 student base width")
    p.add_argument("--student-decoder", type=int, nargs=5, default=d.student_decoder_channels, help="ResNet18 student decoder widths (strides 16, 8, 4, 2, 1)")
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--from-labels", type=Path, default=None,
                   help="build the cohort around the real label maps in this folder (e.g. ../shared/data/kits19_labels)")
    a = p.parse_args(argv)
    if a.cases < 5:
        p.error(f"--cases must be >= 5 (training, validation and held-out test volumes), got {a.cases}")
    if a.from_labels is not None and not a.from_labels.is_dir():
        p.error(f"--from-labels {a.from_labels} is not a folder")
    if a.size % 16:
        p.error(f"--size must be divisible by 16 (network strides), got {a.size}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    torch_threads = os.environ.get("OMP_NUM_THREADS")
    cfg = DemoConfig(
        out=a.out, cases=a.cases, size=a.size, epochs=a.epochs, samples_per_volume=a.samples_per_volume, batch_size=a.batch_size, seed=a.seed,
        teacher_features=tuple(a.teacher_features), student_base_width=a.student_width,
        student_decoder_channels=a.student_decoder, from_labels=a.from_labels,
    )
    t0 = time.perf_counter()
    results = run_demo(cfg)
    print()
    print(format_table(results))
    print()
    print(f"total {time.perf_counter() - t0:.0f} s on {os.cpu_count()} CPU cores (OMP_NUM_THREADS={torch_threads}); outputs in {cfg.out.resolve()}")
    print(f"MLflow: mlflow ui --backend-store-uri sqlite:///{(cfg.out / 'mlruns.db').resolve()}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
