"""``stream2llm --help`` reads as whole sentences. typer's rich markup mode keeps a docstring's hard
line breaks in a group's command list and in a command's later paragraphs, so a docstring wrapped
at the source shows a sentence cut in the middle ("... progressive" / "ANN search ..."). Rendered
wide, each summary and each paragraph must sit on one line of the real help output."""

from __future__ import annotations

import inspect
from typing import Any

import pytest
import typer.main
from typer.testing import CliRunner

from stream2llm.cli import app

WIDE = {"COLUMNS": "1000", "TERMINAL_WIDTH": "1000"}  # no wrapping of the terminal's own


def _commands(group: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    """Every command and group under ``group`` (typer's own click), with its argv path."""
    out = []
    for name, command in group.commands.items():
        out.append(((*path, name), command))
        out += _commands(command, (*path, name)) if hasattr(command, "commands") else []
    return out


ROOT = typer.main.get_command(app)
COMMANDS = _commands(ROOT)
GROUPS = [((), ROOT)] + [(path, c) for path, c in COMMANDS if hasattr(c, "commands")]


def _cases(pairs: list[tuple[tuple[str, ...], Any]]) -> list[Any]:
    return [pytest.param(path, command, id=" ".join(path) or "stream2llm") for path, command in pairs]


def _help_lines(path: tuple[str, ...], cli: typer.Typer = app) -> list[str]:
    """The help output of ``path``, one stripped line each (panel borders and runs of spaces gone)."""
    result = CliRunner().invoke(cli, [*path, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return [" ".join(line.strip("│ ").split()) for line in result.output.splitlines()]


def _paragraphs(command: Any) -> list[str]:
    return [" ".join(p.split()) for p in inspect.cleandoc(command.help or "").split("\n\n") if p.strip()]


@pytest.mark.parametrize(("path", "group"), _cases(GROUPS))
def test_each_commands_summary_is_one_line_in_its_groups_list(path, group):
    lines = _help_lines(path)
    for name, command in group.commands.items():
        summary = _paragraphs(command)[0]
        assert f"{name} {summary}" in lines, f"{name}: summary broken across lines:\n" + "\n".join(lines)


@pytest.mark.parametrize(("path", "command"), _cases([((), ROOT), *COMMANDS]))
def test_each_paragraph_of_a_commands_help_is_one_line(path, command):
    lines = _help_lines(path)
    for paragraph in _paragraphs(command):
        assert paragraph in lines, f"{paragraph!r} broken across lines:\n" + "\n".join(lines)


def test_the_check_sees_a_sentence_wrapped_at_the_source():
    """What the checks above catch, shown on a two-command app whose docstrings are wrapped."""
    wrapped = typer.Typer()

    @wrapped.command()
    def first() -> None:
        """A summary wrapped
        at the source.

        A later paragraph wrapped
        at the source."""

    @wrapped.command()
    def second() -> None:
        """Another command."""

    summary, later = _paragraphs(typer.main.get_command(wrapped).commands["first"])  # type: ignore[attr-defined]
    assert f"first {summary}" not in _help_lines((), wrapped)
    assert later not in _help_lines(("first",), wrapped)
