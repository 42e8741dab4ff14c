"""Import directions (#17): no circles, no private names taken across modules, no import
against the declared layers (``tests/unit/import_rules.toml``). Reads source text only (ast)."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from helpers import REPO_ROOT

PACKAGES = ("flwr_hpc", "strategies", "client_apps")
RULES = Path(__file__).with_name("import_rules.toml")


def import_graph(root: Path, packages=PACKAGES):
    """``({module: {imported project modules}}, [(module, target, private name)])``:
    every import anywhere in a module (functions included), resolved to the project module
    that provides it."""
    modules = {}
    for pkg in packages:
        for path in (root / pkg).rglob("*.py"):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join(parts)] = path

    def owner(name: str) -> str | None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        return name or None

    edges: dict[str, set[str]] = {m: set() for m in modules}
    private = []
    for mod, path in modules.items():
        is_pkg = path.name == "__init__.py"
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                for alias in node.names:
                    target = owner(alias.name)
                    if target and target != mod:
                        edges[mod].add(target)
            elif isinstance(node, ast.ImportFrom):
                if node.level:
                    base = mod.split(".") if is_pkg else mod.split(".")[:-1]
                    base = base[: len(base) - (node.level - 1)]
                    src = ".".join(base + ([node.module] if node.module else []))
                else:
                    src = node.module or ""
                for alias in node.names:
                    target = owner(f"{src}.{alias.name}") or owner(src)
                    if not target or target == mod:
                        continue
                    edges[mod].add(target)
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        private.append((mod, target, alias.name))
    return edges, private


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Groups of modules that import each other, directly or around a loop."""
    reach = {m: set() for m in edges}
    for start in edges:
        todo = list(edges[start])
        while todo:
            m = todo.pop()
            if m not in reach[start]:
                reach[start].add(m)
                todo.extend(edges.get(m, ()))
    groups = {frozenset({m} | {n for n in reach[m] if m in reach[n]}) for m in edges}
    return sorted(sorted(g) for g in groups if len(g) > 1)


def forbidden(edges: dict[str, set[str]], rules: list[dict]) -> list[tuple[str, str]]:
    return sorted((m, t) for m, ts in edges.items() for t in ts for r in rules
                  if m.startswith(r["from"]) and t.startswith(r["to"]))


def test_the_project_keeps_its_import_directions():
    edges, private = import_graph(REPO_ROOT)
    assert "flwr_hpc.worker" in edges and "flwr_hpc.protocol" in edges
    assert circles(edges) == []
    assert private == []
    assert forbidden(edges, tomllib.loads(RULES.read_text())["forbid"]) == []


def test_the_checker_finds_circles_private_names_and_forbidden_edges(tmp_path):
    pkg = tmp_path / "flwr_hpc"
    (pkg / "worker").mkdir(parents=True)
    (pkg / "server").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "server" / "__init__.py").write_text("")
    (pkg / "server" / "grid.py").write_text("from flwr_hpc.worker import run\n")
    (pkg / "worker" / "__init__.py").write_text(
        "def run():\n    from flwr_hpc.server.grid import _Task\n")
    (pkg / "protocol.py").write_text("from .server import grid\n")
    edges, private = import_graph(tmp_path, packages=("flwr_hpc",))
    assert circles(edges) == [["flwr_hpc.server.grid", "flwr_hpc.worker"]]
    assert private == [("flwr_hpc.worker", "flwr_hpc.server.grid", "_Task")]
    rules = tomllib.loads(RULES.read_text())["forbid"]
    assert forbidden(edges, rules) == [("flwr_hpc.protocol", "flwr_hpc.server.grid"),
                                       ("flwr_hpc.worker", "flwr_hpc.server.grid")]


def test_the_site_worker_reference_is_unchanged():
    """Sites allow-list the task function by its import reference."""
    from flwr_hpc.worker import probe, run_task

    assert f"{run_task.__module__}.{run_task.__qualname__}" == "flwr_hpc.worker.run_task"
    assert f"{probe.__module__}.{probe.__qualname__}" == "flwr_hpc.worker.probe"
