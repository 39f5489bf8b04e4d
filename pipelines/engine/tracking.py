"""MLflow helpers for the bundles: store location, unique run names, run parameters, executed config.

MLflow 3 refuses a plain folder as tracking URI, so the default store is a SQLite database in the bundle's
output folder (``sqlite:///<output_dir>/mlruns.db``, artifacts in ``<output_dir>/mlruns``); ``--tracking_uri``
points at a team server instead. MONAI's ``MLFlowHandler`` attaches to the latest *unfinished* run of the same
name, so every bundle run gets a unique name (:func:`unique_run_name`), shared by the trainer's and the
evaluator's handlers. Browse with ``mlflow ui --backend-store-uri sqlite:///<output_dir>/mlruns.db``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from monai.handlers import MLFlowHandler

__all__ = [
    "default_tracking_uri",
    "check_tracking_uri",
    "unique_run_name",
    "file_sha256",
    "run_params",
    "save_executed_config",
    "find_runs",
    "kd_params",
    "TaggedMLFlowHandler",
]

logger = logging.getLogger(__name__)


def default_tracking_uri(output_dir: str | os.PathLike, tracking_uri: str | None = None) -> str:
    """The tracking URI to use: ``tracking_uri`` when given, else SQLite in ``output_dir``.

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
    return f"sqlite:///{out / 'mlruns.db'}"


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

    Patient identifiers never go here: the split file is represented by its hash only.

    Args:
        params: e.g. role, method, beta, lambda, T, p, network, window, num_slices, epochs, lr, seed.
        splits_file: the split JSON whose SHA-256 is logged.

    Returns:
        ``{name: str(value)}``; sequences and dicts are JSON-encoded.
    """
    out: dict[str, str] = {}
    for k, v in params.items():
        out[str(k)] = json.dumps(v) if isinstance(v, (list, tuple, dict)) else str(v)
    if splits_file is not None:
        out["splits_sha256"] = file_sha256(splits_file)
    return out


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

    With none of the extra arguments it behaves as ``MLFlowHandler`` (plus the FAILED status).

    Args:
        args: ``MLFlowHandler`` arguments.
        run_tags: ``{tag: value}`` set on the run (values as strings); ``None`` or ``{}`` sets none.
        run_id_file: file that records the run id (``None``: not recorded, runs are found by name as MONAI does).
        reopen: continue the run recorded in ``run_id_file`` when it exists (a CLI string such as ``"true"`` is
            accepted).
        record: write this handler's run id to ``run_id_file`` when the engine starts.
        kwargs: ``MLFlowHandler`` keyword arguments.
    """

    def __init__(
        self,
        *args: Any,
        run_tags: Mapping[str, Any] | None = None,
        run_id_file: str | os.PathLike | None = None,
        reopen: Any = False,
        record: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        from pipelines.engine.errors import as_bool

        self.run_tags = {str(k): str(v) for k, v in dict(run_tags or {}).items()}
        self.run_id_file = Path(run_id_file) if run_id_file else None
        self.reopen, self.record = as_bool(reopen), as_bool(record)
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
        if self.run_tags and self._tagged != run_id:
            from mlflow.entities import RunTag

            self.client.log_batch(run_id, tags=[RunTag(k, v) for k, v in self.run_tags.items()])
            self._tagged = run_id

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
