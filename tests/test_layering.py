"""Architecture rules from DESIGN.md that a test can hold: no import cycle inside ``zoo`` or ``finetune``
(function-local imports and importlib/__import__ calls included), ``finetune`` never imports ``zoo``,
the tree shows the layers (every finetune module in finetune/{core,data,engine,tools}, zoo's commands in zoo/cli,
the work behind them in zoo/jobs) and imports run downward only, the CLI starts without torch, and every module
and function stays short enough to read (450 and 80 lines)."""
from __future__ import annotations

import ast
import io
import subprocess
import sys
import tokenize
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "finetune")
# The layers, top to bottom, one folder each; a module may import its own layer and the ones below it.
LAYERS = {"tools": 3, "engine": 2, "data": 1, "core": 0}              # finetune/<layer>/
ZOO_LAYERS = {"cli": 2, "jobs": 1, "shell": 0}                         # zoo/cli, zoo/jobs, the rest of zoo


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in sorted((ROOT / pkg).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def _lazy_tables(tree: ast.Module) -> dict[str, list[str]]:
    """Module-level ``NAME = {"attr": "module", ...}`` dicts of strings (lazy-import tables)."""
    tables = {}
    for node in tree.body:
        if (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)
                and isinstance(node.value, ast.Dict)
                and all(isinstance(v, ast.Constant) and isinstance(v.value, str) for v in node.value.values)):
            tables[node.targets[0].id] = [v.value for v in node.value.values]
    return tables


def _imports(name: str, path: Path, modules: dict[str, Path]) -> tuple[set[str], list[str]]:
    """(modules of zoo/finetune that ``name`` imports, anywhere in the file; dynamic imports it cannot
    resolve)."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    is_pkg = path.name == "__init__.py"
    package = name if is_pkg else name.rpartition(".")[0]
    tables = _lazy_tables(tree)
    found: set[str] = set()
    unresolved: list[str] = []

    def add(target: str) -> None:
        if target.split(".")[0] in PACKAGES:
            found.add(target)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                add(sub if sub in modules else base)
        elif isinstance(node, ast.Call):
            fn = node.func
            dynamic = (isinstance(fn, ast.Attribute) and fn.attr == "import_module") or \
                      (isinstance(fn, ast.Name) and fn.id in ("__import__", "import_module"))
            if not dynamic or not node.args:
                continue
            arg = node.args[0]
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str):
                add(arg.value)
            elif isinstance(arg, ast.Subscript) and isinstance(arg.value, ast.Name) and arg.value.id in tables:
                for target in tables[arg.value.id]:
                    add(target)
            else:
                unresolved.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    # ``import a.b.c`` runs a/__init__ and a/b/__init__ too, but those are the packages' own business;
    # an edge goes to the module named.
    return {m for m in found if m in modules and m != name}, unresolved


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    graph, unresolved = {}, []
    for name, path in modules.items():
        graph[name], dyn = _imports(name, path, modules)
        unresolved += dyn
    assert not unresolved, ("dynamic imports the layering test cannot follow (use a literal module name or a "
                            f"module-level lazy table of strings): {unresolved}")
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected component with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def _layer(module: str) -> str:
    """finetune's layer of ``module``: the folder below finetune/ it lives in."""
    if module == "finetune":
        return "tools"       # the package's public face (lazy ``fit``) sits on top
    return module.split(".")[1]


def _zoo_layer(module: str) -> str:
    parts = module.split(".")
    if module == "zoo.__main__":
        return "cli"         # ``python -m zoo`` is the command line
    return parts[1] if len(parts) > 1 and parts[1] in ("cli", "jobs") else "shell"


def test_no_import_cycles():
    assert _cycles(_graph()) == []


def test_cycle_detection_sees_function_local_and_importlib_imports(tmp_path):
    """The checker itself: a cycle made of a function-local import and an importlib call is found."""
    a = tmp_path / "a.py"
    a.write_text("def f():\n    from finetune import b\n")
    b = tmp_path / "b.py"
    b.write_text("import importlib\nimportlib.import_module('finetune.a')\n")
    modules = {"finetune.a": a, "finetune.b": b}
    graph = {n: _imports(n, p, modules)[0] for n, p in modules.items()}
    assert _cycles(graph) == [["finetune.a", "finetune.b"]]


