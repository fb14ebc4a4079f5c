"""The package layout is the architecture: sub-packages by lifetime, and imports only point down.

    protocol (and clients/contract.py)  what every layer passes and raises
    config, metrics                      the models config; the metrics every layer records
    engine                               one model's replica: backends, planner, scheduler, engine
    ingress                              per request: HTTP, OpenAI codec, admission, router, model clients
    app, serve_options                   the Serve app built from the config
    tools                                processes around the service (serve_local, serve_run, compile_cache)

A module may import its own layer or a lower one, never a higher one, and no two modules import each
other, directly or around a circle. The HTTP client imports nothing of the server. Every import counts,
including the ones inside functions and under ``TYPE_CHECKING``. No Ray here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
LAYERS = [  # (module prefix, rank); the longest matching prefix decides
    ("clients.contract", 0),
    ("deployments.protocol", 0),
    ("deployments.config", 1),
    ("deployments.metrics", 1),
    ("deployments.engine", 2),
    ("deployments.ingress", 3),
    ("deployments.serve_options", 4),
    ("deployments.app", 4),
    ("deployments.tools", 5),
]
# The client side: what each client module may import of this repository.
CLIENT_ALLOWED = {
    "clients.serve": ("clients", "deployments.protocol", "deployments.engine.device_faults"),
}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def project_modules() -> dict[str, Path]:
    files = [*REPO.glob("deployments/**/*.py"), *REPO.glob("clients/**/*.py")]
    return {module_name(p): p for p in files if "build" not in p.parts}


MODULES = project_modules()


def imports_of(name: str) -> set[str]:
    """The project modules ``name`` imports (``from a.b import c`` counts as a.b.c when that is a module)."""
    tree = ast.parse(MODULES[name].read_text())
    package = name if MODULES[name].name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
            targets = [
                f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names
            ]
        else:
            continue
        found |= {t for t in targets if t in MODULES and t != name}
    return found


def rank(name: str) -> int | None:
    matches = [(len(prefix), r) for prefix, r in LAYERS if name == prefix or name.startswith(prefix + ".")]
    return max(matches)[1] if matches else None


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_server_module_has_a_layer():
    unplaced = [n for n in MODULES if n.startswith("deployments.") and rank(n) is None]
    assert unplaced == [], f"add these to LAYERS: {unplaced}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if rank(n) is not None))
def test_imports_point_down(name):
    upward = [t for t in GRAPH[name] if t.startswith("deployments.") and rank(t) > rank(name)]
    assert upward == [], f"{name} (layer {rank(name)}) imports higher layers: {upward}"
    clients = [t for t in GRAPH[name] if t.startswith("clients") and t != "clients.contract"]
    assert clients == [], f"{name} imports the client: {clients}"


@pytest.mark.parametrize("name", sorted(n for n in MODULES if n.startswith("clients")))
def test_the_client_imports_nothing_of_the_server(name):
    allowed = CLIENT_ALLOWED.get(name, ("clients",))
    foreign = [t for t in GRAPH[name] if not any(t == a or t.startswith(a + ".") for a in allowed)]
    assert foreign == [], f"{name} imports {foreign}"


def test_no_import_circles():
    """Depth-first search for a back edge; the circle is named when found."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for target in sorted(GRAPH[node]):
            if state.get(target) == 1:
                return path[path.index(target) :] + [target]
            if target not in state and (circle := visit(target)):
                return circle
        path.pop()
        state[node] = 2
        return None

    for name in sorted(GRAPH):
        if name not in state and (circle := visit(name)):
            pytest.fail("import circle: " + " -> ".join(circle))


def test_the_walker_sees_imports():
    """The checks above would pass vacuously if the walker found nothing."""
    assert "deployments.engine.scheduler" in GRAPH["deployments.engine.embedding_engine"]
    assert "deployments.config" in GRAPH["deployments.engine.backends.registry"]
    assert "clients.contract" in GRAPH["deployments.protocol.errors"]
