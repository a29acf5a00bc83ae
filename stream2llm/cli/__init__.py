"""The ``stream2llm`` command line: a typer app (``app``) and its rich screens."""

from stream2llm.cli.app import app

__all__ = ["app"]
