"""The streaming-aware KV connector (core.kv_connector) on vLLM's real scheduler and real tensors,
no model: which blocks the producer saves at which step, which ones the consumer loads, and that a
block survives the round trip through the store bit for bit."""

from __future__ import annotations

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from stream2llm.core import vllm_compat
from stream2llm.core.kv_connector import (
    KV_PARAMS_KEY,
    StreamingKVConnector,
    StreamingKVMetadata,
    tail_key,
    transfer_config,
)
from stream2llm.core.kv_store import DirectoryStore
from tests.unit.synthetic import make_request, make_scheduler, run_until_idle, step, step_with_outputs

BS = 16


def _scheduler(tiny_model, store, role: str, **kw):
    return make_scheduler(
        str(tiny_model.path), block_size=BS, kv_transfer=transfer_config(role, str(store)), **kw
    )


def _saves(output) -> list[tuple[int, str]]:
    assert isinstance(output.kv_connector_metadata, StreamingKVMetadata)
    return output.kv_connector_metadata.saves


def test_block_hash_keys_are_vllms_chained_hashes_and_follow_the_prompt(tiny_model, tmp_path):
    scheduler = _scheduler(tiny_model, tmp_path, "kv_producer")
    a = make_request(scheduler, "a", list(range(40)))
    b = make_request(scheduler, "b", list(range(32)) + [999] * 8)
    keys_a, keys_b = vllm_compat.block_hash_keys(a), vllm_compat.block_hash_keys(b)
    assert len(keys_a) == 40 // BS and keys_a == [bytes(h).hex() for h in a.block_hashes]
    assert keys_a[:2] == keys_b[:2]  # same first 32 tokens: same keys
    c = make_request(scheduler, "c", [5] + list(range(1, 40)))
    assert not set(vllm_compat.block_hash_keys(c)) & set(keys_a)  # chained: one token changes every key


def test_producer_saves_each_full_block_the_step_it_is_computed(tiny_model, tmp_path):
    scheduler = _scheduler(tiny_model, tmp_path, "kv_producer", max_num_batched_tokens=32)
    request = make_request(scheduler, "s", list(range(100, 150)))  # 50 tokens, 32 per step
    scheduler.add_request(request)
    keys = vllm_compat.block_hash_keys(request)
    first = step(scheduler)  # tokens 0-31: blocks 0 and 1 are full
    ids = vllm_compat.request_block_ids(scheduler.kv_cache_manager, "s")
    assert _saves(first) == [(ids[0], keys[0]), (ids[1], keys[1])]
    second = step(scheduler)  # tokens 32-49: block 2 (the last 2 tokens fill no block)
    ids = vllm_compat.request_block_ids(scheduler.kv_cache_manager, "s")
    assert _saves(second) == [(ids[2], keys[2])]
    run_until_idle(scheduler)
    assert request.status.name == "WAITING_FOR_STREAMING_REQ"

    scheduler.add_request(make_request(scheduler, "s", list(range(300, 330)), final=True))  # 80 in all
    outputs, finished = [], {}
    while "s" not in finished:
        out, done = step_with_outputs(scheduler)
        outputs.append(out)
        finished.update(done)
    keys = vllm_compat.block_hash_keys(request)
    saved_after = [key for out in outputs for _, key in _saves(out)]
    assert saved_after == keys[3:5]  # only the blocks the final chunk completed
    counts = finished["s"][KV_PARAMS_KEY]
    assert counts["blocks_saved"] == 5 and counts["blocks_saved_after_final"] == 2
    assert counts["block_size"] == BS and counts["block_bytes"] == 2 * 2 * BS * 32 * 2  # K+V, bf16


def test_producer_does_not_save_a_block_the_store_has(tiny_model, tmp_path):
    scheduler = _scheduler(tiny_model, tmp_path, "kv_producer")
    probe = make_request(scheduler, "probe", list(range(48)))
    DirectoryStore(tmp_path).put(vllm_compat.block_hash_keys(probe)[0], torch.zeros(1))
    request = make_request(scheduler, "r", list(range(48)), final=True, resumable=False)
    scheduler.add_request(request)
    saved = [key for _, key in _saves(step(scheduler))]
    assert saved == vllm_compat.block_hash_keys(request)[1:3]  # block 0 was stored already


def test_consumer_loads_every_stored_block_up_to_the_last_token(tiny_model, tmp_path):
    scheduler = _scheduler(tiny_model, tmp_path, "kv_consumer")
    ids = list(range(200, 264))  # 64 tokens: 4 full blocks
    keys = vllm_compat.block_hash_keys(make_request(scheduler, "probe", ids))
    store = DirectoryStore(tmp_path)
    for key in keys:
        store.put(key, torch.zeros(1))
    request = make_request(scheduler, "d", ids, resumable=False, max_tokens=4)
    scheduler.add_request(request)
    out = step(scheduler)
    blocks = vllm_compat.request_block_ids(scheduler.kv_cache_manager, "d")
    # 63 tokens loaded (block 3 up to its last slot), the last token computed: vLLM samples from it
    assert out.kv_connector_metadata.loads == list(zip(blocks[:4], keys[:4]))
    assert out.num_scheduled_tokens == {"d": 1}
    assert vllm_compat.computed_tokens(request) == 64  # 63 loaded + 1 computed


