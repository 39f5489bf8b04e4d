"""Command-line guard rails of the bundles: ``--help`` lists a role's knobs; an unknown knob is an error.

``python -m monai.bundle run training --config_file bundles/hlfd/configs/train.yaml --epoch 1`` would otherwise add a
new, unused key ``epoch`` and silently train the default 120 epochs, and ``--help`` would be taken as a setting. The
first step of every bundle entry point (``training``, ``evaluating``, ``inferring``) calls :func:`check_cli`, which
reads the ``--config_file`` files named on the command line: their top-level keys are the valid settings (each role
file lists its knobs, with a comment, at the top).

The check only looks at a ``python -m monai.bundle run ...`` command line; bundles run from Python
(``monai.bundle.run(..., **overrides)``, as the demo and the experiment runner do) are not affected.

On such a command line :func:`check_cli` also installs :func:`report_project_error` as ``sys.excepthook``: an error
the project raised (a ``BundleInputError``, or a ``ValueError``/``OSError`` raised in this repository's code), which
MONAI wraps in its "Failed to evaluate ConfigExpression" traceback, is printed first as ``ERROR: <message>``, and the
traceback only with ``CTDISTILL_TRACEBACK=1``. Other errors keep Python's traceback.

The knob VALUES are checked next: :func:`validate_knobs` (every training entry's second step: numbers, dicts,
``tracking_uri``, ``dataset_dir``, one crop per step with BatchNorm) and, for the KD roles, :func:`kd_options`
(``--kd_mask``, ``--kd_balance``, ``--kd_balance_ratio``, ``--baseline_ckpt``); each stops with one line naming the
knob before any long work.
"""

from __future__ import annotations

import ast
import difflib
import logging
import os
import re
import sys
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from pipelines.engine.config_values import refuse_config_syntax

__all__ = [
    "MONAI_RUN_ARGS",
    "role_knobs",
    "check_cli",
    "validate_knobs",
    "project_error",
    "report_project_error",
    "install_excepthook",
    "kd_options",
]

logger = logging.getLogger(__name__)

#: arguments of ``monai.bundle.run`` itself (not config keys)
MONAI_RUN_ARGS = frozenset(
    {"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id", "tracking", "bundle_root"}
)

_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)$")

#: packages whose ValueError/OSError messages are written for users (this repository's code)
_REPO = Path(__file__).resolve().parents[2]
_PROJECT_DIRS = tuple(str(_REPO / d) + os.sep for d in ("pipelines", "distill", "networks", "transforms"))
#: set to 1 to print the full traceback after the project's message
TRACEBACK_ENV = "CTDISTILL_TRACEBACK"


def _raised_in_project(exc: BaseException) -> bool:
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_PROJECT_DIRS)


def project_error(exc: BaseException) -> BaseException | None:
    """The outermost error in ``exc``'s chain that the project raised for a user, or None.

    Args:
        exc: the exception that ended the program (e.g. MONAI's ``RuntimeError: Failed to evaluate ...``).

    Returns:
        the first ``BundleInputError`` in the chain (``__cause__``/``__context__``, outermost first), else the first
        ``ValueError``/``OSError`` raised in this repository's code; None when there is neither.
    """
    chain: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not c for c in chain):
        chain.append(e)
        e = e.__cause__ or e.__context__
    for c in chain:
        if type(c).__name__ == "BundleInputError" and isinstance(c, ValueError):
            return c
    for c in chain:
        if isinstance(c, (ValueError, OSError)) and _raised_in_project(c):
            return c
    return None


