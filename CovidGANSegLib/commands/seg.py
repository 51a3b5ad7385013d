"""Placeholder: the owner of this subcommand replaces this file (see CovidGANSegLib.cli)."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    """Register nothing yet."""
