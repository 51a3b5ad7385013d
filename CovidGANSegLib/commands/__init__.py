"""Subcommands of the ``covidganseg`` CLI, one module each (see ``CovidGANSegLib.cli``)."""

from __future__ import annotations

import argparse


def whole_number(text: str) -> int:
    """``type=`` of a count or seed option: a whole number >= 0, else a usage error that names the
    value (numpy's random generators would refuse a negative seed deep inside a run)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value
