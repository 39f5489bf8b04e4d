"""MLflow for the bundles: one shared store, run names, parameters, links between runs, the logged model.

Store: MLflow 3 refuses a plain folder as tracking URI, so the default store is a SQLite database beside the run
folders, in the PARENT of ``output_dir`` (the default ``runs/<role>`` folders share ``sqlite:///runs/mlruns.db``,
artifacts in ``runs/mlruns``): teacher, students and their evaluations sit side by side in one ``mlflow ui``.
``--tracking_uri`` points at a team server instead. MONAI's ``MLFlowHandler`` attaches to the latest *unfinished*
run of the same name, so every bundle run gets a unique name (:func:`unique_run_name`), shared by the trainer's and
the evaluator's handlers.

Tags (:class:`TaggedMLFlowHandler`): ``git_commit`` / ``git_dirty`` of the ctdistill checkout (``unknown`` outside
git), ``role``; a distillation run's ``teacher_run_id`` (the run that trained its teacher checkpoint, recorded in the
checkpoint: :func:`pipelines.engine.checkpoint.checkpoint_run_id`); an evaluation run's ``training_run_id``, and
``mlflow.parentRunId`` so the UI nests it under that training run (unless ``--run_tags`` names another parent, as
``pipelines.experiment`` does). At the end of training the best weights are logged as an MLflow model
(:func:`log_checkpoint_model`: ``mlflow.pytorch``, signature and input example; registered with
``--register_name``). Browse with ``mlflow ui --backend-store-uri sqlite:///$PWD/runs/mlruns.db``.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from monai.handlers import MLFlowHandler

from pipelines.engine.config_values import CONFIG_PREFIXES

__all__ = [
    "default_tracking_uri",
    "check_tracking_uri",
    "unique_run_name",
    "file_sha256",
    "run_params",
    "save_executed_config",
    "find_runs",
    "kd_params",
    "git_commit",
    "source_tags",
    "config_knobs",
    "model_requirements",
    "describe_model_version",
    "NETWORKS_DIR",
    "run_id_of_checkpoint",
    "model_input_shape",
    "log_checkpoint_model",
    "TaggedMLFlowHandler",
]

logger = logging.getLogger(__name__)


def default_tracking_uri(output_dir: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """The tracking URI to use: ``tracking_uri`` when given, else SQLite in the parent folder of ``output_dir``.

    Every role's default ``output_dir`` is ``runs/<role>``, so all of them (and their evaluations, which write under
    the same ``output_dir``) share ``runs/mlruns.db``.

    Args:
        output_dir: the bundle's output folder (created if missing).
        tracking_uri: an explicit URI (``http(s)://``, ``sqlite:///``, ``postgresql://`` ...); ``None`` or ``""``
            selects the default.

    Returns:
        the URI.

    Raises:
        ValueError: a plain folder or ``file://`` URI (MLflow 3 refuses the file store).
    """
    if tracking_uri:
        if tracking_uri.startswith("file:") or "://" not in tracking_uri:
            raise ValueError(
                f"tracking_uri {tracking_uri!r} is a folder; MLflow 3 refuses the file store. Use "
                "sqlite:///<path>/mlruns.db or a server URI such as http://mlflow.example:5000."
            )
        return tracking_uri
    out = Path(output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{out.parent / 'mlruns.db'}"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> str:
    """Cheap checks of a tracking store before long work (the preflight), instead of failing after it.

    An ``http(s)://`` server must accept a TCP connection within ``timeout`` seconds (MLflow itself retries for
    minutes; not checked when a proxy is configured for it); an existing ``sqlite:///`` file must be a readable SQLite
    database (a corrupt ``mlruns.db`` is named).

    Args:
        uri: the tracking URI (:func:`default_tracking_uri`).
        timeout: seconds to wait for the server.

    Returns:
        ``uri``.

    Raises:
        ValueError: an unreachable server or a corrupt SQLite store, naming it.
    """
    import socket
    import sqlite3
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    parsed = urlparse(uri)
    if parsed.scheme in ("http", "https") and parsed.scheme in getproxies() and not proxy_bypass(parsed.hostname or ""):
        logger.info("tracking server %s is reached through a proxy: not checked before the run", uri)
    elif parsed.scheme in ("http", "https"):
        port = parsed.port or (443 if parsed.scheme == "https" else 80)
        try:
            socket.create_connection((parsed.hostname or "", port), timeout=timeout).close()
        except OSError as e:
            raise ValueError(
                f"MLflow tracking server {uri} is not reachable within {timeout:g} s ({e.strerror or e}); check "
                "--tracking_uri, or omit it to track in sqlite:///<output_dir>/mlruns.db."
            ) from e
    elif parsed.scheme == "sqlite" and uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///") :])
        if path.is_file():
            try:
                con = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=timeout)
                try:
                    verdict = con.execute("PRAGMA quick_check").fetchone()[0]
                finally:
                    con.close()
            except sqlite3.Error as e:
                verdict = str(e)
            if verdict != "ok":
                raise ValueError(
                    f"the MLflow store {path} is not a readable SQLite database ({verdict}); move it aside (it holds "
                    "the earlier runs' history) or pass another --tracking_uri."
                )
    return uri


def unique_run_name(role: str) -> str:
    """``<role>_<UTC yyyymmdd-HHMMSS>_<6 hex>``: unique, so MONAI never attaches to an older unfinished run."""
    return f"{role}_{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}_{uuid.uuid4().hex[:6]}"


def file_sha256(path: str | os.PathLike | None) -> str:
    """SHA-256 hex digest of a file (the split file is logged by hash, never by content); ``""`` for None."""
    if not path:
        return ""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def run_params(params: Mapping[str, Any], splits_file: str | os.PathLike | None = None) -> dict[str, str]:
    """MLflow parameters of a run: the given values as strings plus ``splits_sha256``.

    Inside a bundle run every knob of the executed config (:func:`config_knobs`: ``lr_min``, ``warmup_epochs``,
    ``grad_clip``, ``deep_supervision``, ...) is logged too, under its own name (``params`` win on a clash). Patient
    identifiers never go here: the split file is represented by its hash only.

    Args:
        params: e.g. role, method, beta, lambda, T, p, network, window, num_slices, epochs, lr, seed.
        splits_file: the split JSON whose SHA-256 is logged.

    Returns:
        ``{name: str(value)}``; sequences and dicts are JSON-encoded.
    """
    out: dict[str, str] = {}
    for k, v in {**config_knobs(), **dict(params)}.items():
        out[str(k)] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    if splits_file is not None:
        out["splits_sha256"] = file_sha256(splits_file)
    return out


def _plain(value: Any) -> bool:
    """A knob value: a scalar, or a list/dict of them, with no reference, expression, macro or ``_target_``."""
    if isinstance(value, str):
        return not value.startswith(CONFIG_PREFIXES)
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    if isinstance(value, dict):
        return "_target_" not in value and all(_plain(v) for v in value.values())
    return value is None or isinstance(value, (bool, int, float))


#: top-level keys that are not settings of the run: how it is started (a resumed run would otherwise "change" them)
_NOT_PARAMS = ("imports", "resume", "overwrite", "progress")


def config_knobs(parser: Any = None) -> dict[str, Any]:
    """The knobs of the running bundle config (CLI overrides applied): its top-level plain values.

    Args:
        parser: a ``monai.bundle.ConfigParser``; default the running workflow's (found on the call stack), none
            outside a bundle.

    Returns:
        ``{key: value}`` of the top-level keys whose value is plain (no ``$``/``@``/``%``, no ``_target_``), e.g.
        ``epochs``, ``lr_min``, ``warmup_epochs``, ``grad_clip``, ``deep_supervision`` (not ``resume``, ``overwrite``,
        ``progress``: how a run is started, not what it does); ``{}`` outside a bundle.
    """
    parser = parser if parser is not None else _find_parser()
    if parser is None:
        return {}
    return {k: v for k, v in parser.get().items() if not k.startswith("_") and k not in _NOT_PARAMS and _plain(v)}


def _find_parser() -> Any:
    """The ``ConfigParser`` of the running MONAI bundle workflow, found on the call stack (None outside one)."""
    from monai.bundle import ConfigParser

    frame = sys._getframe(1)
    while frame is not None:
        for name in ("self", "parser"):
            obj = frame.f_locals.get(name)
            parser = getattr(obj, "parser", None) if obj is not None and not isinstance(obj, ConfigParser) else obj
            if isinstance(parser, ConfigParser):
                return parser
        frame = frame.f_back
    return None


def save_executed_config(path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> str:
    """Write the executed bundle config (macros resolved, CLI overrides applied) as JSON, atomically.

    Called from a bundle's ``training``/``evaluating`` list: the running workflow's ``ConfigParser`` is found on
    the call stack and its raw content (what MONAI's own ``--tracking`` option exports) is written. Outside a
    bundle only ``extra`` is written.

    Args:
        path: destination ``.json`` file.
        extra: additional entries (e.g. the resolved user knobs) stored under ``"resolved"``.

    Returns:
        the destination path as a string.
    """
    parser = _find_parser()
    content: dict[str, Any] = {}
    if parser is not None:
        content = {k: v for k, v in parser.get().items() if k != "_meta_"}
        content["_meta_"] = parser.get("_meta_", {})
    if extra:
        content["resolved"] = dict(extra)
    from pipelines.engine.atomic import atomic_write_json

    return str(atomic_write_json(path, content, indent=1, default=str))


def find_runs(tracking_uri: str, experiment_name: str) -> list[Any]:
    """All runs of an experiment (newest first), or ``[]`` when the experiment does not exist."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(experiment_name)
    if exp is None:
        return []
    return list(client.search_runs([exp.experiment_id], order_by=["attributes.start_time DESC"]))


@functools.lru_cache(maxsize=1)
def git_commit() -> tuple[str, str]:
    """The git commit of the ctdistill checkout this code runs from, and whether it has uncommitted changes.

    Only the checkout that holds this package counts (an installed copy inside some other repository is not
    mistaken for it). Never raises.

    Returns:
        ``(commit, dirty)``: the full hash and ``"true"``/``"false"``, or ``("unknown", "unknown")`` outside git
        (an installed wheel, no ``git`` program).
    """
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str:
        proc = subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=20, check=True)
        return proc.stdout.strip()

    try:
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return "unknown", "unknown"
        commit = git("rev-parse", "HEAD")
        dirty = "true" if git("status", "--porcelain", "--untracked-files=no") else "false"
    except (OSError, subprocess.SubprocessError, UnicodeDecodeError):
        return "unknown", "unknown"
    return commit, dirty


