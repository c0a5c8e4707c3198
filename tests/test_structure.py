"""The package's shape: no import cycles between its modules (subpackages included), no module over 900 lines, each
hand-off file named by one owner, one owner of progress bars, one home per mechanism, an example after the exported
cells of every notebook, and no issue numbers in what a reader reads."""
import ast
import json
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT/"slm_research"


def module_name(path: Path) -> str:
    "`capture/store.py` -> `capture.store`, `capture/__init__.py` -> `capture`, `core.py` -> `core`."
    parts = path.relative_to(PKG).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {module_name(p): p for p in sorted(PKG.rglob("*.py")) if not p.name.startswith("_") or p.name == "__init__.py"}
FILES.pop("", None)                                          # slm_research/__init__.py: the package itself
MODULES = set(FILES)
TREES = {m: ast.parse(p.read_text()) for m, p in FILES.items()}




def imports_of(module: str, tree: ast.AST | None = None) -> set[str]:
    "The package modules `module` imports anywhere in it (top level or inside functions), as dotted names."
    tree = tree or TREES[module]
    is_pkg = FILES.get(module, Path()).name == "__init__.py"
    here = module.split(".") if is_pkg else module.split(".")[:-1]     # the package a relative import starts from
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here[: len(here) - (node.level - 1)] + ([*node.module.split(".")] if node.module else [])
            elif (node.module or "").split(".")[0] == "slm_research":
                base = node.module.split(".")[1:]
            else: continue
            target = ".".join(base)
            for a in node.names:                                   # `from pkg import submodule`
                if ".".join([*base, a.name]) in MODULES: found.add(".".join([*base, a.name]))
            if target in MODULES and not (node.level and not node.module): found.add(target)   # `from . import x`: x
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".", 1)[1] for a in node.names if a.name.startswith("slm_research.")} & MODULES
    outside = set()
    for m in found:      # importing `capture.store` from outside `capture` runs `capture/__init__` first
        top = m.split(".")[0]
        if top in MODULES and top != module.split(".")[0]: outside.add(top)
    return (found | outside) - {module}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    "A cycle of `graph` as a list of nodes, or None."
    state, stack = {}, []
    def visit(n):
        state[n] = "open"; stack.append(n)
        for m in sorted(graph.get(n, ())):
            if state.get(m) == "open": return stack[stack.index(m):] + [m]
            if m not in state and (c := visit(m)): return c
        state[n] = "done"; stack.pop()
    for n in sorted(graph):
        if n not in state and (c := visit(n)): return c
    return None


def test_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a"}}) is None


def test_the_import_reader_reads_dotted_and_relative_imports():
    tree = ast.parse("from .files import x\nfrom . import keys\nfrom ..core import paths\nimport slm_research.workspace\n"
                     "from slm_research.corpus import pii\n")
    assert {"capture", "corpus", "corpus.pii"} <= MODULES
    got = imports_of("capture.store", tree)
    assert {"capture.keys", "core", "workspace", "corpus.pii", "corpus"} <= got and "capture" not in got


def test_the_package_has_no_import_cycle():
    graph = {m: imports_of(m) for m in MODULES}
    assert "workspace" in graph["finetune"] and "core" in graph["capture.store"]   # the reader sees real edges
    assert "capture.step" in graph["capture"] and "corpus.pii" in MODULES          # ... into subpackages too
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


def _lines(m): return len(FILES[m].read_text().splitlines())

@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_is_over_900_lines(module):
    assert _lines(module) <= 900, f"{FILES[module].relative_to(ROOT)} has {_lines(module)} lines: split it by concept"


@pytest.mark.parametrize("name", ["gate.json", "registry.json", "calls_clean.parquet", "clusters.parquet", "clusters.json",
                                  "selection.json", "clean_report.json", "clean_quarantine.jsonl"])
def test_handoff_file_names_are_spelled_only_in_the_workspace(name):
    owners = sorted(m for m, p in FILES.items() if re.search(re.escape(f'"{name}"'), p.read_text()))
    assert owners == ["workspace"], f"{name} is spelled out in {owners}"


def test_progress_bars_have_one_owner():
    "Every bar goes through `core.progress`, which honours SLM_PROGRESS and throttles when stderr is not a terminal."
    users = sorted(m for m, p in FILES.items() if m != "core" and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M))
    assert users == [], f"tqdm used directly in {users}: use slm_research.core.progress"


# --- one home per mechanism, read from the code ---------------------------------------------------------------------

def functions(module: str):
    "`(qualified name, node)` of every function of `module`, methods as `Class.method`, nested ones as `outer.inner`."
    out = []
    def walk(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                out.append((prefix + child.name, child)); walk(child, prefix + child.name + ".")
            elif isinstance(child, ast.ClassDef): walk(child, prefix + child.name + ".")
            else: walk(child, prefix)
    walk(TREES[module], "")
    return out


def calls_in(node, name: str):
    "Calls in `node` (not in functions nested in it) of `name` (`os.replace`, or a bare `loads`)."
    found, todo = [], list(ast.iter_child_nodes(node))
    while todo:
        n = todo.pop()
        if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) and n is not node: continue
        if isinstance(n, ast.Call):
            f = n.func
            spelled = (f"{f.value.id}.{f.attr}" if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name)
                       else f.id if isinstance(f, ast.Name) else None)
            if spelled == name: found.append(n)
        todo.extend(ast.iter_child_nodes(n))
    return found


