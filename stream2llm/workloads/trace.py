"""Retrieval traces: schema ``stream2llm.trace/1`` (JSON Lines, one request a line), I/O, validation,
and importers for the published Stream2LLM trace formats.

A line: ``{"schema": "stream2llm.trace/1", "id": ..., "workload": "crawler"|"anns"|..., "query": ...,
"events": [{"t": seconds from query arrival, "op": "append"|"update", "text"|"docs"|"n_tokens": ...}]}``.
``n_tokens`` asks the replayer for that many tokens of deterministic filler text.
"""

from __future__ import annotations

import csv
import gzip
import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from stream2llm.context.layout import UpdateLayout

SCHEMA = "stream2llm.trace/1"
OPS = ("append", "update")
PAYLOADS = ("text", "docs", "n_tokens")


class TraceError(ValueError):
    """A trace line is malformed; the message names the file position and the field."""


@dataclass(frozen=True)
class TraceEvent:
    t: float  # seconds from the query's arrival
    op: str
    text: str | None = None
    docs: tuple[str, ...] | None = None
    n_tokens: int | None = None

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"t": round(self.t, 6), "op": self.op}
        if self.text is not None:
            out["text"] = self.text
        if self.docs is not None:
            out["docs"] = list(self.docs)
        if self.n_tokens is not None:
            out["n_tokens"] = self.n_tokens
        return out


@dataclass(frozen=True)
class TraceRequest:
    id: str
    workload: str
    query: str
    events: tuple[TraceEvent, ...] = field(default_factory=tuple)

    @property
    def duration_s(self) -> float:
        return self.events[-1].t if self.events else 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "schema": SCHEMA,
            "id": self.id,
            "workload": self.workload,
            "query": self.query,
            "events": [e.to_json() for e in self.events],
        }


