"""The package layout: no import cycles, and imports run one way between the sub-packages.

Every ``import`` counts, at module top or inside a function: a lazy import still ties two modules together
(and still runs), so it may not point the wrong way either.
"""

from __future__ import annotations

import ast
from pathlib import Path

PKG = "smolora_mlflow"
ROOT = Path(__file__).resolve().parents[1] / PKG

# The foundation: stdlib-only modules at the package root that every layer, and the side, may read.
FOUNDATION = {"config", "config_checks", "config_parsing", "constants", "refs", "redaction", "errors"}
# Lower layers never import higher ones. flavor, registry and compare stand to the side: they import only the
# foundation and models, and only evaluation and the layers above it import them.
LAYERS = {**dict.fromkeys(FOUNDATION | {"upstream_options"}, 0),
          "models": 1, "data": 2, "evaluation": 3,
          "tracking": 4, "train": 5, "workflow": 6, "serving": 6, "cli": 7}
SIDE = {"flavor", "registry", "compare"}
SIDE_MAY_IMPORT = FOUNDATION | {"models"}
SIDE_IMPORTERS_FROM_LAYER = LAYERS["evaluation"]


def _modules() -> dict[str, Path]:
    out = {}
    for path in ROOT.rglob("*.py"):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _imports(path: Path, module: str, known: set[str]) -> set[str]:
    """Our modules that ``module`` imports (``from pkg import sub`` counts as importing ``pkg.sub``)."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == PKG)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if target.split(".")[0] != PKG:
                continue
            subs = {f"{target}.{a.name}" for a in node.names} & known
            found.update(subs or {target})
    return {m for m in found if m in known and m != module}


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {m: _imports(p, m, set(mods)) for m, p in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                comp = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    comp.append(m)
                    if m == node:
                        break
                if len(comp) > 1:
                    out.append(sorted(comp))
    return out


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _forbidden(importer: str, imported: str) -> str | None:
    a, b = _area(importer), _area(imported)
    if a == b or a in ("", "__main__") or b == "":  # the package root imports only the config
        return None
    if a in SIDE:
        return None if b in SIDE_MAY_IMPORT else f"{a} stands to the side and may import only {sorted(SIDE_MAY_IMPORT)}"
    if b in SIDE:
        ok = LAYERS.get(a, -1) >= SIDE_IMPORTERS_FROM_LAYER
        return None if ok else f"{a} is below evaluation and may not import {b}"
    if a not in LAYERS or b not in LAYERS:
        return f"{importer} or {imported} is in no layer; add it to LAYERS or SIDE"
    return None if LAYERS[b] <= LAYERS[a] else f"{a} (layer {LAYERS[a]}) may not import {b} (layer {LAYERS[b]})"


def test_the_checker_sees_lazy_imports_and_cycles():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert _cycles(graph) == [["a", "b", "c"]]
    g = _graph()
    assert "smolora_mlflow.train" in g["smolora_mlflow.workflow.pipeline"]  # imported inside a function there
    assert _forbidden("smolora_mlflow.flavor", "smolora_mlflow.train") is not None
    assert _forbidden("smolora_mlflow.models.pretrained", "smolora_mlflow.data") is not None


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_imports_run_one_way():
    bad = [f"{m} imports {d}: {why}" for m, deps in sorted(_graph().items()) for d in sorted(deps)
           if (why := _forbidden(m, d))]
    assert bad == []


def test_every_module_sits_in_a_layer_or_to_the_side():
    areas = {_area(m) for m in _modules()} - {"", "__main__"}
    assert areas <= set(LAYERS) | SIDE


def test_init_files_only_hand_names_on():
    """An ``__init__.py`` is a package's face: docstring, imports, ``__all__`` (PEFT's ``tuners/lora/__init__.py``).

    Implementation lives in modules named for what they hold; only a module ``__getattr__`` (lazy imports) may
    be defined here.
    """
    offenders = []
    for path in sorted(ROOT.rglob("__init__.py")):
        for node in ast.parse(path.read_text(encoding="utf-8")).body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == "__getattr__":
                continue
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                offenders.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} defines {node.name}")
    assert offenders == []


def test_no_module_shadows_the_standard_library():
    import sys

    shadows = sorted(str(p.relative_to(ROOT.parent)) for p in ROOT.rglob("*.py")
                     if p.stem in sys.stdlib_module_names)
    assert shadows == []