def who_calls(name: str) -> list[str]:
    return sorted(f"{m}.{q}" for m in MODULES for q, fn in functions(m) if calls_in(fn, name))


def only(found: list[str], allowed: set[str], what: str):
    "Assert `found` is within `allowed`."
    extra = [f for f in found if f not in allowed]
    assert extra == [], f"{what} outside its home: {extra}"


# a seal step (a segment renamed when it is complete) and folders published whole are not file writes
RENAMES = {"core.write_atomic", "capture.store._seal", "corpus.generate_corpus", "slm.embedded_slm_path"}

def test_one_atomic_writer():
    "Files are written whole in one place, `core.write_atomic` (the quarantine too); no other function renames files into place."
    found = who_calls("os.replace") + who_calls("os.rename")
    assert "core.write_atomic" in found                       # the check sees the one it allows
    only(found, RENAMES, "a rename into place")
    assert calls_in(dict(functions("core"))["Quarantine.write"], "write_atomic")


def _loads_of(fn, pattern: str) -> bool:
    "Whether `fn` parses JSON (`json.loads`, `orjson.loads`) of an expression whose source matches `pattern`."
    return any(re.search(pattern, ast.unparse(c.args[0])) for name in ("json.loads", "orjson.loads")
               for c in calls_in(fn, name) if c.args)

def test_one_jsonl_reader():
    "JSON lines are read by `core.read_jsonl` (each bad line named); no other function parses a file's lines itself."
    found = sorted(f"{m}.{q}" for m in MODULES for q, fn in functions(m) if _loads_of(fn, r"^(line|ln|raw_line)$"))
    assert "core.read_jsonl" in found
    only(found, {"core.read_jsonl", "core.read_headlines"}, "a JSON-lines reader")
    assert "read_text_jsonl" not in {q for q, _ in functions("cluster")}


def test_only_calls_parses_a_calls_messages():
    "A call's `messages` column is parsed by `calls` (`loads`, `Call`), so every step reads a call the same way."
    found = sorted(f"{m}.{q}" for m in MODULES if m != "calls" for q, fn in functions(m) if _loads_of(fn, r"messages|msgs"))
    only(found, set(), "a parser of a call's messages")


def test_cluster_reads_calls_through_calls():
    "S3 reads a call's system prompt, last user turn and tool names with `calls` (system or developer role alike)."
    from slm_research.cluster import call_parts
    msgs = [{"role": "developer", "content": "You plan trips."}, {"role": "user", "content": [{"type": "text", "text": "Rome"}]}]
    parts = call_parts(msgs, [{"type": "function", "function": {"name": "book"}}, {"name": "pay"}], None)
    assert (parts["system"], parts["user_head"], parts["tools"]) == ("You plan trips.", "Rome", "tools: book, pay")


def test_one_nearest_centroid_assignment():
    "`cluster.nearest_centroid` places calls in clusters for S3 and S6; nothing else computes `argmax` over centroid similarities."
    users = who_calls("nearest_centroid")
    assert {"cluster.Clusterer.assign_vectors", "iterate.Assigner.assign", "iterate.RequestAssigner.assign_vectors"} <= set(users)
    own = sorted(f"{m}.{q}" for m in MODULES for q, fn in functions(m)
                 if re.search(r"centroids?\.T\b", ast.unparse(fn)) and re.search(r"\.arg(max|min)\(", ast.unparse(fn)))
    only(own, {"cluster.nearest_centroid"}, "a nearest-centroid assignment")


def test_one_session_split():
    "Conversations are hashed to a side of a split in one place, `workspace.session_hash`."
    found = sorted(f"{m}.{q}" for m in MODULES for q, fn in functions(m)
                   if any(isinstance(c.func, ast.Attribute) and c.func.attr == "hash" and "session" in ast.unparse(c.func.value)
                          for c in ast.walk(fn) if isinstance(c, ast.Call)))
    # scale buckets whole sessions onto Ray workers (where a call is masked, not which side of a split it lands on)
    only(found, {"workspace.session_hash", "scale.bucketize"}, "a session hash")
    from slm_research.iterate import held_out
    assert calls_in(dict(functions("iterate"))["held_out"], "session_hash")


