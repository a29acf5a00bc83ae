"""The package's shape: what loads vLLM, how big modules and functions get, which way imports point,
and that no import cycle exists. Read from the source with ``ast`` (and two real subprocesses), so a
change that breaks a rule fails here before anyone notices a slow ``--help`` or a tangled import."""

from __future__ import annotations

import ast
import graphlib
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "stream2llm"
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 60
# modules other engineers are still splitting (redesign in progress): their size case may fail
VLLM_FREE_IMPORT_SECONDS = 3.0  # importing vLLM alone takes longer than this


# -- the import graph, from the source --------------------------------------------------------------
def module_files(package: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every module of ``package`` (a package is its __init__)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = list(path.relative_to(package.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _type_checking_only(node: ast.AST) -> bool:
    test = getattr(node, "test", None)
    return isinstance(node, ast.If) and (
        (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING")
        or (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")
    )


def imports_of(path: Path, known: set[str], *, lazy: bool = True, type_checking: bool = False) -> set[str]:
    """Modules ``path`` imports: module-level statements, and with ``lazy`` those inside functions
    too; ``from a import b`` names module ``a.b`` when that is a module, else ``a``. Imports under
    ``if TYPE_CHECKING:`` never run; they count only with ``type_checking``."""
    found: set[str] = set()

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            if _type_checking_only(child) and not type_checking:
                for other in child.orelse:  # type: ignore[attr-defined]
                    visit(other, in_function)
                continue
            nested = in_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda)
            if isinstance(child, ast.Import) and (lazy or not in_function):
                found.update(alias.name for alias in child.names)
            elif isinstance(child, ast.ImportFrom) and (lazy or not in_function):
                assert child.level == 0, f"{path}: relative import"
                for alias in child.names:
                    full = f"{child.module}.{alias.name}"
                    found.add(full if full in known else child.module or "")
            visit(child, nested)

    visit(ast.parse(path.read_text(encoding="utf-8")), False)
    return found


def import_graph(package: Path, *, lazy: bool) -> dict[str, set[str]]:
    files = module_files(package)
    known = set(files)
    return {
        name: {m for m in imports_of(path, known, lazy=lazy) if m in known and m != name}
        for name, path in files.items()
    }


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    try:
        tuple(graphlib.TopologicalSorter(graph).static_order())
    except graphlib.CycleError as exc:
        return list(exc.args[1])
    return None


# -- (a) what loads vLLM ------------------------------------------------------------------------------
def _loaded_in_subprocess(code: str) -> dict:
    """Run ``code`` in a fresh interpreter (this worktree first on the path); it leaves its report in
    ``report``; returns it with the vLLM modules that ended up loaded."""
    script = textwrap.dedent(code) + textwrap.dedent(
        """
        import json, sys
        report["vllm"] = sorted(m for m in sys.modules if m == "vllm" or m.startswith("vllm."))
        print("REPORT" + json.dumps(report))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120, check=True
    )
    line = next(x for x in done.stdout.splitlines() if x.startswith("REPORT"))
    return json.loads(line[len("REPORT") :])


def test_simulator_imports_without_vllm_and_quickly():
    report = _loaded_in_subprocess(
        """
        import time
        t0 = time.perf_counter()
        import stream2llm.workloads.simulate as sim
        report = {"seconds": time.perf_counter() - t0, "file": sim.__file__,
                  "names": sorted(n for n in ("Simulator", "SimResult", "TEMPLATE_TOKENS",
                                              "simulate_runs") if hasattr(sim, n))}
        """
    )
    assert report["vllm"] == []
    assert Path(report["file"]).is_relative_to(PACKAGE)  # this worktree's code, not an installed copy
    assert report["names"] == ["SimResult", "Simulator", "TEMPLATE_TOKENS", "simulate_runs"]
    assert report["seconds"] < VLLM_FREE_IMPORT_SECONDS


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["index", "build", "--help"]])
def test_cli_help_loads_no_vllm(argv):
    report = _loaded_in_subprocess(
        f"""
        import contextlib, io
        from stream2llm.cli import app
        out, code = io.StringIO(), None
        with contextlib.redirect_stdout(out):
            try:
                app({argv!r}, prog_name="stream2llm")
            except SystemExit as exc:
                code = exc.code
        report = {{"code": code, "help": out.getvalue()}}
        """
    )
    assert report["code"] == 0
    assert "Usage: stream2llm" in report["help"]
    assert report["vllm"] == []


# -- (b) sizes ------------------------------------------------------------------------------------------
def _size_cases() -> list:
    return [pytest.param(path, id=name) for name, path in module_files(PACKAGE).items()]


def oversized(path: Path) -> list[str]:
    """What in ``path`` is over the limits: the module's lines, each function's (def to last line)."""
    source = path.read_text(encoding="utf-8")
    found = []
    if len(source.splitlines()) > MAX_MODULE_LINES:
        found.append(f"module: {len(source.splitlines())} lines")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
            if length > MAX_FUNCTION_LINES:
                found.append(f"{node.name} (line {node.lineno}): {length} lines")
    return found


@pytest.mark.parametrize("path", _size_cases())
def test_module_and_function_sizes(path):
    assert oversized(path) == []


def test_size_check_sees_long_functions_and_modules(tmp_path):
    long = tmp_path / "long.py"
    long.write_text("def f():\n" + "    x = 1\n" * 70 + "\n" * 440 + "def g():\n    return 1\n")
    assert oversized(long) == ["module: 513 lines", "f (line 1): 71 lines"]


# -- (c) import direction -------------------------------------------------------------------------------
def _all_imports(prefix: str) -> dict[str, set[str]]:
    """Every import (module level, in functions, type-only) of the modules under ``prefix``."""
    files = module_files(PACKAGE)
    known = set(files)
    return {
        name: imports_of(path, known, type_checking=True)
        for name, path in files.items()
        if name == prefix or name.startswith(prefix + ".")
    }


def _offending(prefix: str, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    bad = {}
    for name, imported in _all_imports(prefix).items():
        hits = sorted(m for m in imported if any(m == f or m.startswith(f + ".") for f in forbidden))
        if hits:
            bad[name] = hits
    return bad


@pytest.mark.parametrize("layer", ["stream2llm.engine", "stream2llm.core"])
def test_engine_and_core_import_no_front_layer(layer):
    front = tuple(f"stream2llm.{p}" for p in ("workloads", "pipelines", "cli", "server", "integrations"))
    assert _offending(layer, front) == {}


def test_context_imports_nothing_from_engine_core_or_vllm():
    assert _offending("stream2llm.context", ("stream2llm.engine", "stream2llm.core", "vllm")) == {}


@pytest.mark.parametrize("module", ["stream2llm.core.policies", "stream2llm.core.protocol"])
def test_shared_core_modules_import_no_vllm(module):
    assert _offending(module, ("vllm",)) == {}


def test_tokens_is_a_leaf_every_layer_may_import():
    """``stream2llm.tokens`` (token-id arithmetic) is imported by context, core, the simulator and
    retrievers alike, in both processes: it may import nothing from stream2llm or vLLM."""
    assert _all_imports("stream2llm.tokens")  # the module exists and was read
    assert _offending("stream2llm.tokens", ("stream2llm", "vllm")) == {}


def test_direction_check_sees_a_lazy_import(tmp_path):
    (tmp_path / "pkg").mkdir()
    (tmp_path / "pkg" / "__init__.py").write_text("")
    (tmp_path / "pkg" / "a.py").write_text("def f():\n    from vllm import x\n    import pkg.b\n")
    (tmp_path / "pkg" / "b.py").write_text("")
    known = set(module_files(tmp_path / "pkg"))
    assert imports_of(tmp_path / "pkg" / "a.py", known) == {"vllm", "pkg.b"}
    assert imports_of(tmp_path / "pkg" / "a.py", known, lazy=False) == set()


# -- (d) no import cycle ----------------------------------------------------------------------------------
@pytest.mark.parametrize("lazy", [False, True], ids=["module-level", "with-function-level"])
def test_no_import_cycle(lazy):
    assert find_cycle(import_graph(PACKAGE, lazy=lazy)) is None


def test_cycle_check_sees_a_cycle_through_a_lazy_import(tmp_path):
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "a.py").write_text("from pkg.b import g\n")
    (pkg / "b.py").write_text("def g():\n    from pkg import a\n")
    assert find_cycle(import_graph(pkg, lazy=False)) is None
    cycle = find_cycle(import_graph(pkg, lazy=True))
    assert cycle is not None and set(cycle) == {"pkg.a", "pkg.b"}


# -- (e) what the engine-core process loads ----------------------------------------------------------------
# the modules vLLM loads by name in its engine-core process: the scheduler class, the KV connector
# (kv_connector_module_path) and the general-plugin entry point
CORE_ENTRY_MODULES = ("stream2llm.core.scheduler", "stream2llm.core.kv_connector", "stream2llm.core.plugin")
FRONT_END_LAYERS = tuple(f"stream2llm.{p}" for p in ("context", "engine", "server", "pipelines"))


def _reachable(graph: dict[str, set[str]], roots: tuple[str, ...]) -> set[str]:
    seen, todo = set(), list(roots)
    while todo:
        name = todo.pop()
        if name not in seen:
            seen.add(name)
            todo.extend(graph.get(name, ()))
    return seen


def test_the_engine_core_entry_points_are_what_the_engine_names():
    from stream2llm.core import kv_connector
    from stream2llm.engine.config import SCHEDULER_CLS

    assert SCHEDULER_CLS.rsplit(".", 1)[0] in CORE_ENTRY_MODULES
    assert kv_connector.__name__ in CORE_ENTRY_MODULES
    assert '"stream2llm.core.plugin:register"' in (ROOT / "pyproject.toml").read_text(encoding="utf-8")


def test_the_engine_core_imports_no_front_end_module_and_no_tokenizers():
    """Everything the engine-core process runs of ours, from the source: no module of context/,
    engine/, server/ or pipelines/, and none of it imports ``tokenizers`` (vLLM's own scheduler
    loads transformers and tokenizers there anyway; ours must not depend on them)."""
    graph = import_graph(PACKAGE, lazy=True)
    reached = _reachable(graph, CORE_ENTRY_MODULES)
    assert sorted(m for m in reached if m.startswith(FRONT_END_LAYERS)) == []
    files = module_files(PACKAGE)
    users = sorted(m for m in reached if "tokenizers" in imports_of(files[m], set(files), type_checking=True))
    assert users == []


def test_the_engine_core_process_loads_only_core_modules_of_ours():
    """The same, as a fresh interpreter sees it after importing the engine core's entry points."""
    report = _loaded_in_subprocess(
        f"""
        import sys
        for name in {CORE_ENTRY_MODULES!r}:
            __import__(name)
        report = {{"ours": sorted(m for m in sys.modules if m.startswith("stream2llm"))}}
        """
    )
    outside = [m for m in report["ours"] if m.startswith(FRONT_END_LAYERS)]
    assert outside == [] and "stream2llm.core.scheduler" in report["ours"]


# -- (e) benchmarks: the same sizes, and the server only through its public API or HTTP ---------------------
BENCHMARKS = ROOT / "benchmarks"


def _benchmark_cases() -> list:
    paths = sorted(BENCHMARKS.rglob("*.py"))
    return [pytest.param(path, id=str(path.relative_to(BENCHMARKS))) for path in paths]


def _public_names(package_init: Path) -> set[str]:
    """A package's ``__all__``, read from its ``__init__.py``."""
    for node in ast.parse(package_init.read_text(encoding="utf-8")).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "__all__" for t in node.targets):
            return set(ast.literal_eval(node.value))
    return set()


def server_internals_imported(path: Path, public: set[str]) -> list[str]:
    """What ``path`` imports of ``stream2llm.server`` beyond its public API (``__all__``): any of
    its submodules, or a name the package does not export."""
    server = "stream2llm.server"
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith(server + ".")]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.startswith(server + "."):
                found.append(node.module)
            elif node.module == server:
                found += [f"{server}.{a.name}" for a in node.names if a.name not in public]
    return found


@pytest.mark.parametrize("path", _benchmark_cases())
def test_benchmark_module_and_function_sizes(path):
    assert oversized(path) == []


@pytest.mark.parametrize("path", _benchmark_cases())
def test_benchmarks_use_no_server_internals(path):
    assert server_internals_imported(path, _public_names(PACKAGE / "server" / "__init__.py")) == []


def test_server_internals_check_sees_them(tmp_path):
    script = tmp_path / "bench.py"
    script.write_text(
        "from stream2llm.server import create_app, SessionRegistry\n"
        "def f():\n    from stream2llm.server.registry import SERVER\n    import stream2llm.server.app\n"
        "from stream2llm import server\nfrom .clients import host\n"
    )
    assert server_internals_imported(script, {"create_app"}) == [
        "stream2llm.server.SessionRegistry",
        "stream2llm.server.registry",
        "stream2llm.server.app",
    ]


# -- (f) ARCHITECTURE.md's arrows are the code's ------------------------------------------------------------
ARROWS_HEADING = "## Import arrows"


def layer_of(module: str, importer: str | None = None) -> str:
    """The node an import arrow names: a top-level module or package of stream2llm, and for an
    import into core/ from outside it, the core module itself (which of them the front end may
    touch is the point of the map)."""
    parts = module.split(".")[1:] or ["stream2llm"]
    if parts[0] == "core" and len(parts) > 1 and importer is not None and layer_of(importer) != "core":
        return f"core.{parts[1]}"
    return parts[0]


def code_arrows() -> dict[str, set[str]]:
    files = module_files(PACKAGE)
    known = set(files)
    arrows: dict[str, set[str]] = {}
    for name, path in files.items():
        for imported in imports_of(path, known, type_checking=True):
            if imported in known and (target := layer_of(imported, name)) != layer_of(name):
                arrows.setdefault(layer_of(name), set()).add(target)
    return arrows


def documented_arrows(text: str) -> dict[str, set[str]]:
    """The ``a -> b, c`` lines of the first code block under ARCHITECTURE.md's arrows heading."""
    section = text.split(ARROWS_HEADING, 1)[1]
    block = section.split("```", 2)[1]
    arrows = {}
    for line in block.splitlines():
        if "->" in line:
            source, targets = (part.strip() for part in line.split("->", 1))
            arrows[source] = {t.strip() for t in targets.split("#")[0].split(",") if t.strip()}
    return arrows


def test_architecture_md_names_every_import_arrow_and_no_other():
    documented = documented_arrows((ROOT / "ARCHITECTURE.md").read_text(encoding="utf-8"))
    actual = code_arrows()
    missing = {
        a: sorted(b - documented.get(a, set())) for a, b in actual.items() if b - documented.get(a, set())
    }
    stale = {a: sorted(b - actual.get(a, set())) for a, b in documented.items() if b - actual.get(a, set())}
    assert missing == {}, "imports ARCHITECTURE.md does not draw"
    assert stale == {}, "arrows ARCHITECTURE.md draws that no import makes"


def test_the_arrow_reader_reads_a_block():
    text = "# x\n## Import arrows\n\n```text\ncli -> engine, workloads  # why\nengine -> core.protocol\n```\n"
    assert documented_arrows(text) == {"cli": {"engine", "workloads"}, "engine": {"core.protocol"}}
    assert layer_of("stream2llm.core.protocol", "stream2llm.engine.session") == "core.protocol"
    assert layer_of("stream2llm.core.protocol", "stream2llm.core.broker") == "core"
