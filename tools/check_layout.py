"""Check EdgeRazor's import graph: no cycle, no import from an earlier stage into a later one, and the
core never importing a built-in plugin module (it reaches them through the plugin manager only).

    python tools/check_layout.py          # prints the stage of every module and any violation
    python tools/check_layout.py --graph  # also prints every internal import edge

Every ``import`` statement counts, including the lazy ones inside functions: a lazy import hides a
cycle from the interpreter, not from the design. Exit status 1 when something is wrong.
"""

from __future__ import annotations

import argparse
import ast
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: Source folders and the package each is installed as (pyproject's package-dir).
PACKAGES = {"edgerazor": "edgerazor", "plugins": "edgerazor.plugins", "model_adapters": "edgerazor.model_adapters"}

#: The pipeline's stages in order; a module may import only from its own stage or earlier ones.
#: Matching is by the longest prefix. ``edgerazor`` itself (the package facade) is exempt.
STAGES: list[tuple[str, tuple[str, ...]]] = [
    ("core", ("edgerazor.errors", "edgerazor.file_modes", "edgerazor.hookspecs", "edgerazor.plugin_manager", "edgerazor.version",
              "edgerazor.progress", "edgerazor.precision", "edgerazor.ranks")),
    ("recipe", ("edgerazor.recipe", "edgerazor.shapes")),
    ("data", ("edgerazor.data",)),
    ("adapters", ("edgerazor.adapters",)),
    ("quant", ("edgerazor.quant",)),
    ("eval", ("edgerazor.eval",)),
    ("distill", ("edgerazor.distill",)),
    ("export", ("edgerazor.export",)),
    ("runtime", ("edgerazor.runtime",)),
    ("llama_cpp", ("edgerazor.llama_cpp",)),
    ("evaluation", ("edgerazor.evaluation",)),
    ("run", ("edgerazor.demo", "edgerazor.demo_video", "edgerazor.run_folder", "edgerazor.run")),
    ("plan", ("edgerazor.plan",)),
    ("cli", ("edgerazor.cli",)),
]
#: Built-in plugins use the public API of any stage; the core must never import them directly.
PLUGIN_PACKAGES = ("edgerazor.plugins", "edgerazor.model_adapters")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT)
    package = PACKAGES[rel.parts[0]]
    parts = [package, *rel.parts[1:]]
    parts[-1] = parts[-1].removesuffix(".py")
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    found = {}
    for folder in PACKAGES:
        for path in sorted((ROOT / folder).rglob("*.py")):
            found[module_name(path)] = path
    return found


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Internal modules that ``name`` imports anywhere in its file (resolved to known modules)."""
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    targets: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            candidates = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for candidate in candidates:
            # ``from edgerazor.quant import count_bits`` names the package; ``from edgerazor import llama_cpp`` a module
            while candidate and candidate not in known:
                candidate = candidate.rpartition(".")[0]
            if candidate and candidate != name:
                targets.add(candidate)
                break
    return targets


def stage_of(name: str) -> int | None:
    best, best_len = None, -1
    for index, (_, prefixes) in enumerate(STAGES):
        for prefix in prefixes:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best_len:
                best, best_len = index, len(prefix)
    return best


def find_cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return cycles


def check() -> tuple[dict[str, set[str]], list[str]]:
    """The import graph and a list of human-readable problems (empty when the layout is sound)."""
    found = modules()
    known = set(found)
    graph = {name: imports(name, path, known) for name, path in found.items()}
    problems = [f"import cycle: {' <-> '.join(c)}" for c in find_cycles(graph)]
    for name, targets in sorted(graph.items()):
        if name == "edgerazor" or name.startswith(PLUGIN_PACKAGES):
            continue
        own = stage_of(name)
        if own is None:
            problems.append(f"{name}: in no stage (add it to STAGES in tools/check_layout.py)")
            continue
        for target in sorted(targets):
            if target.startswith(PLUGIN_PACKAGES):
                problems.append(f"{name} imports the built-in plugin {target}: use the plugin manager")
                continue
            theirs = stage_of(target)
            if theirs is not None and theirs > own and target != "edgerazor":
                problems.append(f"{name} ({STAGES[own][0]}) imports {target} ({STAGES[theirs][0]}), a later stage")
    return graph, problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--graph", action="store_true", help="print every internal import edge")
    args = parser.parse_args(argv)
    graph, problems = check()
    for stage, prefixes in STAGES:
        members = sorted(n for n in graph if stage_of(n) is not None and STAGES[stage_of(n)][0] == stage)
        print(f"{stage:>10}: {', '.join(members)}")
    if args.graph:
        for name, targets in sorted(graph.items()):
            for target in sorted(targets):
                print(f"{name} -> {target}")
    edges = sum(len(t) for t in graph.values())
    print(f"{len(graph)} modules, {edges} internal imports; {len(problems)} problem(s)")
    for problem in problems:
        print(f"  {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