def source_tags() -> dict[str, str]:
    """MLflow's standard source tags of a run: ``mlflow.source.name`` (the bundle command: ``monai.bundle run
    <workflow>`` and its config file names, no data paths), ``mlflow.source.type`` (LOCAL), and
    ``mlflow.source.git.commit`` when the code runs from a git checkout (:func:`git_commit`)."""
    argv = list(sys.argv)
    if argv and argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") and len(argv) > 2:
        configs = next((argv[i + 1] for i, a in enumerate(argv[:-1]) if a == "--config_file"), "")
        names = " ".join(Path(c.strip(" '\"[]")).name for c in configs.split(",") if c.strip(" '\"[]"))
        name = f"monai.bundle run {argv[2]}" + (f" --config_file {names}" if names else "")
    else:
        name = Path(argv[0]).name if argv and argv[0] else "python"
    tags = {"mlflow.source.name": name, "mlflow.source.type": "LOCAL"}
    commit, _ = git_commit()
    if commit != "unknown":
        tags["mlflow.source.git.commit"] = commit
    return tags


def run_id_of_checkpoint(path: str | os.PathLike | None, what: str) -> str:
    """The MLflow run that trained a checkpoint, for a link tag; ``"unknown"`` (with a warning) when not recorded.

    Args:
        path: the checkpoint (a teacher's, or the evaluated one).
        what: what the checkpoint is, for the warning (e.g. ``"teacher checkpoint"``).

    Returns:
        the run id or ``"unknown"``. Never raises: a link never stops a run.
    """
    from pipelines.engine.checkpoint import checkpoint_run_id

    try:
        run_id = checkpoint_run_id(path) if path else ""
    except Exception as e:  # noqa: BLE001 - an unreadable checkpoint is reported by the code that loads it
        logger.warning("cannot read the MLflow run of %s %s (%s): tagged 'unknown'", what, path, e)
        return "unknown"
    if not run_id:
        logger.warning("%s %s records no MLflow run (trained before runs were recorded, or without tracking): tagged 'unknown'", what, path)
        return "unknown"
    return run_id


