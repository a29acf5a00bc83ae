"""What the engine core counts and reports: tokens prefilled, recomputed and discarded per request
(returned to the front end with the request's final output), engine-wide totals and live state on
the shared-memory stats board, and the optional per-step log.

It also keeps, per request, the token id at each position whose KV the request holds, read from
what each step hands the model runner (not from what the front end meant to send), cut back when
an update cuts the KV; its digest goes back with the counters, so a test can check the prompt the
final answer attended to against an independent tokenization.

vLLM reports none of this per request, and its scheduler stats only travel with outputs; the board
lets the front end read the state at any time (after the last abort too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from stream2llm.core import vllm_compat as compat
from stream2llm.core.protocol import RequestCounters, UpdateRecord, token_digest
from stream2llm.core.stats_board import EngineStats, StatsBoard
from stream2llm.core.step_log import Eviction, PrefillItem, StepLog

MAX_PREFILL_STEPS = 4096  # step start times kept per request (a 2M-token prompt at 512 a step)


class Accounting:
    """Counters per live request and in total, published on the board and in the step log."""

    def __init__(self, scheduler: compat.Scheduler, stats_path: str | None, step_log: str | None) -> None:
        self._scheduler = scheduler
        self._board = StatsBoard(stats_path) if stats_path else None
        self._step_log = StepLog(step_log) if step_log else None
        self._counters: dict[str, RequestCounters] = {}
        self._totals = RequestCounters()
        self._sent: dict[str, list[int]] = {}  # the prompt each request's model runner copied last
        self._computed: dict[str, list[int]] = {}  # token id per position whose KV the request holds

    def counters(self, request_id: str) -> RequestCounters | None:
        """What was counted so far for a live request (None once it is freed)."""
        return self._counters.get(request_id)

    def _counters_for(self, request_id: str) -> RequestCounters:
        return self._counters.setdefault(request_id, RequestCounters())

    def record_update(self, request_id: str, record: UpdateRecord) -> None:
        """An update was applied to a session: its tokens past the kept prefix are recomputed."""
        counters = self._counters_for(request_id)
        counters.updates.append(record)
        counters.tokens_recomputed += record.recomputed
        counters.tokens_discarded += record.discarded
        self._totals.tokens_recomputed += record.recomputed
        self.cut_computed(request_id, record.kept)

    def cut_computed(self, request_id: str, keep: int) -> None:
        """The request's KV was cut back to ``keep`` tokens."""
        del self._computed.get(request_id, [])[keep:]

    def _recomputed(self, request_id: str, start: int, n: int) -> int:
        """Of positions ``start:start+n``, those whose KV the request had computed before: it lost
        them to an eviction or a preemption (an update's cut shortens the record first, so its
        own recompute is counted by ``record_update``, not here)."""
        held = len(self._computed.get(request_id, ()))
        return max(0, min(held, start + n) - start)

    def _note_computed(self, request: compat.Request, start: int, n: int) -> None:
        """Positions ``start:start+n`` are computed this step from the tokens the runner holds: the
        prompt copied when the request was (re)started, then its own sampled tokens. Positions the
        request skipped (prefix-cache hits, kept decode outputs) are taken from that same prompt:
        their KV is vouched for by block hashes, not computed here."""
        rid = request.request_id
        record = self._computed.setdefault(rid, [])
        del record[start:]
        record.extend(self._runner_tokens(request, len(record), start + n))

    def _runner_tokens(self, request: compat.Request, start: int, stop: int) -> list[int]:
        tokens = self._sent.get(request.request_id, [])[start:stop]
        if len(tokens) < stop - start:
            tokens += compat.token_ids_at(request, start + len(tokens), stop)
        return tokens

    def step_scheduled(
        self,
        output: Any,
        t0: float,
        policy: str,
        is_complete: Callable[[str], bool],
        evicted: list[Eviction] | None = None,
        short: int = 0,
        tier: tuple[int, int] | None = None,
    ) -> None:
        """Count the prompt tokens a step scheduled (not decodes), those computed again after
        their KV was lost, and log the step with what gave KV back before it (and the bytes the
        KV tier saves and loads for it)."""
        logged: list[PrefillItem] = []
        again_logged: list[tuple[str, int]] = []
        scheduled = compat.scheduled_tokens(output)
        self._sent.update(compat.sent_prompts(output))
        for request_id, n in scheduled.items():
            request = compat.find_request(self._scheduler, request_id)
            if request is None:
                continue
            computed_before = compat.computed_tokens(request) - n
            prompt_part = max(0, min(n, compat.prompt_length(request) - computed_before))
            if prompt_part:
                again = self._recomputed(request_id, computed_before, prompt_part)
                self._note_computed(request, computed_before, prompt_part)
                self._count_prefill(request_id, prompt_part, again, t0)
                if self._step_log is not None:
                    submitted_as = compat.external_request_id(request_id)
                    logged.append((prompt_part, computed_before, is_complete(request_id), submitted_as))
                    if again:
                        again_logged.append((submitted_as, again))
        if self._step_log is not None:
            decodes = len(scheduled) - len(logged)  # requests past their prompt
            preempted = [compat.external_request_id(r) for r in compat.preempted_ids(output)]
            held = compat.num_requests(self._scheduler)
            kv = (compat.free_block_count(self._scheduler), short)
            self._step_log.scheduled(
                policy, logged, decodes, held, t0, evicted, preempted, again_logged, kv, tier
            )

    def _count_prefill(self, request_id: str, tokens: int, recomputed: int, t0: float) -> None:
        counters = self._counters_for(request_id)
        if len(counters.prefill_steps) < MAX_PREFILL_STEPS:
            counters.prefill_steps.append(round(t0, 6))
        counters.tokens_prefilled += tokens
        counters.tokens_recomputed += recomputed
        self._totals.tokens_prefilled += tokens
        self._totals.tokens_recomputed += recomputed

    def step_done(self) -> None:
        """The step's output came back."""
        if self._step_log is not None:
            self._step_log.finished()

    def release(self, request_id: str) -> dict[str, Any] | None:
        """Stop counting for a freed request; return what goes back to the front end."""
        counters = self._counters.pop(request_id, None)
        self._sent.pop(request_id, None)
        computed = self._computed.pop(request_id, [])
        if counters is None:
            return None
        counters.computed_prompt_len = len(computed)
        counters.computed_prompt_digest = token_digest(computed)
        return counters.as_dict()

    def tier_loaded(self, loaded: list[tuple[str, int]]) -> None:
        """Requests given tokens from the KV tier this step (counted as loaded, not prefilled)."""
        for request_id, tokens in loaded:
            self._counters_for(request_id).tokens_loaded += tokens
            self._totals.tokens_loaded += tokens

    def publish(self, preemptions: int, offloads: int = 0, tier: Any = None) -> None:
        """Write the engine's live state on the board, if there is one."""
        if self._board is None:
            return
        scheduler = self._scheduler
        running, waiting = compat.request_counts(scheduler)
        parked = compat.parked_count(scheduler)
        self._board.publish(
            EngineStats(
                kv_usage=compat.kv_usage(scheduler),
                running=running,
                waiting=max(waiting - parked, 0),
                parked=parked,
                requests=compat.num_requests(scheduler),
                tokens_prefilled=self._totals.tokens_prefilled,
                tokens_recomputed=self._totals.tokens_recomputed,
                preemptions=preemptions,
                offloads=offloads,
                tier_bytes_saved=tier.bytes_offloaded if tier else 0,
                tier_bytes_loaded=tier.bytes_loaded if tier else 0,
                tier_load_failures=tier.blocks_load_failed if tier else 0,
            )
        )
