"""Check that the code the docs name still exists: dotted names ``finetune.x.y`` / ``zoo.x.y`` and test ids
``tests/....py::name`` in README.md, docs/**/*.md and the docstrings and comments of finetune/, zoo/,
scripts/ and tests/.

Static (no import, no torch): a dotted name resolves when its longest prefix is a module or package of this
tree and what follows is a name that module defines (def, class, assignment, import, ``__all__`` or a lazy
``_LAZY`` key), then a name that class defines (method, attribute, dataclass field). Deeper parts (an
attribute of a function's result) are not checked. A test id resolves when its file exists and defines the
test (a function, or ``Class::method``); a ``[param]`` suffix is ignored.

Usage: ``python scripts/check_doc_refs.py`` prints one line per stale reference (file:line: name: why) and
exits 1 when there is one; tests/test_docs_refs.py runs it.
"""
from __future__ import annotations

import ast
import functools
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("finetune", "zoo")
# a dotted name not glued to a word, a path, an option or a URL before it ("zoo-finetune.x", "/zoo.x", "-zoo.x")
DOTTED = re.compile(r"(?<![\w./\-])(?:finetune|zoo)(?:\.[A-Za-z_]\w*)+")
TEST_ID = re.compile(r"(?<![\w./])tests/[\w/]+\.py(?:::\w+(?:::\w+)?)?")
_SUFFIXES = {"py", "md", "yaml", "yml", "json", "html", "txt", "csv", "toml", "pt", "safetensors", "png"}
# Spelled like code, but no code: keys of a bundle's config.json "zoo" section, seed strings and click meta keys,
# and the made-up modules of tests/test_layering.py's cycle test.
NOT_CODE = frozenset({
    "zoo.weights_sha256", "zoo.source_sha256", "zoo.published_from_sha256", "zoo.head",
    "zoo.aug", "zoo.DeviceAugment", "zoo.BatchMix", "zoo.args",
    "finetune.a", "finetune.b",
})


def doc_files() -> list[Path]:
    """The text that names code: the Markdown docs, and the Python sources (docstrings and comments)."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
    for folder in (*PACKAGES, "scripts", "tests"):
        files += sorted((ROOT / folder).rglob("*.py"))
    own = {Path(__file__).resolve(), ROOT / "tests" / "test_docs_refs.py"}     # they name stale code on purpose
    return [f for f in files if f.is_file() and f.resolve() not in own]


def _module_file(parts: list[str]) -> Path | None:
    base = ROOT.joinpath(*parts)
    for candidate in (base / "__init__.py", base.with_suffix(".py")):
        if candidate.is_file():
            return candidate
    return None


@functools.lru_cache(maxsize=None)
def _tree(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"))


def _body_names(body: list[ast.stmt]) -> set[str]:
    """Names a module or class body binds, looking into if/try blocks (optional imports)."""
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
                if isinstance(target, ast.Name) and target.id in ("__all__", "_LAZY"):
                    names |= {c.value for c in ast.walk(node.value)
                              if isinstance(c, ast.Constant) and isinstance(c.value, str)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.If, ast.Try, ast.With)):
            for block in ("body", "orelse", "finalbody"):
                names |= _body_names(getattr(node, block, []))
            for handler in getattr(node, "handlers", []):
                names |= _body_names(handler.body)
    return names


def _class_names(module: ast.Module, name: str) -> set[str] | None:
    """What class ``name`` defines, its own attributes set in methods included; None when it is no class."""
    for node in module.body:
        if isinstance(node, ast.ClassDef) and node.name == name:
            names = _body_names(node.body)
            for sub in ast.walk(node):
                if isinstance(sub, ast.Attribute) and isinstance(sub.value, ast.Name) and sub.value.id == "self":
                    names.add(sub.attr)
            return names
    return None


def check_dotted(name: str) -> str | None:
    """Why ``name`` does not resolve, or None when it does."""
    parts = name.split(".")
    if name in NOT_CODE or parts[-1] in _SUFFIXES or parts[-1].startswith("__"):     # a file name, a dunder
        return None
    k = len(parts)
    while k > 0 and _module_file(parts[:k]) is None:
        k -= 1
    if k == 0:
        return f"no module {parts[0]}"
    rest = parts[k:]
    if not rest:
        return None
    module = _tree(_module_file(parts[:k]))
    if rest[0] not in _body_names(module.body):
        return f"{'.'.join(parts[:k])} defines no {rest[0]}"
    if len(rest) > 1:
        members = _class_names(module, rest[0])
        if members is not None and rest[1] not in members:
            return f"{'.'.join(parts[:k + 1])} has no {rest[1]}"
    return None


def check_test_id(ref: str) -> str | None:
    path, _, names = ref.partition("::")
    file = ROOT / path
    if not file.is_file():
        return "no such test file"
    if not names:
        return None
    parts = names.split("::")
    module = _tree(file)
    if parts[0] not in _body_names(module.body):
        return f"{path} defines no {parts[0]}"
    if len(parts) > 1:
        members = _class_names(module, parts[0])
        if members is None or parts[1] not in members:
            return f"{path}::{parts[0]} has no {parts[1]}"
    return None


def stale_refs() -> list[str]:
    out = []
    for file in doc_files():
        rel = file.relative_to(ROOT)
        for lineno, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
            if file.suffix == ".py" and line.lstrip().startswith(("import ", "from ")):
                continue        # an import is checked by the interpreter
            for m in DOTTED.finditer(line):
                why = check_dotted(m.group(0).rstrip("."))
                if why:
                    out.append(f"{rel}:{lineno}: {m.group(0)}: {why}")
            for m in TEST_ID.finditer(line):
                why = check_test_id(m.group(0))
                if why:
                    out.append(f"{rel}:{lineno}: {m.group(0)}: {why}")
    return out


def main() -> int:
    stale = stale_refs()
    for line in stale:
        print(line)
    return 1 if stale else 0


if __name__ == "__main__":
    sys.exit(main())
