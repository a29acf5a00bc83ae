"""The engine-core side of stream2llm: a vLLM Scheduler subclass (``scheduler_cls``).

It adds what stock vLLM lacks for streamed context:

- **update mode**: a chunk whose ``SamplingParams.extra_args["stream2llm"]["op"] == "update"``
  carries the *whole* new prompt. The session is cut back to the token-exact longest common prefix
  (LCP) of the tokens it holds and the new ones; KV past it is freed, a kept block that carries a
  prefix-cache hash is never written (its hash is dropped, or it is copied on write when shared),
  block hashes are recomputed from the cut, and only the rest is prefilled again;
- **counters**: tokens prefilled and recomputed per request, returned to the front end with the
  request's final output, and live engine state on a shared-memory board (``stats_board``).

Everything that touches vLLM internals goes through ``vllm_compat``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from stream2llm.connectors.prompt import common_prefix_len
from stream2llm.serving import vllm_compat as compat
from stream2llm.serving.stats_board import EngineStats, StatsBoard

CONFIG_KEY = "stream2llm"  # in VllmConfig.additional_config and SamplingParams.extra_args


@dataclass
class UpdateRecord:
    """One update as the engine applied it."""

    old_len: int  # tokens the session held (computed) before
    new_len: int
    lcp: int  # longest common prefix of old and new token ids
    kept: int  # tokens whose KV was kept (lcp, capped at new_len - 1 so one token yields logits)
    recomputed: int  # new_len - kept
    tail: str  # the block holding the cut: private, unhashed, copied (on write) or aligned


@dataclass
class RequestCounters:
    tokens_prefilled: int = 0
    tokens_recomputed: int = 0
    updates: list[UpdateRecord] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "tokens_prefilled": self.tokens_prefilled,
            "tokens_recomputed": self.tokens_recomputed,
            "updates": [vars(u) for u in self.updates],
        }


def chunk_meta(sampling_params: Any) -> dict[str, Any]:
    """What the front end says about a chunk: op ('append' or 'update'), final, policy."""
    extra = getattr(sampling_params, "extra_args", None) or {}
    return extra.get(CONFIG_KEY) or {}


def chunk_op(sampling_params: Any) -> str:
    return chunk_meta(sampling_params).get("op", "append")


class StreamScheduler(compat.HookedScheduler):
    """vLLM's scheduler plus update mode, per-request counters and a live stats board."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        options = (self.vllm_config.additional_config or {}).get(CONFIG_KEY, {})
        self.policy_name: str = options.get("policy", "vllm")
        board_path = options.get("stats_path")
        self._board = StatsBoard(board_path) if board_path else None
        self._counters: dict[str, RequestCounters] = {}
        self._totals = RequestCounters()
        self._publish()

    # -- update mode ----------------------------------------------------------------------------

    def before_session_update(self, session: compat.Request, update: compat.StreamingUpdate):
        if chunk_op(update.sampling_params) != "update":
            return update
        new_ids = list(update.prompt_token_ids or ())
        held = compat.computed_token_ids(session)
        lcp = common_prefix_len(held, new_ids)
        kept, tail = compat.cut_session_kv(self, session, min(lcp, len(new_ids) - 1))
        compat.truncate_session_prompt(session, kept)
        record = UpdateRecord(len(held), len(new_ids), lcp, kept, len(new_ids) - kept, tail)
        counters = self._counters_for(session.request_id)
        counters.updates.append(record)
        counters.tokens_recomputed += record.recomputed
        self._totals.tokens_recomputed += record.recomputed
        return compat.with_prompt(update, new_ids[kept:])

    def is_last_chunk(self, request: compat.Request) -> bool:
        return bool(chunk_meta(request.sampling_params).get("final"))

    # -- counters and stats ---------------------------------------------------------------------

    def _counters_for(self, request_id: str) -> RequestCounters:
        return self._counters.setdefault(request_id, RequestCounters())

    def schedule(self, *args: Any, **kwargs: Any):
        output = super().schedule(*args, **kwargs)
        for request_id, n in output.num_scheduled_tokens.items():
            request = self.requests.get(request_id)
            if request is None:
                continue
            computed_before = request.num_computed_tokens - n
            prompt_part = max(0, min(n, request.num_prompt_tokens - computed_before))
            if prompt_part:
                self._counters_for(request_id).tokens_prefilled += prompt_part
                self._totals.tokens_prefilled += prompt_part
        self._publish()
        return output

    def on_request_freed(self, request: compat.Request, params: dict[str, Any] | None):
        counters = self._counters.pop(request.request_id, None)
        if counters is None:
            return params
        return {**(params or {}), CONFIG_KEY: counters.as_dict()}

    def update_from_output(self, *args: Any, **kwargs: Any):
        outputs = super().update_from_output(*args, **kwargs)
        self._publish()  # requests finished here free their KV; the board must show it
        return outputs

    def finish_requests(self, request_ids: Any, finished_status: Any) -> list[compat.Request]:
        finished = super().finish_requests(request_ids, finished_status)
        self._publish()
        return finished

    def _publish(self) -> None:
        if self._board is None:
            return
        running, waiting = self.get_request_counts()
        parked = self.num_parked_sessions()
        self._board.publish(
            EngineStats(
                kv_usage=self.kv_usage(),
                running=running,
                waiting=max(waiting - parked, 0),
                parked=parked,
                requests=len(self.requests),
                tokens_prefilled=self._totals.tokens_prefilled,
                tokens_recomputed=self._totals.tokens_recomputed,
            )
        )
