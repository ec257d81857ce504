"""The README stays true: it opens with the two commands, and its config table matches config.py."""

from __future__ import annotations

import re
import tomllib
from dataclasses import fields
from pathlib import Path

from moemesh.config import Config, load_config
from moemesh.train.data import build_source

README = Path(__file__).resolve().parents[2] / "README.md"
FIXTURE = Path(__file__).resolve().parents[1] / "fixtures" / "tinyshakespeare_150k.txt"
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


def test_readme_my_run_toml_example_loads_as_written(tmp_path: Path, monkeypatch):
    """The README's config-file example, exactly as printed, with its corpus.txt beside it."""
    block = re.search(r"```toml\n(# my_run\.toml\n.*?)```", README.read_text(), re.DOTALL)
    assert block, "README lost its my_run.toml example"
    (tmp_path / "my_run.toml").write_text(block.group(1))
    (tmp_path / "corpus.txt").write_bytes(FIXTURE.read_bytes())
    monkeypatch.chdir(tmp_path)
    cfg = load_config("my_run.toml")
    assert (cfg.data.source, cfg.data.path, cfg.train.steps) == ("text", "corpus.txt", 1000)
    source = build_source(cfg.data, cfg.model.vocab_size, cfg.train.seq_len, cfg.train.seed)
    assert source.global_batch(1, cfg.train.global_batch, cfg.train.seq_len).max() < cfg.model.vocab_size
