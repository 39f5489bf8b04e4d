"""Test helper: a MONAI ConfigParser holding the data-path YAML sections proposed for the bundles, on CPU."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml
from monai.bundle import ConfigParser

__all__ = ["wired_parser"]


def wired_parser(tmp_path: Path, items: list[dict], sections: str, *extra: str, **knobs: Any) -> ConfigParser:
    """A parser with the bundles' imports, ``device`` = CPU, a ``splits`` JSON of ``items`` (all training), the
    common knobs (seed 0, cache_rate 1, num_workers 0, no train_sampler), ``knobs`` and the YAML ``sections`` (then
    ``extra`` sections, which override)."""
    splits = tmp_path / "splits.json"
    splits.write_text(json.dumps({"training": items, "validation": items[:1]}))
    config: dict[str, Any] = {
        "imports": [
            "$import transforms",
            "$import pipelines.engine",
            "$import pipelines",
            "$import monai",
            "$import torch",
        ],
        "device": "$torch.device('cpu')",
        "splits": str(splits),
        "seed": 0,
        "cache_rate": 1.0,
        "num_workers": 0,
        "train_sampler": None,
    }
    config.update(knobs)
    for text in (sections, *extra):
        config.update(yaml.safe_load(text))
    return ConfigParser(config)
