"""Shared command-line plumbing of the benchmark commands (``model_report``, ``data_report``): threads and JSON."""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

__all__ = ["add_benchmark_args", "apply_benchmark_args", "emit_report"]


def add_benchmark_args(parser: argparse.ArgumentParser) -> None:
    """Add ``--threads N`` (torch intra-op threads) and ``--json PATH`` (also write the report as JSON)."""
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the report as JSON here")


def apply_benchmark_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Check ``--json`` and ``--threads`` before any measurement, then set the thread count.

    Raises:
        SystemExit: through ``parser.error`` (exit 2) for a missing ``--json`` folder or ``--threads < 1``.
    """
    if args.json is not None and not args.json.parent.is_dir():
        parser.error(f"--json: folder {args.json.parent} does not exist")
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)


def emit_report(text: str, report: Mapping[str, Any], json_path: Path | None) -> None:
    """Print the human-readable report and, with ``json_path``, write ``report`` there as JSON."""
    print(text)
    if json_path is not None:
        json_path.write_text(json.dumps(dict(report), indent=2))
        print(f"JSON report written to {json_path}")