def report_project_error(kind: type[BaseException], value: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: the project's message first (``ERROR: ...``), the traceback only on request.

    Errors the project did not raise go to Python's default hook (full traceback).

    Args:
        kind: exception type.
        value: the exception.
        tb: its traceback.
    """
    err = project_error(value) if isinstance(value, Exception) else None
    if err is None:
        sys.__excepthook__(kind, value, tb)
        return
    message = str(err).strip() or type(err).__name__
    sys.stderr.write(f"ERROR: {message}\n")
    if os.environ.get(TRACEBACK_ENV, "").strip() not in ("", "0"):
        sys.stderr.write("".join(traceback.format_exception(kind, value, tb)))
    else:
        sys.stderr.write(f"({type(err).__name__}; set {TRACEBACK_ENV}=1 for the full traceback)\n")
    sys.stderr.flush()


def install_excepthook() -> None:
    """Install :func:`report_project_error` as ``sys.excepthook`` (once; a hook someone else set is kept)."""
    if sys.excepthook in (sys.__excepthook__, report_project_error):
        sys.excepthook = report_project_error
    else:
        logger.debug("sys.excepthook already replaced (%r): project errors keep the default report", sys.excepthook)


def role_knobs(config_files: Sequence[str | Path]) -> dict[str, str]:
    """Top-level keys of the config files with the comment written beside each (``""`` when none), in file order.

    Args:
        config_files: YAML/JSON bundle config files.

    Returns:
        ``{key: "value  # comment"}`` for the knob lines (plain values), ``{key: ""}`` for sections, macros and
        references.

    Raises:
        FileNotFoundError: a config file that does not exist.
    """
    knobs: dict[str, str] = {}
    for f in config_files:
        p = Path(f)
        if not p.is_file():
            raise FileNotFoundError(f"bundle config {p} does not exist (run from the repository root, or fix --config_file).")
        for line in p.read_text().splitlines():
            m = _KEY.match(line)
            if not m:
                continue
            key, rest = m.group(1), m.group(2).strip()
            macro = rest.startswith(('"%', "'%", "%"))
            expression = rest.startswith(('"$', "'$", "$")) and "#" not in rest
            reference = rest.startswith(('"@', "'@", "@"))  # another section by its id (trainer: "@train#trainer")
            shown = "" if (not rest or macro or expression or reference) else rest
            knobs.setdefault(key, shown)
            if shown and not knobs[key]:
                knobs[key] = shown
    return knobs


def _config_files(value: str) -> list[str]:
    value = value.strip()
    if value.startswith("["):
        try:
            return [str(v) for v in ast.literal_eval(value)]
        except (ValueError, SyntaxError):
            return []
    return [v.strip() for v in value.split(",") if v.strip()]


def _cli_keys(argv: Sequence[str]) -> tuple[list[str], dict[str, str]]:
    keys, values = [], {}
    for i, tok in enumerate(argv):
        if not tok.startswith("--"):
            continue
        name, _, inline = tok[2:].partition("=")
        name = name.replace("-", "_") if name in ("config-file", "meta-file", "logging-file", "args-file") else name
        keys.append(name)
        values[name] = inline if inline else (argv[i + 1] if i + 1 < len(argv) else "")
    return keys, values


def check_cli(argv: Sequence[str] | None = None) -> bool:
    """Stop on ``--help`` (print the knobs) or on a knob the bundle does not define.

    Called with the process's own command line (``argv`` None) of a bundle run, it also installs
    :func:`install_excepthook` (the project's error message first, not MONAI's traceback).

    Args:
        argv: the command line (default ``sys.argv``); only ``python -m monai.bundle run <id> ...`` is checked.

    Returns:
        True when the command line is fine (or is not a ``monai.bundle run`` command line).

    Raises:
        SystemExit: ``--help``/``-h`` (exit 0 after printing the role's knobs).
        ValueError: an unknown knob, naming it, the closest valid knobs and where the valid ones are listed; a path
            knob whose value MONAI reads as an expression, reference or macro (``--dataset_dir @kits``).
    """
    from_cli = argv is None
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 3 or not argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") or argv[1] != "run":
        return True
    if from_cli:  # this process is a bundle command line: the user sees the project's message first
        install_excepthook()
    tokens = argv[3:] if not argv[2].startswith("-") else argv[2:]
    keys, values = _cli_keys(tokens)
    files = _config_files(values.get("config_file", ""))
    if not files:
        return True
    knobs = role_knobs(files)
    if "help" in keys or "-h" in tokens:
        print(f"settings of {', '.join(files)} (override with --<name> <value>):")
        width = max((len(k) for k, v in knobs.items() if v), default=10)
        for k, v in knobs.items():
            if v:
                value, _, comment = v.partition("#")
                print(f"  --{k:<{width}}  {value.strip():<16} {comment.strip()}".rstrip())
        print("other top-level sections can be replaced too (see bundles/README.md).")
        sys.exit(0)
    for k in keys:  # MONAI has parsed these already: a path that reads as config syntax cannot be escaped, only refused
        refuse_config_syntax(k, values.get(k))
    unknown = [k for k in keys if k not in MONAI_RUN_ARGS and k.split("#")[0] not in knobs]
    if unknown:
        bad = unknown[0]
        close = difflib.get_close_matches(bad.split("#")[0], [k for k, v in knobs.items() if v] or list(knobs), n=3)
        hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else "."
        raise ValueError(
            f"unknown setting {bad!r}{hint} The settings of this bundle are listed by --help (the knobs at the top of "
            f"{files[0]})."
        )
    return True


def kd_options(
    method: str,
    kd_mask: Any = "none",
    kd_balance: Any = "none",
    kd_balance_ratio: Any = 0.25,
    baseline_ckpt: Any = "",
    key_metric: str = "dsc_tumor",
    splits_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """The KD roles' safeguard knobs, validated before any long work (the ``kd`` overlay's ``teacher_check`` runs it).

    Args:
        method: ``--kd_method``.
        kd_mask: ``none`` | ``teacher_correct`` (``distill.mask``; only for methods with pixel-level terms).
        kd_balance: ``none`` | ``grad`` (``distill.balance``).
        kd_balance_ratio: ``r`` of ``grad`` balancing (a number > 0).
        baseline_ckpt: a plain student's ``best.pt`` for the validation gate (``pipelines.engine.gate``), or ``""``.
        key_metric: the run's key metric (the baseline must have recorded the same).
        splits_file: the run's split JSON (a baseline trained on another split is reported).

    Returns:
        ``{"kd_mask", "kd_balance", "kd_balance_ratio", "baseline_ckpt"}`` normalised, plus
        ``baseline_<key_metric>`` (the baseline's best validation score) when a baseline is given; logged to MLflow
        as params and stored in the checkpoints' settings.

    Raises:
        BundleInputError: an unknown method or value, a mask or balance the method cannot apply, a bad ratio, or an unusable
            baseline checkpoint; each naming the knob and the valid values.
    """
    import distill
    from distill.balance import check_kd_balance
    from distill.mask import check_kd_mask
    from pipelines.engine.errors import BundleInputError, optional_knob

    try:
        name = distill.method_class(method).name
        mask = check_kd_mask(kd_mask)
        ratio = kd_balance_ratio
        if isinstance(ratio, (int, float, str)) and not isinstance(ratio, bool):
            try:
                ratio = float(ratio)
            except ValueError:
                pass  # check_kd_balance names the value
        balance = check_kd_balance(kd_balance, ratio)
        if mask != "none" and name not in distill.MASKABLE:
            raise ValueError(
                f"--kd_mask {mask} restricts pixel-level terms; --kd_method {method} has none (methods that take it: "
                f"{', '.join(distill.MASKABLE)})."
            )
        if balance != "none" and name == "none":
            raise ValueError("--kd_balance grad weights distillation terms; --kd_method none has none.")
    except ValueError as e:
        raise BundleInputError(str(e)) from e
    out: dict[str, Any] = {"kd_mask": mask, "kd_balance": balance, "kd_balance_ratio": ratio, "baseline_ckpt": ""}
    baseline = optional_knob(baseline_ckpt)
    if baseline:
        from pipelines.engine.gate import baseline_score

        out["baseline_ckpt"] = str(baseline)
        out[f"baseline_{key_metric}"] = baseline_score(baseline, key_metric, splits_file)
    return out


#: whole-number knobs and their minimum
_INT_KNOBS: dict[str, int] = {
    "epochs": 1, "val_interval": 1, "batch_size": 1, "samples_per_volume": 1, "seed": 0, "num_workers": 0,
    "num_slices": 1, "sw_batch_size": 1, "warmup_epochs": 0, "spatial_dims": 2, "out_channels": 1,
}  # fmt: skip
#: real-number knobs: (minimum, whether the minimum itself is allowed)
_FLOAT_KNOBS: dict[str, tuple[float, bool]] = {"lr": (0.0, False), "lr_min": (0.0, True), "grad_clip": (0.0, True), "cache_rate": (0.0, True)}
#: dict knobs
_DICT_KNOBS = ("network_kwargs", "run_tags", "kd_weights")
#: MLflow tracking URI schemes a run can use
TRACKING_SCHEMES = ("sqlite", "file", "http", "https", "databricks")


def _whole(knob: str, value: Any, minimum: int) -> int:
    try:
        number = float(value) if isinstance(value, str) else value
        if isinstance(number, bool) or not isinstance(number, (int, float)) or number != int(number):
            raise ValueError
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"--{knob} {value!r} is not a whole number (>= {minimum}).") from None
    if int(number) < minimum:
        raise ValueError(f"--{knob} {value!r} must be >= {minimum}.")
    return int(number)


def validate_knobs(**knobs: Any) -> bool:
    """THE check of a bundle's knob values, before any work: one line naming the knob, the value and what is valid.

    Called second in every training entry point (after :func:`check_cli`), with the knobs as given (a CLI value
    reaches it as fire parsed it: ``--epochs abc`` is the string ``"abc"``). Only the knobs passed are checked.

    Args:
        knobs: knob values by name. Checked: whole numbers (``epochs``, ``val_interval``, ``batch_size``,
            ``samples_per_volume``, ``seed``, ...), real numbers (``lr`` > 0, ``lr_min``/``grad_clip``/``cache_rate``
            >= 0, all finite), dicts (``network_kwargs`` with names the network takes -- ``network_name`` given --,
            ``run_tags`` of string keys and scalar values), ``tracking_uri`` (a scheme MLflow can store in),
            ``dataset_dir`` (a folder, a splits ``.json`` or a datalist ``.csv``), and one training crop per step with
            BatchNorm (``batch_size``, ``samples_per_volume``, the network's ``norm``).

    Returns:
        True (so it can sit in a bundle's expression list).

    Raises:
        ValueError: the first bad knob.
    """
    import ast
    import math
    from urllib.parse import urlparse

    values = dict(knobs)
    for knob, minimum in _INT_KNOBS.items():
        if values.get(knob) is not None:
            values[knob] = _whole(knob, values[knob], minimum)
    for knob, (minimum, inclusive) in _FLOAT_KNOBS.items():
        if values.get(knob) is None:
            continue
        try:
            number = float(values[knob])
        except (ValueError, TypeError):
            raise ValueError(f"--{knob} {values[knob]!r} is not a number.") from None
        if not math.isfinite(number) or number < minimum or (number == minimum and not inclusive):
            raise ValueError(f"--{knob} {values[knob]!r} must be a finite number {'>=' if inclusive else '>'} {minimum:g}.")
    for knob in _DICT_KNOBS:
        value = values.get(knob)
        if isinstance(value, str):
            try:
                value = ast.literal_eval(value) if value.strip() else {}
            except (ValueError, SyntaxError):
                raise ValueError(f"--{knob} {value!r} is not a dict; write it as \"{{'name': value}}\".") from None
        if value is not None and not isinstance(value, Mapping):
            raise ValueError(f"--{knob} {values[knob]!r} is not a dict; write it as \"{{'name': value}}\".")
        values[knob] = value
    tags = values.get("run_tags") or {}
    bad = [k for k, v in tags.items() if not isinstance(k, str) or not k or isinstance(v, (Mapping, list, tuple, set))]
    if bad:
        raise ValueError(f"--run_tags: tag {bad[0]!r} needs a non-empty string name and a plain value, e.g. \"{{'team': 'kidney'}}\".")
    name, kwargs = values.get("network_name"), values.get("network_kwargs")
    if name and kwargs:
        from networks.factory import network_arguments

        accepted = network_arguments(str(name))
        unknown = sorted(set(kwargs) - set(accepted)) if accepted is not None else []
        if unknown:
            raise ValueError(f"--network_kwargs: {unknown[0]!r} is not an argument of {name}; valid: {', '.join(accepted)}.")
    uri = values.get("tracking_uri")
    if uri:
        scheme = urlparse(str(uri)).scheme
        if scheme and len(scheme) > 1 and scheme not in TRACKING_SCHEMES:  # one letter: a Windows drive
            raise ValueError(
                f"--tracking_uri {uri!r}: MLflow cannot store runs at a {scheme}:// address; use sqlite:///<file>.db, "
                "http(s)://<server> or a folder."
            )
    data = values.get("dataset_dir")
    if data and isinstance(data, (str, os.PathLike)):
        from pipelines.engine.splits import refuse_dataset_file

        refuse_dataset_file(data, "--dataset_dir")
    crops = values.get("batch_size"), values.get("samples_per_volume")
    if all(c is not None for c in crops):
        per_step = max(1, crops[0] // crops[1]) * crops[1]
        norm = (kwargs or {}).get("norm", "batch")
        if per_step == 1 and str(norm).lower().startswith("batch"):
            raise ValueError(
                f"--batch_size {crops[0]} with --samples_per_volume {crops[1]} trains on one crop per step, which "
                "BatchNorm cannot normalise; use --batch_size 2 or more."
            )
    return True
