"""ANN layout benchmark: how many prompt tokens does each progressive-ANN update invalidate?

Questions templated from the corpus (an article's description: "Tell me about the 1968 film by
Stanley Kubrick.") go through the progressive IVF retriever over the full Wikipedia index. Each
update replaces the context; the engine keeps KV up to the longest common prefix of the old and new
prompt tokens and recomputes the rest. For the same retrieval results, two layouts of the documents:

- ``score``: every update best first (what a retriever returns);
- ``stable``: documents that survive an update keep their place, newcomers follow (connectors/layout.py).

Counts the invalidated tokens (prompt tokens after the LCP of successive prompts; tiny model's
tokenizer) per update, plus stage latency and whether the source article is in the final top-k.

    .venv/bin/stream2llm index build          # once (full corpus)
    .venv/bin/python benchmarks/ann_layout.py --queries 200 --out benchmarks/results/ann-layout.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path

from stream2llm.context.layout import StableLayout, invalidated
from stream2llm.context.prompt import DOC_SEPARATOR, PromptTemplate, TextTokenizer, common_prefix_len
from stream2llm.engine import models
from stream2llm.retrievers.ann_index import AnnIndex, default_index_dir
from stream2llm.retrievers.corpus import wiki_questions
from stream2llm.retrievers.faiss_ann import ProgressiveAnnRetriever
from stream2llm.workloads.bench import machine


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))] if ordered else 0.0


async def run(args: argparse.Namespace) -> dict:
    index = AnnIndex.load(args.index or default_index_dir())
    info = models.prepare("tiny")
    tokenizer = TextTokenizer(info.path, info.bos_token_id)
    template = PromptTemplate()
    by_id = {d.id: d for d in index.docs}
    retriever = ProgressiveAnnRetriever(
        index, k=args.k, nprobe=args.nprobe, stages=args.stages, layout="score"
    )
    questions = wiki_questions(args.queries, seed=args.seed)
    await asyncio.to_thread(index.embed_query, "warm-up")

    per_layout = {name: {"invalidated": [], "per_query": [], "doc_lcp": []} for name in ("score", "stable")}
    final_tokens, stage_gaps, first_event_s, hits_gold, updates_changed, n_updates = [], [], [], 0, 0, 0
    for question, gold in questions:
        t0 = time.monotonic()
        events = [e async for e in retriever.stream(question, request_id="bench")]
        first_event_s.append(events[0].t - t0)
        stage_gaps += [b.t - a.t for a, b in zip(events, events[1:])]
        hits_gold += any(s.split("#")[0] == gold for s in events[-1].sources)
        rankings = [list(e.sources) for e in events]
        n_updates += len(rankings) - 1
        updates_changed += sum(a != b for a, b in zip(rankings, rankings[1:]))
        layouts = {"score": rankings, "stable": _stable(rankings)}
        for name, orders in layouts.items():
            prompts = [
                tokenizer.encode(
                    template.render_prefix(question) + DOC_SEPARATOR.join(by_id[i].render() for i in o)
                )
                for o in orders
            ]
            lost = [invalidated(a, b) for a, b in zip(prompts, prompts[1:])]
            per_layout[name]["invalidated"] += lost
            per_layout[name]["per_query"].append(sum(lost))
            per_layout[name]["doc_lcp"] += [common_prefix_len(a, b) for a, b in zip(orders, orders[1:])]
        final_tokens.append(len(prompts[-1]))

    result = {
        "schema": "stream2llm.ann-layout/1",
        "machine": machine(),
        "index": {k: v for k, v in vars(index.meta).items() if k not in ("schema",)},
        "params": {"queries": len(questions), "k": args.k, "nprobe": args.nprobe, "stages": args.stages,
                   "seed": args.seed, "tokenizer": "tiny (stream2llm.engine.models)"},
        "updates": n_updates,
        "updates_changing_top_k": updates_changed,
        "final_prompt_tokens": {"mean": statistics.mean(final_tokens), "p50": pct(final_tokens, 50)},
        "gold_article_in_final_top_k": hits_gold / len(questions),
        "latency_s": {
            "first_event_p50": pct(first_event_s, 50),
            "stage_gap_p50": pct(stage_gaps, 50),
            "stage_gap_p95": pct(stage_gaps, 95),
        },
        "layouts": {},
    }  # fmt: skip
    for name, data in per_layout.items():
        result["layouts"][name] = _layout_summary(data, updates_changed, final_tokens)
    score, stable = (result["layouts"][n]["invalidated_tokens_total"] for n in ("score", "stable"))
    result["stable_vs_score_invalidated_ratio"] = stable / score if score else None
    return result


def _layout_summary(data: dict, updates_changed: int, final_tokens: list[int]) -> dict:
    """One layout's invalidated tokens per update and per query, and the documents it kept."""
    lost, per_query = data["invalidated"], data["per_query"]
    return {
        "invalidated_tokens_total": sum(lost),
        "invalidated_per_update_mean": statistics.mean(lost),
        "invalidated_per_changed_update_mean": sum(lost) / max(updates_changed, 1),
        "invalidated_per_query_mean": statistics.mean(per_query),
        "invalidated_per_query_p50": pct(per_query, 50),
        "invalidated_per_query_p95": pct(per_query, 95),
        "invalidated_fraction_of_final_prompt": sum(per_query) / sum(final_tokens),
        "kept_documents_per_update_mean": statistics.mean(data["doc_lcp"]),
    }


def _stable(rankings: list[list[str]]) -> list[list[str]]:
    layout = StableLayout()
    return [layout.arrange(r) for r in rankings]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--nprobe", type=int, default=32)
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--index", type=Path, default=None, help="index directory (default: the user cache)")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    result = asyncio.run(run(args))
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
