"""The package's import graph, read with ``ast``: no circles, and the layer rules hold.

Every import counts, including those inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = "mlflow_deploy_plugin"
ROOT = Path(__file__).resolve().parents[2] / PACKAGE


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> set[str]:
    """Absolute names of everything ``path`` imports (relative imports resolved)."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            found.add(prefix)
            # `from pkg import sub` may import a submodule: count it when it is one.
            found.update(f"{prefix}.{alias.name}" for alias in node.names)
    return found


def _graph() -> dict[str, set[str]]:
    modules = {_module_name(path): path for path in ROOT.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {target for target in _imports(path) if target in modules and target != name}
    return graph


GRAPH = _graph()


def _reachable(start: str, graph: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for target in graph.get(todo.pop(), ()):
            if target not in seen:
                seen.add(target)
                todo.append(target)
    return seen


def _is_package_init(name: str) -> bool:
    return (ROOT.parent / name.replace(".", "/") / "__init__.py").exists()


def test_the_graph_was_read() -> None:
    assert f"{PACKAGE}.deployments" in GRAPH and f"{PACKAGE}.target" in GRAPH
    assert f"{PACKAGE}.deployments" in GRAPH[f"{PACKAGE}.target"]


def test_no_import_circles() -> None:
    # A package's __init__ importing its own submodule is how packages export names, not a circle.
    graph = {name: {t for t in targets if not (_is_package_init(name) and t.startswith(name + "."))}
             for name, targets in GRAPH.items()}
    circles = sorted(name for name in graph if name in _reachable(name, graph))
    assert not circles, f"modules on an import circle: {circles}"


@pytest.mark.parametrize("layer", ["serving", "capture"])
def test_serving_and_capture_import_nothing_from_lifecycle_or_monitoring(layer: str) -> None:
    offenders = {name: sorted(t for t in targets if t.startswith((f"{PACKAGE}.lifecycle", f"{PACKAGE}.monitoring")))
                 for name, targets in GRAPH.items() if name.startswith(f"{PACKAGE}.{layer}")}
    assert not {k: v for k, v in offenders.items() if v}


def _outside_imports(path: Path) -> set[str]:
    """What ``path`` imports: package modules by name, anything else by its top-level name."""
    return {target if target.startswith(PACKAGE + ".") else target.split(".")[0]
            for target in _imports(path) if target in GRAPH or not target.startswith(PACKAGE)}


def test_supervisor_imports_only_stdlib_and_spec_state() -> None:
    allowed_own = {f"{PACKAGE}.spec", f"{PACKAGE}.state", f"{PACKAGE}.engines.local.mailbox",
                   f"{PACKAGE}.engines.local.worker_protocol", f"{PACKAGE}.engines.local.supervisor",
                   f"{PACKAGE}.engines.local.liveness", f"{PACKAGE}.engines.local.processes",
                   f"{PACKAGE}.engines.local.capture_keeper", f"{PACKAGE}.engines.local.handoff",
                   f"{PACKAGE}.engines.local.capture_loss", f"{PACKAGE}.engines.local.oom",
                   f"{PACKAGE}.engines.local.capture_drop_metric", f"{PACKAGE}.engines.local.forkserver",
                   f"{PACKAGE}.timeline"}
    for own in sorted(allowed_own):  # the supervisor, and the modules it imports
        for target in _outside_imports(ROOT.parent / (own.replace(".", "/") + ".py")):
            if target.startswith(PACKAGE):
                assert target in allowed_own, f"{own} imports {target}"
            else:
                assert target in sys.stdlib_module_names or target == "__future__", f"{own} imports {target}"


def test_supervisor_process_loads_no_third_party_module() -> None:
    """What a running supervisor holds: the package's own modules and the standard library only."""
    import subprocess

    code = ("import sys, mlflow_deploy_plugin.engines.local.supervisor; "
            "print('\\n'.join(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True, timeout=120)
    loaded = set(out.stdout.split())
    third_party = sorted({m.split(".")[0] for m in loaded} - set(sys.stdlib_module_names) - {PACKAGE}
                         - {m for m in loaded if m.startswith("_")})
    assert third_party == [], f"the supervisor process imports {third_party}"
    own = sorted(m for m in loaded if m.startswith(PACKAGE + ".") and not _is_package_init(m))
    assert own == [f"{PACKAGE}.engines.local.capture_drop_metric", f"{PACKAGE}.engines.local.capture_keeper",
                   f"{PACKAGE}.engines.local.capture_loss", f"{PACKAGE}.engines.local.forkserver",
                   f"{PACKAGE}.engines.local.handoff",
                   f"{PACKAGE}.engines.local.liveness", f"{PACKAGE}.engines.local.mailbox",
                   f"{PACKAGE}.engines.local.oom", f"{PACKAGE}.engines.local.processes", f"{PACKAGE}.engines.local.supervisor",
                   f"{PACKAGE}.engines.local.worker_protocol", f"{PACKAGE}.spec", f"{PACKAGE}.state",
                   f"{PACKAGE}.timeline"], own


def test_nothing_below_target_imports_it() -> None:
    importers = sorted(name for name, targets in GRAPH.items() if f"{PACKAGE}.target" in targets)
    assert importers == []


def test_lifecycle_engine_does_not_load_the_mlflow_facing_client() -> None:
    import subprocess

    code = ("import mlflow_deploy_plugin.lifecycle.controller, sys; "
            "assert 'mlflow_deploy_plugin.target' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)
