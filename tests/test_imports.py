"""The package has no import cycles: a static check over every `import` / `from ... import` in src/prunetune,
function-level (lazy) ones included, since a lazy import that closes a circle only hides it. Importing a.b.c runs
package a.b first, so that counts as an edge too (the root package `prunetune` aside). Imports under
`if TYPE_CHECKING:` never run and are skipped. Plus: each module imports on its own in a fresh interpreter."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "src" / "prunetune"


def _modules() -> dict[str, tuple[Path, list[str]]]:
    mods = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
            package = parts
        else:
            package = parts[:-1]
        mods[".".join(parts)] = (f, package)
    return mods


def _runtime_nodes(tree: ast.AST):
    """Every node except the bodies of `if TYPE_CHECKING:` blocks."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def import_graph() -> dict[str, set[str]]:
    mods = _modules()
    graph: dict[str, set[str]] = {}
    for name, (path, package) in mods.items():
        deps: set[str] = set()
        for node in _runtime_nodes(ast.parse(path.read_text())):
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom):
                base = package[:len(package) - (node.level - 1)] if node.level else []
                module = ".".join(base + ([node.module] if node.module else []))
                targets = [module] + [f"{module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            for t in targets:
                while t.count(".") >= 1:  # the module and the packages above it (below the root) run
                    if t in mods and t != name and not name.startswith(t + "."):
                        deps.add(t)
                    t = t.rsplit(".", 1)[0]
        graph[name] = deps
    return graph


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycles_inside_the_package():
    graph = import_graph()
    assert "prunetune.arch.families" in graph["prunetune.arch"]  # the graph sees package re-exports
    assert find_cycles(graph) == []


def test_the_checker_finds_a_cycle():
    assert find_cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_leaf_modules_import_alone_in_a_fresh_interpreter():
    """The modules the former circles ran through, each first in its own interpreter (fixed order)."""
    env = dict(os.environ, PYTHONPATH=str(PKG.parent) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    for module in ("prunetune.arch.families", "prunetune.data.metrics", "prunetune.data.causal", "prunetune.config"):
        proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, env=env,
                              timeout=300)
        assert proc.returncode == 0, f"{module}: {proc.stderr[-2000:]}"


def test_module_and_attribute_names_live_in_arch():
    """Family strings, block paths and config attribute names are arch/'s knowledge (descriptor attributes and
    helpers), not repeated elsewhere in the package."""
    import re

    pattern = re.compile(r'"\.0\."|lm_head|n_embd|n_positions|base_model_prefix|max_position_embeddings|'
                         r'== "(?:bert|gpt2|opt|llama|roberta)"|"Conv1D"')
    hits = [f"{f.relative_to(PKG)}:{i}: {line.strip()}" for f in sorted(PKG.rglob("*.py"))
            if f.relative_to(PKG).parts[0] != "arch"
            for i, line in enumerate(f.read_text().splitlines(), 1)
            # doctest examples are user code (they build a tiny config the way a user would)
            if pattern.search(line.split("#")[0]) and not line.strip().startswith((">>>", "..."))]
    assert hits == []


def test_prune_peft_builds_models_through_common():
    """PrunePEFT's supernet base comes from methods/common.load_base (causal-LM head, tokenizer check), not a copy."""
    source = (PKG / "methods" / "prune_peft.py").read_text()
    assert "load_base(ctx)" in source and "load_model(" not in source and "get_arch(" not in source
