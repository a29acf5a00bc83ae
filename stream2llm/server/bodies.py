"""Request bodies: strict pydantic models, OpenAI parameters this server cannot honour, JSON reading.

Every failure is a 400/413 that names what was wrong; nothing is guessed.
"""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Any, Literal, TypeVar

from aiohttp import hdrs, web
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from stream2llm.context.chat import Turn
from stream2llm.server.errors import (
    ApiError,
    body_timeout,
    too_large,
    unsupported_media_type,
    validation_error,
)
from stream2llm.server.registry import SESSIONS

M = TypeVar("M", bound=BaseModel)

# A sampling seed is a 64-bit signed integer, as vLLM's OpenAI server validates it (torch's
# generator takes no more); anything larger failed only inside the engine.
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1
Seed = Annotated[int | None, Field(ge=INT64_MIN, le=INT64_MAX)]


class _Body(BaseModel):
    """Strict JSON bodies: wrong types and unknown fields are errors, not guesses."""

    model_config = ConfigDict(extra="forbid", strict=True)


class OpenSessionBody(_Body):
    question: str = Field(min_length=1)
    max_tokens: int = Field(64, ge=1)
    temperature: float = Field(0.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Seed = None
    ignore_eos: bool = False
    mode: Literal["stream", "nonstream", "vllm"] = "stream"
    truncate: bool = False
    cache_salt: str | None = Field(None, min_length=1)
    session_id: str | None = None  # the client's own id (checked in sessions_api.chosen_id)


class AppendBody(_Body):
    text: str = Field(min_length=1)
    final: bool = False


class UpdateBody(_Body):
    docs: list[str] = Field(min_length=1)
    final: bool = False


class FinishBody(_Body):
    pass


class StreamOptions(_Body):
    include_usage: bool = False


class OpenAIBody(_Body):
    """Fields both OpenAI endpoints share; ``context`` (documents for RAG) is stream2llm's extension."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Seed = None
    presence_penalty: float = Field(0.0, ge=-2, le=2)
    frequency_penalty: float = Field(0.0, ge=-2, le=2)
    stop: str | list[str] | None = None  # applied to the decoded text (see StopScanner)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    ignore_eos: bool = False  # vLLM's extension
    cache_salt: str | None = Field(None, min_length=1)  # vLLM's extension
    context: list[str] | None = None  # stream2llm's extension: retrieved documents

    def stops(self) -> list[str]:
        """The stop strings, as a list (OpenAI takes one string or several)."""
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


class CompletionBody(OpenAIBody):
    prompt: str | list[str]


class ContentPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart]
    name: str | None = None

    def text(self) -> str:
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)

    def turn(self) -> Turn:
        """This message for the shared chat renderer."""
        return Turn(self.role, self.text(), self.name)


class ChatBody(OpenAIBody):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


# OpenAI parameters this server cannot honour: accepted only at their neutral value.
_NEUTRAL: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "best_of": (None, 1),
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "suffix": (None, ""),
    "logit_bias": (None, {}),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "parallel_tool_calls": (None,),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "audio": (None,),
    "modalities": (None, ["text"]),
    "prediction": (None,),
    # vLLM's own extensions, sent at their neutral values by `vllm bench serve`
    "repetition_penalty": (None, 1.0, 1),
    # vllm-router re-serializes OpenAI bodies with these (SGLang's extensions) at their defaults
    "no_stop_trim": (None, False),
    "skip_special_tokens": (None, True),
    "return_hidden_states": (None, False),
    "continue_final_message": (None, False),
    "separate_reasoning": (None, True),
    "stream_reasoning": (None, True),
    "include_reasoning": (None, True),
}


def reject_unsupported(data: dict[str, Any]) -> None:
    """A 400 for an OpenAI parameter set to anything but its neutral value; neutral ones are dropped."""
    for name, neutral in _NEUTRAL.items():
        if name in data and not any(data[name] == value for value in neutral):
            raise ApiError(
                400, f"parameter {name!r} is not supported", code="unsupported_parameter", param=name
            )
        data.pop(name, None)


async def read_json(request: web.Request, model: type[M], *, allow_empty: bool = False) -> M:
    """Parse and validate a JSON body; every failure is a 4xx that names what was wrong: 415 without
    ``Content-Type: application/json`` (a browser page can send any other type cross-origin without a
    preflight), 408 past the body deadline, 413 past the size limit, 400 for the rest."""
    settings = request.app[SESSIONS].settings
    if request.body_exists and request.content_type != "application/json":
        raise unsupported_media_type(request.headers.get(hdrs.CONTENT_TYPE))
    try:
        async with asyncio.timeout(settings.body_timeout_s):
            raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise too_large(request.app[SESSIONS].settings.max_body_bytes) from exc
    except TimeoutError:
        raise body_timeout(settings.body_timeout_s) from None
    if not raw.strip():
        if allow_empty:
            return model()
        raise ApiError(400, "request body is empty; expected a JSON object", code="invalid_json")
    data = _parse(raw)
    if issubclass(model, OpenAIBody):
        reject_unsupported(data)
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _parse(raw: bytes) -> dict[str, Any]:
    """The body as a JSON object; too deep a nesting is a 400 like any other bad JSON."""
    try:
        data = json.loads(raw)
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply", code="invalid_json") from None
    except ValueError as exc:  # includes bad UTF-8
        raise ApiError(400, f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object", code="invalid_json")
    return data


def sampling(**kwargs: Any) -> Any:
    """vLLM's SamplingParams; its own validation errors become 400s (the engine adds the model's
    end-of-sequence ids to every request)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError

    try:
        return SamplingParams(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise ApiError(400, f"invalid sampling parameters: {exc}", code="invalid_value") from None
