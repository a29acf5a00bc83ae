"""The policy's view of every live request, kept between steps and rebuilt only where one changed.

Before each step the broker needs a ``RequestView`` of every request and the ranking of those
that want compute. Most requests are parked sessions waiting for their next chunk: nothing of
theirs changes between steps, and building 500 views and sorting them each step cost more than a
millisecond. The book keeps each request's view, its sort key under the current policy and the
blocks parked sessions hold, and rebuilds a view only when the scheduler says the request may
have changed (``touch``): a chunk arrived or was taken, a step scheduled it or processed its
output, vLLM preempted it, the broker or the update mode changed it; ``forget`` when it is freed.
As a guard against a change no hook reported, the book rebuilds everything when its count of
parked sessions disagrees with vLLM's. ``tests/unit/test_view_book.py`` holds its views, ranking
and decisions equal to building everything from scratch over random runs of the real scheduler.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterable
from typing import Any

from stream2llm.core import vllm_compat as compat
from stream2llm.core.policies import Policy, RequestView
from stream2llm.core.protocol import ChunkMeta
from stream2llm.core.streams import StreamState, StreamTracker

request_facts = compat.request_facts  # called for every changed request, each step


def queued_tokens(request: compat.Request) -> int:
    """Tokens the chunks queued behind the one in work will prefill, at most: an update carries the
    whole new prompt and replaces what was queued before it (its shared prefix is known only when
    it is applied); appends add theirs. Summing every queued update counted a refinement's context
    once per version and ranked the session behind far longer finals."""
    total = 0
    for chunk in compat.queued_chunks(request):
        n = len(compat.chunk_ids(chunk))
        total = n if ChunkMeta.of(chunk.sampling_params).replaces_prompt else total + n
    return total


SortKey = tuple[Any, int, str]  # the policy's key, the request's place in vLLM's order, its id


class Ranking:
    """The sort keys of the requests that want compute, kept in order: a changed key moves one
    entry (two bisections) instead of sorting them all again each step."""

    def __init__(self) -> None:
        self.keys: dict[str, SortKey] = {}
        self._sorted: list[SortKey] = []
        self._order: list[str] = []
        self._rank: dict[str, int] | None = {}

    def reset(self, keys: dict[str, SortKey]) -> None:
        self.keys, self._sorted = keys, sorted(keys.values())
        self._order, self._rank = [k[2] for k in self._sorted], None

    def set(self, rid: str, key: SortKey) -> None:
        old = self.keys.get(rid)
        if old == key:
            return
        self.keys[rid] = key
        i = -1
        if old is not None:
            i = bisect_left(self._sorted, old)
            del self._sorted[i], self._order[i]
        j = bisect_left(self._sorted, key)
        self._sorted.insert(j, key)
        self._order.insert(j, rid)
        if i != j:  # a new entry, or one that changed place
            self._rank = None

    def remove(self, rid: str) -> None:
        old = self.keys.pop(rid, None)
        if old is not None:
            i = bisect_left(self._sorted, old)
            del self._sorted[i], self._order[i]
            self._rank = None

    def order(self) -> list[str]:
        """The ids, best first (a copy)."""
        return list(self._order)

    def rank(self) -> dict[str, int]:
        """Each id's place in ``order`` (kept until a request changes place)."""
        if self._rank is None:
            self._rank = dict(zip(self._order, range(len(self._order))))
        return self._rank


Facts = tuple[bool, int, int, int, bool]  # ``compat.request_facts``
PROGRESS = frozenset({"tokens_computed", "blocks_held"})  # what a running request's steps change


def _only_progress(old: RequestView | None, state: StreamState, facts: Facts) -> bool:
    """Whether a request that wants compute changed in tokens computed and blocks held alone."""
    return (
        old is not None
        and not facts[4]
        and old.tokens_queued == 0
        and old.tokens_pending == max(facts[2], 1)
        and old.complete == state.complete
        and old.last_chunk_arrival == state.last_chunk
        and old.arrival == state.arrival
        and old.next_chunk_eta == state.next_chunk_eta()
    )


def _view(rid: str, state: StreamState, facts: Facts, request: compat.Request) -> RequestView:
    """The policy's view of one request from what vLLM and its stream say of it."""
    parked, computed, to_compute, blocks, queued = facts
    return RequestView(
        rid,
        state.arrival,
        state.last_chunk,
        state.complete,
        parked,
        computed,
        0 if parked else max(to_compute, 1),
        blocks,
        state.next_chunk_eta(),
        queued_tokens(request) if queued else 0,
    )


