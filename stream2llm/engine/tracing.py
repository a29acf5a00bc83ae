"""OpenTelemetry traces of sessions, exported over OTLP the way ``vllm serve --otlp-traces-endpoint``
exports vLLM's: one trace per session, continuing a caller's W3C ``traceparent``.

A session's root span opens with the session; retrievers add a span each with an event per context
arrival while they run. Chunk spans (hand-off, queueing, prefill), the first token and the answer
are built when the session ends, on a thread of their own, from the timings the session and the
engine core recorded anyway (the core's prefill steps come back in the request's counters), so
tracing adds nothing to the prefill path and one queue put to the event loop. The exporter runs
on the SDK's worker thread behind a bounded queue: a collector that is down or slow costs spans
(counted), never a stalled session. Off: no span exists.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    from stream2llm.engine.outputs import ChunkTiming, SessionResult

logger = logging.getLogger(__name__)
TRACE_HEADERS = ("traceparent", "tracestate")
PROTOCOL_ENV = "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"  # grpc (vLLM's default) or http/protobuf
QUEUE_SPANS = 2048  # spans waiting for the exporter; beyond this they are dropped and counted
QUEUE_TRACES = 1024  # ended sessions whose spans wait to be built; beyond this a trace is dropped
EXPORT_TIMEOUT_S = 5.0


def trace_headers(headers: Mapping[str, str] | None) -> dict[str, str]:
    """The W3C trace context among a request's headers (what vllm-router passes on)."""
    if not headers:
        return {}
    return {name: value for name in TRACE_HEADERS if (value := headers.get(name)) is not None}


def check_endpoint(endpoint: str) -> str:
    """The OTLP protocol the environment selects, after checking ``endpoint`` suits it; a clear
    error at start-up instead of spans lost in silence."""
    protocol = os.environ.get(PROTOCOL_ENV, "grpc")
    if protocol not in ("grpc", "http/protobuf"):
        raise ValueError(f"{PROTOCOL_ENV}={protocol!r}: expected grpc or http/protobuf")
    parts = urlsplit(endpoint if "://" in endpoint else f"//{endpoint}")
    try:
        host, _ = parts.hostname, parts.port
    except ValueError:  # a port that is not a number
        host = None
    if not host or (protocol == "http/protobuf" and parts.scheme not in ("http", "https")):
        expected = "http://host:4318/v1/traces" if protocol == "http/protobuf" else "host:4317"
        raise ValueError(f"otlp_traces_endpoint {endpoint!r}: expected {expected} for OTLP over {protocol}")
    return protocol


class _CountingExporter:
    """The OTLP exporter, counting what it sent and what it could not."""

    def __init__(self, exporter: Any) -> None:
        self._exporter = exporter
        self.exported = 0
        self.failed = 0

    def export(self, spans: Sequence[Any]) -> Any:
        from opentelemetry.sdk.trace.export import SpanExportResult

        try:
            result = self._exporter.export(spans)
        except Exception:  # an exporter bug must not kill the SDK's worker thread
            result = SpanExportResult.FAILURE
        if result == SpanExportResult.SUCCESS:
            self.exported += len(spans)
        else:
            self.failed += len(spans)
        return result

    def shutdown(self) -> None:
        self._exporter.shutdown()

    def force_flush(self, timeout_millis: int = 30_000) -> bool:
        return self._exporter.force_flush(timeout_millis)