def test_finetune_never_imports_zoo():
    graph = _graph()
    offenders = sorted(f"{m} -> {t}" for m, ts in graph.items() if m.startswith("finetune")
                       for t in ts if t.split(".")[0] == "zoo")
    assert offenders == []
    mods = _modules_after("import finetune, finetune.core.config, finetune.core.errors, finetune.tools.train")
    assert not any(m == "zoo" or m.startswith("zoo.") for m in mods)


def test_every_finetune_module_lives_in_a_layer_folder():
    stray = sorted(m for m in _modules() if m.startswith("finetune.") and m.split(".")[1] not in LAYERS)
    assert stray == [], f"put each module in finetune/{{{','.join(LAYERS)}}}/: {stray}"


def test_finetune_layers_import_downward_only():
    graph = _graph()
    upward = sorted(f"{m} ({_layer(m)}) -> {t} ({_layer(t)})" for m, ts in graph.items() if m.startswith("finetune")
                    for t in ts if t.startswith("finetune") and LAYERS[_layer(t)] > LAYERS[_layer(m)])
    assert upward == []


def test_zoo_layers_import_downward_only():
    """zoo/cli (commands, the only code that prints) -> zoo/jobs (what a command does) -> the rest of zoo."""
    graph = _graph()
    upward = sorted(f"{m} ({_zoo_layer(m)}) -> {t} ({_zoo_layer(t)})" for m, ts in graph.items()
                    if m.startswith("zoo") for t in ts if t.startswith("zoo")
                    and ZOO_LAYERS[_zoo_layer(t)] > ZOO_LAYERS[_zoo_layer(m)])
    assert upward == []


def test_cli_command_files_are_named_after_their_commands():
    """``zoo X`` is defined in zoo/cli/X.py (X_cmd.py for a builtin or keyword, dashes as underscores)."""
    from zoo.cli import cli

    misplaced = []
    for name, command in cli.commands.items():
        stem = name.replace("-", "_")
        module = (command.callback.__module__ if command.callback else "").rsplit(".", 1)[-1]
        if module not in (stem, f"{stem}_cmd"):
            misplaced.append(f"zoo {name}: zoo/cli/{module}.py")
    assert misplaced == []


def _modules_after(code: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", code + "\nimport sys; print('\\n'.join(sys.modules))"],
                         capture_output=True, text=True, check=True, cwd=ROOT).stdout
    return set(out.split())


def test_cli_help_does_not_import_torch():
    mods = _modules_after("from click.testing import CliRunner\nfrom zoo.cli import cli\n"
                          "r = CliRunner().invoke(cli, ['--help']); assert r.exit_code == 0, r.output")
    assert "torch" not in mods


# Imports sit at the top of their file. The few that stay inside a function are lazy on purpose (the CLI
# starts without torch, an optional extra reports itself missing, ...) and say so: a comment containing
# "lazy" on the import's line or within the two lines above it; one comment covers a block of consecutive
# imports.


def _uncommented_local_imports(path: Path) -> list[int]:
    """Line numbers of imports inside a function or method of ``path`` that no "lazy" comment explains."""
    source = path.read_text(encoding="utf-8")
    lazy_lines = {tok.start[0] for tok in tokenize.generate_tokens(io.StringIO(source).readline)
                  if tok.type == tokenize.COMMENT and "lazy" in tok.string.lower()}

    def explained(first: int, last: int) -> bool:
        return any(line in lazy_lines for line in range(first - 2, last + 1))

    found: set[int] = set()
    for fn in ast.walk(ast.parse(source)):
        if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        for node in ast.walk(fn):
            for field in ("body", "orelse", "finalbody"):
                stmts = getattr(node, field, None)
                if not isinstance(stmts, list):
                    continue
                block: list[ast.stmt] = []       # the run of consecutive imports being read
                for stmt in [*stmts, None]:
                    if isinstance(stmt, (ast.Import, ast.ImportFrom)):
                        block.append(stmt)
                        continue
                    covered = False                  # a comment covers the imports right below it
                    for imp in block:
                        covered = covered or explained(imp.lineno, imp.end_lineno or imp.lineno)
                        if not covered:
                            found.add(imp.lineno)
                    block = []
    return sorted(found)


