"""The decode half of a disaggregated deployment, as the prefill instance's sessions see it.

With ``EngineConfig.decode_url`` set, a session's vLLM request runs here instead of on vLLM's
``generate`` alone: every chunk is prefilled on this (prefill) instance exactly as before, while
``core.kv_connector`` saves each full block as it is computed; the final chunk only prefills (one
throw-away token, like an intermediate chunk); then the whole prompt's token ids go to the decode
instance, a plain vLLM OpenAI server whose connector loads the stored blocks, computes the rest (the
last token, when every block was stored) and generates. Its tokens come back as outputs shaped like
vLLM's, so the session, its text deltas, its TTFT clocks and its counters work unchanged.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from stream2llm.context.events import Op
from stream2llm.core.protocol import CONFIG_KEY, KV_PARAMS_KEY, ChunkMeta
from stream2llm.errors import StreamError

KEEPALIVE_S = 2.0  # below the decode server's keep-alive timeout
TOKEN_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling of a logprob's token


@dataclass(frozen=True)
class Logprob:
    logprob: float


@dataclass
class DecodedCompletion:
    """What the session reads of vLLM's ``CompletionOutput``."""

    token_ids: list[int]
    logprobs: list[dict[int, Logprob]] | None = None
    finish_reason: str | None = None


@dataclass
class DecodedOutput:
    """What the session reads of vLLM's ``RequestOutput``."""

    outputs: list[DecodedCompletion]
    kv_transfer_params: dict[str, Any] | None = None
    finished: bool = False


@dataclass
class _PromptTracker:
    """The prompt a streaming request holds, rebuilt from its chunks (append: extend; update:
    replace), and the same chunks with the final one turned into a prefill-only chunk."""

    ids: list[int] = field(default_factory=list)
    cache_salt: str | None = None

    def take(self, prompt: dict[str, Any], meta: ChunkMeta) -> None:
        chunk = list(prompt["prompt_token_ids"])
        self.ids = chunk if meta.op is Op.UPDATE or not self.ids else self.ids + chunk
        self.cache_salt = prompt.get("cache_salt", self.cache_salt)

    async def tap(self, chunks: AsyncIterator[Any], pulls_kv: bool) -> AsyncIterator[Any]:
        async for chunk in chunks:
            meta = ChunkMeta.of(chunk.sampling_params)
            self.take(chunk.prompt, meta)
            params = prefill_only(chunk.sampling_params, pulls_kv) if meta.final else chunk.sampling_params
            yield type(chunk)(chunk.prompt, mark_remote_decode(params, pulls_kv))


def prefill_only(sampling: Any, pulls_kv: bool = False) -> Any:
    """The same request, generating one token: the prefill instance computes the prompt's KV and
    samples one throw-away token (vLLM has no prefill-only request); the decode instance answers."""
    params = sampling.clone()
    params.max_tokens, params.min_tokens, params.stop_token_ids = 1, 0, []
    return mark_remote_decode(params, pulls_kv)


def mark_remote_decode(params: Any, pulls_kv: bool) -> Any:
    """A decode instance that pulls the KV (NIXL) needs vLLM's P/D request flag on the prefill's
    request (vLLM reads it from a streaming request's first chunk), so that the prefill's
    connector keeps the blocks and returns where they are."""
    if not pulls_kv:
        return params
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": {"do_remote_decode": True}}
    return params


def foreign_params(params: dict[str, Any] | None) -> dict[str, Any]:
    """The prefill connector's own kv_transfer_params (NIXL: where the blocks are), which the
    decode instance gets with the request; stream2llm's counters are not for it."""
    return {k: v for k, v in (params or {}).items() if k not in (CONFIG_KEY, KV_PARAMS_KEY)}


