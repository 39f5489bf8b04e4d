"""Command-line guard rails of the bundles: ``--help`` lists a role's knobs; an unknown knob is an error.

``python -m monai.bundle run training --config_file bundles/hlfd/configs/train.yaml --epoch 1`` would otherwise add a
new, unused key ``epoch`` and silently train the default 120 epochs, and ``--help`` would be taken as a setting. The
first step of every bundle entry point (``training``, ``evaluating``, ``inferring``) calls :func:`check_cli`, which
reads the ``--config_file`` files named on the command line: their top-level keys are the valid settings (each role
file lists its knobs, with a comment, at the top).

The check only looks at a ``python -m monai.bundle run ...`` command line; bundles run from Python
(``monai.bundle.run(..., **overrides)``, as the demo and the experiment runner do) are not affected.
"""

from __future__ import annotations

import ast
import difflib
import logging
import re
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["MONAI_RUN_ARGS", "role_knobs", "check_cli"]

logger = logging.getLogger(__name__)

#: arguments of ``monai.bundle.run`` itself (not config keys)
MONAI_RUN_ARGS = frozenset(
    {"config_file", "meta_file", "logging_file", "args_file", "run_id", "init_id", "final_id", "tracking", "bundle_root"}
)

_KEY = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)\s*:(.*)$")


def role_knobs(config_files: Sequence[str | Path]) -> dict[str, str]:
    """Top-level keys of the config files with the comment written beside each (``""`` when none), in file order.

    Args:
        config_files: YAML/JSON bundle config files.

    Returns:
        ``{key: "value  # comment"}`` for the knob lines (plain values), ``{key: ""}`` for sections and macros.

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
            shown = "" if (not rest or macro or expression) else rest
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

    Args:
        argv: the command line (default ``sys.argv``); only ``python -m monai.bundle run <id> ...`` is checked.

    Returns:
        True when the command line is fine (or is not a ``monai.bundle run`` command line).

    Raises:
        SystemExit: ``--help``/``-h`` (exit 0 after printing the role's knobs).
        ValueError: an unknown knob, naming it, the closest valid knobs and where the valid ones are listed.
    """
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 3 or not argv[0].replace("\\", "/").endswith("monai/bundle/__main__.py") or argv[1] != "run":
        return True
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
