"""Errors a caller can act on. Each names what was wrong; none of them harms another session."""

from __future__ import annotations


class StreamError(ValueError):
    """Base class of every input error stream2llm reports."""


class InvalidEvent(StreamError):
    """A context event is malformed (empty payload, wrong type, unknown op)."""


class SequenceError(StreamError):
    """A context event arrived out of order or twice."""


class SessionClosed(StreamError):
    """An event or call arrived after the session was finished or aborted."""


class SessionExpired(SessionClosed):
    """A session's next chunk did not come within the engine's session_ttl_s; it was aborted."""


class UnknownSession(StreamError, KeyError):
    """No open session has this id."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else "unknown session"


class ContextTooLong(StreamError):
    """The prompt would not fit the model's context window (worded as vLLM words it)."""

    def __init__(self, size: int, limit: int, what: str = "prompt", output_tokens: int = 0) -> None:
        self.size, self.limit, self.output_tokens = size, limit, output_tokens
        window = limit + output_tokens
        super().__init__(
            f"This model's maximum context length is {window} tokens. However, you requested "
            f"{size + output_tokens} tokens ({size} in the {what}, {output_tokens} in the completion). "
            "Please reduce the length of the context or the completion, or open the session with "
            "truncate=True to drop the oldest context."
        )


class OutputTooLong(StreamError):
    """More output tokens were asked for than the context window holds (worded as vLLM words it)."""

    def __init__(self, max_tokens: int, max_model_len: int) -> None:
        super().__init__(
            f"max_tokens={max_tokens} cannot be greater than max_model_len={max_model_len}. "
            "Please request fewer output tokens."
        )


class AdmissionRejected(StreamError):
    """The engine is at its limit of open sessions."""


class EngineDied(StreamError):
    """The vLLM engine core died: every session on the engine failed and no new one is admitted.
    Nothing on this engine can run again; the process should exit so that it is restarted."""
