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
    from CovidGANSegLib.errors import CheckpointError, InputError

    if not args.folder.is_dir():
        raise InputError("models folder not found" if not args.folder.exists() else "not a folder", args.folder)
    problems: list[CheckpointError] = []
    cards = find_models(args.folder, problems=problems)
    if args.verify:
        verified = []
        for c in cards:
            try:
                verified.append(read_model_card(c["checkpoint_path"] + ".json", verify=True))
            except CheckpointError as exc:
                problems.append(exc)
        cards = verified
    if args.json:
        print(json.dumps(cards, indent=2))
    else:
        if not cards and not problems:
            print(f"no models in {args.folder}")
        for c in cards:
            flag = "DEMO (phantoms), not for clinical use" if c.get("demo") else c.get("intended_use", "")
            print(f"{c['kind']:4s} {c['name']:24s} {c['arch']:10s} {c.get('config_name', '?'):8s} {c.get('created', '?')} "
                  f"sha256={c['sha256'][:12]}  {flag}")
    if problems:
        more = f" (and {len(problems) - 1} more: {', '.join(str(p.path) for p in problems[1:])})" if len(problems) > 1 else ""
        first = problems[0]
        raise CheckpointError(f"{first.problem}{more}", first.path)
    return 0
