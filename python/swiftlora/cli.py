"""The ``swiftlora`` command (also ``python -m swiftlora``): one subcommand per module listed in ``SUBCOMMANDS``,
each providing ``add_parser(subparsers)`` (which sets ``func``)."""
from __future__ import annotations

import argparse
import importlib
import sys

# modules providing a subcommand (add_parser); each lives beside the code it drives
SUBCOMMANDS = ("swiftlora.train.cli", "swiftlora.export.cli")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="swiftlora", description="Fast LoRA / QLoRA fine-tuning of LLMs.")
    subparsers = parser.add_subparsers(dest="command", metavar="command")
    for name in SUBCOMMANDS:
        importlib.import_module(name).add_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)
