"""Command line: `moemesh train [CONFIG] [--set key=value ...]`.

User errors print one line `moemesh: error: ...` on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata

from moemesh import __version__
from moemesh.config import preset_names
from moemesh.errors import UserError, report


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line, exit 2, like every other user error
        raise UserError(f"{message} (see {self.prog} --help)")


def version() -> str:
    """The installed distribution's version; the package's own when running from a source tree."""
    try:
        return metadata.version("moemesh")
    except metadata.PackageNotFoundError:
        return __version__


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moemesh", description="Train Mixture-of-Experts transformers on a DP x EP x TP mesh.")
    parser.add_argument("--version", action="version", version=f"moemesh {version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    train = sub.add_parser("train", help="train a model", description=(
        "Train from a preset name or TOML file (default: the 'tiny' preset). "
        "Override any field with --set section.key=value, e.g. --set train.steps=50. "
        f"Presets: {', '.join(preset_names())}."))
    train.add_argument("config", nargs="?", default=None, help="preset name or path to a TOML config")
    train.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                       help="override a config field (repeatable)")
    return parser


def run(argv: list[str] | None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "train":
        from moemesh.config import load_config

        cfg = load_config(args.config, args.overrides)
        from moemesh.launch import train_command  # imports torch: after the config is known to be valid

        return train_command(cfg)
    raise AssertionError(args.command)


def main(argv: list[str] | None = None) -> int:
    try:
        return run(argv)
    except UserError as exc:
        report(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        report("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
