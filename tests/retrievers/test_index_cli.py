"""`stream2llm index build` and `index info` on a few real articles."""

from __future__ import annotations

import json

from typer.testing import CliRunner

from stream2llm.cli import app
from stream2llm.retrievers.ann_index import AnnIndex


def test_index_build_then_info(tmp_path):
    runner = CliRunner()
    out, report = tmp_path / "idx", tmp_path / "build.json"
    result = runner.invoke(
        app,
        [
            "index",
            "build",
            "--docs",
            "30",
            "--kind",
            "ivf",
            "--nlist",
            "2",
            "--out",
            str(out),
            "--json",
            str(report),
        ],
    )
    assert result.exit_code == 0, result.output
    meta = json.loads(report.read_text())
    assert (meta["kind"], meta["nlist"], meta["path"]) == ("ivf", 2, str(out))
    assert meta["n_vectors"] >= 30 and meta["embedder"].startswith("all-MiniLM-L6-v2:")
    assert len(AnnIndex.load(out)) == meta["n_vectors"]

    info = runner.invoke(app, ["index", "info", str(out)])
    assert info.exit_code == 0 and "ivf" in info.output and str(meta["n_vectors"]) in info.output

    missing = runner.invoke(app, ["index", "info", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "stream2llm index build" in missing.output
    bad = runner.invoke(
        app, ["index", "build", "--docs", "5", "--kind", "hnsw", "--out", str(tmp_path / "b")]
    )
    assert bad.exit_code == 1 and "unknown index kind 'hnsw'" in bad.output
