"""``covidganseg models``: list the models (checkpoints with model cards) in a folder."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("models", help="list models (checkpoint + model card) in a folder",
                              description="List the models in FOLDER with their model cards (name, kind, configuration, training data, date, SHA-256).")
    p.add_argument("folder", type=Path, help="models folder (searched recursively for *.pt.json cards)")
    p.add_argument("--json", action="store_true", help="print the cards as JSON")
    p.add_argument("--verify", action="store_true", help="check each checkpoint's SHA-256 against its card")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from CovidGANSegLib.checkpoints import find_models, read_model_card

    cards = find_models(args.folder)
    if args.verify:
        cards = [read_model_card(c["checkpoint_path"], verify=True) for c in cards]
    if args.json:
        print(json.dumps(cards, indent=2))
        return 0
    if not cards:
        print(f"no models in {args.folder}")
    for c in cards:
        flag = "DEMO (phantoms), not for clinical use" if c.get("demo") else c.get("intended_use", "")
        print(f"{c['kind']:4s} {c['name']:24s} {c['arch']:10s} {c.get('config_name', '?'):8s} {c.get('created', '?')} sha256={c['sha256'][:12]}  {flag}")
    return 0