def model_input_shape(settings: Mapping[str, Any]) -> tuple[int, ...]:
    """The input shape ``(C, *spatial)`` of one example for a checkpoint's network, from its saved settings.

    Channels: ``network_kwargs.in_channels``. Spatial size: the 3D ``roi_size``, else the 2.5D ``in_plane_size``,
    else the polyp ``size``, else the network's ``img_size``, else 256 a side.

    Args:
        settings: a checkpoint's ``settings`` (``network_kwargs``, ``preprocessing``).

    Returns:
        e.g. ``(3, 256, 256)`` or ``(1, 96, 96, 32)``.
    """
    kwargs = dict(settings.get("network_kwargs") or {})
    pre = dict(settings.get("preprocessing") or {})
    dims = int(kwargs.get("spatial_dims") or pre.get("spatial_dims") or 2)
    size = (pre.get("roi_size") if dims == 3 else None) or pre.get("in_plane_size") or pre.get("size") or kwargs.get("img_size") or 256
    spatial = [int(size)] * dims if isinstance(size, (int, float)) else [int(v) for v in size]
    if dims == 3 and len(spatial) == 2:
        spatial.append(32)
    return (int(kwargs.get("in_channels") or 1), *spatial[:dims])


#: the networks package, logged with every MLflow model (``code_paths``): the pickled network's classes live there
NETWORKS_DIR = Path(__file__).resolve().parents[2] / "networks"
#: packages the logged model needs to load, pinned to the versions installed here (networks imports only these)
MODEL_PACKAGES: tuple[str, ...] = ("torch", "monai", "numpy", "einops")
#: run metrics that are not validation scores (left out of a registered version's description)
_TRAINING_METRICS = ("train_", "loss", "kd_", "lr", "grad_norm")


