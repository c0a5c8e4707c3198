"""The package's shape: no import cycles between its modules, each hand-off file named by one owner, one owner of progress bars."""
import ast
import re
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent/"slm_research"
MODULES = {p.stem for p in PKG.glob("*.py") if not p.stem.startswith("_")}


def imports_of(path: Path) -> set[str]:
    "The package modules `path` imports anywhere in it (top level or inside functions)."
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            mod = node.module or ""
            if node.level and not mod:                      # from . import x
                found |= {a.name for a in node.names}
            elif node.level or mod.startswith("slm_research"):
                parts = mod.split(".")
                name = parts[-1] if parts[-1] != "slm_research" else None
                found |= {name} if name else {a.name for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name.split(".")[1] for a in node.names if a.name.startswith("slm_research.")}
    return (found & MODULES) - {path.stem}


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


def test_the_package_has_no_import_cycle():
    graph = {m: imports_of(PKG/f"{m}.py") for m in MODULES}
    assert "workspace" in graph["finetune"]          # the reader sees real edges
    assert find_cycle(graph) is None, f"import cycle: {' -> '.join(find_cycle(graph))}"


@pytest.mark.parametrize("name", ["gate.json", "registry.json", "calls_clean.parquet", "clusters.parquet", "clusters.json",
                                  "selection.json", "clean_report.json", "clean_quarantine.jsonl"])
def test_handoff_file_names_are_spelled_only_in_the_workspace(name):
    owners = sorted(p.stem for p in PKG.glob("*.py") if p.stem != "_modidx" and re.search(re.escape(f'"{name}"'), p.read_text()))
    assert owners == ["workspace"], f"{name} is spelled out in {owners}"


def test_progress_bars_have_one_owner():
    "Every bar goes through `core.progress`, which honours SLM_PROGRESS and throttles when stderr is not a terminal."
    users = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in ("core", "_modidx")
                   and re.search(r"^\s*(from tqdm|import tqdm)", p.read_text(), re.M))
    assert users == [], f"tqdm used directly in {users}: use slm_research.core.progress"


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
