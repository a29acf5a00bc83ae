"""The decode half of a disaggregated deployment: a decode backend that answers on another instance.

With ``EngineConfig.decode_url`` set, every chunk is prefilled on this (prefill) instance exactly
as before, while ``core.kv_connector`` saves each full block as it is computed. The final chunk
samples the answer's first token here with the caller's parameters (as DistServe does), and it
reaches the caller at once: the hop to the decode instance moves to the second token. Unless that
token ended the answer, handover hands the prompt and the first token to ``RemoteDecode.decode``,
which asks the decode instance (a plain vLLM OpenAI server whose connector loads the stored
blocks) for the rest over vLLM's token-in, token-out API (the lightest it serves: no text either
way): it computes one token (the prompt's last, to replay a first token sampled
with a seed; else the first token's own KV) and generates, and its answer streams back.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from vllm.sampling_params import SamplingType

from stream2llm.core.protocol import ChunkMeta
from stream2llm.engine.decode import FinalPrompt
from stream2llm.engine.outputs import Generated
from stream2llm.errors import StreamError


class _FirstTokenDiffers(Exception):
    """A replayed first token that is not the one the prefill instance sampled (numerics)."""


KEEPALIVE_S = 2.0  # below the decode server's keep-alive timeout
SILENCE_S = 60.0  # a decode instance that sends nothing this long has failed (it computes one token)


def first_token_only(sampling: Any, pulls_kv: bool = False) -> Any:
    """The final chunk's parameters here: the caller's, for one token. The prefill instance
    samples the answer's first token (stop token ids, ``min_tokens``, seed and logprobs as asked)
    and streams it at once; the decode instance goes on from it (``continuation``)."""
    params = sampling.clone()
    params.max_tokens, params.min_tokens = 1, min(sampling.min_tokens, 1)
    return mark_remote_decode(params, pulls_kv)


def continuation(sampling: Any) -> Any:
    """The decode instance's parameters: the caller's, less the first token already sampled."""
    params = sampling.clone()
    params.max_tokens, params.min_tokens = sampling.max_tokens - 1, max(sampling.min_tokens - 1, 0)
    return params


def mark_remote_decode(params: Any, pulls_kv: bool) -> Any:
    """A decode instance that pulls the KV (NIXL) needs vLLM's P/D request flag on the prefill's
    request (vLLM reads it from a streaming request's first chunk), so that the prefill's
    connector keeps the blocks and returns where they are."""
    if not pulls_kv:
        return params
    params = params.clone()
    params.extra_args = {**(params.extra_args or {}), "kv_transfer_params": {"do_remote_decode": True}}
    return params


GENERATE_PATH = "/inference/v1/generate"  # vLLM's token-in, token-out API (``--enable-scale-out``)
SAMPLING_FIELDS = (
    "max_tokens",
    "min_tokens",
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "seed",
    "presence_penalty",
    "frequency_penalty",
    "repetition_penalty",
    "ignore_eos",
    "logprobs",
)


def generate_body(
    model: str, ids: list[int], sampling: Any, cache_salt: str | None, kv_params: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The decode instance's ``/inference/v1/generate`` body: token ids in, token ids out, the
    session's sampling parameters as vLLM's own; nothing is detokenized there (the session
    decodes its text here, as for every answer)."""
    params = {name: getattr(sampling, name) for name in SAMPLING_FIELDS}
    params |= {"stop_token_ids": list(sampling.stop_token_ids or ()), "detokenize": False}
    body: dict[str, Any] = {
        "model": model,
        "token_ids": ids,
        "sampling_params": params,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if cache_salt is not None:
        body["cache_salt"] = cache_salt
    if kv_params:
        body["kv_transfer_params"] = kv_params
    return body


def _token_logprobs(raw: dict[str, Any] | None) -> list[dict[int, float]]:
    """vLLM's streamed generate logprobs (one entry per token, its top candidates by id) as the
    session's."""
    if not raw:
        return []
    return [
        {int(top["token_id"]): float(top["logprob"]) for top in entry.get("top_logprobs") or ()}
        for entry in raw.get("content") or ()
    ]


class RemoteDecode:
    """A decode backend: the final chunk samples the first token here; the instance at ``url``
    answers the rest."""

    def __init__(self, url: str, model: str, *, pulls_kv: bool = False, silence_s: float = SILENCE_S) -> None:
        self.url = url.rstrip("/")
        self.model = model
        self.pulls_kv = pulls_kv
        self.silence_s = silence_s
        self._http: aiohttp.ClientSession | None = None

    def chunk_sampling(self, params: Any, meta: ChunkMeta) -> Any:
        """The final chunk samples one throw-away token here; a pulling decode instance needs
        vLLM's P/D flag on every chunk."""
        if meta.final:
            return first_token_only(params, self.pulls_kv)
        return mark_remote_decode(params, self.pulls_kv)

    def ends_here(self, finish_reason: str, sampling: Any) -> bool:
        """The first token ends the answer when it stops it (a stop token, EOS) or the caller
        asked for one token; otherwise its finish is only the one-token cap of ``first_token_only``."""
        return finish_reason != "length" or sampling.max_tokens <= 1

    async def decode(self, prompt: FinalPrompt, sampling: Any, first_token: int) -> AsyncIterator[Generated]:
        """The rest of the answer after ``first_token`` (sampled here), cumulatively; the last one
        carries what the decode instance computed itself (``counters["kv_transfer"]``).

        Greedy and random sampling continue after our token: the decode instance gets the prompt
        and the first token, the caller's parameters less that token (``continuation``), computes
        the first token's KV and samples the second, so the hop costs no more than one step there.
        Seeded sampling is replayed: the decode instance gets the prompt prefilled here, samples
        the first token again and goes on, so that its generator advances exactly as on one
        instance (vLLM cannot carry a generator's state across); the repeated first token is
        checked against ours and dropped, and one that came out different continues after ours."""
        if sampling.sampling_type == SamplingType.RANDOM_SEED:
            try:
                async for rest in self._replayed(prompt, sampling, first_token):
                    yield rest
                return
            except _FirstTokenDiffers:
                pass  # nothing was yielded: the decode instance's first token is its first output
        async for rest in self._answer(prompt, [*prompt.token_ids, first_token], continuation(sampling)):
            yield rest

    async def _replayed(
        self, prompt: FinalPrompt, sampling: Any, first_token: int
    ) -> AsyncIterator[Generated]:
        async for answer in self._answer(prompt, prompt.token_ids, sampling):
            if answer.token_ids[:1] != [first_token]:
                raise _FirstTokenDiffers(answer.token_ids[:1])
            rest = answer.token_ids[1:]
            if rest or answer.finish_reason is not None:
                logprobs = answer.logprobs[1:] if answer.logprobs is not None else None
                yield Generated(rest, logprobs, answer.finish_reason, answer.counters)

    async def _answer(self, prompt: FinalPrompt, ids: list[int], sampling: Any) -> AsyncIterator[Generated]:
        """The decode instance's answer to ``ids``, cumulatively, then what it computed itself."""
        body = generate_body(self.model, ids, sampling, prompt.cache_salt, prompt.kv_params)
        ids_out: list[int] = []
        lps: list[dict[int, float]] = []
        counts: dict[str, int] = {}
        finish: str | None = None
        async for event in self._events(body, prompt.trace_headers):
            counts.update(_usage_counts(event.get("usage")))
            for choice in event.get("choices") or ():
                ids_out += choice.get("token_ids") or []
                lps += _token_logprobs(choice.get("logprobs"))
                finish = choice.get("finish_reason") or finish
                if finish is None:
                    yield Generated(list(ids_out), self._logprobs(sampling, lps))
        if finish is None:
            raise StreamError(f"the decode instance at {self.url} ended its answer without a finish reason")
        yield Generated(list(ids_out), self._logprobs(sampling, lps), finish, {"kv_transfer": counts})

    @staticmethod
    def _logprobs(sampling: Any, lps: list[dict[int, float]]) -> list[dict[int, float]] | None:
        return list(lps) if sampling.logprobs is not None else None

    async def _events(self, body: dict[str, Any], headers: dict[str, str]) -> AsyncIterator[dict[str, Any]]:
        """The decode instance's server-sent events, parsed; a clear error if it fails."""
        if self._http is None or self._http.closed:
            # idle connections are dropped before vLLM's server (uvicorn: 5 s) closes them: reusing
            # one it is closing fails the request ("Server disconnected"; seen once in 60 under load)
            connector = aiohttp.TCPConnector(keepalive_timeout=KEEPALIVE_S)
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=self.silence_s)
            self._http = aiohttp.ClientSession(connector=connector, timeout=timeout)
        usage: dict[str, Any] | None = None
        try:
            post = self._http.post(self.url + GENERATE_PATH, json=body, headers=headers)
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
        except aiohttp.ServerTimeoutError:
            raise StreamError(
                f"the decode instance at {self.url} sent nothing for {self.silence_s:g} s"
            ) from None
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
