"""Options shared by several `dpa` commands: preset overrides given as `--set dotted.key=value`."""

from __future__ import annotations

from typing import Annotated, Optional

import typer
import yaml

OverrideOpt = Annotated[
    Optional[list[str]], typer.Option("--set", "-s", help="override a preset value: dotted.key=YAML value (repeatable)")
]


def parse_overrides(items: list[str] | None) -> dict:
    """`dpa.train.lr=0.001` → {'dpa.train.lr': 0.001}; values are parsed as YAML."""
    overrides = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep:
            raise typer.BadParameter(f"{item!r}: expected dotted.key=value")
        overrides[key.strip()] = yaml.safe_load(value)
    return overrides
