"""Compose each role's MONAI bundle configs from the shared base and the role's own file.

``bundles/common/configs/<kind>.yaml`` is the ONE base of every role (``kind`` = train, evaluate, inference,
multi_gpu_train); ``bundles/common/configs/<overlay>.yaml`` are shared overlays a role may take (``kd``: the
distillation sections); ``bundles/<role>/role.yaml`` holds only what the role changes. This tool writes the
self-contained ``bundles/<role>/configs/<kind>.yaml`` that users run (no macros, no paths to other files, so a
bundle runs from any working directory and can be zipped as it is)::

    python -m pipelines.compose_bundles            # regenerate every role
    python -m pipelines.compose_bundles --check    # exit 1 naming the stale files (CI / tests)

Composition is MONAI's own merge rule for config lists (``ConfigParser.load_config_files``: a later file replaces a
top-level key of an earlier one) applied to TEXT blocks, so the comments beside every knob survive into the file
``--help`` reads. A top-level block is a key line, its indented continuation and the comment lines directly above
it (a section rule ``# ----`` above them stays in place). A role block replaces the base block of the same key in place (keeping the base's comment when the role's line
has none); a new block is inserted after the block the role file lists before it. ``{role}`` in any source is
replaced by the role's name. ``remove`` drops base keys a role does not have (the polyp role has no CT window).

``role.yaml`` fields: ``description`` (header of every generated file), ``overlays`` (``{kind: [overlay, ...]}``),
``remove`` (``{kind: [key, ...]}``) and one YAML block scalar per kind with the role's blocks (``train: |``).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = ["KINDS", "BUNDLES_DIR", "Block", "parse_blocks", "merge_blocks", "compose", "compose_role", "roles", "main"]

logger = logging.getLogger(__name__)

#: generated config kinds (``bundles/<role>/configs/<kind>.yaml``), each with a base in ``bundles/common/configs``
KINDS: tuple[str, ...] = ("train", "evaluate", "inference", "multi_gpu_train")
#: the bundles folder of this checkout
BUNDLES_DIR: Path = Path(__file__).resolve().parents[1] / "bundles"
#: files copied from the base folder into every role's configs/ as they are
COPIED: tuple[str, ...] = ("logging.conf",)

_KEY = re.compile(r"^([^\s#\-][^:]*?):(?:\s|$)")
_ROLE_FIELDS = {"description", "overlays", "remove", *KINDS}


@dataclass
class Block:
    """One top-level item of a YAML file as text: a keyed block or free lines (comments, blank lines).

    Attributes:
        key: the top-level key, None for free lines.
        lead: comment lines directly above the key line (they belong to the block).
        body: the key line and its indented continuation (or the free lines).
    """

    key: str | None
    lead: list[str] = field(default_factory=list)
    body: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        return [*self.lead, *self.body]


def _comment_start(line: str) -> int:
    """Index of the YAML comment in ``line`` (``-1`` when none): a ``#`` after whitespace and outside quotes."""
    quote = ""
    for i, ch in enumerate(line):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] in " \t"):
            return i
    return -1


def parse_blocks(text: str) -> tuple[list[str], list[Block]]:
    """Split YAML text into its leading comment header and its top-level items.

    Args:
        text: the file's text (top-level keys at column 0, continuations indented).

    Returns:
        ``(header, items)``: the comment/blank lines before the first key or separated from it by a blank line,
        and the items in file order.

    Raises:
        ValueError: a non-indented line that is neither a key, a comment nor blank (e.g. an unindented list).
    """
    lines = text.splitlines()
    header: list[str] = []
    i = 0
    while i < len(lines) and (not lines[i].strip() or lines[i].startswith("#")):
        header.append(lines[i])
        i += 1
    # comment lines right above the first key belong to that key, not to the header
    pending: list[str] = []
    while header and header[-1].startswith("#"):
        pending.insert(0, header.pop())
    items: list[Block] = []
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            pending.append(line)
            i += 1
            continue
        if not line.strip():
            if pending:
                items.append(Block(None, body=pending))
                pending = []
            items.append(Block(None, body=[line]))
            i += 1
            continue
        m = _KEY.match(line)
        if not m:
            raise ValueError(f"line {i + 1} {line!r}: top-level lines must be 'key: value' (indent list items and continuations)")
        body = [line]
        i += 1
        while i < len(lines):
            nxt = lines[i]
            if nxt.startswith((" ", "\t")):
                body.append(nxt)
                i += 1
            elif not nxt.strip():
                j = i
                while j < len(lines) and not lines[j].strip():
                    j += 1
                if j < len(lines) and lines[j].startswith((" ", "\t")):
                    body.extend(lines[i:j])
                    i = j
                else:
                    break
            else:
                break
        # a section rule ("# ----") above the key stays where it is when a role replaces the block
        rule = max((n for n, c in enumerate(pending) if c.startswith("# ---")), default=-1)
        if rule >= 0:
            items.append(Block(None, body=pending[: rule + 1]))
        items.append(Block(m.group(1).strip(), lead=pending[rule + 1 :], body=body))
        pending = []
    if pending:
        items.append(Block(None, body=pending))
    return header, items