def _need(obj: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in obj:
        raise TraceError(f"{where}: missing field {key!r}")
    value = obj[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise TraceError(f"{where}: field {key!r} has type {type(value).__name__}")
    return value


def parse_event(obj: Any, where: str, previous_t: float) -> TraceEvent:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: an event must be an object")
    t = float(_need(obj, "t", (int, float), where))
    if t < previous_t:
        raise TraceError(f"{where}: field 't' goes back in time ({t} < {previous_t})")
    op = _need(obj, "op", str, where)
    if op not in OPS:
        raise TraceError(f"{where}: field 'op' is {op!r}; expected one of {', '.join(OPS)}")
    present = [k for k in PAYLOADS if k in obj]
    if len(present) != 1:
        raise TraceError(f"{where}: needs exactly one of text, docs, n_tokens (has {present or 'none'})")
    (kind,) = present
    if kind == "text":
        if op != "append":
            raise TraceError(f"{where}: field 'text' goes with op 'append'; updates carry 'docs'")
        return TraceEvent(t, op, text=_need(obj, "text", str, where))
    if kind == "docs":
        docs = _need(obj, "docs", list, where)
        if not all(isinstance(d, str) for d in docs):
            raise TraceError(f"{where}: field 'docs' must be a list of strings")
        return TraceEvent(t, op, docs=tuple(docs))
    n = _need(obj, "n_tokens", int, where)
    if n <= 0:
        raise TraceError(f"{where}: field 'n_tokens' must be positive")
    return TraceEvent(t, op, n_tokens=n)


def parse_request(obj: Any, where: str) -> TraceRequest:
    if not isinstance(obj, dict):
        raise TraceError(f"{where}: a trace line must be a JSON object")
    schema = obj.get("schema")
    if schema != SCHEMA:
        raise TraceError(f"{where}: field 'schema' is {schema!r}; expected {SCHEMA!r}")
    events_raw = _need(obj, "events", list, where)
    if not events_raw:
        raise TraceError(f"{where}: field 'events' is empty")
    events, previous = [], 0.0
    for i, raw in enumerate(events_raw):
        event = parse_event(raw, f"{where}, events[{i}]", previous)
        events.append(event)
        previous = event.t
    return TraceRequest(
        id=str(_need(obj, "id", (str, int), where)),
        workload=_need(obj, "workload", str, where),
        query=_need(obj, "query", str, where),
        events=tuple(events),
    )


def read_trace(path: str | Path) -> list[TraceRequest]:
    """Read and validate a trace file (``.gz``: gzip-compressed); errors name the line and the field."""
    return list(iter_trace(path))


def iter_trace(path: str | Path) -> Iterator[TraceRequest]:
    """The requests of a trace file, validated one line at a time (``.gz``: gzip-compressed)."""
    seen: set[str] = set()
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as exc:
                raise TraceError(f"{where}: not JSON ({exc.msg})") from None
            request = parse_request(obj, where)
            if request.id in seen:
                raise TraceError(f"{where}: duplicate id {request.id!r}")
            seen.add(request.id)
            yield request


def write_trace(path: str | Path, requests: Iterable[TraceRequest]) -> int:
    n = 0
    with open(path, "w", encoding="utf-8") as f:
        for request in requests:
            f.write(json.dumps(request.to_json(), ensure_ascii=False) + "\n")
            n += 1
    return n


# ---------------------------------------------------------------------------------------------
# Importers for the published formats
# ---------------------------------------------------------------------------------------------


def import_crawler_csv(path: str | Path, request_id: str | None = None) -> TraceRequest:
    """One published crawler CSV (``query_<N>.csv``: type, query, content, startTime, endTime).

    The search row gives the query; each page_scrape row with content becomes an append at its
    endTime (events sorted by endTime, as the published replayer does)."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise TraceError(f"{path}: no rows")
    for i, row in enumerate(rows, 2):
        for column in ("type", "endTime"):
            if column not in row:
                raise TraceError(f"{path}:{i}: missing column {column!r}")
    query = next((r.get("query") or "" for r in rows if r.get("query")), "")
    pages = sorted(
        (r for r in rows if r["type"] == "page_scrape" and (r.get("content") or "").strip()),
        key=lambda r: float(r["endTime"]),
    )
    if not pages:
        raise TraceError(f"{path}: no page_scrape row with content")
    events = tuple(TraceEvent(float(r["endTime"]), "append", text=r["content"]) for r in pages)
    return TraceRequest(request_id or path.stem, "crawler", query, events)


def import_ann_traces(trace_map: str | Path, corpus_parts: Iterable[str | Path]) -> list[TraceRequest]:
    """Published ANN traces: ``query_trace_map_5k.json`` plus the per-query pipeline CSVs
    (StartTime_us, EndTime_us, PipelinePool) and the document corpus parts.

    Row i becomes an update with the documents of its pool at the cumulative pipeline time."""
    trace_map = Path(trace_map)
    corpus: dict[str, str] = {}
    for part in corpus_parts:
        corpus.update(json.loads(Path(part).read_text(encoding="utf-8")))
    mapping = json.loads(trace_map.read_text(encoding="utf-8"))
    requests = []
    for qid, entry in sorted(mapping.items(), key=lambda kv: int(kv[0]) if kv[0].isdigit() else kv[0]):
        csv_path = trace_map.parent / entry["trace_file"]
        with open(csv_path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
        t, events = 0.0, []
        for i, row in enumerate(rows, 2):
            try:
                t += (float(row["EndTime_us"]) - float(row["StartTime_us"])) / 1e6
                pool = [d.strip() for d in row["PipelinePool"].strip("()[] ").split(",") if d.strip()]
            except (KeyError, ValueError) as exc:
                raise TraceError(f"{csv_path}:{i}: bad row ({exc})") from None
            missing = [d for d in pool if d not in corpus]
            if missing:
                raise TraceError(f"{csv_path}:{i}: documents not in the corpus: {missing[:3]}")
            events.append(TraceEvent(t, "update", docs=tuple(corpus[d] for d in pool)))
        if events:
            requests.append(TraceRequest(f"ann-{qid}", "anns", entry.get("query", ""), tuple(events)))
    return requests


def with_stable_layout(requests: Iterable[TraceRequest]) -> list[TraceRequest]:
    """The same requests with every update's documents laid out as the context assembler lays them
    out (``context/layout.py``: survivors keep their place, newcomers follow), instead of in the
    retriever's score order."""
    out = []
    for request in requests:
        layout = UpdateLayout("stable")
        events = tuple(
            replace(e, docs=tuple(layout.arrange(e.docs))) if e.op == "update" and e.docs else e
            for e in request.events
        )
        out.append(replace(request, events=events))
    return out
