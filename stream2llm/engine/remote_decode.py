"""The decode half of a disaggregated deployment: a decode backend that answers on another instance.

With ``EngineConfig.decode_url`` set, every chunk is prefilled on this (prefill) instance exactly
as before, while ``core.kv_connector`` saves each full block as it is computed; the final chunk
only prefills (one throw-away token, like an intermediate chunk); then handover hands the whole
prompt's token ids to ``RemoteDecode.decode``, which asks the decode instance (a plain vLLM OpenAI
server whose connector loads the stored blocks, computes the rest and generates) and streams its
answer back as ``Generated``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp

from stream2llm.core.protocol import ChunkMeta
from stream2llm.engine.decode import FinalPrompt
from stream2llm.engine.outputs import Generated
from stream2llm.errors import StreamError

KEEPALIVE_S = 2.0  # below the decode server's keep-alive timeout
TOKEN_PREFIX = "token_id:"  # vLLM's return_tokens_as_token_ids spelling of a logprob's token


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


def _token_logprobs(raw: dict[str, Any] | None) -> list[dict[int, float]]:
    """vLLM's streamed completion logprobs (top_logprobs keyed ``token_id:N``) as the session's."""
    if not raw:
        return []
    out = []
    for top in raw.get("top_logprobs") or ():
        out.append({int(k.removeprefix(TOKEN_PREFIX)): float(v) for k, v in (top or {}).items()})
    return out


class RemoteDecode:
    """A decode backend: the final chunk only prefills here; the instance at ``url`` answers."""

    answers_here = False

    def __init__(self, url: str, model: str, *, pulls_kv: bool = False) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.pulls_kv = pulls_kv
        self._http: aiohttp.ClientSession | None = None

    def chunk_sampling(self, params: Any, meta: ChunkMeta) -> Any:
        """The final chunk samples one throw-away token here; a pulling decode instance needs
        vLLM's P/D flag on every chunk."""
        if meta.final:
            return prefill_only(params, self.pulls_kv)
        return mark_remote_decode(params, self.pulls_kv)

    async def decode(self, prompt: FinalPrompt, sampling: Any) -> AsyncIterator[Generated]:
        """The decode instance's answer, cumulatively; the last one carries what it computed itself
        (``counters["kv_transfer"]``)."""
        body = completion_body(self.model, prompt.token_ids, sampling, prompt.cache_salt, prompt.kv_params)
        ids: list[int] = []
        lps: list[dict[int, float]] = []
        counts: dict[str, int] = {}
        finish: str | None = None
        async for event in self._events(body, prompt.trace_headers):
            counts.update(_usage_counts(event.get("usage")))
            for choice in event.get("choices") or ():
                ids += choice.get("token_ids") or []
                lps += _token_logprobs(choice.get("logprobs"))
                finish = choice.get("finish_reason") or finish
                if finish is None:
                    yield Generated(list(ids), self._logprobs(sampling, lps))
        if finish is None:
            raise StreamError(f"the decode instance at {self.url} ended its answer without a finish reason")
        yield Generated(list(ids), self._logprobs(sampling, lps), finish, {"kv_transfer": counts})

    @staticmethod
    def _logprobs(sampling: Any, lps: list[dict[int, float]]) -> list[dict[int, float]] | None:
        return list(lps) if sampling.logprobs is not None else None

    async def _events(self, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """The decode instance's server-sent events, parsed; a clear error if it fails."""
        if self._http is None or self._http.closed:
            # idle connections are dropped before vLLM's server (uvicorn: 5 s) closes them: reusing
            # one it is closing fails the request ("Server disconnected"; seen once in 60 under load)
            connector = aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout)
        usage: dict[str, Any] | None = None
        try:
            post = self._http.post(self.url + "/v1/completions", json=body, headers=headers)
            async with post as response:
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