def model_requirements() -> list[str]:
    """pip requirements of a logged model: :data:`MODEL_PACKAGES` pinned to the installed versions (``torch==2.13.0``)."""
    from importlib.metadata import version

    return [f"{name}=={version(name).split('+')[0]}" for name in MODEL_PACKAGES]


def describe_model_version(tracking_uri: str, name: str, version: str, run_id: str, checkpoint: str | os.PathLike) -> dict[str, str]:
    """Give a registered model version a description and its validation metrics (as version tags).

    Args:
        tracking_uri: the store.
        name: the registered model.
        version: its version.
        run_id: the training run that logged it.
        checkpoint: the checkpoint it was made from (``best_metric``, ``best_epoch``, settings).

    Returns:
        the tags set: ``val.<metric>`` for each validation metric of the run (last value), ``best_metric``,
        ``best_epoch``, ``role``, ``network``, ``training_run_id``.
    """
    import mlflow

    from pipelines.engine.checkpoint import load_checkpoint

    ckpt = load_checkpoint(checkpoint)
    settings = dict(ckpt.get("settings") or {})
    client = mlflow.MlflowClient(tracking_uri=tracking_uri)
    metrics = {k: v for k, v in client.get_run(run_id).data.metrics.items() if not k.startswith(_TRAINING_METRICS)}
    tags = {f"val.{k}": f"{v:.4f}" for k, v in sorted(metrics.items())}
    best, epoch = ckpt.get("best_metric"), ckpt.get("best_epoch")
    tags.update(
        best_metric=f"{float(best):.4f}" if isinstance(best, (int, float)) else "none",
        best_epoch=str(epoch),
        role=str(settings.get("role", "")),
        network=str(settings.get("network_name", "")),
        training_run_id=run_id,
    )
    scores = ", ".join(f"{k[4:]} {v}" for k, v in tags.items() if k.startswith("val.")) or "none recorded"
    description = (
        f"ctdistill {settings.get('role', '')} ({settings.get('network_name', '')} {json.dumps(settings.get('network_kwargs') or {})}), "
        f"best validation score {tags['best_metric']} at epoch {epoch} of training run {run_id}; last validation: {scores}. "
        "Input: CT windowed to [0, 1] as saved in the checkpoint's preprocessing settings; research use only, not a medical device."
    )
    client.update_model_version(name, version, description=description)
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    return tags


