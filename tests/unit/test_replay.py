"""The one replay over a transport: events sent at their due times (the last final), the record
filled from the outcome, a session past the run's deadline aborted. No model: a fake transport."""

from __future__ import annotations

import asyncio
import json

from stream2llm.workloads.metrics import RequestRecord
from stream2llm.workloads.replay import Outcome, ReplayOptions, RunPlan, replay_run
from stream2llm.workloads.trace import TraceEvent, TraceRequest


class FakeSession:
    def __init__(self, log: list, hang: bool) -> None:
        self.log, self.hang, self.aborted = log, hang, False
        self.ended = False

    async def append(self, text: str, *, final: bool) -> None:
        self.log.append(("append", text, final, asyncio.get_running_loop().time()))

    async def update(self, docs: list[str], *, final: bool) -> None:
        self.log.append(("update", docs, final, asyncio.get_running_loop().time()))

    async def abort(self) -> None:
        self.aborted = True

    async def result(self) -> Outcome:
        if self.hang:
            await asyncio.Event().wait()
        return Outcome(0.25, 0.5, 30, 7, 30, 2, tokens_discarded=3, timeline=("r", 1.0, 2.0, 3.0))


class FakeTransport:
    def __init__(self, hang: bool = False) -> None:
        self.log: list = []
        self.sessions: list[FakeSession] = []
        self.hang = hang

    async def open(self, request: TraceRequest, salt: str) -> FakeSession:
        self.log.append(("open", request.query, salt, asyncio.get_running_loop().time()))
        self.sessions.append(FakeSession(self.log, self.hang))
        return self.sessions[-1]


REQUEST = TraceRequest(
    "r", "test", "Q?", (TraceEvent(0.0, "append", text="a"), TraceEvent(0.1, "update", docs=("b", "c")))
)


def _run(transport: FakeTransport, deadline: float | None) -> tuple[RequestRecord, float]:
    plan = RunPlan([["a", ["b", "c"]]], [RequestRecord("r", 0.05)], deadline, "salt")

    async def go() -> float:
        start = asyncio.get_running_loop().time()
        await replay_run(transport, [REQUEST], plan, ReplayOptions(delay_multiplier=2.0))
        return start

    return plan.records[0], asyncio.run(go())


def test_replay_sends_each_event_when_due_and_fills_the_record():
    transport = FakeTransport()
    record, start = _run(transport, None)
    (_, query, salt, opened), first, last = transport.log
    assert (query, salt) == ("Q?", "salt") and opened - start >= 0.05
    assert first[:3] == ("append", "a", False) and last[:3] == ("update", ["b", "c"], True)
    assert last[3] - start >= 0.05 + 0.1 * 2.0  # arrival + t x delay multiplier
    assert record.error is None and record.ttft_final_s == 0.25 and record.ttft_query_s == 0.5
    assert (record.prompt_tokens, record.final_chunk_tokens) == (30, 7)
    assert (record.tokens_prefilled, record.tokens_recomputed, record.tokens_discarded) == (30, 2, 3)
    assert record.timeline == ("r", 1.0, 2.0, 3.0) and record.ttft_due_s is None  # no engine clock
    assert record.done_s is not None and record.done_s >= 0.25


def test_a_session_past_the_deadline_is_aborted_and_recorded_as_stalled():
    transport = FakeTransport(hang=True)
    record, _ = _run(transport, 0.4)
    assert transport.sessions[0].aborted
    assert record.error is not None and record.error.startswith("stalled") and record.done_s is None


def test_the_http_transport_replays_through_the_session_api():
    """A fake deployment: the same record fields as before the transports were split out (the
    client's TTFT from the final event's POST, no engine clock), the salt and mode in the open."""
    from aiohttp import web

    from stream2llm.workloads.http_replay import HttpTransport, session_id

    seen: list = []
    final = asyncio.Event()

    async def open_session(request: web.Request) -> web.Response:
        seen.append(("open", await request.json()))
        return web.json_response({"id": "s"})

    async def event(request: web.Request) -> web.Response:
        body = await request.json()
        seen.append((request.match_info["op"], body))
        if body["final"]:
            final.set()
        return web.json_response({})

    async def stream(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        await final.wait()
        for pause in (0.0, 0.05, 0.1):  # three tokens: the second 50 ms after the first, the third 100 after
            await asyncio.sleep(pause)
            await response.write(b'data: {"type": "delta", "text": "x"}\n\n')
        result = {"type": "result", "prompt_tokens": 12, "chunks": [{"tokens": 5}], "tokens_prefilled": 12}
        result |= {"tokens_recomputed": 1, "kv_transfer": {"blocks": 2}, "completion_tokens": 3}
        await response.write(f"data: {json.dumps(result)}\n\ndata: [DONE]\n\n".encode())
        return response

    app = web.Application()
    app.router.add_post("/v1/sessions", open_session)
    app.router.add_post("/v1/sessions/{sid}/{op}", event)
    app.router.add_get("/v1/sessions/{sid}/stream", stream)

    async def go() -> RequestRecord:
        import aiohttp

        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        plan = RunPlan([["a", ["b", "c"]]], [RequestRecord("r", 0.0)], None, "salt-0123456789")
        try:
            async with aiohttp.ClientSession() as http:
                transport = HttpTransport(http, f"http://127.0.0.1:{port}", "stream", ReplayOptions())
                await replay_run(transport, [REQUEST], plan, ReplayOptions(delay_multiplier=0.5))
        finally:
            await runner.cleanup()
        return plan.records[0]

    record = asyncio.run(go())
    assert record.error is None, record.error
    sid = session_id("r", "salt-0123456789")
    assert seen == [
        ("open", {"question": "Q?", "max_tokens": 1, "ignore_eos": True, "mode": "stream"}
         | {"cache_salt": "salt-0123456789", "session_id": sid}),
        ("append", {"text": "a", "final": False}),
        ("update", {"docs": ["b", "c"], "final": True}),
    ]  # fmt: skip
    assert record.ttft_final_s is not None and record.ttft_query_s is not None
    assert 0 < record.ttft_final_s < record.ttft_query_s and record.ttft_query_s >= 0.05
    assert (record.prompt_tokens, record.final_chunk_tokens, record.tokens_prefilled) == (12, 5, 12)
    assert record.tokens_recomputed == 1 and record.kv_transfer == {"blocks": 2}
    assert record.ttft_due_s is None and record.timeline is None and record.tokens_discarded == 0
    assert record.second_token_s is not None and 0.05 <= record.second_token_s < 0.5
    assert record.tpot_s is not None and 0.075 <= record.tpot_s < 0.5  # 150 ms over two tokens