def test_one_gate_threshold():
    "The gate's threshold is a field of `gate.GateConfig` only; S5's and S6's configs hold a `GateConfig`."
    owners, holders = [], {}
    for m in sorted(MODULES):
        for node in ast.walk(TREES[m]):
            if isinstance(node, ast.ClassDef) and node.name.endswith("Config"):
                fields = {f.target.id: ast.unparse(f.annotation) for f in node.body
                          if isinstance(f, ast.AnnAssign) and isinstance(f.target, ast.Name)}
                if {"threshold", "gate_threshold"} & set(fields): owners.append(f"{m}.{node.name}")
                if "gate" in fields: holders[f"{m}.{node.name}"] = fields["gate"]
    assert owners == ["gate.GateConfig"], owners
    assert {"finetune.FinetuneConfig", "iterate.IterateConfig"} <= set(holders), holders
    assert all("GateConfig" in t for t in holders.values()), holders


# --- notebooks and prose ----------------------------------------------------------------------------------------------

NBS = ROOT/"nbs"
EXPORT = re.compile(r"^\s*#\|\s*exports?\b", re.M)

def example_counts(nb: Path) -> tuple[int, int]:
    "`(exported cells followed by an example, exported cells)`: the next code cell is not exported and has content."
    cells = [c for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
    src = ["".join(c["source"]) for c in cells]
    exported = [i for i, s in enumerate(src) if EXPORT.search(s)]
    followed = [i for i in exported if i + 1 < len(src) and not EXPORT.search(src[i + 1]) and src[i + 1].strip()]
    return len(followed), len(exported)


def test_example_counter_counts():
    import tempfile
    cell = lambda s: {"cell_type": "code", "source": [s]}
    with tempfile.TemporaryDirectory() as d:
        nb = Path(d)/"x.ipynb"
        nb.write_text(json.dumps({"cells": [cell("#| export\na=1"), {"cell_type": "markdown", "source": ["a"]}, cell("a"),
                                            cell("#| exports\nb=1"), cell("#| export\nc=1"), cell("  "), cell("#| export\nd")]}))
        assert example_counts(nb) == (1, 4)


NOTEBOOKS = sorted(p for p in NBS.glob("*.ipynb") if example_counts(p)[1])

@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.stem)
def test_nine_in_ten_exported_cells_have_an_example(nb):
    k, n = example_counts(nb)
    assert k >= 0.9 * n, f"{nb.name}: {k} of {n} exported cells are followed by an example (at least 90% wanted)"


ISSUE = re.compile(r"issue [0-9]+|issue #[0-9]+", re.I)
PROSE = [p for p in [*NBS.glob("*.ipynb"), ROOT/"README.md", *(ROOT/"docs").rglob("*.md"), *(ROOT/"docs").rglob("*.ipynb")]
         if p.exists() and not {"_build", "_site", "build", "_proc"} & set(p.parts)]

@pytest.mark.parametrize("path", PROSE, ids=lambda p: p.name)
def test_no_issue_numbers_in_what_a_reader_reads(path):
    "Notebooks, the README and the docs say what is measured and why; a reader of them has no issue tracker."
    hits = [m.group(0) for m in ISSUE.finditer(path.read_text())]
    assert hits == [], f"{path.relative_to(ROOT)} cites {hits}"


STEPS = [("capture", "capture_to_files", "CaptureConfig"), ("clean", "clean_to_files", "CleanConfig"),
         ("cluster", "cluster_to_files", "ClusterConfig"), ("selection", "select_to_files", "SelectConfig"),
         ("finetune", "finetune_to_files", "FinetuneConfig"), ("iterate", "iterate", "IterateConfig")]


@pytest.mark.parametrize("module,step,config", STEPS)
def test_every_step_takes_the_workspace_and_one_config(module, step, config):
    "S1-S6 share one shape: the step's function takes the workspace and its `Config` dataclass, whose CLI options come from it."
    import dataclasses
    import importlib
    import inspect
    from slm_research.workspace import Config
    mod = importlib.import_module(f"slm_research.{module}")
    fn, cfg = getattr(mod, step), getattr(mod, config)
    assert dataclasses.is_dataclass(cfg) and issubclass(cfg, Config)
    params = list(inspect.signature(fn).parameters)
    assert "config" in params[:3] and any(p in params[:3] for p in ("ws", "workspace")), params
    assert cfg.from_dict(cfg().to_dict()) == cfg()       # a config survives its own round trip


WORKSPACE_USE = re.compile(r"\bWorkspace\(\)|paths\(\)\.processed|\.processed\s*/")   # the profile's workspace, or a file in it

def test_only_the_workspace_chain_uses_the_profiles_workspace():
    "`slm-research run --jobs 2` runs every notebook outside `runner.WORKSPACE_CHAIN` beside it: none may touch its files."
    from slm_research.runner import WORKSPACE_CHAIN
    users = set()
    for nb in NBS.glob("[0-9][0-9]_*.ipynb"):
        code = ["".join(c["source"]) for c in json.loads(nb.read_text())["cells"] if c["cell_type"] == "code"]
        if any(WORKSPACE_USE.search(s) for s in code if not EXPORT.search(s)): users.add(nb.stem)
    assert users - set(WORKSPACE_CHAIN) == set(), sorted(users - set(WORKSPACE_CHAIN))
