"""The package's layers: imports point one way (core <- models <- methods <- seg <- viz <- cli)
and no two modules import each other, directly or through others, counting the imports made
inside functions too (they would hide a cycle from Python but not from a reader)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "sfp"
LAYERS = ("core", "models", "methods", "seg", "viz", "cli")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in ROOT.rglob("*.py")}


def _target(name: str) -> str | None:
    """The sfp module an import of ``name`` loads (longest existing prefix)."""
    parts = name.split(".")
    while parts:
        candidate = ".".join(parts)
        if candidate in MODULES:
            return candidate
        parts.pop()
    return None


def _imports(module: str) -> set[str]:
    tree = ast.parse(MODULES[module].read_text(encoding="utf-8"))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for name in names:
            if name.split(".")[0] == "sfp":
                target = _target(name)
                if target and target != module:
                    out.add(target)
    return out


GRAPH = {m: _imports(m) for m in MODULES}


def _layer(module: str) -> int:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else -1


def test_every_module_is_in_a_layer():
    loose = [m for m in MODULES if _layer(m) < 0 and m not in ("sfp", "sfp._lazy", "sfp.__main__")]
    assert loose == []


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_point_down(module):
    if module in ("sfp", "sfp.__main__"):
        return
    up = sorted(t for t in GRAPH[module] if _layer(t) > _layer(module))
    assert up == [], f"{module} (layer {LAYERS[_layer(module)]}) imports higher layers: {up}"


def test_no_import_cycles():
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for t in sorted(GRAPH[m]):
            if t in ("sfp",):  # the root only holds lazy names and the version
                continue
            if state.get(t) == 1:
                cycle = stack[stack.index(t):] + [t]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if t not in state:
                visit(t)
        stack.pop()
        state[m] = 2

    for m in sorted(GRAPH):
        if m not in state:
            visit(m)


def test_the_graph_is_not_empty():
    assert "sfp.core.forward" in GRAPH["sfp.methods.baselines"]
    assert "sfp.seg.pipeline" in GRAPH["sfp.viz.figures.ablation"]


def test_import_sfp_is_cheap_and_short_module_names_resolve() -> None:
    """``import sfp`` loads no torch; ``sfp.io`` and friends are the modules one layer down."""
    code = (
        "import sys, sfp\n"
        "assert 'torch' not in sys.modules, 'import sfp imported torch'\n"
        "import sfp.core.io, sfp.core.probe, sfp.models.synthetic, sfp.models.text\n"
        "assert sfp.io is sfp.core.io and sfp.io.load_image is sfp.load_image\n"
        "assert sfp.probe is sfp.core.probe and sfp.synthetic is sfp.models.synthetic\n"
        "assert sfp.text is sfp.models.text and sfp.outliers is sfp.core.outliers\n"
        "import sfp.core.neurons\n"
        "assert sfp.neurons is sfp.core.neurons\n"
        "assert {'io', 'probe', 'neurons', 'widgets'} <= set(dir(sfp))\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300, cwd=ROOT.parent)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
