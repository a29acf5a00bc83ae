"""One chat conversation -> one prompt, and stop strings on generated text, for every surface.

The HTTP server's OpenAI chat endpoint and the LangChain chat model both turn a conversation into
the engine's (question, context) pair here, so the same conversation is the same prompt (and the
same prefix-cache entries) whichever way it arrives. Nothing here imports vLLM or LangChain.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

# How a turn's role is shown in the prompt; a role not listed is shown as given.
ROLE_LABELS = {
    "system": "System",
    "developer": "Developer",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
    "function": "Function",
}
TURN_SEPARATOR = "\n\n"  # one paragraph per turn, as documents are separated in the context


class Turn(NamedTuple):
    """One message: role (system, user, assistant, tool, ...), its text, and an optional name."""

    role: str
    text: str
    name: str | None = None


def render_chat(turns: Sequence[Turn | tuple[str, str]]) -> tuple[str, str]:
    """(question, context) for the engine's prompt template.

    The last ``user`` turn is the question (the last turn when there is none); every other turn, in
    order, becomes the context as ``Role: text`` (``Role (name): text`` when named) paragraphs.
    Deterministic, so a conversation always maps to the same prompt and prefix-cache hits carry
    across turns.

    Where the two earlier renderers differed, the LangChain chat model's behaviour was kept (it
    passes LangChain's standard chat-model tests): turns are separated by a blank line, not one
    newline, and the question is the last user turn wherever it is, not necessarily the last
    message. The HTTP server still answers 400 to an OpenAI chat that does not end with a user
    message: that is request validation on its side, not a different rendering.
    """
    if not turns:
        raise ValueError("a chat needs at least one message")
    chat = [Turn(*turn) for turn in turns]
    users = [i for i, turn in enumerate(chat) if turn.role == "user"]
    last = users[-1] if users else len(chat) - 1
    context = TURN_SEPARATOR.join(render_turn(turn) for i, turn in enumerate(chat) if i != last)
    return chat[last].text, context


def render_turn(turn: Turn) -> str:
    """``Role: text`` or ``Role (name): text``."""
    role = ROLE_LABELS.get(turn.role, turn.role)
    if turn.name:
        role = f"{role} ({turn.name})"
    return f"{role}: {turn.text}"


class StopScanner:
    """Cuts streamed text at the first stop string.

    The engine runs without a tokenizer in vLLM (stream2llm tokenizes), so vLLM cannot apply stop
    strings; this does, on the decoded text. Text that could be the start of a stop string is held
    back until the next delta decides, so no stop string (or part of one) is ever emitted."""

    def __init__(self, stops: Sequence[str] | None) -> None:
        self.stops = [s for s in (stops or ()) if s]
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text
        self._pending = ""

    def feed(self, delta: str) -> str:
        """The part of ``pending + delta`` that is safe to emit now."""
        if self.stopped:
            return ""
        text = self._pending + delta
        hits = [(i, s) for s in self.stops if (i := text.find(s)) >= 0]
        if hits:
            at, self.matched = min(hits)
            self.stopped, self._pending = True, ""
            return text[:at]
        hold = max((_overlap(text, s) for s in self.stops), default=0)
        self._pending = text[len(text) - hold :]
        return text[: len(text) - hold]

    def flush(self) -> str:
        """What was held back, once the stream ended without a stop string."""
        rest, self._pending = self._pending, ""
        return rest


def _overlap(text: str, stop: str) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of ``stop``."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
