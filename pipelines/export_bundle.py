"""Export a trained role as a self-contained MONAI model-zoo bundle zip (and TorchScript / ONNX models).

::

    python -m pipelines.export_bundle hlfd --checkpoint runs/hlfd/checkpoints/best.pt --out hlfd_bundle.zip
    python -m pipelines.export_bundle resnet18_student --checkpoint best.pt --out student.zip --torchscript --onnx

The zip holds one folder ``<name>/`` laid out as the MONAI bundle specification asks:

- ``configs/``: the role's ``inference.yaml``, ``evaluate.yaml``, ``train.yaml``, ``multi_gpu_train.yaml`` and
  ``logging.conf`` (the self-contained files of ``bundles/<role>/configs``), with ``bundle_root``, ``checkpoint``
  (``$@bundle_root + '/models/model.pt'``), ``network_def`` and the output folders relative to the bundle
  (inference and evaluation only; nothing points into this repository); ``metadata.json`` (valid against the zoo
  schema shipped in ``bundles/schema/``, with the versions installed here and the network's exact input/output
  shapes);
- ``models/model.pt``: the network's weights as a plain state dict (what the zoo's ``ckpt_export`` loads by
  default); the settings that rebuild the network (name, kwargs, preprocessing) are the ``ctdistill`` section of
  ``metadata.json``, which the exported configs read (``pipelines.engine.settings_from_metadata``). Optionally
  ``models/model.ts`` (TorchScript, traced) and ``models/model.onnx``;
- ``docs/README.md`` (what the model is, its data and preprocessing, its recorded validation score, how to run
  it, intended use), ``docs/data_license.txt`` (the training data's licences) and ``LICENSE``.

Inference and evaluation of an unpacked bundle write nothing inside its folder: their default output folder and
MLflow store are ``<bundle folder>_output/`` beside it.

Before the zip is written the staged bundle is checked the way the zoo checks it (``verify_metadata`` against the
shipped schema, offline; ``verify_net_in_out`` on ``network_def``). The zip is written atomically and is
byte-identical for the same inputs (fixed entry times).

TorchScript is traced, not scripted: the networks pick modules by computed names (``getattr(self,
f"layer{k}")``, the UNet++ node grid), pass an ``int`` scale to ``F.interpolate`` and validate input sizes in
Python, none of which ``torch.jit.script`` compiles (its first complaint, ``Unknown type annotation: 'int'``,
comes from the class-level annotations of ``networks.contract.TapNetwork``, which are strings under
``from __future__ import annotations``). In eval mode the forward passes have no data-dependent control flow, so a
trace at the bundle's input shape is exact (tested against eager).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import re
import sys
import tempfile
import zipfile
from collections.abc import Mapping, Sequence
from importlib import metadata as importlib_metadata
from pathlib import Path
from typing import Any

import torch
import yaml

from pipelines.engine.config_values import CONFIG_PREFIXES

__all__ = [
    "BUNDLES_DIR",
    "SCHEMA_FILE",
    "LICENSE_FILE",
    "DATA_LICENSE",
    "CONFIG_FILES",
    "export_bundle",
    "bundle_metadata",
    "bundle_configs",
    "verify_bundle",
    "export_torchscript",
    "export_onnx",
    "main",
]

logger = logging.getLogger(__name__)

_REPO = Path(__file__).resolve().parents[1]
#: the roles' bundle folders of this checkout
BUNDLES_DIR: Path = _REPO / "bundles"
#: MONAI's model-zoo metadata schema, shipped so that ``verify_metadata`` runs offline
SCHEMA_FILE: Path = BUNDLES_DIR / "schema" / "meta_schema_20240725.json"
#: the project's licence, copied into every bundle
LICENSE_FILE: Path = _REPO / "LICENSE"
#: files of ``bundles/<role>/configs`` copied into the bundle (``metadata.json`` is rebuilt)
CONFIG_FILES: tuple[str, ...] = ("inference.yaml", "evaluate.yaml", "train.yaml", "multi_gpu_train.yaml", "logging.conf")
#: packages the bundle's configs import beyond MONAI (their installed versions go into ``metadata.json``)
REQUIRED_PACKAGES: tuple[str, ...] = ("ctdistill", "pytorch-ignite", "nibabel", "pydicom", "einops", "mlflow")
_ZIP_TIME = (1980, 1, 1, 0, 0, 0)
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")

# Top-level keys each exported config gets (MONAI's top-level replace rule, applied as text so the comments stay)
_BUNDLE_ROOT = 'bundle_root: "."   # the unpacked bundle folder: run from inside it, or pass --bundle_root <folder>\n'
_CHECKPOINT = "checkpoint: \"$@bundle_root + '/models/model.pt'\"   # the exported weights: a plain state dict (--checkpoint <file> for others)\n"
# models/model.pt is a plain state dict (the zoo's ckpt_export loads it without --key_in_ckpt): the settings that
# rebuild the network come from configs/metadata.json, and the weights load strictly into network_def
_SETTINGS = (
    "ckpt_settings: \"$pipelines.engine.settings_from_metadata(@bundle_root + '/configs/metadata.json')\"   # network and preprocessing settings\n"
    "network: \"$networks.perf.prepare_network(pipelines.engine.init_from_checkpoint(@network_def, @checkpoint).to(@device).eval(), channels_last=@channels_last, device=@device)\"\n"
)
#: what an unpacked bundle writes goes beside it, into <bundle folder>_output/, never inside the bundle folder
_OUTPUT = "$os.path.abspath(@bundle_root) + '_output"
_OVERLAYS: dict[str, str] = {
    "inference.yaml": f"output_dir: \"{_OUTPUT}/inference'\"   # label maps + volumes.csv, beside the bundle folder (or --output_dir <folder>)\n"
    + _CHECKPOINT
    + _BUNDLE_ROOT
    + _SETTINGS,
    "evaluate.yaml": "dataset_dir: null   # REQUIRED here: the labelled data (KiTS/LiTS/nnU-Net folder, CSV or splits JSON)\n"
    + f"output_dir: \"{_OUTPUT}'\"   # results go to <output_dir>/eval, beside the bundle folder (or --output_dir <folder>)\n"
    + _CHECKPOINT
    + _BUNDLE_ROOT
    + f"tracking_uri: \"$'sqlite:///' + {_OUTPUT[1:]}/mlruns.db'\"   # MLflow store beside the bundle folder (or --tracking_uri <server>)\n"
    + _SETTINGS,
}
#: the data licence note of every exported bundle (``docs/data_license.txt``, as the model zoo asks)
DATA_LICENSE = """Data licence of this bundle's training data
==========================================

