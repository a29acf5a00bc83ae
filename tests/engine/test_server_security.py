"""The HTTP server against hostile clients: browser pages (Origin, DNS rebinding, simple requests),
slow and greedy clients (deadlines, connection cap, limits) and bad input (nesting, seeds), on a real
engine and real sockets."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time

import aiohttp
import pytest

from stream2llm.server.app import InsecureBind, ServerSettings, create_app, start_site
from stream2llm.server.registry import SESSIONS

pytestmark = pytest.mark.engine

TOKEN = "sec-token"


@contextlib.asynccontextmanager
async def running(engine, **settings):
    """A server on 127.0.0.1 (any port) with these settings; yields (url, app)."""
    app = create_app(engine, ServerSettings(**settings))
    runner, url = await start_site(app, "127.0.0.1", 0)
    try:
        yield url, app
    finally:
        await runner.cleanup()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


async def error_of(response: aiohttp.ClientResponse, status: int) -> dict:
    body = await response.json()
    assert response.status == status, body
    return body["error"]


async def raw_request(port: int, data: bytes, *, wait_s: float = 5.0) -> bytes:
    """Send ``data`` on a fresh socket and read until the server closes it (or ``wait_s``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    try:
        return await asyncio.wait_for(reader.read(), wait_s)
    finally:
        writer.close()


def open_count(engine) -> int:
    return len(engine.open_sessions())


# -- browser pages --------------------------------------------------------------------------------------


async def test_json_bodies_need_the_json_content_type(engine):
    """A page can POST text/plain or a form cross-origin without a preflight: such a body is 415,
    and no session opens."""
    async with running(engine) as (url, app), aiohttp.ClientSession(url) as http:
        before = open_count(engine)
        body = json.dumps({"question": "q"}).encode()
        for headers in (
            {"Content-Type": "text/plain"},
            {"Content-Type": "application/x-www-form-urlencoded"},
        ):
            async with http.post("/v1/sessions", data=body, headers=headers) as r:
                error = await error_of(r, 415)
                assert (
                    error["code"] == "unsupported_media_type" and headers["Content-Type"] in error["message"]
                )
        async with http.post("/v1/sessions", data=body, skip_auto_headers=["Content-Type"]) as r:
            await error_of(r, 415)
        chat = {"model": app[SESSIONS].model_name, "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(
            "/v1/chat/completions", data=json.dumps(chat), headers={"Content-Type": "text/plain"}
        ) as r:
            await error_of(r, 415)
        assert open_count(engine) == before and not app[SESSIONS].entries

        typed = {"Content-Type": "application/json; charset=utf-8"}
        async with http.post("/v1/sessions", data=body, headers=typed) as r:
            assert r.status == 201, await r.text()
            sid = (await r.json())["id"]
        async with http.post(f"/v1/sessions/{sid}/finish", skip_auto_headers=["Content-Type"]) as r:
            assert r.status == 200, await r.text()  # no body: no Content-Type needed
        async with http.delete(f"/v1/sessions/{sid}") as r:
            assert r.status == 200


async def test_a_foreign_origin_is_refused_and_an_allowed_one_may_read(engine):
    evil = {"Origin": "http://evil.example"}
    async with running(engine) as (url, app), aiohttp.ClientSession(url) as http:
        async with http.post("/v1/sessions", json={"question": "q"}, headers=evil) as r:
            error = await error_of(r, 403)
            assert error["code"] == "origin_not_allowed" and "evil.example" in error["message"]
        async with http.get("/v1/models", headers={"Origin": "null"}) as r:  # sandboxed page, file://
            await error_of(r, 403)
        assert not app[SESSIONS].entries
        async with http.get("/v1/models") as r:  # no Origin: not a browser page
            assert r.status == 200 and "Access-Control-Allow-Origin" not in r.headers

    site = "http://app.example:3000"
    async with running(engine, allowed_origins=(site,)) as (url, app), aiohttp.ClientSession(url) as http:
        async with http.get("/v1/models", headers={"Origin": site}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == site
        async with http.get("/v1/models", headers=evil) as r:
            await error_of(r, 403)
        preflight = {"Origin": site, "Access-Control-Request-Method": "POST"}
        async with http.options("/v1/chat/completions", headers=preflight) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == site
            assert "Content-Type" in r.headers["Access-Control-Allow-Headers"]
        async with http.options("/v1/chat/completions", headers={**preflight, **evil}) as r:
            assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
        body = {"model": app[SESSIONS].model_name, "prompt": "Hello", "max_tokens": 2, "stream": True}
        async with http.post("/v1/completions", json=body, headers={"Origin": site}) as r:
            assert r.status == 200 and r.headers["Access-Control-Allow-Origin"] == site  # a stream too
            assert (await r.text()).rstrip().endswith("data: [DONE]")


async def test_dns_rebinding_host_is_misdirected_on_a_loopback_bind(engine):
    async with running(engine, allowed_hosts=("box.lan",)) as (url, app), aiohttp.ClientSession(url) as http:
        port = port_of(url)
        for host in (f"attacker.example:{port}", "attacker.example", f"127.0.0.1.evil.example:{port}"):
            async with http.get("/v1/models", headers={"Host": host}) as r:
                error = await error_of(r, 421)
                assert error["code"] == "misdirected_request" and host in error["message"]
            async with http.post("/v1/sessions", json={"question": "q"}, headers={"Host": host}) as r:
                await error_of(r, 421)
        assert not app[SESSIONS].entries
        for host in (
            f"localhost:{port}",
            f"127.0.0.1:{port}",
            f"[::1]:{port}",
            "LOCALHOST",
            f"box.lan:{port}",
        ):
            async with http.get("/v1/models", headers={"Host": host}) as r:
                assert r.status == 200, (host, await r.text())


async def test_a_public_bind_without_a_token_is_refused_unless_allowed(engine, capfd, caplog):
    app = create_app(engine, ServerSettings())
    with pytest.raises(InsecureBind, match="allow-insecure-bind"):
        await start_site(app, "0.0.0.0", 0)
    runner, url = await start_site(create_app(engine, ServerSettings(token=TOKEN)), "0.0.0.0", 0)
    await runner.cleanup()  # with a token: served, no warning
    assert "INSECURE" not in capfd.readouterr().err

    with caplog.at_level(logging.WARNING):
        app = create_app(engine, ServerSettings(allow_insecure_bind=True))
        runner, url = await start_site(app, "0.0.0.0", 0)
    try:
        assert "INSECURE" in capfd.readouterr().err
        assert any("INSECURE" in rec.getMessage() for rec in caplog.records)
        local = f"http://127.0.0.1:{port_of(url)}"
        async with aiohttp.ClientSession(local) as http, http.get("/v1/models") as r:
            assert r.status == 200  # not a loopback bind: Host is not checked
    finally:
        await runner.cleanup()


def test_serve_refuses_a_public_bind_without_a_token_before_starting_the_engine(monkeypatch):
    from typer.testing import CliRunner

    from stream2llm import cli
    from stream2llm.engine import engine as engine_mod

    def no_engine(config):
        raise AssertionError("the engine must not start")

    monkeypatch.setattr(engine_mod.StreamingEngine, "start", staticmethod(no_engine))
    monkeypatch.delenv("STREAM2LLM_TOKEN", raising=False)
    result = CliRunner().invoke(cli.app, ["serve", "--model", "tiny", "--host", "0.0.0.0"])
    assert result.exit_code == 1, result.output
    assert "--allow-insecure-bind" in result.output and "token" in result.output


def test_serve_passes_the_security_options(monkeypatch):
    from typer.testing import CliRunner

    from stream2llm import cli
    from stream2llm.server import app as server_mod

    seen = {}

    async def fake_serve(config, settings, on_ready=None):
        seen["settings"] = settings

    monkeypatch.setattr(server_mod, "serve", fake_serve)
    args = ["serve", "--host", "0.0.0.0", "--allow-insecure-bind", "--allowed-origin", "http://a.example"]
    result = CliRunner().invoke(cli.app, [*args, "--allowed-host", "box.lan", "--allowed-host", "box2.lan"])
    assert result.exit_code == 0, result.output
    settings = seen["settings"]
    assert settings.allow_insecure_bind and settings.allowed_origins == ("http://a.example",)
    assert settings.allowed_hosts == ("box.lan", "box2.lan")


# -- slow and greedy clients ----------------------------------------------------------------------------


async def test_headers_must_arrive_within_the_header_deadline(engine):
    """Slowloris: a client dripping header lines is cut off at the deadline, as is one that sends
    nothing; a prompt one is served."""
    async with running(engine, header_timeout_s=1.0) as (url, _):
        port = port_of(url)
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        start = time.monotonic()
        writer.write(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        closed_after = None
        for i in range(40):  # one header line every 0.1 s: never finishing
            if reader.at_eof():
                closed_after = time.monotonic() - start
                break
            with contextlib.suppress(ConnectionError):
                writer.write(f"X-Drip-{i}: x\r\n".encode())
                await writer.drain()
            with contextlib.suppress(asyncio.TimeoutError):
                assert await asyncio.wait_for(reader.read(), 0.1) == b""  # closed, no response
        writer.close()
        assert closed_after is not None and 0.9 <= closed_after < 2.5, closed_after

        start = time.monotonic()
        assert await raw_request(port, b"") == b""  # silent connection
        assert time.monotonic() - start < 2.5
        answer = await raw_request(
            port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
        )
        assert answer.startswith(b"HTTP/1.1 200")


async def test_a_body_must_arrive_within_the_body_deadline(engine):
    async with running(engine, body_timeout_s=1.0) as (url, app):
        head = (
            b"POST /v1/sessions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            b"Content-Length: 200\r\n\r\n"
        )
        reader, writer = await asyncio.open_connection("127.0.0.1", port_of(url))
        start = time.monotonic()
        writer.write(head + b'{"question": "sl')  # then nothing more
        answer = await asyncio.wait_for(reader.read(4096), 5)
        took = time.monotonic() - start
        assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
        assert b"request_timeout" in answer and 0.9 <= took < 2.0, took
        await asyncio.wait_for(reader.read(), 3)  # then the connection closes (after the linger)
        assert time.monotonic() - start < 3.5
        writer.close()
        assert not app[SESSIONS].entries


async def test_connections_beyond_the_cap_get_503_and_health_still_answers(engine):
    async with running(engine, max_connections=3) as (url, app):
        port = port_of(url)
        idle = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        server = app[SESSIONS]
        async with aiohttp.ClientSession(url) as http:
            async with http.get("/v1/models") as r:
                error = await error_of(r, 503)
                assert error["code"] == "too_many_connections" and "max_connections=3" in error["message"]
                assert r.headers["Retry-After"] == "1" and r.headers.get("Connection") == "close"
            async with http.get("/health") as r:
                assert r.status == 200
            for _, writer in idle:
                writer.close()
            for _ in range(50):
                async with http.get("/v1/models") as r:
                    if r.status == 200:
                        break
                await asyncio.sleep(0.05)
            assert r.status == 200  # slots freed as the idle connections closed
        assert server.running() == 0


async def test_oversized_headers_are_refused(engine):
    async with running(engine) as (url, _):
        port = port_of(url)
        huge = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n"
        assert (await raw_request(port, huge)).split(b" ")[1] in (b"400", b"431")
        many = b"".join(f"X-H{i}: v\r\n".encode() for i in range(200))
        answer = await raw_request(port, b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + many + b"\r\n")
        assert answer.split(b" ")[1] in (b"400", b"431")


async def test_the_body_limit_follows_the_context_window(engine):
    window = engine.config.max_model_len
    async with running(engine) as (url, app), aiohttp.ClientSession(url) as http:
        limit = app[SESSIONS].settings.max_body_bytes
        assert limit == window * 16 + (64 << 10)  # not a fixed 4 MiB
        async with http.post(
            "/v1/sessions", data=b" " * (limit + 1), headers={"Content-Type": "application/json"}
        ) as r:
            assert (await error_of(r, 413))["code"] == "request_too_large"
        async with http.post("/v1/sessions", json={"question": "q", "cache_salt": "x" * (limit - 100)}) as r:
            assert r.status == 201, await r.text()  # just under the limit: accepted
            sid = (await r.json())["id"]
        async with http.delete(f"/v1/sessions/{sid}") as r:
            assert r.status == 200
    async with running(engine, max_body_bytes=1000) as (url, app):
        assert app[SESSIONS].settings.max_body_bytes == 1000  # an explicit limit wins


# -- bad input ------------------------------------------------------------------------------------------


async def test_deep_nesting_and_out_of_range_seeds_are_400(engine):
    async with running(engine) as (url, app), aiohttp.ClientSession(url) as http:
        model = app[SESSIONS].model_name
        deep = "[" * 50000 + "]" * 50000
        for path, head in [
            ("/v1/sessions", '{"question": '),
            ("/v1/completions", '{"model": "m", "prompt": '),
        ]:
            data = head + deep + "}"
            async with http.post(path, data=data, headers={"Content-Type": "application/json"}) as r:
                error = await error_of(r, 400)
                assert error["code"] == "invalid_json" and "nested too deeply" in error["message"]
        for seed in (2**64, 2**64 + 5, 2**63, -(2**63) - 1):
            async with http.post("/v1/sessions", json={"question": "q", "seed": seed}) as r:
                assert (await error_of(r, 400))["param"] == "seed"
            body = {"model": model, "prompt": "Hello", "max_tokens": 2, "seed": seed}
            async with http.post("/v1/completions", json=body) as r:
                assert (await error_of(r, 400))["param"] == "seed"
        assert not app[SESSIONS].entries
        body = {"model": model, "prompt": "Hello", "max_tokens": 2, "temperature": 1.0, "seed": 2**63 - 1}
        async with http.post("/v1/completions", json=body) as r:
            answer = await r.json()
            assert r.status == 200 and answer["usage"]["completion_tokens"] == 2, answer


async def test_openai_sessions_are_invisible_to_the_session_api(engine):
    async with running(engine) as (url, app), aiohttp.ClientSession(url) as http:
        model = app[SESSIONS].model_name
        async with http.post(
            "/v1/completions", json={"model": model, "prompt": "Hello", "max_tokens": 2}
        ) as r:
            done = (await r.json())["id"]
        body = {"model": model, "prompt": "Hello", "max_tokens": 3000, "ignore_eos": True, "stream": True}
        async with http.post("/v1/completions", json=body) as stream:
            first = json.loads((await stream.content.readline()).decode().removeprefix("data: "))
            live = first["id"]
            assert app[SESSIONS].entries[live].state == "open"  # still generating
            for sid in (done, live):
                for method, path, payload in [
                    ("GET", f"/v1/sessions/{sid}", None),
                    ("GET", f"/v1/sessions/{sid}/stream", None),
                    ("POST", f"/v1/sessions/{sid}/append", {"text": "x"}),
                    ("POST", f"/v1/sessions/{sid}/finish", None),
                    ("DELETE", f"/v1/sessions/{sid}", None),
                ]:
                    async with http.request(method, path, json=payload) as r:
                        error = await error_of(r, 404)
                        assert error["code"] == "session_not_found", (method, path)
            assert app[SESSIONS].entries[live].state == "open"  # untouched by all of that
        for _ in range(100):  # the client left the stream: aborted
            if app[SESSIONS].entries[live].state != "open":
                break
            await asyncio.sleep(0.05)
        assert app[SESSIONS].entries[live].state == "aborted"