def _replace(base: Block, new: Block) -> Block:
    """``new`` in place of ``base``, keeping the base's lead comment and beside-comment when ``new`` has none."""
    lead = new.lead or base.lead
    body = list(new.body)
    if len(body) == 1 and len(base.body) == 1 and _comment_start(body[0]) < 0:
        c = _comment_start(base.body[0])
        if c >= 0:
            value = body[0].rstrip()
            body[0] = value.ljust(c - 1) + " " + base.body[0][c:] if len(value) < c else f"{value}  {base.body[0][c:]}"
    return Block(base.key, lead=lead, body=body)


def merge_blocks(base: Sequence[Block], overlay: Sequence[Block]) -> list[Block]:
    """Merge an overlay's blocks into the base's (MONAI's top-level replace rule, as text).

    Args:
        base: items of the base file.
        overlay: items of the overlay (role or shared overlay).

    Returns:
        The merged items: replaced blocks stay where the base has them; new blocks follow the block the overlay
        lists before them (at the end when none); free lines of the overlay go with the new block that follows them.
    """
    merged = list(base)
    cursor: int | None = None
    pending: list[Block] = []
    for item in overlay:
        if item.key is None:
            pending.append(item)
            continue
        where = next((n for n, b in enumerate(merged) if b.key == item.key), None)
        if where is not None:
            merged[where] = _replace(merged[where], item)
            cursor = where + 1
        else:
            at = len(merged) if cursor is None else cursor
            new = [*pending, item] if cursor is not None or not merged else [Block(None, body=[""]), *pending, item]
            merged[at:at] = new
            cursor = at + len(new)
        pending = []
    return merged


def _remove(items: list[Block], keys: Sequence[str], source: str) -> list[Block]:
    present = {b.key for b in items}
    missing = [k for k in keys if k not in present]
    if missing:
        raise ValueError(f"{source}: 'remove' names keys the base does not have: {missing}")
    return [b for b in items if b.key not in set(keys)]


def _load_role(role_dir: Path) -> dict[str, Any]:
    path = role_dir / "role.yaml"
    try:
        spec = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{path}: cannot read the role file ({e})") from e
    if not isinstance(spec, dict):
        raise ValueError(f"{path}: expected a mapping with {sorted(_ROLE_FIELDS)}")
    unknown = sorted(set(spec) - _ROLE_FIELDS)
    if unknown:
        raise ValueError(f"{path}: unknown fields {unknown}; valid: {sorted(_ROLE_FIELDS)}")
    for name in ("overlays", "remove"):
        bad = sorted(set(spec.get(name) or {}) - set(KINDS))
        if bad:
            raise ValueError(f"{path}: {name} has unknown kinds {bad}; valid: {list(KINDS)}")
    return spec


def roles(bundles_dir: Path = BUNDLES_DIR) -> list[str]:
    """The roles of a bundles folder: every sub-folder with a ``role.yaml``, sorted."""
    return sorted(p.parent.name for p in bundles_dir.glob("*/role.yaml"))


