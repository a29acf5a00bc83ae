"""The ``stream2llm`` command line (typer): the app, its ``model`` and ``index`` groups, and which
command lives where. The commands are in ``run_cmds``, ``workload_cmds``, ``model_cmds`` and
``index_cmds``; what they share (options, consoles, error handling) in ``common``. Async work runs
under ``asyncio.run`` (typer ignores ``async def`` commands); no command module imports vLLM at
import time, so ``stream2llm --help`` stays fast."""

from __future__ import annotations

import sys

import typer

from stream2llm.cli import index_cmds, model_cmds, run_cmds, workload_cmds

app = typer.Typer(help="Streaming-aware RAG serving on vLLM.", no_args_is_help=True, add_completion=False)

model_app = typer.Typer(help="Prepare and list the local models.", no_args_is_help=True)
model_app.command("prepare")(model_cmds.model_prepare)
model_app.command("list")(model_cmds.model_list)
app.add_typer(model_app, name="model")

for command in (
    run_cmds.demo,
    workload_cmds.synth,
    workload_cmds.bench,
    workload_cmds.simulate,
    workload_cmds.calibrate,
    run_cmds.serve,
    run_cmds.run,
    workload_cmds.capture,
):
    app.command()(command)

index_app = typer.Typer(
    help="Build and inspect the ANN index (packaged Wikipedia corpus).", no_args_is_help=True
)
index_app.command("build")(index_cmds.index_build)
index_app.command("info")(index_cmds.index_info)
app.add_typer(index_app, name="index")


def main() -> None:  # pragma: no cover - console entry point
    app(prog_name="stream2llm")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
