"""The command line's surface: every command has --help, errors are one line with exit status 1."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from stream2llm.cli import app

COMMANDS = [
    ["demo"], ["run"], ["serve"], ["index", "build"], ["index", "info"], ["capture"], ["synth"],
    ["bench"], ["simulate"], ["calibrate"], ["model", "prepare"], ["model", "list"],
]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS, ids=" ".join)
def test_every_command_has_help(command):
    result = CliRunner().invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage:" in result.output and "--help" in result.output


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bench", "missing-traces.jsonl"], "missing-traces.jsonl"),
        (["synth", "--workload", "nope", "--n", "3"], "nope"),
        (["synth", "--workload", "anns", "--churn", "sometimes", "--n", "3"], "unknown churn 'sometimes'"),
        (["run", "a question", "--retriever", "nope"], "unknown retriever"),
        (["simulate", "--profile", "no-such-profile", "--n", "5"], "no cost profile"),
    ],
)
def test_errors_are_one_line_with_exit_status_1_and_no_traceback(args, message):
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], result.output
    assert "Traceback" not in result.output


def test_debug_shows_the_exception():
    result = CliRunner().invoke(app, ["synth", "--workload", "nope", "--n", "3", "--debug"])
    assert result.exit_code == 1 and isinstance(result.exception, ValueError)


def test_json_output_option(tmp_path):
    report = tmp_path / "synth.json"
    result = CliRunner().invoke(
        app, ["synth", "--n", "5", "--out", str(tmp_path / "t.jsonl"), "--json", str(report)]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(report.read_text())
    assert data["n"] == 5 and data["achieved"] and data["target"]
