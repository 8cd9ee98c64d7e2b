"""Repository rules: clean notebooks, chapter order of imports, one package list for pip and conda."""
from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))

# Which chapter each dslib module belongs to. A module may import only modules of its own or earlier chapters.
CHAPTER = {
    "config": 1, "fp8": 1, "kv_cache": 1, "attention": 1, "cost": 1, "viz": 1, "show": 1, "paths": 1,
    "rope": 2, "mla": 2,
    "indexer": 3, "sparse": 3, "tasks": 3, "train": 3,
    "moe": 4, "moe_train": 4,
    "model": 5, "checkpoint": 5, "devices": 5, "record": 5, "lm_data": 5, "lm_train": 5,
    "synthetic": 6, "streaming": 6, "kernels": 6,
}
# The GPU kernels (chapter 6) are a backend of earlier chapters' modules: those may import them, but only inside a
# function (loaded when a caller asks for backend="triton" or runs an FP8 linear on a GPU), never at module level.
LAZY_BACKENDS = ("dslib.kernels",)
EXERCISES = {f"exercises.ch{n}": n for n in range(1, 7)}


def chapter_of(module: str) -> int | None:
    """'dslib.viz.moe' -> 1 (viz is chapter 1); 'dslib.exercises.ch3' -> 3; 'dslib' -> 0."""
    parts = module.split(".")
    if parts[0] != "dslib":
        return None
    if len(parts) == 1:
        return 0
    if len(parts) >= 3 and ".".join(parts[1:3]) in EXERCISES:
        return EXERCISES[".".join(parts[1:3])]
    if parts[1] == "exercises":
        return 1
    if parts[1] not in CHAPTER:
        raise AssertionError(f"dslib.{parts[1]} has no chapter: add it to CHAPTER in tests/test_hygiene.py")
    return CHAPTER[parts[1]]


def dslib_imports(source: str, package: str) -> set[str]:
    """Every dslib module named by an import statement (absolute or relative)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "dslib"}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if mod.split(".")[0] == "dslib":
                found.add(mod)
                found |= {f"{mod}.{a.name}" for a in node.names
                          if f"{mod}.{a.name}".count(".") <= 2 and a.name[:1].islower()
                          and chapter_known(f"{mod}.{a.name}")}
    return found


def chapter_known(module: str) -> bool:
    parts = module.split(".")
    return len(parts) >= 2 and (parts[1] in CHAPTER or parts[1] == "exercises")


def module_files():
    for path in sorted((ROOT / "dslib").rglob("*.py")):
        rel = path.relative_to(ROOT).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        yield path, ".".join(parts)


@pytest.mark.parametrize("path,module", list(module_files()), ids=lambda x: str(x) if isinstance(x, str) else "")
def test_dslib_imports_follow_chapter_order(path, module):
    own = chapter_of(module)
    if own == 0:  # dslib/__init__.py re-exports; it loads later chapters lazily
        return
    package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    source = path.read_text()
    lazy = lazy_backend_imports(source, package)
    for imported in dslib_imports(source, package) - lazy:
        theirs = chapter_of(imported)
        assert theirs <= own, f"{module} (chapter {own}) imports {imported} (chapter {theirs})"


def lazy_backend_imports(source: str, package: str) -> set[str]:
    """Imports of LAZY_BACKENDS made only inside function bodies (none of them also at module level)."""
    tree = ast.parse(source)
    inside = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for stmt in node.body:
                inside |= dslib_imports(ast.unparse(stmt), package)
    top = dslib_imports(ast.unparse(ast.Module([n for n in tree.body if not isinstance(
        n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))], [])), package)
    for cls in (n for n in tree.body if isinstance(n, ast.ClassDef)):
        top |= dslib_imports(ast.unparse(ast.Module([n for n in cls.body if not isinstance(
            n, (ast.FunctionDef, ast.AsyncFunctionDef))], [])), package)
    return {m for m in inside - top if m.startswith(LAZY_BACKENDS)}


def test_backend_imports_are_lazy():
    """moe.py and checkpoint.py reach the kernels only inside a function; a module-level import is caught."""
    assert lazy_backend_imports("def f():\n    from dslib.kernels import fp8\n", "dslib") >= {"dslib.kernels"}
    assert not lazy_backend_imports("from dslib.kernels import fp8\ndef f():\n    from dslib.kernels import fp8\n",
                                    "dslib")


def notebook_chapter(path: Path) -> int:
    return int(re.match(r"(\d+)_", path.name).group(1))


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_imports_follow_chapter_order(nb):
    own = notebook_chapter(nb)
    cells = json.loads(nb.read_text())["cells"]
    for cell in cells:
        if cell["cell_type"] != "code":
            continue
        src = "".join(cell["source"])
        src = "\n".join(line for line in src.splitlines() if not line.lstrip().startswith(("%", "!")))
        for imported in dslib_imports(src, "dslib"):
            chapter = chapter_of(imported)
            assert chapter <= own, f"{nb.name} (chapter {own}) imports {imported} (chapter {chapter})"


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_committed_clean(nb):
    """No outputs, execution counts or widget state (nbstripout's verify mode)."""
    result = subprocess.run(
        [sys.executable, "-m", "nbstripout", "--verify", "--keep-id", str(nb)], capture_output=True, text=True
    )
    assert result.returncode == 0, (f"{nb.name} carries outputs or metadata: run `make strip`.\n"
                                   f"{result.stdout}{result.stderr}")


def test_every_notebook_has_parameters_cell_and_exercises():
    for nb in NOTEBOOKS:
        cells = json.loads(nb.read_text())["cells"]
        tagged = [c for c in cells if "parameters" in c.get("metadata", {}).get("tags", [])]
        assert len(tagged) == 1, f"{nb.name}: exactly one cell tagged 'parameters' expected"
        text = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "markdown")
        assert "What you built" in text, f"{nb.name}: no 'What you built' section"
        assert "Exercise" in text, f"{nb.name}: no exercises"