def test_producer_saves_the_final_prompts_partial_last_block_and_the_consumer_loads_it(tiny_model, tmp_path):
    producer = _scheduler(tiny_model, tmp_path, "kv_producer", max_num_batched_tokens=32)
    ids = list(range(100, 150))  # 50 tokens: 3 full blocks and 2 tokens in block 3
    request = make_request(producer, "p", ids, final=True, resumable=False, max_tokens=4)
    producer.add_request(request)
    keys = vllm_compat.block_hash_keys(request)
    assert [key for _, key in _saves(step(producer))] == keys[:2]
    second = step(producer)  # the step computing the last token saves block 2 and the partial block 3
    blocks = vllm_compat.request_block_ids(producer.kv_cache_manager, "p")
    tail = tail_key(keys[2], ids[48:])
    assert _saves(second) == [(blocks[2], keys[2]), (blocks[3], tail)]

    consumer = _scheduler(tiny_model, tmp_path, "kv_consumer")
    store = DirectoryStore(tmp_path)
    for key in [*keys, tail]:
        store.put(key, torch.zeros(1))
    decode = make_request(consumer, "d", ids, resumable=False, max_tokens=4)
    consumer.add_request(decode)
    out = step(consumer)
    blocks = vllm_compat.request_block_ids(consumer.kv_cache_manager, "d")
    assert out.kv_connector_metadata.loads == list(zip(blocks[:4], [*keys, tail]))
    assert out.num_scheduled_tokens == {"d": 1}  # 49 tokens loaded


def test_a_tail_key_names_the_whole_prompt():
    assert tail_key("ab", [1, 2]) == tail_key("ab", [1, 2])
    variants = [("ab", [1, 3]), ("ac", [1, 2]), (None, [1, 2]), ("ab", [12])]
    assert len({tail_key("ab", [1, 2]), *(tail_key(k, t) for k, t in variants)}) == 5


def test_consumer_without_the_tail_computes_it(tiny_model, tmp_path):
    scheduler = _scheduler(tiny_model, tmp_path, "kv_consumer")
    ids = list(range(50))
    keys = vllm_compat.block_hash_keys(make_request(scheduler, "probe", ids))
    store = DirectoryStore(tmp_path)
    for key in keys:
        store.put(key, torch.zeros(1))
    scheduler.add_request(make_request(scheduler, "d", ids, resumable=False))
    out = step(scheduler)
    assert [key for _, key in out.kv_connector_metadata.loads] == keys
    assert out.num_scheduled_tokens == {"d": 2}  # tokens 48 and 49


def test_consumer_stops_at_the_first_missing_block(tiny_model, tmp_path):
    scheduler = _scheduler(tiny_model, tmp_path, "kv_consumer")
    ids = list(range(64))
    keys = vllm_compat.block_hash_keys(make_request(scheduler, "probe", ids))
    store = DirectoryStore(tmp_path)
    for key in (keys[0], keys[2]):  # block 1 missing: block 2 is of no use (a prefix is needed)
        store.put(key, torch.zeros(1))
    scheduler.add_request(make_request(scheduler, "d", ids, resumable=False))
    out = step(scheduler)
    assert [key for _, key in out.kv_connector_metadata.loads] == [keys[0]]
    assert out.num_scheduled_tokens == {"d": 48}


def _worker(tiny_model, tmp_path, role: str, num_blocks: int = 64) -> StreamingKVConnector:
    scheduler = _scheduler(tiny_model, tmp_path, role, num_blocks=num_blocks)
    return StreamingKVConnector(scheduler.vllm_config, KVConnectorRole.WORKER, scheduler.kv_cache_config)


def test_a_block_survives_save_and_load_bit_for_bit(tiny_model, tmp_path):
    producer, consumer = (
        _worker(tiny_model, tmp_path, "kv_producer"),
        _worker(tiny_model, tmp_path, "kv_consumer"),
    )
    source = {f"layer{i}": torch.randn(64, 2, BS, 64, dtype=torch.bfloat16) for i in range(2)}
    target = {name: torch.zeros_like(t) for name, t in source.items()}
    producer.register_kv_caches(source)
    consumer.register_kv_caches(target)
    producer.bind_connector_metadata(StreamingKVMetadata(saves=[(5, "ab" * 32), (6, "cd" * 32)]))
    producer.wait_for_save()
    consumer.bind_connector_metadata(
        StreamingKVMetadata(loads=[(9, "ab" * 32), (1, "cd" * 32), (2, "ef" * 32)])
    )
    consumer.start_load_kv(None)
    for name in source:
        assert torch.equal(target[name][9], source[name][5]) and torch.equal(target[name][1], source[name][6])
        assert not target[name][2].any() and not target[name][5].any()  # nothing else written
    assert consumer.get_block_ids_with_load_errors() == {2}  # "ef...": never stored, vLLM recomputes it
    assert consumer.get_block_ids_with_load_errors() == set()


def test_the_store_evicts_its_oldest_blocks_past_capacity(tmp_path):
    store = DirectoryStore(tmp_path, capacity_bytes=3 * 64)
    for key in ("a1", "b2", "c3", "d4"):
        assert store.put(key, torch.zeros(16)) == 64
    assert [store.has(k) for k in ("a1", "b2", "c3", "d4")] == [False, True, True, True]
    assert store.put("d4", torch.zeros(16)) == 0  # already there
    assert torch.equal(store.get("c3"), torch.zeros(16))
