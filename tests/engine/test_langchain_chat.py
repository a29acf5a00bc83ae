"""ChatStream2LLM: LangChain's standard chat-model tests on the tiny model, plus our own checks that
the answers are the engine's (equal to a direct session), that stop strings cut the text, and that
an engine started by the caller works for async and (from other threads) sync calls.

The standard tests build the model from ``chat_model_params`` (``model="tiny"``), so they share one
background engine for the whole module; it is shut down when the module ends."""

from __future__ import annotations

import asyncio

import pytest
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests
from vllm import SamplingParams

from stream2llm.context.chat import StopScanner
from stream2llm.engine.engine import EngineConfig
from stream2llm.errors import StreamError
from stream2llm.integrations.langchain import ChatStream2LLM, render_messages
from stream2llm.integrations.langchain import bridge as background

ENGINE_CONFIG = {"kv_cache_bytes": 128 << 20, "max_model_len": 2048}
TINY = {"model": "tiny", "temperature": 0, "engine_config": ENGINE_CONFIG}  # no max_tokens: tests set it


@pytest.fixture(scope="module", autouse=True)
def _release_shared_engine():
    yield
    background.shutdown_shared_engines()


def shared_handle() -> background.BackgroundEngine:
    return background.shared_engine(EngineConfig(model="tiny", **ENGINE_CONFIG))


async def reference(engine, question: str, context: str = "", max_tokens: int = 16):
    """The same prompt as one plain session, straight on the engine."""
    s = await engine.open(question, SamplingParams(temperature=0, max_tokens=max_tokens), mode="nonstream")
    if context:
        await s.append(context, final=True)
    else:
        await s.finish()
    return await s.result()


# -- LangChain's standard tests ----------------------------------------------------------------------


class _TinyChatModel:
    """The standard suites' settings for ChatStream2LLM on the tiny test model. It generates text
    from text: no tools, structured output, JSON mode or media inputs (those properties default to
    False for a model without bind_tools); one engine serves one model, so no per-call override."""

    @property
    def chat_model_class(self) -> type[ChatStream2LLM]:
        return ChatStream2LLM

    @property
    def chat_model_params(self) -> dict:
        return TINY

    @property
    def supports_model_override(self) -> bool:
        return False


class TestChatStream2LLMUnit(_TinyChatModel, ChatModelUnitTests):
    pass


class TestChatStream2LLMIntegration(_TinyChatModel, ChatModelIntegrationTests):
    pass


# -- pure logic --------------------------------------------------------------------------------------


def test_render_messages_puts_the_last_human_message_last():
    messages = [
        SystemMessage("Be terse."),
        HumanMessage("hello", name="ann"),
        AIMessage("hi"),
        HumanMessage([{"type": "text", "text": "how are "}, "you"]),
    ]
    assert render_messages(messages) == (
        "how are you",
        "System: Be terse.\n\nUser (ann): hello\n\nAssistant: hi",
    )
    assert render_messages([HumanMessage("q")]) == ("q", "")


def test_render_messages_rejects_media_and_empty_input():
    image = HumanMessage([{"type": "image", "url": "http://x/y.png"}])
    with pytest.raises(ValueError, match=r"text only.*'image'"):
        render_messages([image])
    with pytest.raises(ValueError, match="at least one message"):
        render_messages([])


@pytest.mark.parametrize(
    ("deltas", "stops", "emitted", "stopped"),
    [
        (["abc", "def"], ["cd"], "ab", True),  # stop string split across deltas
        (["a<", "/x"], ["</s>"], "a</x", False),  # a false start is released later
        (["xy", "z"], ["yz", "xyz"], "", True),  # the earliest match wins
        (["ab"], [], "ab", False),
    ],
)
def test_stop_scanner(deltas, stops, emitted, stopped):
    scanner = StopScanner(stops)
    out = "".join(scanner.feed(d) for d in deltas)
    out += "" if scanner.stopped else scanner.flush()
    assert (out, scanner.stopped) == (emitted, stopped)


