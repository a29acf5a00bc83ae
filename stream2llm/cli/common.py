"""What every ``stream2llm`` command shares: the consoles, the option types, running async work and
turning failures into one line on stderr. The command modules import this, never ``cli.app`` (which
imports them), so the CLI has no import cycle."""

from __future__ import annotations

import json
from collections.abc import Coroutine
from pathlib import Path
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.console import Console

from stream2llm.cli.lifecycle import Stopped

T = TypeVar("T")

console = Console()
errors = Console(stderr=True)

ModelOpt = Annotated[str, typer.Option("--model", "-m", help="tiny, gemma-270m or a local HF directory.")]
JsonOpt = Annotated[Path | None, typer.Option("--json", help="Also write the results as JSON here.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks.")]
RetrieverOpt = Annotated[
    str, typer.Option("--retriever", "-r", help="ann, crawl, or both comma-separated (ann,crawl).")
]
SeedOpt = Annotated[
    list[str] | None,
    typer.Option("--seed-url", help="Crawl from this URL (repeatable); default: the local site."),
]
AllowPrivateOpt = Annotated[
    bool, typer.Option("--allow-private", help="Let the crawler reach private/loopback addresses.")
]
MaxPagesOpt = Annotated[int, typer.Option(help="Pages a crawl emits at most.")]
IndexDocsOpt = Annotated[
    int | None, typer.Option(help="Build/use a small ANN index of N articles (default: all 10,033).")
]


def source_options(
    seed_url: list[str] | None, allow_private: bool, max_pages: int, index_docs: int | None, **extra: Any
) -> Any:
    """The retrievers' SourceOptions from the shared command-line options (imported late: the
    pipelines are not needed for --help)."""
    from stream2llm.pipelines.sources import SourceOptions

    return SourceOptions(
        seed_urls=tuple(seed_url or ()),
        allow_private=allow_private,
        max_pages=max_pages,
        index_docs=index_docs,
        **extra,
    )


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    """Run a command's async work so that SIGINT, SIGTERM and the engine's death stop it cleanly
    (``cli.lifecycle``: sessions aborted, engine shut down, then ``Stopped`` with the exit status)."""
    from stream2llm.cli.lifecycle import run

    return run(coro)


def quiet_engine_logs() -> None:
    """Interactive commands show their own progress; vLLM's warnings and load bars would bury it
    (set VLLM_LOGGING_LEVEL to see them)."""
    import os

    os.environ.setdefault("VLLM_LOGGING_LEVEL", "ERROR")
    os.environ.setdefault("TQDM_DISABLE", "1")


def fail(exc: BaseException, debug: bool) -> NoReturn:
    """One clear line on stderr and exit status 1 (130 when interrupted); --debug re-raises."""
    if debug:
        raise exc
    if isinstance(exc, KeyboardInterrupt):
        errors.print("interrupted")
        raise typer.Exit(130)
    if isinstance(exc, Stopped):
        errors.print(f"stream2llm: {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(exc.code)
    message = " ".join(str(exc).split()) or type(exc).__name__
    errors.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def write_json(path: Path | None, report: object) -> None:
    if path is not None:
        path.write_text(json.dumps(report, indent=1, default=str) + "\n")