The weights in models/model.pt were trained by the ctdistill project on the data named in configs/metadata.json
("data_source"). Those data sets keep their own licences and terms of use, which bind any use of this model:

- KiTS19 (kidney tumor segmentation challenge 2019): CC BY-NC-SA 4.0, https://kits19.grand-challenge.org
- LiTS (liver tumor segmentation challenge): CC BY-NC-SA 4.0, https://competitions.codalab.org/competitions/17094
- Kvasir-SEG: for research and educational use, cite the dataset paper; CVC-ClinicDB: for research use, cite the
  dataset paper
- synthetic volumes made by `python -m pipelines.synthesize` (test runs): no restriction

No image or label of these data sets is included in this bundle. The code and the bundle files are released under
the Apache-2.0 licence (LICENSE); the weights are for research use only and are not a medical device.
"""


def _check_name(value: str, what: str) -> str:
    if not isinstance(value, str) or not _NAME.match(value):
        raise ValueError(f"{what} {value!r} is not valid: letters, digits, '_', '.', '-' (no spaces or slashes).")
    return value


def _roles(bundles_dir: Path) -> list[str]:
    """Folders of ``bundles_dir`` with ``configs/metadata.json`` and ``configs/inference.yaml`` (not ``common``)."""
    return sorted(p.parent.parent.name for p in bundles_dir.glob("*/configs/metadata.json") if p.with_name("inference.yaml").is_file())


def _knob(config: Path, key: str, default: Any) -> Any:
    """A plain top-level value of a role config (``default`` when absent, an expression or a macro)."""
    try:
        value = (yaml.safe_load(config.read_text()) or {}).get(key, default)
    except (OSError, yaml.YAMLError):
        return default
    return default if isinstance(value, str) and value.startswith(CONFIG_PREFIXES) else value


def _version(package: str) -> str:
    try:
        return importlib_metadata.version(package)
    except importlib_metadata.PackageNotFoundError:
        return "not installed"


def bundle_metadata(
    role_metadata: Mapping[str, Any],
    network: torch.nn.Module,
    checkpoint: Mapping[str, Any],
    *,
    name: str,
    version: str,
    key_metric: str = "dsc_tumor",
    source_sha256: str = "",
) -> dict[str, Any]:
    """The exported ``metadata.json``: the role's metadata with this checkpoint's shapes, scores and versions.

    Args:
        role_metadata: ``bundles/<role>/configs/metadata.json``.
        network: the rebuilt network (``in_channels``, ``out_channels``).
        checkpoint: the ``models/model.pt`` content (:func:`pipelines.engine.checkpoint.release_checkpoint`).
        name: bundle name.
        version: bundle version.
        key_metric: the validation metric that selected the checkpoint (``best_metric``).
        source_sha256: SHA-256 of the training checkpoint the bundle was exported from.

    Returns:
        the metadata dict (``network_data_format`` with explicit channels and the spatial shape the network is fed:
        ``pipelines.engine.tracking.model_input_shape``).
    """
    from pipelines.engine.tracking import model_input_shape

    meta = json.loads(json.dumps(dict(role_metadata)))
    settings = checkpoint.get("settings") or {}
    pre = dict(settings.get("preprocessing") or {})
    shape = list(model_input_shape(settings)[1:])
    fmt = meta.setdefault("network_data_format", {"inputs": {"image": {}}, "outputs": {"pred": {}}})
    image = fmt["inputs"].setdefault("image", {})
    image.update(num_channels=int(network.in_channels), spatial_shape=shape, is_patch_data=len(shape) == 3)
    if int(network.in_channels) == 1:
        image["channel_def"] = {"0": "CT slice" if len(shape) == 2 else "CT volume"}
    elif pre.get("num_slices") and int(pre["num_slices"]) == int(network.in_channels):
        half = int(network.in_channels) // 2
        image["channel_def"] = {str(i): "slice z" + (f"{i - half:+d}" if i != half else "") for i in range(int(network.in_channels))}
    pred = fmt["outputs"].setdefault("pred", {})
    pred.update(num_channels=int(network.out_channels), spatial_shape=shape, is_patch_data=len(shape) == 3)
    best = checkpoint.get("best_metric")
    scores = {}
    if isinstance(best, (int, float)) and math.isfinite(best):
        scores[f"val_mean_{key_metric}"] = round(float(best), 4)
    meta.update(
        name=name,
        version=version,
        changelog={version: f"exported from a ctdistill {settings.get('role', '')} checkpoint (epoch {checkpoint.get('epoch', '?')})"},
        monai_version=_version("monai"),
        pytorch_version=_version("torch").split("+")[0],
        numpy_version=_version("numpy"),
        required_packages_version={p: _version(p) for p in REQUIRED_PACKAGES},
        eval_metrics=scores,
    )
    meta["ctdistill"] = {
        "role": settings.get("role", ""),
        "network_name": settings.get("network_name", ""),
        "network_kwargs": settings.get("network_kwargs", {}),
        "preprocessing": pre,
        "best_epoch": checkpoint.get("best_epoch"),
        "seed": settings.get("seed", 0),
        "source_checkpoint_sha256": source_sha256,
        "source_mlflow_run_id": settings.get("mlflow_run_id", ""),
    }
    return meta


def bundle_configs(role_configs: Path, note: str = "") -> dict[str, str]:
    """The exported config texts: the role's files with the bundle-relative keys of :data:`_OVERLAYS`.

    Comments are kept, except the "GENERATED ... regenerate" header of the repository's files (``note`` is
    written in its place); ``bundles/<role>/`` in comments becomes bundle-relative (``configs/...``).

    Args:
        role_configs: ``bundles/<role>/configs`` (self-contained files: no ``%file#id`` macros).
        note: a comment line for the top of every YAML file (e.g. where the bundle was exported from).

    Returns:
        ``{file name: text}`` for :data:`CONFIG_FILES` (the ones the role has; inference and evaluate required).

    Raises:
        ValueError: inference/evaluate missing, or a config that still pulls sections from other files by macro.
    """
    from pipelines.compose_bundles import merge_blocks, parse_blocks

    role = role_configs.parent.name
    out: dict[str, str] = {}
    for fname in CONFIG_FILES:
        path = role_configs / fname
        if not path.is_file():
            if fname in _OVERLAYS:
                raise ValueError(f"{path} does not exist; a bundle needs its inference and evaluate configs.")
            continue
        text = path.read_text()
        if fname.endswith(".yaml") and re.search(r"""^[A-Za-z_]\w*:\s*["']?%""", text, re.M):
            raise ValueError(
                f"{path} pulls sections from other files by macro ('%file#id'); only self-contained configs can be "
                "exported (regenerate them: python -m pipelines.compose_bundles)."
            )
        if fname.endswith(".yaml"):
            header, items = parse_blocks(text)
            if fname in _OVERLAYS:
                items = merge_blocks(items, parse_blocks(_OVERLAYS[fname])[1])
            header = [h for h in header if not h.startswith(("# GENERATED by", "# edit those and regenerate"))]
            if note:
                header = [*header[:1], f"# {note}", *header[1:]]
            lines = [*header, *(line for b in items for line in b.lines())]
            text = "\n".join(lines).rstrip().replace(f"bundles/{role}/", "") + "\n"
        out[fname] = text
    return out


def bundle_readme(meta: Mapping[str, Any], checkpoint: Mapping[str, Any], params: int) -> str:
    """``docs/README.md`` of an exported bundle (model, data, preprocessing, score, commands, intended use)."""
    settings = checkpoint.get("settings") or {}
    pre = settings.get("preprocessing") or {}
    image = meta["network_data_format"]["inputs"]["image"]
    name, role = meta["name"], settings.get("role", "")
    scores = ", ".join(f"`{k}` = {v}" for k, v in (meta.get("eval_metrics") or {}).items()) or "not recorded"
    pre_rows = "\n".join(f"| `{k}` | `{json.dumps(v)}` |" for k, v in pre.items())
    shape = "x".join(str(s) for s in image["spatial_shape"])
    return f"""# {name}

{meta.get("description", "")}

Exported from a ctdistill `{role}` training checkpoint with `python -m pipelines.export_bundle` (bundle version
{meta["version"]}). Network: `{settings.get("network_name")}` with `{json.dumps(settings.get("network_kwargs", {}))}`
({params / 1e6:.2f}M parameters); input {image["num_channels"]} channel(s) of {shape} voxels, output
{meta["network_data_format"]["outputs"]["pred"]["num_channels"]} class logits ({meta.get("label_classes", "")}).

## Data and preprocessing

{meta.get("data_source", "")}. Labels: {meta.get("label_classes", "")}. The inference and evaluation configs rebuild
the preprocessing from the settings stored in `models/model.pt`:

| setting | value |
|---|---|
{pre_rows}

## Validation score recorded in the checkpoint

{scores} (epoch {checkpoint.get("best_epoch", "?")} of {checkpoint.get("epoch", "?")}; mean over the validation
volumes of the training run, every slice). Re-measure on your own labelled data with the evaluation below.

## Run it

Requirements: the `ctdistill` package (it provides the `pipelines`, `transforms`, `networks` and `distill` modules
the configs import) with the versions in `configs/metadata.json`. From this folder (or anywhere, adding
`--bundle_root <this folder>`):

```bash
python -m monai.bundle run inferring  --config_file configs/inference.yaml --input_dir <ct folder> --output_dir <out>
python -m monai.bundle run evaluating --config_file configs/evaluate.yaml --dataset_dir <labelled data>
python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath <ctdistill>/bundles/schema/meta_schema_20240725.json
python -m monai.bundle verify_net_in_out network_def --meta_file configs/metadata.json --config_file configs/inference.yaml
python -m monai.bundle ckpt_export network_def --filepath models/model.ts --ckpt_file models/model.pt \\
    --meta_file configs/metadata.json --config_file configs/inference.yaml --use_trace true
```

Inference reads NIfTI volumes or DICOM series and writes label maps (0 background, 1 organ, 2 tumor) in each
input's geometry plus `volumes.csv` (organ and tumor mL). Evaluation writes per-volume DSC / RVD to
`eval/cases.csv` and `eval/summary.csv`. `configs/train.yaml` retrains or fine-tunes the same network
(`python -m monai.bundle run training --config_file configs/train.yaml --dataset_dir <data>`).
`models/model.pt` is a plain state dict (`torch.load(..., weights_only=True)`); the network it fits is rebuilt from
the `ctdistill` section of `configs/metadata.json` (`network_name`, `network_kwargs`, `preprocessing`). Inference and
evaluation write nothing inside this folder: by default into `<this folder>_output/` beside it (label maps, CSVs and
the MLflow store `mlruns.db`), or wherever `--output_dir` / `--tracking_uri` say. Data licences: `docs/data_license.txt`.

## Intended use

{meta.get("intended_use", "Research on kidney/liver tumor segmentation in CT.")} Not a medical device: it is not
validated for clinical use, and its score above comes from the training run's own validation split.

## Licence

{meta.get("copyright", "")}; released under the {meta.get("license", "Apache-2.0")} licence (`LICENSE`).
"""


def verify_bundle(bundle_dir: str | Path, schema: str | Path = SCHEMA_FILE) -> None:
    """MONAI's checks of a bundle folder, offline: ``verify_metadata`` and ``verify_net_in_out`` on ``network_def``.

    Args:
        bundle_dir: the bundle folder (``configs/``, ``models/model.pt``).
        schema: the zoo metadata schema file (an existing file: MONAI skips the download).

    Raises:
        FileNotFoundError: the schema file is missing.
        ValueError: the metadata fails the schema, or the network's output channels/dtype differ from it.
    """
    from monai.bundle import verify_metadata, verify_net_in_out

    from pipelines.engine.config_values import config_literal

    schema, bundle_dir = Path(schema), Path(bundle_dir)
    if not schema.is_file():
        raise FileNotFoundError(f"metadata schema {schema} does not exist (it ships in bundles/schema/).")
    meta = str(bundle_dir / "configs" / "metadata.json")
    verify_metadata(meta_file=meta, filepath=str(schema))
    verify_net_in_out(
        net_id="network_def",
        meta_file=meta,
        config_file=str(bundle_dir / "configs" / "inference.yaml"),
        device="cpu",
        bundle_root=config_literal(bundle_dir),  # a folder named '@x' or 'a#b' stays a path
    )


def _example_shape(meta: Mapping[str, Any]) -> list[int]:
    """``(C, *spatial)`` of one network input, from ``metadata.json`` (its spatial shape must be explicit)."""
    image = meta["network_data_format"]["inputs"]["image"]
    spatial = image["spatial_shape"]
    if not all(isinstance(s, int) and not isinstance(s, bool) for s in spatial):
        raise ValueError(f"metadata spatial_shape {spatial} is not explicit; give integers (the size the network is fed).")
    return [int(image["num_channels"]), *spatial]


def export_torchscript(bundle_dir: str | Path, filepath: str | Path | None = None) -> Path:
    """``monai.bundle.ckpt_export`` of a bundle folder to TorchScript, traced at the metadata's input shape.

    Args:
        bundle_dir: the bundle folder (``configs/inference.yaml`` with ``network_def``, ``models/model.pt``).
        filepath: the ``.ts`` file (default ``<bundle_dir>/models/model.ts``).

    Returns:
        the written file (metadata and the inference config embedded, as MONAI's ``ckpt_export`` stores them).
    """
    from monai.bundle import ckpt_export

    from pipelines.engine.config_values import config_literal

    bundle_dir = Path(bundle_dir)
    meta = json.loads((bundle_dir / "configs" / "metadata.json").read_text())
    out = Path(filepath) if filepath else bundle_dir / "models" / "model.ts"
    ckpt_export(
        net_id="network_def",
        filepath=str(out),
        ckpt_file=str(bundle_dir / "models" / "model.pt"),
        meta_file=str(bundle_dir / "configs" / "metadata.json"),
        config_file=str(bundle_dir / "configs" / "inference.yaml"),
        use_trace=True,
        input_shape=[1, *_example_shape(meta)],
        bundle_root=config_literal(bundle_dir),  # a folder named '@x' or 'a#b' stays a path
    )
    return out


def export_onnx(
    network: torch.nn.Module,
    path: str | Path,
    input_shape: Sequence[int],
    *,
    opset: int = 18,
    check_atol: float | None = 1e-4,
) -> Path:
    """Export a network to ONNX (``torch.onnx`` dynamo exporter) with a dynamic batch axis.

    Args:
        network: the network; exported in eval mode on CPU (its mode and device are restored).
        path: the ``.onnx`` file (written atomically).
        input_shape: ``(C, *spatial)`` of ONE input; the batch axis is dynamic (input ``image``, output ``pred``).
        opset: ONNX opset (>= 17).
        check_atol: when onnxruntime is installed, run the file on a random batch of 2 and require
            ``max |onnx - eager| <= check_atol`` (None: no check).

    Returns:
        the written file.

    Raises:
        ValueError: ``opset`` below 17, or the ONNX output differs from eager by more than ``check_atol``.
    """
    from pipelines.engine.atomic import atomic_write

    if int(opset) < 17:
        raise ValueError(f"opset {opset} is too old; use 17 or later.")
    shape = tuple(int(s) for s in input_shape)
    device, training = next(network.parameters()).device, network.training
    network.cpu().eval()
    example = torch.rand(2, *shape, generator=torch.Generator().manual_seed(0))
    try:
        batch = torch.export.Dim("batch", min=1, max=4096)

        def write(tmp: Path) -> None:
            torch.onnx.export(
                network,
                (example,),
                str(tmp),
                input_names=["image"],
                output_names=["pred"],
                opset_version=int(opset),
                dynamo=True,
                dynamic_shapes=({0: batch},),
                external_data=False,  # one self-contained file (weights inside; fine below 2 GB)
                verbose=False,
            )

        out = atomic_write(path, write)
        if check_atol is not None:
            try:
                import onnxruntime
            except ImportError:
                logger.warning("onnxruntime is not installed: %s was not checked against eager PyTorch", out)
                return out
            session = onnxruntime.InferenceSession(str(out), providers=["CPUExecutionProvider"])
            got = session.run(None, {"image": example.numpy()})[0]
            with torch.no_grad():
                want = network(example).numpy()
            diff = float(abs(got - want).max())
            if diff > check_atol:
                raise ValueError(f"{out}: ONNX output differs from eager PyTorch by {diff:.3g} (> {check_atol}).")
        return out
    finally:
        network.to(device).train(training)


def _write_zip(folder: Path, name: str, zip_path: Path) -> None:
    """Zip ``folder`` as ``<name>/...`` with sorted entries and fixed times (same files -> same bytes)."""
    with zipfile.ZipFile(zip_path, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            if p.is_file():
                info = zipfile.ZipInfo(f"{name}/{p.relative_to(folder).as_posix()}", date_time=_ZIP_TIME)
                info.compress_type = zipfile.ZIP_DEFLATED
                info.external_attr = 0o644 << 16
                zf.writestr(info, p.read_bytes())


def export_bundle(
    role: str,
    checkpoint: str | Path,
    out: str | Path,
    *,
    name: str | None = None,
    version: str = "0.1.0",
    overwrite: bool = False,
    torchscript: bool = False,
    onnx: bool = False,
    verify: bool = True,
    bundles_dir: str | Path | None = None,
) -> Path:
    """Write a MONAI model-zoo bundle zip of a trained role (see the module docstring for its content).

    Args:
        role: the role folder in ``bundles_dir`` (e.g. ``hlfd``); the checkpoint must come from it.
        checkpoint: the training checkpoint (``best.pt``), loaded with ``weights_only=True``.
        out: the ``.zip`` to write.
        name: the bundle (and top folder) name; default ``ctdistill_<role>``.
        version: the bundle version in ``metadata.json``.
        overwrite: replace an existing ``out`` (otherwise refused).
        torchscript: also write ``models/model.ts`` (traced, :func:`export_torchscript`).
        onnx: also write ``models/model.onnx`` (:func:`export_onnx`).
        verify: run :func:`verify_bundle` on the staged bundle before writing the zip.
        bundles_dir: the bundles folder (its ``<role>/configs`` must be self-contained); default :data:`BUNDLES_DIR`.

    Returns:
        the zip path.

    Raises:
        ValueError: an unknown role, a bad name/version/out, a checkpoint from another role or without the
            network settings, or a bundle that fails verification.
        FileExistsError: ``out`` exists and ``overwrite`` is False.
        pipelines.engine.BundleInputError: a missing or unloadable checkpoint.
    """
    import networks
    from pipelines.engine.atomic import atomic_write
    from pipelines.engine.checkpoint import load_checkpoint, release_checkpoint
    from pipelines.engine.tracking import file_sha256

    bundles_dir, out = Path(bundles_dir or BUNDLES_DIR), Path(out)
    roles = _roles(bundles_dir)
    if role not in roles:
        raise ValueError(f"unknown role {role!r}; valid: {', '.join(roles)}.")
    name = _check_name(name or f"ctdistill_{role}", "bundle name")
    version = _check_name(str(version), "version")
    if out.suffix.lower() != ".zip":
        raise ValueError(f"--out {out} must be a .zip file.")
    if out.is_dir():
        raise ValueError(f"--out {out} is a folder; give the .zip file to write.")
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; pass --overwrite to replace it, or choose another --out.")
    role_configs = bundles_dir / role / "configs"
    ckpt = load_checkpoint(checkpoint)
    weights = release_checkpoint(ckpt)
    trained_by = weights["settings"].get("role")
    if trained_by and trained_by != role:
        raise ValueError(f"{checkpoint} was trained by the {trained_by!r} role, not {role!r}; export it as {trained_by}.")
    configs = bundle_configs(role_configs, f"exported by `python -m pipelines.export_bundle` as bundle {name} {version}; run from this bundle's folder")
    role_meta = json.loads((role_configs / "metadata.json").read_text())
    key_metric = str(_knob(role_configs / "train.yaml", "key_metric", "dsc_tumor"))

    with tempfile.TemporaryDirectory(prefix="ctdistill_export_") as tmp:
        stage = Path(tmp) / name
        (stage / "models").mkdir(parents=True)
        (stage / "configs").mkdir()
        (stage / "docs").mkdir()
        torch.save(weights["model"], stage / "models" / "model.pt")  # a plain state dict (the zoo's default form)
        network = networks.create(weights["settings"]["network_name"], **dict(weights["settings"].get("network_kwargs") or {}))
        network.load_state_dict(torch.load(stage / "models" / "model.pt", map_location="cpu", weights_only=True))  # strict
        meta = bundle_metadata(
            role_meta, network, weights, name=name, version=version, key_metric=key_metric, source_sha256=file_sha256(checkpoint)
        )
        (stage / "configs" / "metadata.json").write_text(json.dumps(meta, indent=2) + "\n")
        for fname, text in configs.items():
            (stage / "configs" / fname).write_text(text)
        params = sum(p.numel() for p in network.parameters())
        (stage / "docs" / "README.md").write_text(bundle_readme(meta, weights, params))
        (stage / "docs" / "data_license.txt").write_text(DATA_LICENSE)
        (stage / "LICENSE").write_bytes(LICENSE_FILE.read_bytes())
        if verify:
            verify_bundle(stage)
        if torchscript:
            export_torchscript(stage)
        if onnx:
            export_onnx(network, stage / "models" / "model.onnx", _example_shape(meta))
        atomic_write(out, lambda p: _write_zip(stage, name, p))
    logger.info("wrote %s (%s/: configs, models/model.pt%s, docs/README.md, LICENSE)", out, name,
                "".join(f", models/model.{e}" for e, on in (("ts", torchscript), ("onnx", onnx)) if on))  # fmt: skip
    return out


def main(argv: Sequence[str] | None = None) -> int:
    """Command line of :func:`export_bundle`; returns the exit code (2 with ``ERROR: <message>`` on bad input)."""
    parser = argparse.ArgumentParser(
        prog="python -m pipelines.export_bundle", description=__doc__.splitlines()[0]
    )  # fmt: skip
    parser.add_argument("role", help=f"the role the checkpoint was trained with: {', '.join(_roles(BUNDLES_DIR))}")
    parser.add_argument("--checkpoint", required=True, type=Path, help="the training checkpoint (best.pt)")
    parser.add_argument("--out", required=True, type=Path, help="the bundle zip to write")
    parser.add_argument("--name", default=None, help="bundle name (default ctdistill_<role>)")
    parser.add_argument("--version", default="0.1.0", help="bundle version (default 0.1.0)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    parser.add_argument("--torchscript", action="store_true", help="also include models/model.ts (traced)")
    parser.add_argument("--onnx", action="store_true", help="also include models/model.onnx (dynamic batch)")
    parser.add_argument("--no-verify", dest="verify", action="store_false", help="skip verify_metadata / verify_net_in_out")
    parser.add_argument("--bundles-dir", type=Path, default=None, help="the bundles folder holding <role>/configs (default: this checkout's bundles/)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for chatty in ("onnx_ir", "onnxscript", "torch.onnx"):  # the ONNX exporter logs every graph pass at INFO
        logging.getLogger(chatty).setLevel(logging.WARNING)
    try:
        export_bundle(
            args.role, args.checkpoint, args.out, name=args.name, version=args.version, overwrite=args.overwrite,
            torchscript=args.torchscript, onnx=args.onnx, verify=args.verify, bundles_dir=args.bundles_dir,
        )  # fmt: skip
    except (ValueError, OSError) as e:
        print(f"ERROR: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