def _requirement_names(specs):
    return {re.split(r"[<>=!~ \[]", s.strip(), maxsplit=1)[0].lower().replace("_", "-"): s.replace(" ", "")
            for s in specs}


def test_environment_yml_matches_pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = list(project["dependencies"])
    for extra in ("lab", "dev", "gpu"):
        declared += project["optional-dependencies"].get(extra, [])
    env_lines = (ROOT / "environment.yml").read_text().splitlines()
    pip_specs = [line.strip()[2:].strip() for line in env_lines if line.startswith("      - ")]
    pip_specs = [s for s in pip_specs if not s.startswith("-e")]
    assert _requirement_names(pip_specs) == _requirement_names(declared)


# Calls and attributes whose result is a wall-clock time, measured now or recorded in data/ (`median_ms`,
# `step_ms`, ...). A notebook may print and plot them, never assert on them: on 2 busy cores a timing ratio can
# invert, and a flaky notebook blocks CI. Assert on counted work instead; claims about recorded times are
# checked by tests (tests/test_recorded_claims.py).
TIMING_SOURCES = re.compile(
    r"perf_counter\(|time\.time\(|wall_seconds\(|decode_step_time\(|time_attention\(|\.seconds\b|do_bench\("
    r"|_ms\b|\bms\(|ms_per_step|tokens_per_s"
)


def _timing_names(tree: ast.AST, source: str) -> set[str]:
    """Names assigned (directly, by .append/.extend, or through another timing name) from a wall-clock source.
    Loop variables are not followed: `for name in timings` makes `name` a key, not a time."""
    names: set[str] = set()
    changed = True
    while changed:
        changed = False
        for node in ast.walk(tree):
            if isinstance(node, ast.Assign):
                targets, value = node.targets, node.value
            elif isinstance(node, (ast.AugAssign, ast.AnnAssign)) and node.value is not None:
                targets, value = [node.target], node.value
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("append", "extend") and node.args):
                targets, value = [node.func.value], node.args[0]
            else:
                continue
            text = ast.get_source_segment(source, value) or ""
            used = {n.id for n in ast.walk(value) if isinstance(n, ast.Name)}
            if TIMING_SOURCES.search(text) or used & names:
                for t in targets:
                    while isinstance(t, (ast.Subscript, ast.Attribute)):
                        t = t.value
                    for n in ast.walk(t):
                        if isinstance(n, ast.Name) and n.id not in names:
                            names.add(n.id)
                            changed = True
    return names


@pytest.mark.parametrize("nb", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_asserts_do_not_depend_on_wall_clock(nb):
    cells = json.loads(nb.read_text())["cells"]
    source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
    source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith(("%", "!")))
    tree = ast.parse(source)
    timed = _timing_names(tree, source)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assert):
            used = {n.id for n in ast.walk(node.test) if isinstance(n, ast.Name)} & timed
            assert not used, (
                f"{nb.name}: `{ast.get_source_segment(source, node)}` asserts on wall-clock time ({sorted(used)}); "
                "assert on counted FLOPs, bytes or calls and print the time instead."
            )
