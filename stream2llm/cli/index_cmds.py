"""``stream2llm index build|info``: the FAISS index the ANN retriever searches."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from stream2llm.cli.common import DebugOpt, JsonOpt, console, fail, write_json


def index_build(
    docs: Annotated[int | None, typer.Option("--docs", help="Index only N articles (spread evenly).")] = None,
    kind: Annotated[str, typer.Option(help="auto (IVF above 5,000 vectors), flat or ivf.")] = "auto",
    nlist: Annotated[int | None, typer.Option(help="IVF lists (default ~4 sqrt(n)).")] = None,
    out: Annotated[Path | None, typer.Option(help="Index directory (default: the user cache).")] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """Embed the Wikipedia lead extracts (all-MiniLM-L6-v2, CPU) and save a FAISS index.

    It is saved where `run`, `capture` and `demo` look for it; `--index-docs N` uses the N-article one."""
    from stream2llm.pipelines.sources import SourceOptions, index_name
    from stream2llm.retrievers import ann_index

    try:
        index = ann_index.build_wiki_index(docs, kind=kind, nlist=nlist, progress=True, console=console)
        path = index.save(out or ann_index.default_index_dir(index_name(SourceOptions(index_docs=docs))))
    except Exception as exc:
        fail(exc, debug)
    _print_index_meta(index.meta, path)
    write_json(json_out, {"path": str(path), **vars(index.meta)})


def index_info(
    path: Annotated[Path | None, typer.Argument(help="Index directory (default: the user cache).")] = None,
    json_out: JsonOpt = None,
    debug: DebugOpt = False,
):
    """What an index holds and how it was built."""
    from stream2llm.retrievers import ann_index

    path = path or ann_index.default_index_dir()
    try:
        meta = ann_index.read_meta(path)
    except Exception as exc:
        fail(exc, debug)
    _print_index_meta(meta, path)
    write_json(json_out, {"path": str(path), **vars(meta)})


def _print_index_meta(meta: Any, path: Path) -> None:
    table = Table("field", "value", title=f"index at {path}")
    for key, value in vars(meta).items():
        table.add_row(key, str(value))
    console.print(table)
