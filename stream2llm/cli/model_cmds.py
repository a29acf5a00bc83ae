"""``stream2llm model prepare|list``: the local models the engine can load."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.table import Table

from stream2llm.cli.common import DebugOpt, JsonOpt, console, fail, write_json
from stream2llm.engine import models


def model_prepare(name: Annotated[str, typer.Argument(help="tiny or gemma-270m")], debug: DebugOpt = False):
    """Build a model once and cache it (gemma-270m: ~90 s, 544 MB)."""
    try:
        with console.status(f"preparing {name} ..."):
            info = models.prepare(name)
    except Exception as exc:
        fail(exc, debug)
    console.print(f"{name}: [green]ready[/green] at {info.path}")


def model_list(json_out: JsonOpt = None):
    """Known models and whether they are prepared."""
    table = Table("name", "description", "prepared at")
    listed = models.list_models()
    for name, about, path in listed:
        table.add_row(name, about, str(path) if path else "[dim]not yet[/dim]")
    console.print(table)
    write_json(json_out, [{"name": n, "description": a, "path": p} for n, a, p in listed])