class _Writer:
    """Builds ended sessions' spans on a thread of its own, from a bounded queue: a session's end
    costs the event loop one queue put (building ~25 spans takes milliseconds)."""

    def __init__(self, size: int = QUEUE_TRACES) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(maxsize=size)
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="stream2llm-traces", daemon=True)
        self._thread.start()

    def submit(self, job: Callable[[], None]) -> None:
        try:
            self._jobs.put_nowait(job)
        except queue.Full:
            self.dropped += 1

    def _run(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job is None:
                    return
                job()
            except Exception:  # a span that cannot be built must not stop the others
                logger.exception("building a session's trace failed")
            finally:
                self._jobs.task_done()

    def drain(self, timeout_s: float) -> bool:
        """Wait until every queued trace is built (or the time is up)."""
        deadline = time.monotonic() + timeout_s
        while self._jobs.unfinished_tasks and time.monotonic() < deadline:
            time.sleep(0.01)
        return not self._jobs.unfinished_tasks

    def stop(self, timeout_s: float) -> None:
        self.drain(timeout_s)
        with contextlib.suppress(queue.Full):
            self._jobs.put_nowait(None)
        self._thread.join(timeout_s)


class Tracing:
    """The engine's tracer provider and exporter; ``session`` starts one session's trace."""

    def __init__(self, endpoint: str, service_name: str = "stream2llm") -> None:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        protocol = check_endpoint(endpoint)
        self.endpoint = endpoint
        self._exporter = _CountingExporter(_otlp_exporter(endpoint, protocol))
        self._provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        self._processor = BatchSpanProcessor(self._exporter, max_queue_size=QUEUE_SPANS)  # type: ignore[arg-type]
        self._provider.add_span_processor(self._processor)
        self.tracer = self._provider.get_tracer("stream2llm")
        self.spans_ended = 0
        self.offset_ns = _epoch_offset_ns()
        self.writer = _Writer()

    def session(self, request_id: str, mode: str, headers: Mapping[str, str] | None = None) -> SessionTrace:
        return SessionTrace(self, request_id, mode, trace_headers(headers))

    def counts(self) -> dict[str, int]:
        """Spans ended, exported and failed to export; the rest wait in the queue or were dropped."""
        return {
            "ended": self.spans_ended,
            "exported": self._exporter.exported,
            "failed": self._exporter.failed,
        }

    @property
    def traces_dropped(self) -> int:
        """Sessions whose trace was dropped: their spans' builder had fallen too far behind."""
        return self.writer.dropped

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Build what ended, then export what is queued (tests, shutdown)."""
        built = self.writer.drain(timeout_s)
        return self._provider.force_flush(int(timeout_s * 1000)) and built

    def shutdown(self, timeout_s: float = 1.0) -> None:
        self.writer.stop(timeout_s)
        self._provider.shutdown()


def _otlp_exporter(endpoint: str, protocol: str) -> Any:
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        return OTLPSpanExporter(endpoint=endpoint, insecure=True, timeout=EXPORT_TIMEOUT_S)
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

    return HttpExporter(endpoint=endpoint, timeout=EXPORT_TIMEOUT_S)


def _epoch_offset_ns() -> int:
    """What turns a monotonic timestamp (what sessions and the engine core record) into epoch
    nanoseconds; taken once, so that equal timestamps stay equal in every span."""
    return time.time_ns() - time.monotonic_ns()


class SessionTrace:
    """One session's trace: its root span, open while the session is."""

    def __init__(self, tracing: Tracing, request_id: str, mode: str, headers: dict[str, str]) -> None:
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._tracing = tracing
        # a caller's traceparent; else the span active where the session opened (an instrumented
        # application calling a pipeline), as any OpenTelemetry-instrumented library does
        parent = TraceContextTextMapPropagator().extract(headers) if headers else None
        self.root = tracing.tracer.start_span(
            "stream2llm.session",
            context=parent,
            kind=trace.SpanKind.SERVER,
            attributes={"gen_ai.request.id": request_id, "stream2llm.mode": mode},
        )
        self._context = trace.set_span_in_context(self.root)
        self._retrievers: dict[str, Any] = {}
        self._arrivals: dict[str, int] = {}
        self._ended = False
        self._decode: Any = None

    def _ns(self, monotonic_s: float) -> int:
        return self._tracing.offset_ns + int(monotonic_s * 1e9)

    def _span(
        self,
        name: str,
        start: float,
        end: float | None,
        attributes: dict[str, Any],
        parent: Any = None,
        kind: Any = None,
    ) -> Any:
        from opentelemetry import trace

        context = trace.set_span_in_context(parent) if parent is not None else self._context
        span = self._tracing.tracer.start_span(
            name,
            context=context,
            start_time=self._ns(start),
            attributes=attributes,
            kind=kind or trace.SpanKind.INTERNAL,
        )
        if end is not None:
            self._end(span, end)
        return span

    def _end(self, span: Any, at: float | None = None) -> None:
        span.end(end_time=self._ns(at) if at is not None else None)
        self._tracing.spans_ended += 1

    # -- retrieval, live -------------------------------------------------------------------------

    def context_arrived(
        self, retriever: str, op: str, chars: int, final: bool, seq: int | None = None
    ) -> None:
        """A retriever's event reached the session (``seq``: the retriever's own number, else its
        count): the retriever's span opens with the first."""
        self._arrivals[retriever] = self._arrivals.get(retriever, 0) + 1
        seq = self._arrivals[retriever] - 1 if seq is None else seq
        span = self._retrievers.get(retriever)
        if span is None:
            span = self._retrievers[retriever] = self._span(
                f"retrieve {retriever}", time.monotonic(), None, {"stream2llm.retriever": retriever}
            )
        span.add_event("context", {"seq": seq, "op": op, "chars": chars, "final": final})
        if final:
            self.retriever_done(retriever)

    def retriever_done(self, retriever: str, error: str | None = None) -> None:
        span = self._retrievers.pop(retriever, None)
        if span is None and error is not None:
            span = self._span(
                f"retrieve {retriever}", time.monotonic(), None, {"stream2llm.retriever": retriever}
            )
        if span is None:
            return
        if error is not None:
            from opentelemetry.trace import Status, StatusCode

            span.set_status(Status(StatusCode.ERROR, error))
        self._end(span)

    def decode_call(self) -> dict[str, str]:
        """The decode instance's part (``--disaggregate``): a span from now to the answer's end,
        and its ``traceparent`` for the call, so the decode instance's own spans join the trace."""
        from opentelemetry import trace
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        self._decode = self._span("decode (remote)", time.monotonic(), None, {}, kind=trace.SpanKind.CLIENT)
        carrier: dict[str, str] = {}
        TraceContextTextMapPropagator().inject(carrier, context=trace.set_span_in_context(self._decode))
        return carrier

    # -- the end ---------------------------------------------------------------------------------

    def finished(self, result: SessionResult, ended_at: float) -> None:
        """The chunks, the first token and the answer, from what the session recorded (built by
        the writer thread; nothing else touches this trace once the session ended)."""
        if not self._ended:
            self._ended = True
            self._tracing.writer.submit(lambda: self._write_finished(result, ended_at))

    def failed(self, error: BaseException) -> None:
        if not self._ended:
            self._ended = True
            self._tracing.writer.submit(lambda: self._write_failed(error))

    def _write_finished(self, result: SessionResult, ended_at: float) -> None:
        for retriever in list(self._retrievers):
            self.retriever_done(retriever)
        self._chunks(result.chunks, result.prefill_steps, ended_at)
        if self._decode is not None:
            self._end(self._decode, ended_at)
        root = self.root
        if result.first_token_at is not None:
            root.add_event("first token", timestamp=self._ns(result.first_token_at))
            self._span(
                "answer",
                result.first_token_at,
                ended_at,
                {"gen_ai.usage.completion_tokens": len(result.token_ids)},
            )
        root.set_attributes(
            {
                "gen_ai.usage.prompt_tokens": len(result.prompt_token_ids),
                "gen_ai.usage.completion_tokens": len(result.token_ids),
                "stream2llm.ttft_final_s": result.ttft_final_s,
                "stream2llm.tokens_prefilled": result.tokens_prefilled,
                "stream2llm.tokens_recomputed": result.tokens_recomputed,
                "stream2llm.chunks": len(result.chunks),
            }
        )
        if result.final_event_at is not None:
            root.add_event("final context", timestamp=self._ns(result.final_event_at))
        self._end(root, ended_at)

    def _write_failed(self, error: BaseException) -> None:
        from opentelemetry.trace import Status, StatusCode

        for retriever in list(self._retrievers):
            self.retriever_done(retriever)
        for span in (self._decode, self.root):
            if span is not None:
                span.set_status(Status(StatusCode.ERROR, str(error)))
                self._end(span)

    def _chunks(self, chunks: Iterable[ChunkTiming], prefill_steps: Sequence[float], ended_at: float) -> None:
        """A span per chunk from its hand-off to its prefill's end, split where its first prefill
        step started: queueing, then prefill (a chunk taken over before any step only queued)."""
        for i, chunk in enumerate(chunks):
            done = chunk.done if chunk.done is not None else ended_at
            span = self._span(
                "chunk", chunk.sent, None, {"stream2llm.chunk": i, "stream2llm.tokens": chunk.tokens}
            )
            started = next((t for t in prefill_steps if chunk.sent <= t <= done), None)
            self._span("queue", chunk.sent, started if started is not None else done, {}, parent=span)
            if started is not None:
                self._span("prefill", started, done, {}, parent=span)
            self._end(span, done)