def log_checkpoint_model(
    tracking_uri: str,
    run_id: str,
    checkpoint: str | os.PathLike,
    *,
    input_shape: Sequence[int] | None = None,
    register_name: str = "",
    name: str = "model",
) -> str:
    """Log a checkpoint's network with its weights as an MLflow model of a run (``mlflow.pytorch.log_model``).

    The network is rebuilt from the checkpoint (:func:`pipelines.engine.checkpoint.network_from_checkpoint`, eval
    mode). The input example is one zero tensor ``(1, *input_shape)``; the signature has a free batch size and free
    spatial sizes (fixed for networks built for one ``img_size``). The model is saved with pickle (any architecture,
    any input size) together with the ``networks`` package it needs (``code_paths``) and pip requirements pinned to
    this environment (:func:`model_requirements`): ``mlflow.pytorch.load_model`` works from any folder without
    ctdistill installed. A registered version gets a description and its validation metrics
    (:func:`describe_model_version`). The run is ended (FINISHED) when done.

    Args:
        tracking_uri: the store of the run.
        run_id: the training run.
        checkpoint: the checkpoint (``best.pt``).
        input_shape: ``(C, *spatial)`` of one example; default :func:`model_input_shape` of its settings.
        register_name: also register the model under this name in the model registry (``""``: not registered).
        name: the model's name in the run.

    Returns:
        the model URI (``models:/<model id>``).

    Raises:
        BundleInputError: an unreadable checkpoint.
    """
    import mlflow
    import mlflow.pytorch
    import numpy as np
    import torch
    from mlflow.models import ModelSignature
    from mlflow.types import Schema, TensorSpec

    from pipelines.engine.checkpoint import checkpoint_settings, network_from_checkpoint

    settings = checkpoint_settings(checkpoint)
    shape = tuple(int(v) for v in input_shape) if input_shape else model_input_shape(settings)
    net = network_from_checkpoint(checkpoint, "cpu")
    example = np.zeros((1, *shape), dtype=np.float32)
    with torch.no_grad():
        out = net(torch.from_numpy(example))
    out = out[0] if isinstance(out, (list, tuple)) else out
    fixed = bool(dict(settings.get("network_kwargs") or {}).get("img_size"))
    free = tuple(shape[1:]) if fixed else (-1,) * (len(shape) - 1)
    signature = ModelSignature(
        inputs=Schema([TensorSpec(np.dtype(np.float32), (-1, shape[0], *free))]),
        outputs=Schema([TensorSpec(np.dtype(np.float32), (-1, int(out.shape[1]), *free))]),
    )
    requirements = model_requirements()
    # mlflow.set_tracking_uri also sets MLFLOW_TRACKING_URI, which MONAI's handlers prefer: restore it exactly
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(tracking_uri)
    try:
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pytorch.log_model(
                net,
                name=name,
                signature=signature,
                input_example=example,
                registered_model_name=register_name or None,
                pip_requirements=requirements,
                serialization_format="pickle",
                code_paths=[str(NETWORKS_DIR)],  # the pickled classes' package: loads without ctdistill installed
            )
        if register_name and getattr(info, "registered_model_version", None) is not None:
            describe_model_version(tracking_uri, register_name, str(info.registered_model_version), run_id, checkpoint)
    finally:
        mlflow.set_tracking_uri(previous)
    logger.info("logged the weights of %s as MLflow model %s%s", checkpoint, info.model_uri, f" (registered as {register_name!r})" if register_name else "")
    return str(info.model_uri)


