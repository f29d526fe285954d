"""The import graph of vitsink_jax/ (every import, at a module's top or inside a function):
no circle, and the layers import downward only (data/ nothing above it, models/ no other
family's file)."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "vitsink_jax"


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def import_graph() -> dict:
    """{module: set of vitsink_jax modules it imports} (a ``from . import x`` of a submodule
    counts as importing that submodule)."""
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
        edges = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[:len(package.split(".")) - node.level + 1]
                    base = ".".join(anchor + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            edges |= {t for t in targets if t in modules and t != name}
        graph[name] = edges
    return graph


def cycles(graph: dict) -> list:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = set()
            while True:
                w = stack.pop()
                on.discard(w)
                comp.add(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_no_import_circle():
    graph = import_graph()
    # a package's __init__ importing its own submodules is the package, not a circle
    for name in graph:
        graph[name] = {t for t in graph[name] if not (t.startswith(name + ".") or name.startswith(t + ".")
                                                      and PACKAGE.joinpath(*t.split(".")[1:], "__init__.py").exists())}
    assert cycles(graph) == []


def test_data_imports_nothing_above_it():
    allowed = ("vitsink_jax.data", "vitsink_jax.config", "vitsink_jax.paths", "vitsink_jax.atomic",
               "vitsink_jax.provenance", "vitsink_jax.progress", "vitsink_jax.resolved")
    above = {m: sorted(t for t in edges if not t.startswith(allowed))
             for m, edges in import_graph().items() if m.startswith("vitsink_jax.data")}
    assert {m: t for m, t in above.items() if t} == {}


# One file per model family (its config reading and module); the rest of models/ is shared:
# registry, layers, attention, rope, outputs, tower (the towers' skeleton), merge, projector, and
# the compositions every LLM / LVLM family builds on (llm.py runs phi's and gemma's blocks, lvlm.py
# is LLaVA's and the base of the other LVLMs).
FAMILIES = {"vit", "dinov2", "internvit", "internvl", "gemma", "gemma3", "phi", "qwen2_5_vl"}


def test_the_family_files_are_the_models_files_that_register():
    registering = {p.stem for p in (PACKAGE / "models").glob("*.py") if "registry.register_" in p.read_text()}
    assert registering == FAMILIES | {"llm", "lvlm"}  # llama / qwen2 and llava register in their compositions


def test_no_model_file_imports_another_familys():
    graph = import_graph()
    family = {f"vitsink_jax.models.{f}" for f in FAMILIES}
    bad = {m: sorted(graph[m] & family) for m in family}
    assert {m: t for m, t in bad.items() if t} == {}


def test_config_imports_no_family():
    """config.py (the shared fields) reaches the families only through the registry."""
    assert {t for t in import_graph()["vitsink_jax.config"] if t.startswith("vitsink_jax.models")} == \
        {"vitsink_jax.models.registry"}
