"""Keep `docs/api.md` and `docs/faq.md` in step with the code: config tables, exported names and links."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path

import pytest
from peft.config import PeftConfig

import peft_ismoe
from peft_ismoe import GNPIQConfig, ISMoEConfig, backbones, data, memory

DOCS = Path(__file__).resolve().parent.parent / "docs"
API = (DOCS / "api.md").read_text(encoding="utf-8")

# Fields PEFT fills in itself (or uses only for its own Hub loading); a user of ISMoE never sets them, so the
# api page does not give them a row. Every name here must really come from PeftConfig (checked below), so this
# list cannot hide a field of our own.
PEFT_FIELDS_NOT_DOCUMENTED = frozenset(
    {"peft_type", "auto_mapping", "peft_version", "base_model_name_or_path", "revision"}
)

CONFIG_CASES = [
    pytest.param(GNPIQConfig, frozenset(), id="GNPIQConfig"),
    pytest.param(ISMoEConfig, PEFT_FIELDS_NOT_DOCUMENTED, id="ISMoEConfig"),
]

SUBMODULES = [pytest.param(module, id=module.__name__) for module in (data, memory, backbones)]

_TABLE_ROW = re.compile(r"^\|\s*`(?P<name>[A-Za-z_][A-Za-z0-9_]*)`\s*\|(?P<rest>.*)\|\s*$")
_CODE = re.compile(r"`([^`]+)`")
_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")


def _section(text: str, heading: str) -> str:
    """The text under `heading` (a markdown heading line) up to the next heading of the same or a higher level."""
    lines = text.splitlines()
    start = lines.index(heading)
    level = len(heading) - len(heading.lstrip("#"))
    body = []
    for line in lines[start + 1 :]:
        hashes = len(line) - len(line.lstrip("#"))
        if 0 < hashes <= level and line[hashes : hashes + 1] == " ":
            break
        body.append(line)
    return "\n".join(body)


def _field_rows(section: str) -> dict[str, str]:
    """``{field name: default cell}`` for every table row of `section` that starts with a backticked name."""
    rows = {}
    for line in section.splitlines():
        match = _TABLE_ROW.match(line)
        if match:
            rows[match["name"]] = match["rest"].split("|")[0].strip()
    return rows


def _documented_default(cell: str) -> object:
    """The first backticked literal of a table cell, as a Python value (``1e-4``, ``"gelu"``, ``None`` ...)."""
    code = _CODE.search(cell)
    assert code is not None, f"the default cell {cell!r} holds no backticked value"
    return ast.literal_eval(code.group(1))


def _slug(heading: str) -> str:
    """The anchor a markdown renderer (GitHub's rule) gives a heading: lowercase, punctuation dropped, spaces -> -."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_excluded_fields_are_peft_base_fields():
    base = {f.name for f in dataclasses.fields(PeftConfig)}
    assert base >= PEFT_FIELDS_NOT_DOCUMENTED


@pytest.mark.parametrize("config_cls, excluded", CONFIG_CASES)
def test_every_config_field_has_a_row_with_its_real_default(config_cls, excluded):
    rows = _field_rows(_section(API, f"### `{config_cls.__name__}`"))
    fields = {f.name: f for f in dataclasses.fields(config_cls) if f.name not in excluded}

    assert sorted(set(fields) - set(rows)) == [], "fields without a row in docs/api.md"
    for name, field in fields.items():
        assert field.default is not dataclasses.MISSING, f"{name} has a default factory; compare it by hand"
        documented = _documented_default(rows[name])
        # Compare types too: a documented `0` must not pass for a default of `False`, nor `8` for `8.0`.
        assert (documented, type(documented)) == (field.default, type(field.default)), name


@pytest.mark.parametrize("config_cls, excluded", CONFIG_CASES)
def test_config_tables_hold_no_stale_rows(config_cls, excluded):
    rows = _field_rows(_section(API, f"### `{config_cls.__name__}`"))
    fields = {f.name for f in dataclasses.fields(config_cls)}
    assert sorted(set(rows) - fields) == []


def test_every_exported_name_is_documented():
    missing = [name for name in peft_ismoe.__all__ if f"`{name}" not in API]
    assert missing == []


@pytest.mark.parametrize("module", SUBMODULES)
def test_every_public_name_of_the_submodules_is_documented(module):
    missing = [name for name in module.__all__ if f"`{name}" not in API]
    assert missing == []


@pytest.mark.parametrize("page", ["api.md", "faq.md"])
def test_relative_links_point_to_existing_pages_and_headings(page):
    text = (DOCS / page).read_text(encoding="utf-8")
    broken = []
    for match in _LINK.finditer(text):
        target = match["target"]
        if "://" in target:
            continue
        file_part, _, anchor = target.partition("#")
        linked = (DOCS / file_part) if file_part else DOCS / page
        if not linked.is_file():
            broken.append(target)
            continue
        if anchor:
            headings = [line for line in linked.read_text(encoding="utf-8").splitlines() if line.startswith("#")]
            if anchor not in {_slug(h) for h in headings}:
                broken.append(target)
    assert broken == []


def test_slug_follows_the_renderer_rule():
    assert _slug("## Planning memory: `plan`, `MemoryPlan`") == "planning-memory-plan-memoryplan"
    assert _slug("### Offline backbones: `peft_ismoe.backbones`") == "offline-backbones-peft_ismoebackbones"