#: MLflow names of the distillation weights (paper notation)
_KD_NAMES = {"lam": "lambda", "temperature": "T"}


def kd_params(weights: Mapping[str, Any]) -> dict[str, Any]:
    """Distillation weights under their paper names (``lam`` -> ``lambda``, ``temperature`` -> ``T``)."""
    return {_KD_NAMES.get(k, k): v for k, v in dict(weights).items()}


class TaggedMLFlowHandler(MLFlowHandler):
    """MONAI's ``MLFlowHandler`` with run tags, one run history across ``--resume``, and crashed runs marked FAILED.

    * Tags: the bundle knob ``--run_tags "{'mlflow.parentRunId': '<id>'}"`` nests the run under a parent run in the
      MLflow UI (``pipelines.experiment`` links every arm's training and evaluation runs to its experiment run this
      way).
    * Resume: with ``run_id_file`` (the training bundles pass ``<output_dir>/checkpoints/mlflow_run_id``) the
      trainer's handler records its run id there when the engine starts; with ``reopen=True`` (``--resume true``) it
      first reopens the run recorded there, so a killed and resumed training keeps ONE run whose metrics continue
      at the resumed epoch (parameters already logged are kept; a changed value is logged as a warning and a
      ``resumed.<name>`` tag). The evaluator's handler passes ``reopen=True, record=False``: it follows the run
      the trainer recorded.
    * Failures: an exception raised in the engine (a crash, an unreadable case, a full disk, Ctrl-C) ends the run
      with status FAILED (KILLED for ``KeyboardInterrupt``) before ignite re-raises it, instead of leaving it
      RUNNING. The handler runs before the other ``EXCEPTION_RAISED`` handlers (MONAI's ``StatsHandler`` re-raises at
      once, so handlers after it never run) and re-raises the exception itself.

    * Links (set when the run starts; a missing record is tagged ``unknown`` with a warning, never an error):
      ``teacher_checkpoint`` tags ``teacher_run_id`` (the run that trained the teacher); ``parent_checkpoint`` (an
      evaluation's checkpoint) tags ``training_run_id`` and makes the run a child of that training run
      (``mlflow.parentRunId``, when that run is in this store and ``run_tags`` names no other parent). Every run is
      tagged ``git_commit``, ``git_dirty`` (:func:`git_commit`) and ``role`` (the ``role`` parameter).
    * Model: with ``log_model`` the network of ``model_checkpoint`` (``best.pt``) is logged as an MLflow model
      when the engine completes, after the artifacts (:func:`log_checkpoint_model`; ``register_name`` registers it).
      A failure is logged as a warning: a finished training is never lost to a tracking error.

    With none of the extra arguments it behaves as ``MLFlowHandler`` (plus the FAILED status and the git/role tags).

    Args:
        args: ``MLFlowHandler`` arguments.
        run_tags: ``{tag: value}`` set on the run (values as strings); ``None`` or ``{}`` sets none.
        run_id_file: file that records the run id (``None``: not recorded, runs are found by name as MONAI does).
        reopen: continue the run recorded in ``run_id_file`` when it exists (a CLI string such as ``"true"`` is
            accepted).
        record: write this handler's run id to ``run_id_file`` when the engine starts.
        teacher_checkpoint: a distillation run's teacher checkpoint (``None``/``""``: not a distillation run).
        parent_checkpoint: an evaluation run's checkpoint, whose training run becomes the parent.
        log_model: log ``model_checkpoint`` as an MLflow model on completion (CLI strings accepted).
        model_checkpoint: the checkpoint to log (``best.pt``).
        register_name: model registry name (``""``: logged, not registered).
        input_shape: ``(C, *spatial)`` of the model's input example (default: from the checkpoint's settings).
        kwargs: ``MLFlowHandler`` keyword arguments.

    Raises:
        ValueError: ``log_model`` without ``model_checkpoint``.
    """

    def __init__(
        self,
        *args: Any,
        run_tags: Mapping[str, Any] | None = None,
        run_id_file: str | os.PathLike | None = None,
        reopen: Any = False,
        record: bool = True,
        teacher_checkpoint: str | os.PathLike | None = None,
        parent_checkpoint: str | os.PathLike | None = None,
        log_model: Any = False,
        model_checkpoint: str | os.PathLike | None = None,
        register_name: str | None = "",
        input_shape: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        from pipelines.engine.errors import as_bool

        self.run_tags = {str(k): str(v) for k, v in dict(run_tags or {}).items()}
        self.run_id_file = Path(run_id_file) if run_id_file else None
        self.reopen, self.record = as_bool(reopen), as_bool(record)
        self.teacher_checkpoint = str(teacher_checkpoint) if teacher_checkpoint else None
        self.parent_checkpoint = str(parent_checkpoint) if parent_checkpoint else None
        self.log_model = as_bool(log_model)
        if self.log_model and not model_checkpoint:
            raise ValueError("log_model=True needs model_checkpoint (the best.pt to log), got none.")
        self.model_checkpoint = str(model_checkpoint) if model_checkpoint else None
        self.register_name = str(register_name or "")
        self.input_shape = tuple(int(v) for v in input_shape) if input_shape else None
        self.model_uri: str | None = None
        self._tagged: str | None = None

    def attach(self, engine: Any) -> None:
        """Attach as ``MLFlowHandler`` does, plus the ``EXCEPTION_RAISED`` handler, placed first."""
        from ignite.engine import Events

        super().attach(engine)
        if not engine.has_event_handler(self.exception_raised, Events.EXCEPTION_RAISED):
            engine.add_event_handler(Events.EXCEPTION_RAISED, self.exception_raised)
            handlers = getattr(engine, "_event_handlers", {}).get(Events.EXCEPTION_RAISED)
            if isinstance(handlers, list) and len(handlers) > 1:
                handlers.insert(0, handlers.pop())  # before StatsHandler, which re-raises and stops the others

    def _recorded_run_id(self) -> str:
        try:
            return self.run_id_file.read_text().strip() if self.run_id_file is not None else ""
        except OSError:
            return ""

    def _reopen(self, engine: Any) -> None:
        """Continue the run recorded in ``run_id_file`` (status back to RUNNING); a missing run starts a new one."""
        run_id = self._recorded_run_id()
        if not run_id:
            if self.record:
                logger.warning("no MLflow run recorded in %s: the resumed training starts a new MLflow run", self.run_id_file)
            return
        try:
            run = self.client.get_run(run_id)
        except Exception as e:  # noqa: BLE001 - another store, a deleted run: start anew, say so
            logger.warning("MLflow run %s (from %s) not found in this tracking store (%s): starting a new run", run_id, self.run_id_file, e)
            return
        if run.info.status != "RUNNING":
            self.client.update_run(run_id, status="RUNNING")
        self.cur_run = self.client.get_run(run_id)
        if self.experiment_param:
            logged = self.cur_run.data.params
            changed = {k: str(v) for k, v in self.experiment_param.items() if k in logged and logged[k] != str(v)}
            for k, v in changed.items():
                logger.warning("resumed MLflow run %s: parameter %s was %r, now %r (kept; tagged resumed.%s)", run_id, k, logged[k], v, k)
            if changed:
                from mlflow.entities import RunTag

                self.client.log_batch(run_id, tags=[RunTag(f"resumed.{k}", v) for k, v in changed.items()])
            self.experiment_param = {k: v for k, v in self.experiment_param.items() if k not in logged}
        if self.record:
            from mlflow.entities import RunTag

            epoch = int(getattr(engine.state, "epoch", 0) or 0)
            self.client.log_batch(run_id, tags=[RunTag("resumed_from_epoch", str(epoch))])
            logger.info("continuing MLflow run %s (%s) from epoch %d", run_id, self.cur_run.info.run_name, epoch)

    def start(self, engine: Any) -> None:
        """Reopen the recorded run (resume) or start/attach as ``MLFlowHandler`` does; record the id; set the tags."""
        if self.cur_run is None and self.reopen and self.run_id_file is not None:
            self._reopen(engine)
        super().start(engine)
        if self.cur_run is None:
            return
        run_id = self.cur_run.info.run_id
        if self.record and self.run_id_file is not None and self._recorded_run_id() != run_id:
            from pipelines.engine.atomic import atomic_write_text

            atomic_write_text(self.run_id_file, run_id + "\n")
        if self._tagged != run_id:
            from mlflow.entities import RunTag

            tags = {**self._link_tags(run_id), **self.run_tags}
            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in tags.items()])
            self._tagged = run_id

    def _link_tags(self, run_id: str) -> dict[str, str]:
        """git commit, role, teacher and training-run links of this run (see the class docstring)."""
        commit, dirty = git_commit()
        tags = {"git_commit": commit, "git_dirty": dirty, **source_tags()}
        role = dict(self.experiment_param or {}).get("role") or self.cur_run.data.params.get("role")
        if role:
            tags["role"] = str(role)
        if self.teacher_checkpoint:
            tags["teacher_run_id"] = run_id_of_checkpoint(self.teacher_checkpoint, "teacher checkpoint")
        if self.parent_checkpoint:
            parent = run_id_of_checkpoint(self.parent_checkpoint, "evaluated checkpoint")
            tags["training_run_id"] = parent
            if parent != "unknown" and parent != run_id and "mlflow.parentRunId" not in self.run_tags:
                try:
                    self.client.get_run(parent)
                    tags["mlflow.parentRunId"] = parent
                except Exception as e:  # noqa: BLE001 - a training tracked elsewhere: keep the id, no nesting
                    logger.warning("training run %s of %s is not in this tracking store (%s): not nested under it", parent, self.parent_checkpoint, e)
        return tags

    def complete(self) -> None:
        """Log the artifacts (``MLFlowHandler``), then the model of ``model_checkpoint`` when ``log_model``."""
        super().complete()
        if not self.log_model or self.cur_run is None or self.model_uri is not None:
            return
        try:
            self.model_uri = log_checkpoint_model(
                self.client.tracking_uri,
                self.cur_run.info.run_id,
                self.model_checkpoint,
                input_shape=self.input_shape,
                register_name=self.register_name,
            )
        except Exception as e:  # noqa: BLE001 - the training is done and saved; only the MLflow model is missing
            logger.warning("could not log %s as an MLflow model (%s: %s); the checkpoint itself is intact", self.model_checkpoint, type(e).__name__, e)

    def exception_raised(self, engine: Any, e: BaseException) -> None:
        """End the run as FAILED (KILLED for ``KeyboardInterrupt``), then re-raise ``e``.

        Args:
            engine: the ignite engine (unused).
            e: the exception ignite caught.

        Raises:
            BaseException: ``e`` itself, always.
        """
        if self.cur_run is not None:
            from mlflow.entities import RunStatus

            status = RunStatus.KILLED if isinstance(e, KeyboardInterrupt) else RunStatus.FAILED
            run_id = self.cur_run.info.run_id
            try:
                self.client.set_terminated(run_id, RunStatus.to_string(status))
                logger.info("MLflow run %s ended as %s: %s", run_id, RunStatus.to_string(status), type(e).__name__)
            except Exception as err:  # noqa: BLE001 - never hide the original error behind a tracking error
                logger.warning("could not mark MLflow run %s as %s: %s", run_id, RunStatus.to_string(status), err)
            finally:
                self.cur_run = None
                try:
                    self._dispose_sqlite_store()
                except Exception:  # noqa: BLE001 - best effort
                    pass
        raise e
