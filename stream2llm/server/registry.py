"""The sessions opened over HTTP: open (after the server's own admission check), watch how each
ends, remember ended ones for a while, and abort them all at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from aiohttp import web

from stream2llm.errors import AdmissionRejected, EngineDied, SessionClosed, SessionExpired, UnknownSession
from stream2llm.server.errors import ApiError, api_error
from stream2llm.server.metrics import ServerMetrics
from stream2llm.server.settings import ServerSettings

if TYPE_CHECKING:
    from stream2llm.engine.engine import Session, SessionResult, StreamingEngine


@dataclass
class Entry:
    """One session opened over HTTP, remembered until well after it ends."""

    session: Session
    api: str  # sessions, completions or chat
    created: int = field(default_factory=lambda: int(time.time()))
    result: SessionResult | None = None
    error: ApiError | None = None
    state: str = "open"  # open, generating, completed, stopped, aborted, expired, failed
    streaming: bool = False
    stopped: bool = False  # ended by the server on a stop string, not by the client
    watcher: asyncio.Task | None = None

    def current_state(self) -> str:
        if self.state == "open" and not self.session.is_open:
            return "generating"
        return self.state


class SessionRegistry:
    """Sessions opened over HTTP, by id, with the engine and settings the handlers need."""

    def __init__(self, engine: StreamingEngine, settings: ServerSettings) -> None:
        self.engine = engine
        self.settings = settings
        self.model_name = settings.model_name or engine.model.name
        self.started = int(time.time())
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.metrics = ServerMetrics(self)

    def running(self) -> int:
        return sum(1 for e in self.entries.values() if e.state == "open")

    def entry(self, session_id: str) -> Entry:
        try:
            return self.entries[session_id]
        except KeyError:
            raise UnknownSession(f"no session with id {session_id!r}") from None

    async def open(self, api: str, question: str, sampling: Any, **kwargs: Any) -> Entry:
        """Open an engine session, after the server's own admission check (a session that fails
        to open holds no slot: engine.open drops it)."""
        if self.running() >= self.settings.max_sessions:
            raise AdmissionRejected(
                f"server has {self.running()} running sessions (max_sessions={self.settings.max_sessions})"
            )
        session = await self.engine.open(question, sampling, **kwargs)
        entry = Entry(session, api)
        self.entries[session.request_id] = entry
        entry.watcher = asyncio.get_running_loop().create_task(self._watch(entry))
        self._forget_old()
        return entry

    async def _watch(self, entry: Entry) -> None:
        """Record how a session ended (result or error) and its metrics."""
        try:
            entry.result = await entry.session.result()
            entry.state = "completed"
        except SessionExpired as exc:
            entry.state, entry.error = "expired", api_error(exc)
        except SessionClosed as exc:
            if entry.stopped:
                entry.state = "stopped"
            else:
                entry.state, entry.error = "aborted", api_error(exc)
        except EngineDied as exc:  # 503 engine_dead: a supervisor restarts the server
            entry.state, entry.error = "failed", api_error(exc)
        except Exception as exc:  # the engine failed this request
            entry.state = "failed"
            entry.error = ApiError(500, str(exc), type="server_error", code="engine_error")
        self.metrics.record_end(entry.api, entry.state, entry.result)

    def _forget_old(self) -> None:
        """Drop the oldest ended sessions beyond ``keep_results`` (running ones are always kept)."""
        ended = [k for k, e in self.entries.items() if e.state != "open"]
        for key in ended[: max(0, len(ended) - self.settings.keep_results)]:
            del self.entries[key]

    async def stop(self, entry: Entry) -> None:
        """End a session the server decided is done (a stop string): abort it, which frees its KV,
        and record it as stopped rather than aborted."""
        entry.stopped = True
        await entry.session.abort()
        assert entry.watcher is not None
        await asyncio.shield(entry.watcher)

    async def outcome(self, entry: Entry) -> SessionResult:
        """The session's result, or the ApiError it ended with."""
        assert entry.watcher is not None
        await asyncio.shield(entry.watcher)
        if entry.result is None:
            raise entry.error or ApiError(500, "session ended without a result", type="server_error")
        return entry.result

    async def shutdown(self) -> None:
        for entry in list(self.entries.values()):
            with contextlib.suppress(Exception):
                await entry.session.abort()
        watchers = [e.watcher for e in self.entries.values() if e.watcher is not None]
        await asyncio.gather(*watchers, return_exceptions=True)


SESSIONS = web.AppKey("stream2llm_sessions", SessionRegistry)  # the sessions this server owns
