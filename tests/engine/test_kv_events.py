"""vLLM's KV cache events from a stream2llm engine tell the truth: a real ZMQ subscriber replays
BlockStored / BlockRemoved / AllBlocksCleared into a block set, and after appends, updates that
cut KV, aborts, TTL expiries and evictions under memory pressure that set equals the prefix
cache's own block hashes (``kv_events_audit``: the engine core writes them after every step)."""

from __future__ import annotations

import asyncio
import threading

import msgspec
import pytest
import zmq
from vllm import SamplingParams
from vllm.distributed.kv_events import AllBlocksCleared, BlockRemoved, BlockStored, KVEventBatch

from stream2llm.core.kv_audit import block_key, read_audit
from tests.conftest import EXACT_DTYPE, corpus_text

QUESTION = "What is this about?"
SAMPLING = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


class Subscriber:
    """A ZMQ SUB socket on its own thread, replaying every batch into a block set."""

    def __init__(self, endpoint: str) -> None:
        self.blocks: set[str] = set()
        self.counts = {"stored": 0, "removed": 0, "cleared": 0}
        self.last_seq = -1
        self._lock = threading.Lock()
        self._socket = zmq.Context.instance().socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.setsockopt(zmq.RCVTIMEO, 100)
        self._socket.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        decoder = msgspec.msgpack.Decoder(KVEventBatch)
        while not self._stop.is_set():
            try:
                _topic, seq, payload = self._socket.recv_multipart()
            except zmq.Again:
                continue
            with self._lock:
                self.last_seq = int.from_bytes(seq, "big")
                for event in decoder.decode(payload).events:
                    self._apply(event)

    def _apply(self, event) -> None:
        if isinstance(event, BlockStored):
            self.counts["stored"] += 1
            self.blocks.update(block_key(event.group_idx, h) for h in event.block_hashes)
        elif isinstance(event, BlockRemoved):
            self.counts["removed"] += 1
            self.blocks.difference_update(block_key(event.group_idx, h) for h in event.block_hashes)
        elif isinstance(event, AllBlocksCleared):
            self.counts["cleared"] += 1
            self.blocks.clear()

    def snapshot(self) -> tuple[set[str], dict[str, int]]:
        with self._lock:
            return set(self.blocks), dict(self.counts)

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close(linger=0)


@pytest.fixture(scope="module")
async def evented(tiny_model, tmp_path_factory):
    from stream2llm.engine.engine import EngineConfig, StreamingEngine

    folder = tmp_path_factory.mktemp("kv-events")
    endpoint = f"ipc://{folder / 'kv.sock'}"
    subscriber = Subscriber(endpoint)  # before the publisher binds: no event is missed
    audit = str(folder / "cached.json")
    config = EngineConfig(
        model="tiny",
        kv_cache_bytes=6 << 20,  # 96 blocks: sixteen sessions of ~1,800 tokens need ~240
        max_model_len=4096,
        session_ttl_s=1.5,
        dtype=EXACT_DTYPE,
        kv_events={"endpoint": endpoint, "topic": "kv"},
        kv_events_audit=audit,
    )
    engine = await StreamingEngine.start(config)
    yield engine, subscriber, audit
    await engine.shutdown()
    subscriber.close()


async def settle(
    engine, subscriber: Subscriber, audit: str, timeout_s: float = 10.0
) -> tuple[set[str], set[str]]:
    """Wait until the engine holds no request and the replayed set matches the audit (or time out)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while asyncio.get_running_loop().time() < deadline:
        replayed, truth = subscriber.snapshot()[0], read_audit(audit)
        if engine.stats().requests == 0 and replayed == truth:
            return replayed, truth
        await asyncio.sleep(0.1)
    return subscriber.snapshot()[0], read_audit(audit)


async def streamed(
    engine, pieces: list[str], *, update: bool = False, gap_s: float = 0.1, salt: str | None = None
):
    session = await engine.open(QUESTION, SAMPLING, cache_salt=salt)
    for k, piece in enumerate(pieces):
        await asyncio.sleep(gap_s)
        final = k == len(pieces) - 1
        await (session.update(piece, final=final) if update else session.append(piece, final=final))
    return await session.result()


def assert_replay_matches(replayed: set[str], truth: set[str]) -> None:
    assert truth, "the prefix cache holds no block: the scenario stored nothing"
    missing, stale = truth - replayed, replayed - truth
    assert not missing and not stale, (
        f"{len(missing)} cached blocks never announced, {len(stale)} announced but gone"
    )


async def test_appends_and_updates_that_cut_kv_are_reported_block_for_block(evented):
    engine, subscriber, audit = evented
    docs = [corpus_text(1500, seed=s) for s in range(4)]
    await asyncio.gather(
        streamed(engine, [corpus_text(2000, seed=10)[i * 500 : (i + 1) * 500] for i in range(4)]),
        # each update keeps the first document and replaces what follows: KV past it is cut
        streamed(engine, [docs[0] + docs[1], docs[0] + docs[2], docs[0] + docs[3]], update=True),
        # the same context twice at once: blocks computed twice under one hash
        streamed(engine, [docs[1]], salt=None),
        streamed(engine, [docs[1]], salt=None),
    )
    replayed, truth = await settle(engine, subscriber, audit)
    assert_replay_matches(replayed, truth)
    counts = subscriber.snapshot()[1]
    assert counts["stored"] > 0


async def test_aborts_and_ttl_expiries_leave_the_replayed_set_equal_to_the_cache(evented):
    engine, subscriber, audit = evented
    aborted = await engine.open(QUESTION, SAMPLING)
    await aborted.append(corpus_text(1200, seed=21))
    expired = await engine.open(QUESTION, SAMPLING)
    await expired.append(corpus_text(1200, seed=22))
    await asyncio.sleep(0.3)
    await aborted.abort()
    with pytest.raises(Exception, match="session_ttl_s"):
        await asyncio.wait_for(expired.result(), timeout=20)
    replayed, truth = await settle(engine, subscriber, audit)
    assert_replay_matches(replayed, truth)


async def test_evictions_under_memory_pressure_report_every_block_removed(evented):
    engine, subscriber, audit = evented
    removed_before = subscriber.snapshot()[1]["removed"]
    contexts = [corpus_text(4200, seed=100 + i) for i in range(16)]
    await asyncio.wait_for(
        asyncio.gather(
            *(streamed(engine, [c[k * 1050 : (k + 1) * 1050] for k in range(4)], gap_s=0.3) for c in contexts)
        ),
        timeout=180,
    )
    replayed, truth = await settle(engine, subscriber, audit)
    assert_replay_matches(replayed, truth)
    assert subscriber.snapshot()[1]["removed"] - removed_before > 50  # 96 blocks, ~240 needed
    assert engine.stats().preemptions > 0


async def test_a_prefix_cache_reset_is_announced_as_all_blocks_cleared(evented):
    engine, subscriber, audit = evented
    await streamed(engine, [corpus_text(800, seed=31)])
    assert (await settle(engine, subscriber, audit))[1]
    assert await engine.reset_prefix_cache()
    replayed, truth = await settle(engine, subscriber, audit)
    assert replayed == truth == set()
    assert subscriber.snapshot()[1]["cleared"] >= 1