def compose(role: str, kind: str, bundles_dir: Path = BUNDLES_DIR) -> str:
    """The text of ``bundles/<role>/configs/<kind>.yaml``.

    Args:
        role: a role folder name with a ``role.yaml``.
        kind: one of :data:`KINDS`.
        bundles_dir: the bundles folder.

    Returns:
        The generated YAML text (ends with a newline).

    Raises:
        ValueError: an unknown kind or role, a malformed role file, or an overlay that does not exist.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown config kind {kind!r}; valid: {list(KINDS)}")
    role_dir = bundles_dir / role
    if not (role_dir / "role.yaml").is_file():
        raise ValueError(f"unknown role {role!r}: no {role_dir / 'role.yaml'}; roles: {roles(bundles_dir)}")
    spec = _load_role(role_dir)
    common = bundles_dir / "common" / "configs"
    base_path = common / f"{kind}.yaml"
    header, items = parse_blocks(base_path.read_text())
    sources = [base_path]
    for name in (spec.get("overlays") or {}).get(kind, []):
        path = common / f"{name}.yaml"
        if not path.is_file():
            raise ValueError(f"{role_dir / 'role.yaml'}: overlay {name!r} does not exist ({path})")
        items = merge_blocks(items, parse_blocks(path.read_text())[1])
        sources.append(path)
    items = _remove(items, (spec.get("remove") or {}).get(kind, []), str(role_dir / "role.yaml"))
    own = spec.get(kind) or ""
    if own.strip():
        items = merge_blocks(items, parse_blocks(own)[1])
    sources.append(role_dir / "role.yaml")
    names = " + ".join(str(p.relative_to(bundles_dir.parent)) for p in sources)
    description = [f"# {line}".rstrip() for line in str(spec.get("description") or role).strip().splitlines()]
    description[0] = f"# {role}: {description[0][2:]}"
    top = [
        *description,
        "#",
        f"# GENERATED by `python -m pipelines.compose_bundles` from {names}:",
        "# edit those and regenerate (tests/bundles/test_compose.py fails while this file is stale).",
        *[h for h in header if not h.startswith("#:")],
    ]
    body = [line for b in items for line in b.lines()]
    while body and not body[0].strip():
        body.pop(0)
    while top and not top[-1].strip():
        top.pop()
    text = "\n".join([*top, "", *body]).rstrip() + "\n"
    return re.sub(r"\n{3,}", "\n\n", text.replace("{role}", role))


def compose_role(role: str, bundles_dir: Path = BUNDLES_DIR, check: bool = False) -> list[Path]:
    """Write (or, with ``check``, compare) every generated file of a role.

    Args:
        role: the role folder name.
        bundles_dir: the bundles folder.
        check: compare only; write nothing.

    Returns:
        The files that were stale (rewritten unless ``check``).
    """
    out_dir = bundles_dir / role / "configs"
    wanted = {out_dir / f"{kind}.yaml": compose(role, kind, bundles_dir) for kind in KINDS}
    for name in COPIED:
        wanted[out_dir / name] = (bundles_dir / "common" / "configs" / name).read_text()
    stale = [p for p, text in wanted.items() if not p.is_file() or p.read_text() != text]
    if not check:
        from pipelines.engine.atomic import atomic_write_text

        out_dir.mkdir(parents=True, exist_ok=True)
        for p in stale:
            atomic_write_text(p, wanted[p])
    return stale


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: regenerate (default) or ``--check`` the composed bundle configs; returns the exit code."""
    parser = argparse.ArgumentParser(prog="python -m pipelines.compose_bundles", description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when a generated file is stale")
    parser.add_argument("--role", action="append", help="only this role (repeatable); default: every role")
    parser.add_argument("--bundles-dir", type=Path, default=BUNDLES_DIR, help="bundles folder (default: this checkout's)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    stale: list[Path] = []
    for role in args.role or roles(args.bundles_dir):
        stale += compose_role(role, args.bundles_dir, check=args.check)
    for p in stale:
        logger.info("%s %s", "stale:" if args.check else "wrote", p)
    if args.check and stale:
        logger.error("ERROR: %d generated bundle file(s) are stale: run python -m pipelines.compose_bundles", len(stale))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
