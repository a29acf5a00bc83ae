"""The ``stream2llm`` command line (typer). Async work runs under ``asyncio.run`` (typer ignores
``async def`` commands)."""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from stream2llm.serving import models

app = typer.Typer(help="Streaming-aware RAG serving on vLLM.", no_args_is_help=True, add_completion=False)
model_app = typer.Typer(help="Prepare and list the local models.", no_args_is_help=True)
app.add_typer(model_app, name="model")
console = Console()

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="tiny, gemma-270m or a local HF directory.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]


def _fail(exc: BaseException, debug: bool) -> None:
    if debug:
        raise exc
    console.print(f"[red]error:[/red] {exc}")
    raise typer.Exit(1)


@model_app.command("prepare")
def model_prepare(name: Annotated[str, typer.Argument(help="tiny or gemma-270m")], debug: DebugOpt = False):
    """Build a model once and cache it (gemma-270m: ~90 s, 544 MB)."""
    try:
        with console.status(f"preparing {name} ..."):
            info = models.prepare(name)
    except Exception as exc:
        _fail(exc, debug)
    console.print(f"{name}: [green]ready[/green] at {info.path}")


@model_app.command("list")
def model_list():
    """Known models and whether they are prepared."""
    table = Table("name", "description", "prepared at")
    for name, about, path in models.list_models():
        table.add_row(name, about, str(path) if path else "[dim]not yet[/dim]")
    console.print(table)


@app.command()
def demo(
    model: ModelOpt = models.DEFAULT_MODEL,
    chunks: Annotated[int, typer.Option(help="Pieces the context arrives in.")] = 4,
    gap: Annotated[float, typer.Option(help="Seconds between pieces (retrieval time).")] = 1.0,
    max_tokens: Annotated[int, typer.Option(help="Tokens to generate.")] = 48,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Stream retrieved context into the model while it "arrives", then answer; compare TTFT with
    sending the whole prompt after retrieval (non-streaming) on the same engine."""
    from stream2llm.pipelines.demo import run_demo

    try:
        report = asyncio.run(
            run_demo(model, chunks=chunks, gap_s=gap, max_tokens=max_tokens, console=console)
        )
    except Exception as exc:
        _fail(exc, debug)
    if json_out:
        json_out.write_text(json.dumps(report, indent=2))


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="stream2llm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
