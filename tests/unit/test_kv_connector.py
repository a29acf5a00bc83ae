"""The streaming-aware KV connector (core.kv_connector) on vLLM's real scheduler and real tensors,
no model: which blocks the producer saves at which step, which ones the consumer loads, and that a
block survives the round trip through the store bit for bit."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorRole

from stream2llm.core import vllm_compat
from stream2llm.core.kv_connector import (
    KV_PARAMS_KEY,
    StreamingKVConnector,
    StreamingKVMetadata,
    tail_key,
    tier_config,
    transfer_config,
)
from stream2llm.core.kv_store import BlockUnreadable, DirectoryStore
from stream2llm.core.step_log import read_step_log
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


@pytest.mark.parametrize("prompt_len", [50, 63])  # a partial tail; a tail that the first token fills
def test_a_consumer_whose_prompt_ends_with_the_first_token_loads_the_whole_prefilled_prompt(
    tiny_model, tmp_path, prompt_len
):
    """The prefill instance sampled the first token: the decode instance's prompt is the prefill's
    plus that token, and it loads every block the prefill stored (its partial tail included),
    computing only the first token."""
    ids = list(range(100, 100 + prompt_len))
    producer = _scheduler(tiny_model, tmp_path, "kv_producer")
    keys = vllm_compat.block_hash_keys(make_request(producer, "probe", ids))
    full = prompt_len // BS
    tail = tail_key(keys[full - 1], ids[full * BS :])
    store = DirectoryStore(tmp_path)
    for key in [*keys[:full], tail]:
        store.put(key, torch.zeros(1))
    consumer = _scheduler(tiny_model, tmp_path, "kv_consumer")
    decode = make_request(consumer, "d", [*ids, 7], resumable=False, max_tokens=4)
    consumer.add_request(decode)
    out = step(consumer)
    blocks = vllm_compat.request_block_ids(consumer.kv_cache_manager, "d")
    assert out.kv_connector_metadata.loads == list(zip(blocks[: full + 1], [*keys[:full], tail]))
    assert out.num_scheduled_tokens == {"d": 1}  # the first token: the prompt's KV was all loaded


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


# -- the connector as one engine's KV tier ------------------------------------------------------


def test_an_offloaded_victims_full_blocks_are_copied_out_before_its_blocks_are_reused(tiny_model, tmp_path):
    """The broker evicts a parked session to the tier: its full blocks (by block id and vLLM's
    key) go out with the very step that may reuse them, and its partial tail is not saved."""
    scheduler = make_scheduler(
        str(tiny_model.path),
        num_blocks=20,
        block_size=BS,
        policy="stream2llm",
        kv_transfer=tier_config(str(tmp_path / "tier"), 1 << 30),
        preemption="offload",
        step_log=str(tmp_path / "steps.jsonl"),
    )
    victim = make_request(scheduler, "a", list(range(1000, 1150)))  # 9 full blocks and 6 tokens
    scheduler.add_request(victim)
    run_until_idle(scheduler)
    keys = vllm_compat.block_hash_keys(victim)[: 150 // BS]
    held = vllm_compat.request_block_ids(scheduler.kv_cache_manager, "a")[: 150 // BS]
    newcomer = make_request(scheduler, "c", list(range(3000, 3250)), final=True, resumable=False)
    scheduler.add_request(newcomer)  # needs 16 of the 19 blocks: the parked session must go
    out = step(scheduler)
    assert victim.num_computed_tokens == 0 and out.num_scheduled_tokens.get("c")
    assert out.kv_connector_metadata.offloads == list(zip(held, keys, strict=True))
    assert scheduler.broker.offloads == 1 and scheduler.get_kv_connector().tier.blocks_offloaded == 9
    run_until_idle(scheduler)
    (logged,) = [s for s in read_step_log(tmp_path / "steps.jsonl") if "evicted" in s]
    block_bytes = scheduler.get_kv_connector().bytes_per_token * BS
    assert logged["evicted"] == [["a", 150, 10, "offload"]] and logged["tier"] == [9 * block_bytes, 0]


def test_the_tier_loads_what_the_prefix_cache_lost_and_counts_it(tiny_model, tmp_path):
    """On resume, blocks still in vLLM's prefix cache are hits; the stored rest is loaded from the
    tier (external hits), not recomputed; the tier's counters and the request's count it."""
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=64, block_size=BS, kv_transfer=tier_config(str(tmp_path), 1 << 30)
    )
    tier = scheduler.get_kv_connector()
    request = make_request(scheduler, "s", list(range(100, 180)))  # 5 full blocks
    keys = vllm_compat.block_hash_keys(request)
    for key in keys[2:]:  # what an earlier offload left: blocks 2-4 (0-1 are found in the cache)
        tier.store.put(key, torch.zeros(2, 2, BS, 64, dtype=torch.bfloat16))
    scheduler.add_request(make_request(scheduler, "warm", list(range(100, 132)), resumable=False))
    run_until_idle(scheduler)
    scheduler.add_request(request)
    out = step(scheduler)
    ids = vllm_compat.request_block_ids(scheduler.kv_cache_manager, "s")
    assert out.kv_connector_metadata.loads == [(ids[i], keys[i]) for i in (2, 3, 4)]
    assert (
        out.num_scheduled_tokens["s"] == 80 - 5 * BS + 1
    )  # the last token is computed: vLLM samples from it
    assert tier.tier.blocks_loaded == 3 and scheduler.accounting.counters("s").tokens_loaded == 3 * BS - 1


def test_a_failed_load_is_taken_back_from_the_requests_loaded_tokens(tiny_model, tmp_path):
    scheduler = make_scheduler(
        str(tiny_model.path), num_blocks=64, block_size=BS, kv_transfer=tier_config(str(tmp_path), 1 << 30)
    )
    tier = scheduler.get_kv_connector()
    request = make_request(scheduler, "s", list(range(100, 150)))
    for key in vllm_compat.block_hash_keys(request):
        tier.store.put(key, torch.zeros(2, 2, BS, 64, dtype=torch.bfloat16))
    scheduler.add_request(request)
    out = step(scheduler)
    (first_block, _), *_ = out.kv_connector_metadata.loads
    tier.update_connector_output(SimpleNamespace(invalid_block_ids={first_block}))
    scheduler._count_tier_loads()
    assert tier.tier.blocks_load_failed == 1
    assert scheduler.accounting.counters("s").tokens_loaded == 3 * BS - BS  # the failed block's tokens


def test_evicted_blocks_are_saved_when_the_step_is_bound_before_any_load(tiny_model, tmp_path):
    """vLLM calls start_load_kv after the forward pass in a step without synchronous loads, so the
    evicted blocks are copied out when the metadata is bound; a load into a freed block follows."""
    worker = _worker(tiny_model, tmp_path, "kv_both")
    kv = {f"layer{i}": torch.randn(64, 2, BS, 64, dtype=torch.bfloat16) for i in range(2)}
    before = {name: t[3].clone() for name, t in kv.items()}
    worker.register_kv_caches(kv)
    worker.store.put("ee" * 32, torch.ones(2, 2, BS, 64, dtype=torch.bfloat16))
    worker.bind_connector_metadata(StreamingKVMetadata(offloads=[(3, "ab" * 32)], loads=[(3, "ee" * 32)]))
    assert torch.equal(worker.store.get("ab" * 32)[0], before["layer0"])  # saved on binding
    worker.start_load_kv(None)
    assert all(torch.equal(t[3], torch.ones_like(t[3])) for t in kv.values())  # then the load


def test_the_store_keeps_the_least_recently_used_out_first(tmp_path):
    store = DirectoryStore(tmp_path, capacity_bytes=3 * 64)
    for key in ("a1", "b2", "c3"):
        store.put(key, torch.zeros(16))
    store.get("a1")  # a1 used: b2 is now the least recently used
    store.put("d4", torch.zeros(16))
    assert [store.has(k) for k in ("a1", "b2", "c3", "d4")] == [True, False, True, True]
    assert store.bytes_held == 3 * 64 == store.bytes_held_peak


def test_a_damaged_or_missing_block_is_unreadable_never_wrong(tmp_path):
    store = DirectoryStore(tmp_path)
    block = torch.randn(2, 2, BS, 64).to(torch.bfloat16)
    store.put("ab" * 32, block)
    path = tmp_path / f"{'ab' * 32}.safetensors"
    raw = bytearray(path.read_bytes())
    raw[-7] ^= 0x40  # one bit in the data
    path.write_bytes(bytes(raw))
    with pytest.raises(BlockUnreadable, match="checksum"):
        store.get("ab" * 32)
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(BlockUnreadable):
        store.get("ab" * 32)
    path.unlink()
    with pytest.raises(BlockUnreadable):
        store.get("ab" * 32)
