"""A streaming-aware KV connector for prefill/decode disaggregation, on vLLM's ``KVConnectorBase_V1``.

vLLM loads it by ``kv_connector_module_path`` (no fork): in the prefill instance (stream2llm's
engine, ``kv_role="kv_producer"``) and in the decode instance (a plain vLLM engine,
``kv_role="kv_consumer"``). What makes it streaming-aware: the producer saves every full block the
step it is computed, whichever chunk computed it, so while retrieval goes on the prompt's KV is
already moving; when the final chunk comes, only its own blocks are left to save. vLLM's own
ExampleConnector saves a request's first scheduled step only, keyed by the whole prompt, so a
streamed session's chunks would never be stored.

Blocks are keyed by vLLM's chained block hashes (``core.kv_store``). When a request's final prompt
is computed, the producer also saves its partial last block, keyed by the last full block's key and
the tokens it holds (``tail_key``). The decode instance loads the longest run of leading blocks it
finds, partial last block included, up to the prompt's last token (vLLM must compute at least one
token to sample from): with every block stored it computes that one token, as vLLM's own P/D
connectors do. A block that vanished between the lookup and the load is reported to vLLM, which
recomputes it.

The same connector is one engine's KV tier (``kv_role="kv_both"``, ``saves="evicted"``): it saves
nothing as it is computed; when the broker evicts a parked session by offloading it (``offload``),
the session's full blocks are copied to the store before anything can overwrite them (when the
worker binds the next step's metadata, before that step's loads and forward pass), and when the
session resumes its stored blocks load back as external hits, so only what the prefix cache and
the tier both lost is recomputed. Every block carries a checksum: a missing or damaged one is
reported to vLLM, which recomputes it (``kv_load_failure_policy="recompute"``).

Configuration (``kv_connector_extra_config``): ``store_path`` (a directory; default under
``/dev/shm``), ``capacity_bytes`` (least recently used blocks are removed past it), ``saves``
(``computed``: every full block as it is computed, a P/D producer's default; ``evicted``: only
offloaded victims' blocks).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)

from stream2llm.core import vllm_compat as compat
from stream2llm.core.kv_store import (
    DEFAULT_CAPACITY_BYTES,
    DEFAULT_ROOT,
    BlockStore,
    BlockUnreadable,
    DirectoryStore,
)
from stream2llm.core.protocol import KV_PARAMS_KEY, ChunkMeta
from stream2llm.tokens import ceil_div

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.v1.kv_cache_interface import KVCacheConfig

MODULE_PATH = __name__
CONNECTOR_NAME = "StreamingKVConnector"
SAVES = ("computed", "evicted")


@dataclass
class StreamingKVMetadata(KVConnectorMetadata):
    """One step's work for the worker: (block id, key) pairs to save after the forward pass and to
    load before it."""

    saves: list[tuple[int, str]] = field(default_factory=list)
    loads: list[tuple[int, str]] = field(default_factory=list)
    offloads: list[tuple[int, str]] = field(default_factory=list)  # evicted blocks: saved before loads


@dataclass
class _Saved:
    """What the producer saved for one request: keys seen, blocks written before/after its final chunk."""

    keys: set[str] = field(default_factory=set)
    before_final: int = 0
    after_final: int = 0


class StreamingKVConnector(KVConnectorBase_V1):
    """Saves each full block as it is computed (producer) and loads every stored leading block (consumer)."""

    def __init__(
        self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig
    ) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = self._kv_transfer_config
        root = transfer.get_from_extra_config("store_path", str(DEFAULT_ROOT / "stream2llm-kv"))
        capacity = int(transfer.get_from_extra_config("capacity_bytes", DEFAULT_CAPACITY_BYTES))
        saves = transfer.get_from_extra_config("saves", "computed")
        if saves not in SAVES:
            raise ValueError(f"kv_connector_extra_config saves={saves!r}: expected one of {', '.join(SAVES)}")
        self.store: BlockStore = DirectoryStore(root, capacity)
        self.block_size = vllm_config.cache_config.block_size
        self.saves_kv = transfer.kv_role in ("kv_producer", "kv_both") and saves == "computed"
        self.offloads_kv = transfer.kv_role in ("kv_producer", "kv_both")
        self.loads_kv = transfer.kv_role in ("kv_consumer", "kv_both")
        self._num_blocks = kv_cache_config.num_blocks
        self._block_bytes = _block_bytes(kv_cache_config)
        # scheduler side
        self._requests: dict[str, Any] = {}
        self._saved: dict[str, _Saved] = {}
        self._plans: dict[str, tuple[int, list[str]]] = {}  # request id -> (first block, keys to load)
        self._loads: list[tuple[int, str]] = []
        self._offloads: list[tuple[int, str]] = []
        self.tier = TierCounters()
        self.loaded_last: list[tuple[str, int]] = []  # (request, tokens) the store gave or took back
        self._loading: dict[int, tuple[str, int]] = {}  # block id -> (request, tokens) of the last loads
        # worker side
        self._layers: Layers = []  # (KV tensor, its block dimension), by layer name
        self._load_errors: set[int] = set()

    @property
    def bytes_per_token(self) -> int:
        """KV bytes one token takes over every layer (what offloading it moves)."""
        return self._block_bytes // self.block_size

    @property
    def requires_kv_delivery(self) -> bool:
        return False  # a save that never happened is a cache miss: the decode instance computes it

    # -- scheduler side: the producer ------------------------------------------------------------

    def on_new_request(self, request: Any) -> None:
        if self.saves_kv:
            self._requests[request.request_id] = request

    def build_connector_meta(self, scheduler_output: Any) -> StreamingKVMetadata:
        meta = StreamingKVMetadata(loads=self._loads, offloads=self._offloads)
        self._loads, self._offloads = [], []
        if self.saves_kv:
            for request_id, n in compat.scheduled_tokens(scheduler_output).items():
                if (request := self._requests.get(request_id)) is not None:
                    computed = compat.computed_tokens(request) + n
                    meta.saves += self._blocks_to_save(request, computed)
                    meta.saves += self._tail_to_save(request, computed)
        return meta

    def _blocks_to_save(self, request: Any, computed_after_step: int) -> list[tuple[int, str]]:
        """The full blocks this step completes (or that a prefix-cache hit brought) not stored yet."""
        keys = compat.block_hash_keys(request)[: computed_after_step // self.block_size]
        saved = self._saved.setdefault(request.request_id, _Saved())
        new = [(i, k) for i, k in enumerate(keys) if k not in saved.keys]
        if not new:
            return []
        block_ids = compat.request_block_ids(self._kv_cache_manager, request.request_id)
        final = ChunkMeta.of(request.sampling_params).final
        out = []
        for i, key in new:
            saved.keys.add(key)
            if self.store.has(key):
                continue  # a request with the same prefix stored it
            out.append((block_ids[i], key))
            if final:
                saved.after_final += 1
            else:
                saved.before_final += 1
        return out

    def _tail_to_save(self, request: Any, computed_after_step: int) -> list[tuple[int, str]]:
        """The final prompt's partial last block, once this step computes the prompt's last token
        (earlier chunks' tails are overwritten by the chunks after them: never saved)."""
        prompt = compat.prompt_length(request)
        full = prompt // self.block_size
        if computed_after_step < prompt or prompt == full * self.block_size:
            return []
        if compat.is_stream_chunk(request) and not ChunkMeta.of(request.sampling_params).final:
            return []  # a session's chunk that more will follow
        keys = compat.block_hash_keys(request)[:full]
        tokens = compat.token_ids_at(request, full * self.block_size, prompt)
        key = tail_key(keys[-1] if keys else None, tokens)
        saved = self._saved.setdefault(request.request_id, _Saved())
        if key in saved.keys:
            return []
        saved.keys.add(key)
        if self.store.has(key):
            return []
        saved.after_final += 1
        block_id = compat.request_block_ids(self._kv_cache_manager, request.request_id)[full]
        return [(block_id, key)]

    # -- scheduler side: the tier ----------------------------------------------------------------

    def offload(self, request: Any) -> int:
        """Queue the full blocks a victim holds for saving, before the broker frees them; returns
        the blocks queued (those the store has already are not copied again). The copy runs at
        the start of the next step's forward pass, before any load or computation can reuse the
        freed blocks."""
        if not self.offloads_kv:
            raise RuntimeError("this KV connector has no tier: its role does not save (kv_role)")
        full = compat.computed_tokens(request) // self.block_size
        keys = compat.block_hash_keys(request)[:full]
        block_ids = compat.request_block_ids(self._kv_cache_manager, request.request_id)
        queued = [(block_ids[i], key) for i, key in enumerate(keys) if not self.store.has(key)]
        self._offloads += queued
        self.tier.blocks_offloaded += len(queued)
        self.tier.bytes_offloaded += len(queued) * self._block_bytes
        return len(queued)

    def update_connector_output(self, connector_output: Any) -> None:
        """vLLM's report of a step's transfers: the blocks whose load failed are counted, and
        taken back from their requests' loaded tokens (vLLM recomputes them)."""
        failed = connector_output.invalid_block_ids or ()
        self.tier.blocks_load_failed += len(failed)
        for block_id in failed:
            if (owner := self._loading.get(block_id)) is not None:
                self.loaded_last.append((owner[0], -owner[1]))
        self._loading.clear()

    def request_finished(self, request: Any, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Report what was saved for the request (the front end gets it with the final output)."""
        rid = request.request_id
        self._requests.pop(rid, None)
        self._plans.pop(rid, None)
        saved = self._saved.pop(rid, None)
        if saved is None:
            return False, None
        counts = {
            "blocks_saved": saved.before_final + saved.after_final,
            "blocks_saved_after_final": saved.after_final,
            "block_bytes": self._block_bytes,
            "block_size": self.block_size,
        }
        return False, {KV_PARAMS_KEY: counts}

    # -- scheduler side: the consumer ------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int, bool]:
        """Tokens beyond ``num_computed_tokens`` covered by stored leading blocks, up to the
        prompt's last token (loaded in the step that schedules the request, before its forward
        pass: synchronous)."""
        if not self.loads_kv:
            return 0, False
        loadable = compat.tokens_held(request) - 1
        keys = self._keys_covering(request, loadable)
        first = n = num_computed_tokens // self.block_size
        while n < len(keys) and self.store.has(keys[n]):
            n += 1
        if n <= first:
            return 0, False
        self._plans[request.request_id] = (first, keys[first:n])
        return min(n * self.block_size, loadable) - num_computed_tokens, False

    def _keys_covering(self, request: Any, tokens: int) -> list[str]:
        """Keys of the blocks that hold the request's first ``tokens`` tokens: full blocks by
        vLLM's hash; the block holding the last of them, if it is not full within ``tokens``, is
        the first the store has of: that block full in this prompt (vLLM's hash), the prefill's
        partial prompt tail (``tail_key``), or that tail one token shorter (the prefill instance
        sampled the first token, and this prompt ends with it)."""
        full = tokens // self.block_size
        hashes = compat.block_hash_keys(request)
        if tokens % self.block_size == 0:
            return hashes[:full]
        start, held = full * self.block_size, compat.tokens_held(request)
        last = hashes[full - 1] if full else None
        candidates = hashes[full : full + 1] + [
            tail_key(last, compat.token_ids_at(request, start, end))
            for end in (held, held - 1)
            if end - start < self.block_size
        ]
        return [*hashes[:full], next((key for key in candidates if self.store.has(key)), candidates[0])]

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        plan = self._plans.pop(request.request_id, None)
        if num_external_tokens <= 0 or plan is None:
            return
        first, keys = plan
        block_ids = compat.group_block_ids(blocks)
        n = ceil_div(num_external_tokens, self.block_size)
        self._loads += [(block_ids[first + j], keys[j]) for j in range(n)]
        for j in range(n):
            tokens = min(self.block_size, num_external_tokens - j * self.block_size)
            self._loading[block_ids[first + j]] = (request.request_id, tokens)
        self.tier.blocks_loaded += n
        self.tier.bytes_loaded += n * self._block_bytes
        self.loaded_last.append((request.request_id, num_external_tokens))

    # -- worker side -----------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._layers = [(t, _block_dim(t, self._num_blocks)) for _, t in sorted(kv_caches.items())]

    def bind_connector_metadata(self, connector_metadata: KVConnectorMetadata) -> None:
        """Take the step's metadata and copy out the blocks evicted for it, now: vLLM binds the
        metadata before the forward pass that may reuse those blocks, while it calls
        ``start_load_kv`` only after the forward in a step without synchronous loads."""
        super().bind_connector_metadata(connector_metadata)
        if isinstance(connector_metadata, StreamingKVMetadata):
            self._save(connector_metadata.offloads)

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StreamingKVMetadata)
        for block_id, key in meta.loads:
            try:
                copy_in(self.store, self._layers, block_id, key)
            except BlockUnreadable:  # removed or damaged since the lookup: vLLM recomputes it
                self._load_errors.add(block_id)

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # every block was loaded before the forward pass

    def save_kv_layer(
        self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any
    ) -> None:
        return  # saved whole after the forward pass (wait_for_save): one file per block

    def wait_for_save(self) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, StreamingKVMetadata)
        self._save(meta.saves)

    def _save(self, blocks: list[tuple[int, str]]) -> None:
        copy_out(self.store, self._layers, blocks)

    def get_block_ids_with_load_errors(self) -> set[int]:
        errors, self._load_errors = self._load_errors, set()
        return errors


Layers = list[tuple[torch.Tensor, int]]  # each layer's KV tensor and the dimension that indexes blocks


def copy_out(store: BlockStore, layers: Layers, blocks: list[tuple[int, str]]) -> None:
    """Copy KV blocks (id, key) from every layer into the store, one entry per block."""
    for block_id, key in blocks:
        block = torch.stack([cache.select(dim, block_id) for cache, dim in layers])
        store.put(key, block.cpu())  # host memory, whatever device the KV is on


def copy_in(store: BlockStore, layers: Layers, block_id: int, key: str) -> None:
    """Copy one stored block into every layer's KV at ``block_id``; ``BlockUnreadable`` if the
    store cannot give it back intact."""
    block = store.get(key)
    if block.shape[0] != len(layers):
        raise BlockUnreadable(f"KV block {key} holds {block.shape[0]} layers; this model has {len(layers)}")
    for (cache, dim), layer_block in zip(layers, block, strict=True):
        target = cache.select(dim, block_id)
        if layer_block.shape != target.shape or layer_block.dtype != target.dtype:
            raise BlockUnreadable(
                f"KV block {key} is {tuple(layer_block.shape)} {layer_block.dtype}, not this KV's"
            )
        target.copy_(layer_block)


@dataclass
class TierCounters:
    """What the tier moved since the engine started (scheduler side: planned copies, and the
    loads vLLM reported failed)."""

    blocks_offloaded: int = 0
    bytes_offloaded: int = 0
    blocks_loaded: int = 0
    bytes_loaded: int = 0
    blocks_load_failed: int = 0


def tail_key(last_full_key: str | None, tokens: list[int]) -> str:
    """The store key of a prompt's partial last block: chained like vLLM's block hashes (the key of
    the full block before it, then its own tokens), so it names the whole prompt."""
    text = f"{last_full_key or 'root'}:{','.join(map(str, tokens))}"
    return hashlib.sha256(text.encode()).hexdigest()


def _block_dim(cache: torch.Tensor, num_blocks: int) -> int:
    """The dimension of a layer's KV tensor that indexes blocks (CPU: 0, [blocks, heads, tokens,
    2*head size]; some GPU backends: 1, [2, blocks, ...])."""
    for dim in (0, 1):
        if cache.shape[dim] == num_blocks:
            return dim
    raise RuntimeError(
        f"cannot find the block dimension ({num_blocks} blocks) of a KV tensor {tuple(cache.shape)}"
    )


def _block_bytes(kv_cache_config: Any) -> int:
    """Bytes one block holds over every layer (what a save or load of one block moves)."""
    return sum(
        group.kv_cache_spec.page_size_bytes * len(group.layer_names)
        for group in kv_cache_config.kv_cache_groups
    )


def transfer_config(
    role: str, store_path: str, capacity_bytes: int = DEFAULT_CAPACITY_BYTES, saves: str = "computed"
) -> dict[str, Any]:
    """vLLM's ``kv_transfer_config`` (as a dict: ``--kv-transfer-config`` JSON) for this connector."""
    return {
        "kv_connector": CONNECTOR_NAME,
        "kv_connector_module_path": MODULE_PATH,
        "kv_role": role,
        "kv_load_failure_policy": "recompute",  # a block missing or damaged is recomputed
        "kv_connector_extra_config": {
            "store_path": store_path,
            "capacity_bytes": capacity_bytes,
            "saves": saves,
        },
    }


def tier_config(store_path: str, capacity_bytes: int) -> dict[str, Any]:
    """One engine's KV tier: offloaded victims' blocks saved and loaded back by this connector."""
    return transfer_config("kv_both", store_path, capacity_bytes, saves="evicted")