def test_function_local_imports_say_why_they_are_lazy():
    offenders = []
    for path in sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")):
        rel = path.relative_to(ROOT).as_posix()
        offenders += [f"{rel}:{line}" for line in _uncommented_local_imports(path)]
    assert not offenders, ("imports inside functions without a comment saying why they are lazy (move them to "
                           f"the top of the file, or add `# lazy: <reason>`): {offenders}")


def test_local_import_check_sees_methods_nested_functions_and_blocks(tmp_path):
    path = tmp_path / "m.py"
    path.write_text("import os\n"                                # 1  top of file: fine
                    "class C:\n"
                    "    def m(self):\n"
                    "        import json\n"                      # 4  a method: flagged
                    "        def inner():\n"
                    "            from pathlib import Path\n"     # 6  a nested function: flagged
                    "def f():\n"
                    "    # lazy: the reason\n"
                    "    import torch\n"                         # 9  commented
                    "    import timm\n"                          # 10 the same block
                    "    x = 1\n"
                    "    import numpy\n"                         # 12 a new block, too far from the comment
                    "    try:\n"
                    "        import onnx  # lazy: optional\n"   # 14 commented on its line
                    "    except ImportError:\n"
                    "        x = 2\n"
                    "        import sys\n"                      # 17 flagged (the comment is 3 lines up)
                    "def g():\n"
                    "    import a\n"                            # 19 above the comment: flagged
                    "    # lazy: b and c\n"
                    "    import b\n"
                    "    import c\n"
                    "\n"
                    "    import d\n")                           # 25 still the block the comment covers
    assert _uncommented_local_imports(path) == [4, 6, 12, 17, 19]


# Sizes a newcomer can read (issue 25): every module under 450 lines, every function (from its ``def`` line
# to its last line, docstring included) at most 80.
MAX_MODULE_LINES = 450
MAX_FUNCTION_LINES = 80


def _too_long(path: Path) -> list[str]:
    source = path.read_text(encoding="utf-8")
    rel = path.relative_to(ROOT).as_posix() if path.is_relative_to(ROOT) else path.name
    lines = len(source.splitlines())
    out = [f"{rel}: {lines} lines"] if lines >= MAX_MODULE_LINES else []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            length = node.end_lineno - node.lineno + 1
            if length > MAX_FUNCTION_LINES:
                out.append(f"{rel}:{node.lineno} {node.name}: {length} lines")
    return out


def test_modules_under_450_lines_and_functions_at_most_80():
    offenders = [o for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py")) for o in _too_long(path)]
    assert offenders == [], ("split by concern (a module per concern, a helper per step), not at the line "
                             f"limit: {offenders}")


def test_size_check_sees_long_functions_and_methods(tmp_path):
    """The checker itself: a method one line over the limit is found, one at the limit is not."""
    body = "\n".join(["        x = 0"] * (MAX_FUNCTION_LINES - 1))
    path = tmp_path / "m.py"
    path.write_text(f"class A:\n    def ok(self):\n{body}\n\n    def long(self):\n{body}\n        x = 1\n")
    assert _too_long(path) == [f"m.py:{MAX_FUNCTION_LINES + 3} long: {MAX_FUNCTION_LINES + 1} lines"]
    path.write_text("x = 0\n" * MAX_MODULE_LINES)
    assert _too_long(path) == [f"m.py: {MAX_MODULE_LINES} lines"]


MAX_LINE_CHARS = 120     # CONVENTIONS' line length; the merges of helper-71 (2026-12) added lines of 121-137


def test_lines_at_most_120_characters():
    offenders = [f"{path.relative_to(ROOT).as_posix()}:{i}: {len(line)}"
                 for pkg in PACKAGES for path in sorted((ROOT / pkg).rglob("*.py"))
                 for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1)
                 if len(line) > MAX_LINE_CHARS]
    assert offenders == [], f"wrap these lines at {MAX_LINE_CHARS} characters: {offenders}"
