"""Queue surgery: moving requests between vLLM's running list and waiting queues, and resetting them.

These are the levers the broker and the update mode pull on vLLM's own structures: the order it
schedules in, taking a partial prefill out of the running list, and freeing a waiting request's
KV. vLLM then schedules and allocates as it always does.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from itertools import islice, repeat
from operator import attrgetter
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from stream2llm.core.vllm_compat.scheduler_state import blocks_held, is_prefilling

_request_id = attrgetter("request_id")

__all__ = [
    "QueueMemo",
    "defer_running_prefill",
    "evict_waiting_kv",
    "rank_queues",
    "sort_queues",
]


def sort_queues(scheduler: Scheduler, key: Any) -> None:
    """Order the running list and the waiting requests by ``key`` (smallest first). vLLM
    schedules in this order and preempts from the end of the running list.

    vLLM keeps waiting requests that hold KV (resumed sessions, deferred prefills) in a queue it
    drains before the one for requests without KV (new sessions, evicted ones), which would put
    every partial stream's next chunk ahead of a higher-ranked request with no KV. Both kinds go
    into the first queue, in rank order; vLLM schedules and removes requests from either queue
    alike, and re-files them by their KV when it re-queues them."""
    scheduler.running.sort(key=key)
    first, second = scheduler.kv_holding_waiting, scheduler.waiting
    if not isinstance(first, deque) or not isinstance(second, deque):
        return  # a priority policy orders its own queues
    ordered = sorted([*first, *second], key=key)
    first.clear()
    second.clear()
    first.extend(ordered)


@dataclass
class QueueMemo:
    """What ``rank_queues`` left: the ranking it ordered by, the running list and the ranked head
    of the KV-holding queue, set only when every ranked request was in one of them. If the same
    ranking finds the same requests there again (and nothing new in the other queue), vLLM's
    queues are as it left them and nothing needs reading."""

    rank: Mapping[str, int] | None = None
    running: list[Request] = field(default_factory=list)
    head: list[Request] = field(default_factory=list)

    def holds(self, rank: Mapping[str, int], running: list[Request], first: deque[Request]) -> bool:
        n = len(self.head)
        return rank is self.rank and running == self.running and list(islice(first, n)) == self.head


def rank_queues(scheduler: Scheduler, rank: Mapping[str, int], memo: QueueMemo | None = None) -> None:
    """``sort_queues`` by place in ``rank`` (requests it does not rank go last, in their order),
    reading only the front of the KV-holding queue: its head up to the last ranked request it
    holds, and the other queue (new requests since the last step). Parked sessions sit in that
    queue behind the ranked ones, which a previous step put in front, and need not be touched;
    a ranked request further back (a session that just took its next chunk) is found by reading
    on to it, and one missing from both queues by reading all of it. The result is exactly
    ``sort_queues``'s (a contract test holds them equal). ``memo`` skips even that when nothing
    moved since the last call."""
    running, first, second = scheduler.running, scheduler.kv_holding_waiting, scheduler.waiting
    if not isinstance(first, deque) or not isinstance(second, deque):
        _sort_running(running, rank)
        return  # a priority policy orders its own queues
    if memo is not None and not second and memo.holds(rank, running, first):
        return
    in_running = _sort_running(running, rank)
    ranked = [r for r in second if r.request_id in rank]
    tail = [r for r in second if r.request_id not in rank] if len(ranked) < len(second) else []
    wanted = len(rank) - len(ranked) - in_running
    if second or not _leads_in_order(first, rank, wanted):  # else: as the last call left it
        _reorder(first, rank, ranked, wanted)
        second.clear()
        first.extend(tail)
    if memo is not None:
        placed = list(islice(first, len(rank) - in_running))
        complete = all(r.request_id in rank for r in placed) and len(placed) == len(rank) - in_running
        memo.rank, memo.running, memo.head = (rank if complete else None), list(running), placed


def _sort_running(running: list[Request], rank: Mapping[str, int]) -> int:
    """Order the running list by rank; how many running requests are ranked."""
    last = len(rank)
    places = _places(running, rank, last)
    if places != sorted(places):
        running.sort(key=lambda r: rank.get(r.request_id, last))
    return len(places) - places.count(last)


def _reorder(first: deque[Request], rank: Mapping[str, int], ranked: list[Request], wanted: int) -> None:
    """Pop the queue's head up to its last ranked request, put the ranked ones (and ``ranked``,
    from the other queue) in front in rank order, then the rest of the head in its order."""
    head: list[Request] = []
    while wanted > 0 and first:
        request = first.popleft()
        if request.request_id in rank:
            ranked.append(request)
            wanted -= 1
        else:
            head.append(request)
    ranked.sort(key=lambda r: rank[r.request_id])
    first.extendleft(reversed(head))
    first.extendleft(reversed(ranked))


def _places(requests: Iterable[Request], rank: Mapping[str, int], default: Any) -> list[Any]:
    """Each request's place in ``rank`` (``default`` where it has none), read without a Python
    call per request: the running list and the queue's head are read every step."""
    return list(map(rank.get, map(_request_id, requests), repeat(default)))


def _leads_in_order(queue: deque[Request], rank: Mapping[str, int], wanted: int) -> bool:
    """Whether the queue starts with ``wanted`` ranked requests, in rank order."""
    if len(queue) < wanted:
        return False
    places = _places(islice(queue, wanted), rank, None)
    return None not in places and places == sorted(places)


def evict_waiting_kv(scheduler: Scheduler, request: Request) -> int:
    """Free the KV of a request that is not running (a parked session, or one waiting for blocks);
    it recomputes when it is scheduled again. Freed blocks keep their prefix-cache hashes, so if
    nobody reuses them first, the request gets them back for free. Callers wait until no step of
    the request is in flight (``step_in_flight``): its output would land on a reset request."""
    assert request.status in (RequestStatus.WAITING_FOR_STREAMING_REQ, RequestStatus.WAITING), request.status
    n = blocks_held(scheduler, request.request_id)
    scheduler._free_request_blocks(request)  # vLLM's own free: deferred while a KV load may write them
    request.num_computed_tokens = 0
    request.num_preemptions += 1
    return n


def defer_running_prefill(scheduler: Scheduler, request: Request) -> None:
    """Take a request that is still prefilling out of the running list, keeping its KV, so that
    higher-ranked waiting work gets this step's tokens first. vLLM resumes it from the waiting
    queue like a streaming session resumes (the worker gets its state anew). Safe with a step in
    flight: a request still prefilling after it was scheduled is one whose step samples nothing."""
    assert is_prefilling(request), request.status
    scheduler.running.remove(request)
    scheduler._inflight_prefills.discard(request)
    request.status = RequestStatus.WAITING
    scheduler.kv_holding_waiting.add_request(request)
