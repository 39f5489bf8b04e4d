"""User strings into MONAI bundle configs as DATA, never as code: the one escape every override goes through.

MONAI's ``ConfigParser`` (1.6.1) gives a string value meaning by its content, and has no escape for it:

- a string starting with ``$`` is a Python expression, run with ``eval`` (``"$__import__('os').system(...)"``);
- a string that is exactly ``@name`` (or ``@a::b``) is a reference to another config item (a relative folder
  ``@kits`` becomes the ``kits`` setting, or a KeyError);
- a string starting with ``%`` is a macro: ``%file.yaml::key`` reads another config file into this one;
- every ``#`` in any string is rewritten to ``::`` (MONAI's old id separator), so ``/data/run#2`` becomes
  ``/data/run::2``.

A path or name that reached us from a file (``experiment.json``, a splits JSON, ``dataset.json``, a CSV, metadata)
or from a tool's command line must arrive in the bundle exactly as written. :func:`config_literal` therefore turns
every such string into an expression that evaluates to nothing but the string itself: ``$'<python literal>'`` with
``@`` and ``#`` written as ``\\x40`` / ``\\x23`` (so MONAI's reference and separator rewriting find nothing in it);
strings that MONAI would keep as they are stay unchanged (readable in the executed config). :func:`literal_overrides`
applies it to a whole set of bundle overrides (``pipelines.experiment.run_bundle``, the demo, ``train_report``).

On a ``python -m monai.bundle run ...`` command line MONAI has parsed the values before any project code runs, so
nothing can be escaped there: :func:`refuse_config_syntax` (called by ``pipelines.engine.check_cli``, the first
step of every bundle) stops with one line naming the knob when a path knob's value would be read as config syntax.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

__all__ = ["CONFIG_PREFIXES", "PATH_KNOBS", "is_config_syntax", "config_literal", "literal_overrides", "refuse_config_syntax"]

#: MONAI's expression, reference and macro prefixes (``monai.bundle.utils.EXPR_KEY``, ``ID_REF_KEY``, ``MACRO_KEY``)
CONFIG_PREFIXES: tuple[str, ...] = ("$", "@", "%")

#: bundle knobs whose value is a path or a location (never an expression on purpose)
PATH_KNOBS: frozenset[str] = frozenset(
    {"dataset_dir", "splits_file", "output_dir", "input_dir", "teacher_ckpt", "checkpoint", "init_checkpoint", "tracking_uri", "bundle_root"}
)


def is_config_syntax(value: str) -> bool:
    """Whether MONAI's ``ConfigParser`` would read ``value`` as something other than the plain string.

    Args:
        value: a config string value.

    Returns:
        True for a leading ``$``/``@``/``%`` (expression, reference, macro) or any ``#`` (rewritten to ``::``).
    """
    return value.startswith(CONFIG_PREFIXES) or "#" in value


def config_literal(value: Any) -> Any:
    """``value`` as a bundle config value that MONAI reads as exactly this data.

    Strings MONAI would interpret (:func:`is_config_syntax`) become ``$'...'``: an expression holding only a Python
    string literal (``repr``) whose ``@``/``#`` are written ``\\x40``/``\\x23``; evaluating it gives the original string
    and runs nothing else. Paths become strings first; lists, tuples and dict values are converted item by item;
    numbers, booleans and None are returned unchanged.

    Args:
        value: an override value (str, ``os.PathLike``, number, bool, None, or a list/tuple/dict of those).

    Returns:
        the config-safe value.

    Raises:
        ValueError: a dict key that MONAI would read as config syntax (keys are config ids; they cannot be escaped).
    """
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if isinstance(value, str):
        if not is_config_syntax(value):
            return value
        return "$" + repr(value).replace("@", "\\x40").replace("#", "\\x23")
    if isinstance(value, (list, tuple)):
        return [config_literal(v) for v in value]
    if isinstance(value, Mapping):
        out = {}
        for k, v in value.items():
            if isinstance(k, str) and is_config_syntax(k):
                raise ValueError(
                    f"the key {k!r} cannot be passed to a bundle config: MONAI reads keys starting with $, @ or % or "
                    "holding '#' as config syntax; rename it."
                )
            out[k] = config_literal(v)
        return out
    return value


def literal_overrides(overrides: Mapping[str, Any]) -> dict[str, Any]:
    """Every value of a set of bundle overrides through :func:`config_literal` (the keys are the knob names).

    Args:
        overrides: ``{knob: value}`` as given to ``monai.bundle.run(..., **overrides)`` or ``ConfigParser.update``.

    Returns:
        a new dict with config-safe values.
    """
    return {k: config_literal(v) for k, v in overrides.items()}


def refuse_config_syntax(knob: str, value: Any) -> None:
    """Stop when a path knob given on a bundle command line would be read by MONAI as config syntax.

    Args:
        knob: the knob name (without ``--``).
        value: the value as written on the command line.

    Raises:
        ValueError: one line naming the knob, the value, what MONAI would do with it and how to write it instead.
    """
    if knob not in PATH_KNOBS or not isinstance(value, str) or not is_config_syntax(value):
        return
    if "#" in value:
        what, fix = "rewrites every '#' to '::'", "rename the file or folder (or link it under a name without '#')"
    else:
        what = {"$": "runs it as a Python expression", "@": "reads it as a reference to another setting",
                "%": "reads it as a macro (another config file)"}[value[0]]  # fmt: skip
        fix = f"write it as ./{value} (a relative path) or give the absolute path"
    raise ValueError(f"--{knob} {value!r}: MONAI {what}, not a path; {fix}.")
