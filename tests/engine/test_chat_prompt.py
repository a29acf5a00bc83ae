"""One conversation, one prompt: the HTTP server's chat endpoint and the LangChain chat model render
a conversation through the same renderer (stream2llm.context.chat), so they hand the engine the same
prompt token ids, and greedy answers agree."""

from __future__ import annotations

import aiohttp
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

from stream2llm.context.chat import Turn, render_chat
from stream2llm.integrations.langchain import ChatStream2LLM
from stream2llm.server.app import ServerSettings, create_app, start_site
from stream2llm.server.registry import SESSIONS
from tests.engine.test_server import wait_until

CONVERSATION = [
    Turn("system", "You answer briefly."),
    Turn("user", "What is a generator?", "ann"),
    Turn("assistant", "A function that yields values."),
    Turn("user", "And what does the yield statement do?"),
]
LANGCHAIN = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}


async def server_answer(engine) -> tuple[dict, list[int]]:
    """The chat completion for CONVERSATION and the prompt ids of the session the server ran."""
    app = create_app(engine, ServerSettings())
    runner, url = await start_site(app, "127.0.0.1", 0)
    messages = [
        {"role": t.role, "content": t.text, **({"name": t.name} if t.name else {})} for t in CONVERSATION
    ]
    body = {"model": engine.model.name, "messages": messages, "temperature": 0, "max_tokens": 12}
    try:
        async with aiohttp.ClientSession(url) as http, http.post("/v1/chat/completions", json=body) as r:
            answer = await r.json()
            assert r.status == 200, answer
        result = app[SESSIONS].entries[answer["id"]].result
        assert result is not None
        return answer, result.prompt_token_ids
    finally:
        await runner.cleanup()


async def test_server_and_langchain_chat_model_send_the_same_prompt_ids(engine):
    answer, server_ids = await server_answer(engine)
    messages = [LANGCHAIN[t.role](t.text, name=t.name) for t in CONVERSATION]

    # the chat model's own session, read while it generates
    long = ChatStream2LLM(engine=engine, temperature=0, max_tokens=1000, sampling_kwargs={"ignore_eos": True})
    stream = long.astream(messages)
    async for _ in stream:
        (session,) = engine.open_sessions()
        chat_ids = session.prompt_ids
        break
    await stream.aclose()
    assert await wait_until(lambda: not engine.open_sessions())
    assert chat_ids == server_ids

    # both are the shared renderer's prompt, laid out by the engine's template
    question, context = render_chat(CONVERSATION)
    assert "\n\nUser (ann): What is a generator?\n\n" in context
    template = engine.template
    text = template.render_prefix(question) + context + template.render_suffix(question)
    assert server_ids == engine.tokenizer.encode(text)

    chat = ChatStream2LLM(engine=engine, temperature=0, max_tokens=12)
    reply = await chat.ainvoke(messages)
    assert reply.content == answer["choices"][0]["message"]["content"]
    assert reply.usage_metadata["input_tokens"] == answer["usage"]["prompt_tokens"] == len(server_ids)
