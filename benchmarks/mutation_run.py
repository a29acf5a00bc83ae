"""Mutation run for the equivalence oracle: each patch under benchmarks/mutations/ breaks the KV a
session keeps in one small way (a token past the LCP, a stale block, a wrong token id); applied
to a temporary copy of the package, it must make the equivalence tests fail. Prints, per mutation,
the tests that failed and why; exits 1 if some mutation failed none.

    /work/main/.venv/bin/python benchmarks/mutation_run.py [--baseline] [-k EXPR] [patch names...]
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTATIONS = ROOT / "benchmarks" / "mutations"
TESTS = "tests/engine/test_equivalence.py"
COPIED = ("stream2llm", "tests", "pyproject.toml")


def _copy_tree(dest: Path) -> None:
    for name in COPIED:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
        elif src.exists():
            shutil.copy2(src, dest / name)


def run_one(patch: Path | None, k: str | None) -> tuple[int, list[str], str]:
    """(pytest's exit code, failed test ids, output tail) for the tests on a patched copy."""
    with tempfile.TemporaryDirectory(prefix="s2l-mutation-") as tmp:
        dest = Path(tmp)
        _copy_tree(dest)
        if patch is not None:
            subprocess.run(["git", "apply", str(patch)], cwd=dest, check=True)
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", TESTS]
        if k:
            cmd += ["-k", k]
        proc = subprocess.run(cmd, cwd=dest, capture_output=True, text=True)
    out = proc.stdout + proc.stderr
    failed = sorted(set(re.findall(r"^(?:FAILED|ERROR) (\S+(?: - .{0,150})?)", out, re.M)))
    return proc.returncode, failed, out[-1500:]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="patch names (default: all)")
    parser.add_argument("--baseline", action="store_true", help="also run the unpatched copy (must pass)")
    parser.add_argument("-k", help="pytest -k expression (a subset of the equivalence tests)")
    args = parser.parse_args()
    patches = sorted(MUTATIONS.glob("*.patch"))
    if args.names:
        patches = [p for p in patches if p.stem in args.names]
    survivors = []
    runs: list[Path | None] = [None, *patches] if args.baseline else list(patches)
    for patch in runs:
        name = "baseline" if patch is None else patch.stem
        code, failed, tail = run_one(patch, args.k)
        print(f"== {name}: pytest exit {code}, {len(failed)} failed", flush=True)
        for test in failed:
            print(f"   {test}")
        if patch is None and code != 0:
            print(tail)
            return 1
        if patch is not None and not failed:
            survivors.append(name)
            print(tail)
    if survivors:
        print("mutations no test caught: " + ", ".join(survivors))
        return 1
    print("every mutation made at least one equivalence test fail")
    return 0


if __name__ == "__main__":
    sys.exit(main())
