"""The ``covidganseg`` command line: one subcommand per step of the pipeline.

Each subcommand lives in ``CovidGANSegLib/commands/<name>.py`` with ``register(subparsers)``;
heavy imports (torch) happen inside the handlers so ``--help`` stays fast. Logging is configured
here and only here.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from collections.abc import Sequence

from CovidGANSegLib import __version__, progress
from CovidGANSegLib.errors import CovidGANSegError

#: command modules, in the order of the pipeline
COMMAND_MODULES = ("phantoms", "preprocess", "gan", "seg", "evaluate", "demo", "models")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="covidganseg",
        description="Self-supervised COVID-19 lesion segmentation in chest CT (3D GAN + TransUNet).",
        epilog="Run 'covidganseg COMMAND --help' for the options of each command.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="logging level (default INFO)")
    parser.add_argument("--progress", default="bar", choices=["bar", "lines", "none"],
                        help="progress display: tqdm bars, 'PROGRESS <fraction> <text>' lines on stdout (for the Slicer module), or none")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(f"CovidGANSegLib.commands.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    progress.set_mode(args.progress)
    try:
        result = args.handler(args)
    except CovidGANSegError as exc:
        print(f"covidganseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except FileExistsError as exc:
        print(f"covidganseg {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"covidganseg {args.command}: interrupted", file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    raise SystemExit(main())