# -- the standalone (background) engine --------------------------------------------------------------


def test_invoke_equals_a_direct_session_and_counts_tokens():
    chat = ChatStream2LLM(**TINY, max_tokens=16)
    messages = [SystemMessage("You answer."), HumanMessage("What is a list?")]
    msg = chat.invoke(messages)
    question, context = render_messages(messages)
    ref = shared_handle().run(lambda e: reference(e, question, context))
    assert msg.content == ref.text and msg.content
    assert msg.usage_metadata["input_tokens"] == len(ref.prompt_token_ids)
    assert msg.usage_metadata["output_tokens"] == len(ref.token_ids) == 16
    assert msg.response_metadata["model_name"] == "tiny"
    assert msg.response_metadata["finish_reason"] == "length"

    chunks = list(chat.stream(messages))
    assert len(chunks) > 2 and chunks[-1].chunk_position == "last"
    assert "".join(c.content for c in chunks) == ref.text


def test_instances_with_one_config_share_one_engine():
    a = ChatStream2LLM(**TINY)
    b = ChatStream2LLM(**{**TINY, "temperature": 0.7, "max_tokens": 4})
    a.invoke("one")
    b.invoke("two")
    assert a._handle_sync() is b._handle_sync() is shared_handle()
    assert len(background._shared) == 1


def test_stop_strings_cut_invoke_and_stream():
    chat = ChatStream2LLM(**{**TINY, "max_tokens": 24})
    full = chat.invoke("Hello").content
    stop = full[len(full) // 2 : len(full) // 2 + 3]
    cut = full[: full.index(stop)]
    msg = chat.invoke("Hello", stop=[stop])
    assert msg.content == cut
    assert msg.response_metadata["finish_reason"] == "stop"
    assert msg.response_metadata["stop_sequence"] == stop
    assert msg.usage_metadata["output_tokens"] < 24
    streamed = [
        c.content for c in ChatStream2LLM(**{**TINY, "max_tokens": 24, "stop": [stop]}).stream("Hello")
    ]
    assert "".join(streamed) == cut
    assert not any(stop in c for c in streamed)
    assert shared_handle().engine.open_sessions() == []  # the stopped session was aborted


def test_timeout_and_bad_arguments_are_clear_errors():
    with pytest.raises(TimeoutError, match=r"timeout=0\.001"):
        ChatStream2LLM(**{**TINY, "max_tokens": 512, "timeout": 0.001}).invoke("Hello")
    with pytest.raises(ValueError, match="unknown call arguments: colour"):
        ChatStream2LLM(**TINY).invoke("Hello", colour="red")
    with pytest.raises(ValueError, match="per-call model='gemma-270m'"):
        ChatStream2LLM(**TINY).invoke("Hello", model="gemma-270m")
    assert shared_handle().engine.open_sessions() == []
    assert ChatStream2LLM(**TINY).invoke("Hello").content  # the engine still serves


# -- an engine the caller started in its own loop ------------------------------------------------------


async def test_user_engine_async_and_threaded_sync_calls(engine):
    chat = ChatStream2LLM(engine=engine, temperature=0, max_tokens=12)
    assert chat.model == "tiny"
    ref = await reference(engine, "Tell me", "User: hi", max_tokens=12)
    messages = [HumanMessage("hi"), HumanMessage("Tell me")]
    assert (await chat.ainvoke(messages)).content == ref.text
    chunks = [c async for c in chat.astream(messages)]
    assert "".join(c.content for c in chunks) == ref.text and len(chunks) > 2
    threaded = await asyncio.to_thread(chat.invoke, messages)  # sync, from a worker thread
    assert threaded.content == ref.text
    with pytest.raises(StreamError, match="use the async API"):
        chat.invoke(messages)  # sync on the engine's own loop would block it
    assert engine.open_sessions() == []
