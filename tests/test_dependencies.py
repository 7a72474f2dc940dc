"""Every third-party import in zoo/ and finetune/ is declared in pyproject.toml, and every declaration is used.

The imports are read from the source (AST: ``import x``, ``from x import y`` at any depth, function-local
ones included, and ``importlib.import_module("x")`` with a literal name), so a new import of a package
that pyproject does not name fails here instead of on a user's machine with an ImportError. The
``dev`` extra does not count: it is for the tests, not for the package.
"""
from __future__ import annotations

import ast
import fnmatch
import re
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("zoo", "finetune")
# import name -> distribution name, where they differ beyond case and - / _
IMPORT_TO_DIST = {
    "PIL": "pillow",
    "yaml": "pyyaml",
    "sklearn": "scikit-learn",
}
# submodules of a declared package that need another distribution installed
SUBMODULE_NEEDS = {
    "torch.utils.tensorboard": "tensorboard",
}
TEST_ONLY_EXTRA = "dev"


def _norm(dist: str) -> str:
    """PEP 503 normalised distribution name."""
    return re.sub(r"[-_.]+", "-", dist).lower()


def _dist_name(requirement: str) -> str:
    return _norm(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def declared() -> dict[str, str]:
    """Normalised distribution name -> where it is declared ("dependencies" or "extra NAME"), dev excluded."""
    project = _pyproject()["project"]
    out = {_dist_name(r): "dependencies" for r in project["dependencies"]}
    for extra, reqs in project.get("optional-dependencies", {}).items():
        if extra != TEST_ONLY_EXTRA:
            for r in reqs:
                out.setdefault(_dist_name(r), f"extra {extra}")
    return out


def imported_modules() -> dict[str, set[str]]:
    """Dotted module name -> the files importing it (absolute imports only: relative ones are ours)."""
    found: dict[str, set[str]] = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), rel)):
                names: list[str] = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                        and isinstance(node.args[0].value, str) \
                        and getattr(node.func, "attr", getattr(node.func, "id", None)) == "import_module":
                    names = [node.args[0].value]
                for name in names:
                    found.setdefault(name, set()).add(rel)
    return found


def third_party(modules: dict[str, set[str]]) -> dict[str, set[str]]:
    """Top-level import name -> files, for everything that is neither the stdlib nor our own packages."""
    out: dict[str, set[str]] = {}
    for name, files in modules.items():
        top = name.split(".")[0]
        if top in sys.stdlib_module_names or top in PACKAGES or top == "__future__":
            continue
        out.setdefault(top, set()).update(files)
    return out


def _needed() -> dict[str, set[str]]:
    """Distribution -> the files whose imports need it."""
    modules = imported_modules()
    needed: dict[str, set[str]] = {}
    for top, files in third_party(modules).items():
        needed.setdefault(_norm(IMPORT_TO_DIST.get(top, top)), set()).update(files)
    for module, dist in SUBMODULE_NEEDS.items():
        files = {f for name, fs in modules.items() if name == module or name.startswith(module + ".") for f in fs}
        if files:
            needed.setdefault(_norm(dist), set()).update(files)
    return needed


def test_every_import_is_declared():
    have = declared()
    missing = {dist: sorted(files) for dist, files in _needed().items() if dist not in have}
    assert not missing, (f"imported but not declared in pyproject.toml (dependencies or an extra other than "
                         f"{TEST_ONLY_EXTRA}; IMPORT_TO_DIST maps import names to distributions): {missing}")


def test_every_declaration_is_imported():
    """A dependency nothing imports any more is stale (and so is a mapping nothing uses)."""
    needed = _needed()
    unused = sorted(dist for dist in declared() if dist not in needed)
    assert not unused, f"declared in pyproject.toml but imported nowhere in {PACKAGES}: {unused}"
    tops = third_party(imported_modules())
    assert set(IMPORT_TO_DIST) <= set(tops), f"IMPORT_TO_DIST entries for imports that are gone: " \
                                             f"{set(IMPORT_TO_DIST) - set(tops)}"


def test_every_dependency_has_a_lower_bound():
    project = _pyproject()["project"]
    reqs = list(project["dependencies"]) + [r for rs in project["optional-dependencies"].values() for r in rs]
    unbounded = [r for r in reqs if ">=" not in r and "==" not in r]
    assert not unbounded, f"give each the first version that provides what the code uses: {unbounded}"


def test_the_lock_pins_what_scripts_test_installs():
    """requirements.lock (scripts/setup-venv dev,demo) pins every dependency of the package, dev and demo."""
    project = _pyproject()["project"]
    extras = project["optional-dependencies"]
    wanted = {_dist_name(r) for r in project["dependencies"] + extras["dev"] + extras["demo"]}
    lines = (ROOT / "requirements.lock").read_text(encoding="utf-8").splitlines()
    pinned = {_dist_name(line) for line in lines if line.strip() and not line.startswith("#")}
    assert wanted <= pinned, f"not pinned in requirements.lock (run scripts/lock): {sorted(wanted - pinned)}"


def test_every_subpackage_ships():
    """The wheel's package list (setuptools' find include patterns) covers every folder with an __init__.py."""
    patterns = _pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    for package in PACKAGES:
        for init in (ROOT / package).rglob("__init__.py"):
            dotted = ".".join(init.parent.relative_to(ROOT).parts)
            assert any(fnmatch.fnmatchcase(dotted, p) for p in patterns), f"{dotted} is not packaged"
