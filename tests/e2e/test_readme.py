"""The README stays true: it opens with the two commands, and its config table matches config.py."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

from moemesh.config import Config

README = Path(__file__).resolve().parents[2] / "README.md"
_ROW = re.compile(r"^\| (\w+) \| `(\w+)` \| ([^|]+) \|")


README_DEMO_LINE = ("make demo    # creates .venv, installs moemesh with torch==2.13.0, trains the default tiny MoE "
                    "on an 8-process 2×2×2 CPU mesh")


def test_readme_opens_with_make_demo_and_make_test():
    lines = README.read_text().splitlines()
    assert lines[0].startswith("# ")
    assert lines[1:6] == [
        "",
        "```",
        README_DEMO_LINE,
        "make test    # same set-up, then the test suite",
        "```",
    ]


def test_readme_config_table_lists_every_field_with_its_default():
    documented = {}
    for line in README.read_text().splitlines():
        if match := _ROW.match(line):
            section, key, default = match.groups()
            # the table writes defaults as TOML values, strings in backticks
            documented[f"{section}.{key}"] = tomllib.loads(f"v = {default.strip().strip('`')}")["v"]
    cfg = Config()
    actual = {f"{s.name}.{f.name}": getattr(getattr(cfg, s.name), f.name)
              for s in fields(Config) for f in fields(getattr(cfg, s.name))}
    assert documented.keys() == actual.keys()
    for key, value in actual.items():
        assert documented[key] == value and type(documented[key]) is type(value), key
