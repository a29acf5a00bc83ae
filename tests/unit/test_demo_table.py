"""The demo's summary table tells an identical answer, a bf16 near-tie on the same computed prompt,
and a real difference apart (no engine: the rows are what ``run_demo`` builds)."""

import io

from rich.console import Console

from stream2llm.cli.demo import PROMPT_ONLY, summary_table


def _row(question: str, same_answer: bool, same_prompt: bool) -> dict:
    return {
        "question": question,
        "retriever": "ann",
        "prompt_tokens": 568,
        "retrieval_s": 4.0,
        "ttft_final_stream_s": 0.17,
        "ttft_final_nonstream_s": 0.5,
        "speedup": 2.9,
        "same_answer": same_answer,
        "same_prompt": same_prompt,
    }


def _render(rows: list[dict]) -> str:
    out = io.StringIO()
    Console(file=out, width=200, color_system=None).print(summary_table(rows))
    return out.getvalue()


def _same_cell(text: str, question: str) -> str:
    line = next(line for line in text.splitlines() if question in line)
    return line.split("│")[-2].strip()


def test_same_answers_say_yes_and_need_no_caption():
    text = _render([_row("q one", True, True)])
    assert _same_cell(text, "q one") == "yes"
    assert "near-tie" not in text


def test_a_near_tie_on_the_same_prompt_is_told_apart_from_a_wrong_prompt():
    text = _render([_row("q tie", False, True), _row("q wrong", False, False)])
    assert _same_cell(text, "q tie") == "prompt"
    assert _same_cell(text, "q wrong") == "no"
    assert " ".join(PROMPT_ONLY.split()[:6]) in " ".join(text.split())