class ViewBook:
    """Views, sort keys and parked blocks of the live requests of one scheduler."""

    def __init__(self, scheduler: compat.Scheduler, streams: StreamTracker) -> None:
        self._scheduler = scheduler
        self._streams = streams
        self._tables = compat.block_tables(scheduler)
        self._requests = compat.request_table(scheduler)
        # Every live request's view; a running request's may lag in fields its policy's key does
        # not read (``Policy.key_fields``: tokens computed, blocks held), which ``views`` fills in.
        self.current: dict[str, RequestView] = {}
        self._lagging: dict[str, compat.Request] = {}
        self.to_compute: dict[str, int] = {}  # tokens each holds but has not computed
        self._seq: dict[str, int] = {}  # order vLLM first held them in (ties of the ranking keep it)
        self._next_seq = 0
        self.ranking = Ranking()  # of the requests that want compute
        self._policy: Policy | None = None  # whose keys the ranking holds
        self.parked_blocks = 0  # blocks held by parked sessions
        self._parked: set[str] = set()
        self._dirty: set[str] = set()
        self.rebuilds = 0  # times the guard found the book out of step with vLLM

    # -- what the scheduler tells the book ------------------------------------------------------

    def admitted(self, request_id: str, new: bool) -> None:
        """vLLM now holds the request; ``new``: it was not held before (it goes last in vLLM's
        order, as a new key of its dict of requests does)."""
        if new or request_id not in self._seq:
            self._seq[request_id] = self._next_seq
            self._next_seq += 1
        self._dirty.add(request_id)

    def touch(self, request_ids: Iterable[str]) -> None:
        """These requests may have changed: their views are rebuilt before the next ranking."""
        self._dirty.update(request_ids)

    def forget(self, request_id: str) -> None:
        """The request was freed."""
        self._drop(request_id)
        self._seq.pop(request_id, None)
        self._dirty.discard(request_id)

    # -- what the broker asks -------------------------------------------------------------------

    def refresh(self, policy: Policy, now: float, running: set[str]) -> None:
        """Bring every changed view (and every sort key, if the policy changed) up to date;
        ``running``: the ids of vLLM's running list."""
        if policy is not self._policy:
            self._policy = policy
            keys = self.ranking.keys
            views = self.views
            self.ranking.reset({rid: (policy.key(views[rid]), k[1], rid) for rid, k in keys.items()})
        self._update_dirty(now, policy, running)
        if len(self._parked) != compat.parked_count(self._scheduler):
            self._rebuild()
            self._update_dirty(now, policy, running)

    def _update_dirty(self, now: float, policy: Policy, running: set[str]) -> None:
        """Rebuild the view of every request touched since the last refresh. The loop is written
        for the common case, a tracked request that wants compute before and after (every request
        a step scheduled): it runs for each of them every step. A running request whose change
        its policy's key does not read (a decoding request's next token) keeps its view and key;
        ``views`` rebuilds its view when asked."""
        dirty, self._dirty = self._dirty, set()
        requests, tables, states, views = self._requests, self._tables, self._streams.states, self.current
        ranking, seqs, parked, to_compute = self.ranking, self._seq, self._parked, self.to_compute
        key, lagging = policy.key, self._lagging
        may_lag = policy.key_fields.isdisjoint(PROGRESS)
        for rid in dirty:
            request = requests.get(rid)
            facts = request_facts(request, tables) if request is not None else None
            state = states.get(rid)
            if facts is None or state is None or facts[0] or rid in parked or rid not in seqs:
                self._update(rid, request, facts, now, policy)
                continue
            to_compute[rid] = facts[2]
            if may_lag and rid in running and _only_progress(views.get(rid), state, facts):
                lagging[rid] = request
                continue
            lagging.pop(rid, None)
            view = views[rid] = _view(rid, state, facts, request)
            ranking.set(rid, (key(view), seqs[rid], rid))

    @property
    def views(self) -> dict[str, RequestView]:
        """Every live request's view, up to date (a new dict: ``current`` with the lagging ones
        rebuilt; what a policy's victims are picked from)."""
        views = dict(self.current)
        states = self._streams.states
        for rid, request in self._lagging.items():
            facts = request_facts(request, self._tables)
            if facts is not None and rid in states:
                views[rid] = _view(rid, states[rid], facts, request)
        return views

    def in_vllm_order(self) -> list[RequestView]:
        """Every view, in the order vLLM holds the requests (what a policy's victims are picked
        from; ties keep that order)."""
        seq = self._seq
        return sorted(self.views.values(), key=lambda v: seq[v.request_id])

    # -- keeping it -----------------------------------------------------------------------------

    def _update(
        self, rid: str, request: compat.Request | None, facts: Facts | None, now: float, policy: Policy
    ) -> None:
        """Any request: finished, parked, untracked, new, or one that wants compute."""
        if request is None or facts is None:
            self._drop(rid)
            return
        state = self._streams.get(rid)
        if state is None:  # not tracked: the broker's stand-in is stamped now, so it is rebuilt each step
            state = StreamState(now, now, True)
            self._dirty.add(rid)
        view = _view(rid, state, facts, request)
        self._lagging.pop(rid, None)
        old = self.current.get(rid)
        if old is not None and old.parked:
            self._parked.discard(rid)
            self.parked_blocks -= old.blocks_held
        self.current[rid], self.to_compute[rid] = view, facts[2]
        if view.parked:
            self.ranking.remove(rid)
            self._parked.add(rid)
            self.parked_blocks += view.blocks_held
            return
        seq = self._seq.get(rid)
        if seq is None:
            seq = self._seq[rid] = self._next_seq
            self._next_seq += 1
        self.ranking.set(rid, (policy.key(view), seq, rid))

    def _drop(self, rid: str) -> None:
        """Take the request out: view, sort key, parked blocks."""
        old = self.current.pop(rid, None)
        self._lagging.pop(rid, None)
        self.to_compute.pop(rid, None)
        self.ranking.remove(rid)
        if old is not None and old.parked:
            self._parked.discard(rid)
            self.parked_blocks -= old.blocks_held

    def _rebuild(self) -> None:
        """Forget every view and read every live request again, in vLLM's order."""
        self.rebuilds += 1
        self.current, self.to_compute, self.ranking, self._lagging = {}, {}, Ranking(), {}
        self._parked, self.parked_blocks = set(), 0
        self._seq = {}
        for request in compat.live_requests(self._scheduler):
            self.admitted(request.request_id, True)
