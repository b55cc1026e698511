"""The layout shows the architecture: layers import only from below, policies know no training,
no import cycle, small files."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parent.parent / "src" / "ppolm"
# From the bottom up; a module may import from its own layer and those before it. Evaluation
# (evaluate, EvalCallback, the KL budget, the report) needs no trainer, and the Trainer makes an
# EvalCallback from its eval_dataset, so evaluation sits below training.
LAYERS = ["errors", "maths", "config", "policies", "rollout", "parallel", "engines",
          "checkpoint", "observe", "evaluation", "training", "reward_modeling", "run", "cli",
          "__main__", "__init__"]


def modules() -> dict[str, Path]:
    """Module name -> file; a package is named by its ``__init__.py``."""
    out = {}
    for p in SRC.rglob("*.py"):
        parts = p.relative_to(SRC.parent).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = p
    return out


def imports(path: Path) -> set[str]:
    """The ppolm modules a file imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("ppolm"):
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("ppolm"))
    return found & set(modules())


def layer(module: str) -> int:
    part = module.split(".")[1] if module != "ppolm" else "__init__"
    return LAYERS.index(part)


def test_layers_import_only_from_below():
    checked = 0
    for name, path in modules().items():
        if name == "ppolm":
            continue                                  # the public API re-exports everything
        for dep in imports(path):
            assert dep != "ppolm", f"{name} imports the top-level package"
            assert layer(dep) <= layer(name), f"{name} imports {dep} (a higher layer)"
            checked += 1
    assert checked > 50


def test_policies_import_nothing_of_engines_training_or_checkpoints():
    for name, path in modules().items():
        if name.startswith("ppolm.policies"):
            bad = [d for d in imports(path) if d.split(".")[1] in
                   ("engines", "training", "rollout", "evaluation", "run", "cli")]
            assert not bad, f"{name} imports {bad}"


def test_checkpoint_code_imports_nothing_of_the_trainer():
    deps = imports(SRC / "checkpoint" / "folders.py")
    assert not [d for d in deps if d != "ppolm.errors"], deps


def test_no_import_cycle():
    # a package's __init__ counts as a module: a cycle through a re-export is still a cycle
    graph = {name: imports(path) for name, path in modules().items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for dep in graph.get(node, ()):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join([*trail, node, dep]))
            if dep not in state:
                visit(dep, [*trail, node])
        state[node] = 2

    for node in list(graph):
        if node not in state:
            visit(node, [])


def test_no_source_file_over_400_lines():
    long = {name: n for name, p in modules().items()
            if (n := len(p.read_text().splitlines())) > 400}
    assert not long, long


def test_no_module_shares_a_name_with_a_package():
    # training/engines.py beside the engines/ package made a reader open the wrong file
    packages = {p.name for p in SRC.iterdir() if p.is_dir() and (p / "__init__.py").exists()}
    clash = [name for name, p in modules().items()
             if p.name != "__init__.py" and p.stem in packages and p.parent != SRC]
    assert not clash, clash


def test_the_loop_in_the_architecture_page_is_the_source():
    """docs/architecture.md's loop snippet: each code line is a line of trainer.py, so the page
    cannot drift from the loop it describes."""
    doc = (SRC.parent.parent / "docs" / "architecture.md").read_text()
    block = doc.split("## The loop", 1)[1].split("```python", 1)[1].split("```", 1)[0]
    source = {line.strip() for line in (SRC / "training" / "trainer.py").read_text().splitlines()}
    code = [line.strip() for line in block.splitlines()
            if line.strip() and not line.strip().startswith("#")]
    assert len(code) >= 10
    missing = [line for line in code if line not in source]
    assert not missing, f"lines of the architecture page's loop not in trainer.py: {missing}"
