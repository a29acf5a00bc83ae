"""ANN churn: questions for a capture of the real progressive retriever, the churn fitted to it
(what ``stream2llm synth --workload anns --churn fitted`` draws from), and churn statistics of any
trace (capture or synthetic).

    .venv/bin/python benchmarks/ann_churn.py queries --n 240 --out queries.txt
    .venv/bin/stream2llm capture --retriever ann --k 10 --queries queries.txt --out capture.jsonl
    .venv/bin/python benchmarks/ann_churn.py fit capture.jsonl.gz \
        --out stream2llm/workloads/data/ann_churn.json
    .venv/bin/python benchmarks/ann_churn.py summary capture.jsonl.gz anns-fitted.jsonl anns-uniform.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

from stream2llm.retrievers.corpus import wiki_corpus_path
from stream2llm.workloads.churn import churn_summary, fit_churn, save_fit
from stream2llm.workloads.synth import FILLER_PREFIX, filler_tokens
from stream2llm.workloads.trace import read_trace

# question shapes a reader might type; {t}: title, {d}: description
TEMPLATES = (
    "Tell me about the {d}.",
    "What is {t}?",
    "What is {t} known for?",
    "Why is {t} significant?",
    "Can you give me a short overview of {t}?",
    "What should I know about the {d}?",
    "Who or what is {t}, and why does it matter?",
    "Explain {t} to a student.",
)


def questions(n: int, seed: int) -> list[str]:
    """``n`` varied questions about distinct articles of the packaged corpus, the same every run:
    articles drawn by ``seed`` from those with a description, each with a template drawn too."""
    raw = json.loads(wiki_corpus_path("en-us").read_text(encoding="utf-8"))
    usable = sorted(
        (e for e in raw.values() if len((e.get("description") or "").split()) >= 2),
        key=lambda e: e["title"],
    )
    rng = random.Random(seed)
    out = []
    for entry in rng.sample(usable, n):
        template = rng.choice(TEMPLATES)
        title = re.sub(r"\s*\(.*\)$", "", entry["title"])  # "Stage (theatre)" -> "Stage"
        out.append(template.format(t=title, d=_in_sentence(entry["description"].rstrip("."))))
    return out


def _in_sentence(description: str) -> str:
    """A description as it reads inside a sentence: "Branch of mathematics" -> "branch of
    mathematics", but "South African port city" stays (its next word is a proper noun too)."""
    words = description.split()
    if len(words) > 1 and words[1][:1].isupper():
        return description
    return description[:1].lower() + description[1:]


def doc_tokens(doc: str) -> int:
    """A document's tokens as the simulator counts them (filler: its own; text: 4 characters)."""
    return filler_tokens(doc) if doc.startswith(FILLER_PREFIX) else max(1, len(doc) // 4)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("queries", help="write the capture's questions, one a line")
    q.add_argument("--n", type=int, default=240)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--out", type=Path, required=True)
    f = sub.add_parser("fit", help="fit the churn model to a capture and write it with its summary")
    f.add_argument("capture", type=Path)
    f.add_argument("--bins", type=int, default=3)
    f.add_argument("--out", type=Path, required=True)
    s = sub.add_parser("summary", help="churn statistics of trace files")
    s.add_argument("traces", type=Path, nargs="+")
    args = parser.parse_args()
    if args.command == "queries":
        args.out.write_text("\n".join(questions(args.n, args.seed)) + "\n", encoding="utf-8")
    elif args.command == "fit":
        requests = read_trace(args.capture)
        model = fit_churn(
            requests, bins=args.bins, source=f"benchmarks/results/ann-capture-200/{args.capture.name}"
        )
        save_fit(model, churn_summary(requests, doc_tokens), args.out)
        print(args.out.read_text())
    else:
        for path in args.traces:
            print(path, json.dumps(churn_summary(read_trace(path), doc_tokens), indent=1))


if __name__ == "__main__":
    main()