def completion_body(
    model: str, ids: list[int], sampling: Any, cache_salt: str | None, kv_params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The decode instance's ``/v1/completions`` body for the session's sampling parameters."""
    body: dict[str, Any] = {
        "model": model,
        "prompt": ids,
        "max_tokens": sampling.max_tokens,
        "min_tokens": sampling.min_tokens,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "top_k": sampling.top_k,
        "min_p": sampling.min_p,
        "seed": sampling.seed,
        "presence_penalty": sampling.presence_penalty,
        "frequency_penalty": sampling.frequency_penalty,
        "repetition_penalty": sampling.repetition_penalty,
        "stop_token_ids": list(sampling.stop_token_ids or ()),
        "ignore_eos": sampling.ignore_eos,
        "skip_special_tokens": sampling.skip_special_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
        "return_token_ids": True,
        "return_tokens_as_token_ids": True,
    }
    if sampling.logprobs is not None:
        body["logprobs"] = sampling.logprobs
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    if kv_params:
        body["kv_transfer_params"] = kv_params
    return body


def _token_logprobs(raw: dict[str, Any] | None) -> list[dict[int, Logprob]]:
    """vLLM's streamed completion logprobs (top_logprobs keyed ``token_id:N``) as the session's."""
    if not raw:
        return []
    out = []
    for top in raw.get("top_logprobs") or ():
        out.append({int(k.removeprefix(TOKEN_PREFIX)): Logprob(float(v)) for k, v in (top or {}).items()})
    return out


class RemoteDecode:
    """Runs a session's request: prefill here (``local_generate``), decode on ``url``."""

    def __init__(
        self,
        url: str,
        model: str,
        local_generate: Callable[..., AsyncIterator[Any]],
        *,
        pulls_kv: bool = False,
    ) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.pulls_kv = pulls_kv
        self._local_generate = local_generate
        self._http: aiohttp.ClientSession | None = None

    def generate(self, prompt: Any, sampling: Any, *, request_id: str) -> AsyncIterator[Any]:
        """vLLM's ``generate`` signature: a dict prompt (one request) or a stream of chunks."""
        return self._generate(prompt, sampling, request_id)

    async def _generate(self, prompt: Any, sampling: Any, request_id: str) -> AsyncIterator[Any]:
        tracker = _PromptTracker()
        if isinstance(prompt, dict):
            tracker.take(prompt, ChunkMeta(Op.UPDATE, True))
            local_prompt: Any = prompt
        else:
            local_prompt = tracker.tap(prompt, self.pulls_kv)
        prefilled = None
        local_sampling = prefill_only(sampling, self.pulls_kv)
        async for out in self._local_generate(local_prompt, local_sampling, request_id=request_id):
            if out.finished:
                prefilled = out  # the final chunk's throw-away token: the decode instance answers
            else:
                yield out
        if prefilled is None:
            return
        async for out in self._decode(tracker, sampling, prefilled):
            yield out

    async def _decode(
        self, tracker: _PromptTracker, sampling: Any, prefilled: Any
    ) -> AsyncIterator[DecodedOutput]:
        """Stream the decode instance's answer as cumulative outputs after the throw-away tokens."""
        local = prefilled.outputs[0]
        head_ids = list(local.token_ids)[:-1]  # intermediate chunks' throw-away tokens
        head_lp = [{t: Logprob(lp.logprob) for t, lp in d.items()} for d in (local.logprobs or [])[:-1]]
        params = dict(prefilled.kv_transfer_params or {})
        counters = dict(params.get(CONFIG_KEY) or {})
        transfer = dict(params.get(KV_PARAMS_KEY) or {})
        ids: list[int] = []
        lps: list[dict[int, Logprob]] = []
        finish: str | None = None
        body = completion_body(self.model, tracker.ids, sampling, tracker.cache_salt, foreign_params(params))
        async for event in self._events(body):
            transfer.update(_usage_counts(event.get("usage")))
            for choice in event.get("choices") or ():
                ids += choice.get("token_ids") or []
                lps += _token_logprobs(choice.get("logprobs"))
                finish = choice.get("finish_reason") or finish
                if finish is None:
                    yield DecodedOutput(
                        [DecodedCompletion(head_ids + ids, self._logprobs(sampling, head_lp + lps))]
                    )
        if finish is None:
            raise StreamError(f"the decode instance at {self.url} ended its answer without a finish reason")
        final = DecodedCompletion(head_ids + ids, self._logprobs(sampling, head_lp + lps), finish)
        yield DecodedOutput([final], {CONFIG_KEY: {**counters, "kv_transfer": transfer}}, finished=True)

    @staticmethod
    def _logprobs(sampling: Any, lps: list[dict[int, Logprob]]) -> list[dict[int, Logprob]] | None:
        return lps if sampling.logprobs is not None else None

    async def _events(self, body: dict[str, Any]) -> AsyncIterator[dict[str, Any]]:
        """The decode instance's server-sent events, parsed; a clear error if it fails."""
        if self._http is None or self._http.closed:
            # idle connections are dropped before vLLM's server (uvicorn: 5 s) closes them: reusing
            # one it is closing fails the request ("Server disconnected"; seen once in 60 under load)
            connector = aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout)
        usage: dict[str, Any] | None = None
        try:
            async with self._http.post(self.url + "/v1/completions", json=body) as response:
                if response.status != 200:
                    text = (await response.text())[:300]
                    raise StreamError(f"the decode instance at {self.url} answered {response.status}: {text}")
                async for line in response.content:
                    data = line.decode().strip().removeprefix("data:").strip()
                    if not data or data == "[DONE]":
                        continue
                    event = json.loads(data)
                    if event.get("usage") and not event.get("choices"):
                        usage = event  # the last event: usage only
                        continue
                    yield event
        except aiohttp.ClientError as exc:
            raise StreamError(f"the decode instance at {self.url} failed: {exc}") from exc
        if usage is not None:
            yield usage

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()


def _usage_counts(usage: dict[str, Any] | None) -> dict[str, int]:
    """What the decode instance computed itself: the prompt's tokens minus those it found cached
    (loaded through the connector, or in its own prefix cache)."""
    if not usage:
        return {}
    prompt = int(usage.get("prompt_tokens") or 0)
    cached = int(((usage.get("prompt_tokens_details") or {}).get("cached_tokens")) or 0)
    return {
        "decode_prompt_tokens": prompt,
        "decode_cached_tokens": cached,
        "decode_prefilled_tokens": prompt - cached,
    }
