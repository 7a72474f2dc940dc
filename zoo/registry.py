"""The model catalogue: loading + validation of registry files, lookup (the entries' dataclasses: ``zoo.entry``).

Imports no torch (``zoo list`` must answer in well under a second). Files: the curated ``registry.yaml``
shipped with the package, plus an optional user file named by ``ZOO_REGISTRY`` (the CLI's ``--registry``),
same schema, same validation. A user entry may not reuse a curated name unless it says ``override: true``
(then it replaces the curated entry; ``origin_file`` tells which file won). Several user files may be given,
separated by ``os.pathsep``. Beyond the files, ``timm:<arch>[.<tag>]`` and ``hf-hub:<org>/<repo>`` resolve to
ad-hoc entries in ``zoo.resolve`` (that path imports timm/torch: it builds the model on the meta device to
derive stages); this module never imports it.
"""
from __future__ import annotations

import difflib
import fnmatch
import os
import re
from pathlib import Path
from typing import Any, Iterable

import yaml

from finetune.core.io import load_yaml, read_user_text, yaml_problem
from finetune.core.yamlschema import as_bool, as_float, as_int
from zoo.entry import (COMMIT_RE, HUB_REPO_RE, HUB_REPO_RULE, MIN_PREFIX, ModelEntry, Preprocessing, Source, _HEX_RE,
                       entry_pin, matches_pin, parse_digest, public_source_id, weights_tag)
from zoo.errors import RegistryError, UnknownModelError, UsageError

__all__ = [
    "Source", "Preprocessing", "ModelEntry", "load_registry", "list_models", "get_entry", "list_families",
    "curated_registry_path", "parse_registry", "natural_key", "AD_HOC_PREFIXES", "COMMIT_RE", "MIN_PREFIX",
    "SOURCE_REQUIRED",
    "parse_digest", "matches_pin", "entry_pin", "weights_tag", "public_source_id",
]


# ----------------------------------------------------------------------------------------------- schema
_ENTRY_REQUIRED = ("name", "builder", "sources", "preprocessing", "stages", "classifier", "family", "license")
_ENTRY_OPTIONAL = ("params", "top1", "top1_source", "paper", "year", "num_classes", "description", "override")
_PREP_REQUIRED = ("input_size", "interpolation", "crop_pct", "mean", "std", "origin")
_SOURCE_KINDS = {
    # kind: (required fields, fields that make no sense for this kind)
    "hf": (("repo", "revision", "filename"), ("url", "path", "package")),
    "url": (("url",), ("repo", "revision", "revision_note", "filename", "path", "package")),
    "file": (("path",), ("repo", "revision", "revision_note", "filename", "url", "package")),
    "package": (("package", "path"), ("repo", "revision", "revision_note", "filename", "url")),
}
SOURCE_REQUIRED = {kind: required for kind, (required, _) in _SOURCE_KINDS.items()}   # also checked in a lock file
_SOURCE_FIELDS = ("kind", "repo", "revision", "revision_note", "filename", "url", "path", "package", "sha256",
                  "sha256_prefix", "sha256_note", "format", "key_map")
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
_FORMATS = ("safetensors", "pth")
_BUILDERS = ("timm", "torchvision")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]*")
AD_HOC_PREFIXES = ("timm:", "hf-hub:")     # references resolved by zoo.resolve, not by a registry file


class _Where:
    """Builds the one-line RegistryError naming the file, the entry and the field."""

    def __init__(self, path: str, entry: str | None = None) -> None:
        self.path, self.entry = path, entry

    def error(self, field_name: str | None, problem: str) -> RegistryError:
        where = self.path
        if self.entry is not None:
            where += f": entry {self.entry}"
        if field_name:
            where += f": field '{field_name}'"
        return RegistryError(f"{where}: {problem}; fix the file (schema: see the header of registry.yaml)")


def _typename(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _check_keys(where: _Where, data: dict, required: Iterable[str], allowed: Iterable[str], prefix: str) -> None:
    allowed = set(allowed) | set(required)
    for key in data:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), sorted(allowed), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise where.error(f"{prefix}{key}", f"unknown key{hint}")
    for key in required:
        if key not in data:
            raise where.error(f"{prefix}{key}", "missing (required)")


def _str(where: _Where, name: str, value: Any, *, optional: bool = False, empty: bool = False) -> str | None:
    if value is None and optional:
        return None
    if not isinstance(value, str):
        raise where.error(name, f"must be a string, got {_typename(value)}")
    if not empty and not value.strip():
        raise where.error(name, "must not be empty")
    return value


def _got(value: Any) -> str:
    """A value a field refused, in its message: text as written (the file is read as text: `'11M'`), else its type."""
    return repr(value) if isinstance(value, str) else _typename(value)


def _int(where: _Where, name: str, value: Any, *, optional: bool = False, minimum: int | None = None) -> int | None:
    """A whole number: what Python's int() reads (`params: 25_557_032`), as the config's whole numbers are read."""
    if value is None and optional:
        return None
    try:
        number = as_int(value)
    except ValueError:
        raise where.error(name, f"must be an integer, got {_got(value)}") from None
    if minimum is not None and number < minimum:
        raise where.error(name, f"must be >= {minimum}, got {number}")
    return number


def _float(where: _Where, name: str, value: Any, *, optional: bool = False) -> float | None:
    if value is None and optional:
        return None
    try:
        return as_float(value)
    except ValueError:
        raise where.error(name, f"must be a number, got {_got(value)}") from None


def _triple(where: _Where, name: str, value: Any, kind: type) -> tuple:
    if not isinstance(value, list) or len(value) != 3:
        raise where.error(name, f"must be a list of 3 numbers, got {value!r}")
    conv = _int if kind is int else _float
    return tuple(conv(where, f"{name}[{i}]", v) for i, v in enumerate(value))


def _parse_source(where: _Where, i: int, data: Any) -> Source:
    prefix = f"sources[{i}]."
    if not isinstance(data, dict):
        raise where.error(f"sources[{i}]", f"must be a mapping, got {_typename(data)}")
    _check_keys(where, data, ("kind",), _SOURCE_FIELDS, prefix)
    kind = _str(where, prefix + "kind", data["kind"])
    if kind not in _SOURCE_KINDS:
        raise where.error(prefix + "kind", f"must be one of {', '.join(_SOURCE_KINDS)}, got {kind!r}")
    required, forbidden = _SOURCE_KINDS[kind]
    for key in required:
        if key not in data:
            raise where.error(prefix + key, f"missing (required for kind {kind})")
    for key in forbidden:
        if key in data:
            raise where.error(prefix + key, f"not used by kind {kind}; remove it")
    values: dict[str, Any] = {"kind": kind}
    for key in ("repo", "revision", "revision_note", "filename", "url", "path", "package", "sha256_note", "key_map"):
        if key in data:
            values[key] = _str(where, prefix + key, data[key], optional=key not in required)
    fmt = _str(where, prefix + "format", data.get("format", "safetensors"))
    if fmt not in _FORMATS:
        raise where.error(prefix + "format", f"must be one of {', '.join(_FORMATS)}, got {fmt!r}")
    values["format"] = fmt
    sha = _str(where, prefix + "sha256", data.get("sha256"), optional=True)
    pre = _str(where, prefix + "sha256_prefix", data.get("sha256_prefix"), optional=True)    # (12345678: text)
    if sha is not None and MIN_PREFIX <= len(sha) < 64 and pre is None:
        pre, sha = sha, None    # a short digest is a prefix pin (weaker: say so in the docs)
    if sha is not None and not (len(sha) == 64 and _HEX_RE.fullmatch(sha)):
        raise where.error(prefix + "sha256", "must be 64 lowercase hex digits, a prefix of at least "
                                             f"{MIN_PREFIX} of them, or null with a sha256_note")
    values["sha256"] = sha
    if pre is not None:
        if not (MIN_PREFIX <= len(pre) <= 64 and _HEX_RE.fullmatch(pre)):
            raise where.error(prefix + "sha256_prefix", f"must be {MIN_PREFIX} to 64 lowercase hex digits, got {pre!r}")
        if sha is not None and not sha.startswith(pre):
            raise where.error(prefix + "sha256_prefix", "does not match the start of sha256")
    values["sha256_prefix"] = pre
    if sha is None and pre is None and not values.get("sha256_note"):
        raise where.error(prefix + "sha256_note", "required when sha256 is null (say why there is no digest)")
    if kind == "hf":
        if not HUB_REPO_RE.fullmatch(values["repo"]):
            raise where.error(prefix + "repo", f"must look like <org>/<name>, {HUB_REPO_RULE}, got {values['repo']!r}")
        if not COMMIT_RE.fullmatch(values["revision"]) and not values.get("revision_note"):
            raise where.error(prefix + "revision_note",
                              f"required when revision is not a 40-hex commit ({values['revision']!r})")
    if kind == "url":
        url = values["url"]
        local = url.startswith(("http://127.0.0.1", "http://localhost", "http://[::1]"))
        if not (url.startswith("https://") or local):
            raise where.error(prefix + "url", f"must be an https:// URL, got {url!r}")
    return Source(**values)


def _parse_preprocessing(where: _Where, data: Any) -> Preprocessing:
    if not isinstance(data, dict):
        raise where.error("preprocessing", f"must be a mapping, got {_typename(data)}")
    _check_keys(where, data, _PREP_REQUIRED, (), "preprocessing.")
    size = _triple(where, "preprocessing.input_size", data["input_size"], int)
    if size[0] not in (1, 3) or min(size[1:]) < 1:
        raise where.error("preprocessing.input_size", f"must be [channels (1 or 3), height, width], got {list(size)}")
    interp = _str(where, "preprocessing.interpolation", data["interpolation"])
    if interp not in _INTERPOLATIONS:
        raise where.error("preprocessing.interpolation", f"must be one of {', '.join(_INTERPOLATIONS)}, got {interp!r}")
    crop = _float(where, "preprocessing.crop_pct", data["crop_pct"])
    if not 0.0 < crop <= 1.0:
        raise where.error("preprocessing.crop_pct", f"must be in (0, 1], got {crop}")
    mean = _triple(where, "preprocessing.mean", data["mean"], float)
    std = _triple(where, "preprocessing.std", data["std"], float)
    if min(std) <= 0:
        raise where.error("preprocessing.std", "must be positive")
    origin = _str(where, "preprocessing.origin", data["origin"])
    return Preprocessing(input_size=size, interpolation=interp, crop_pct=crop, mean=mean, std=std, origin=origin)


def _parse_stages(where: _Where, data: Any, classifier: str) -> tuple[tuple[str, ...], ...]:
    if not isinstance(data, list) or not data:
        raise where.error("stages", "must be a non-empty list of lists of module-name prefixes")
    stages, seen = [], []
    for i, stage in enumerate(data):
        if not isinstance(stage, list) or not stage:
            raise where.error(f"stages[{i}]", "must be a non-empty list of module-name prefixes")
        prefixes = tuple(_str(where, f"stages[{i}][{j}]", p) for j, p in enumerate(stage))
        for p in prefixes:
            for q in seen + [classifier]:
                # One parameter must never fall in two stages (or in a stage and the classifier).
                if p == q or p.startswith(q + ".") or q.startswith(p + "."):
                    what = "the classifier" if q == classifier else f"prefix '{q}'"
                    raise where.error(f"stages[{i}]", f"prefix '{p}' overlaps {what}")
            seen.append(p)
        stages.append(prefixes)
    return tuple(stages)


def _parse_entry(path: str, i: int, data: Any) -> tuple[ModelEntry, bool]:
    where = _Where(path, f"#{i + 1}")
    if not isinstance(data, dict):
        raise where.error(None, f"must be a mapping, got {_typename(data)}")
    if isinstance(data.get("name"), str):
        where = _Where(path, f"'{data['name']}'")
    _check_keys(where, data, _ENTRY_REQUIRED, _ENTRY_OPTIONAL, "")
    name = _str(where, "name", data["name"])
    if not _NAME_RE.fullmatch(name):
        raise where.error("name", "use letters, digits, '.', '_', '+', '-' (':' and '/' are for timm:/hf-hub: refs)")
    builder = _str(where, "builder", data["builder"])
    lib, _, arch = builder.partition(":")
    if lib not in _BUILDERS or not arch:
        raise where.error("builder", f"must be 'timm:<arch>' or 'torchvision:<fn>', got {builder!r}")
    sources = data["sources"]
    if not isinstance(sources, list) or not sources:
        raise where.error("sources", "must be a non-empty list of sources")
    classifier = _str(where, "classifier", data["classifier"])
    try:
        override = as_bool(data.get("override", False))    # the words of zoo's boolean flags: `override: yes`
    except ValueError:
        raise where.error("override", f"must be true or false (yes/no, on/off, ...), got {_got(data['override'])}") \
            from None
    top1 = _float(where, "top1", data.get("top1"), optional=True)
    if top1 is not None and not 0.0 <= top1 <= 100.0:
        raise where.error("top1", f"is a percentage in [0, 100], got {top1}")
    entry = ModelEntry(
        name=name, builder=builder,
        sources=tuple(_parse_source(where, j, s) for j, s in enumerate(sources)),
        preprocessing=_parse_preprocessing(where, data["preprocessing"]),
        stages=_parse_stages(where, data["stages"], classifier), classifier=classifier,
        params=_int(where, "params", data.get("params"), optional=True, minimum=1), top1=top1,
        license=_str(where, "license", data["license"]), paper=_str(where, "paper", data.get("paper", ""), empty=True),
        year=_int(where, "year", data.get("year"), optional=True, minimum=1900),
        family=_str(where, "family", data["family"]),
        num_classes=_int(where, "num_classes", data.get("num_classes", 1000), minimum=1),
        description=_str(where, "description", data.get("description", ""), empty=True),
        top1_source=_str(where, "top1_source", data.get("top1_source", ""), empty=True),
        origin_file=path,
    )
    return entry, override


def parse_registry(text: str, path: str = "<string>") -> list[tuple[ModelEntry, bool]]:
    """Parse and validate one registry file's text: ``[(entry, override), ...]`` in file order.

    Raises:
        RegistryError: invalid YAML, unknown/missing keys, bad types, duplicate names (one line each).
    """
    try:
        # each value read by its field's kind (text as written, Python's int()); a key written twice: refused (QA)
        data = load_yaml(text, as_text=True)
    except yaml.YAMLError as err:
        raise RegistryError(f"{path}: invalid YAML{yaml_problem(err)}; fix the syntax") from None
    where = _Where(path)
    if data is None:
        data = {"models": []}
    if not isinstance(data, dict):
        raise where.error(None, f"top level must be a mapping with a 'models' list, got {_typename(data)}")
    _check_keys(where, data, ("models",), ("version",), "")
    if _int(where, "version", data.get("version", 1)) != 1:
        raise where.error("version", f"unsupported version {data.get('version')!r} (this zoo reads version 1)")
    models = data["models"] if data["models"] is not None else []
    if not isinstance(models, list):
        raise where.error("models", f"must be a list of entries, got {_typename(models)}")
    out, seen = [], {}
    for i, item in enumerate(models):
        entry, override = _parse_entry(path, i, item)
        if entry.name in seen:
            raise _Where(path, f"'{entry.name}'").error(
                "name", f"duplicate name (entries #{seen[entry.name] + 1} and #{i + 1}); rename or remove one")
        seen[entry.name] = i
        out.append((entry, override))
    return out

# ----------------------------------------------------------------------------------------------- loading
def curated_registry_path() -> Path:
    """The curated ``registry.yaml`` shipped inside the package."""
    return Path(__file__).resolve().with_name("registry.yaml")


_CACHE: dict[tuple, dict[str, ModelEntry]] = {}


def _read(path: Path) -> str:
    try:
        return read_user_text(path)
    except FileNotFoundError:
        raise RegistryError(f"{path}: registry file not found; create it or unset ZOO_REGISTRY / --registry") from None
    except UnicodeDecodeError:
        raise RegistryError(f"{path}: the registry file is not UTF-8 text (nor UTF-16/32 with a byte-order mark); "
                            "save it as UTF-8") from None
    except OSError as err:
        raise RegistryError(f"{path}: cannot read the registry file ({err}); check the path and permissions") from None


def _stamp(path: Path) -> tuple:
    try:
        st = path.stat()
        return (str(path), st.st_mtime_ns, st.st_size)
    except OSError:
        return (str(path), None, None)


def load_registry(extra: str | Path | None = None) -> dict[str, ModelEntry]:
    """All entries by name: the curated file, then the user file(s) (``extra``, else ``ZOO_REGISTRY``).

    A user entry reusing a curated name is an error unless it sets ``override: true``.
    Parsed files are memoised by (path, mtime, size), so repeated calls are cheap.

    Raises:
        RegistryError: a file is missing, malformed, or a name clashes.
    """
    user = str(extra) if extra is not None else os.environ.get("ZOO_REGISTRY", "")
    paths = [curated_registry_path()] + [Path(p).expanduser() for p in user.split(os.pathsep) if p.strip()]
    key = tuple(_stamp(p) for p in paths)
    if key in _CACHE:
        return dict(_CACHE[key])
    entries: dict[str, ModelEntry] = {}
    for n, path in enumerate(paths):
        for entry, override in parse_registry(_read(path), str(path)):
            if entry.name in entries and not override:
                raise _Where(str(path), f"'{entry.name}'").error(
                    "name", f"already defined in {entries[entry.name].origin_file}; rename it, "
                            "or add 'override: true' to replace that entry")
            entries[entry.name] = entry
    _CACHE.clear()  # keep one generation: files rarely change within a process
    _CACHE[key] = entries
    return dict(entries)


def natural_key(text: str) -> list:
    """Sort key that orders resnet18 < resnet50 < resnet101 (digits compared as numbers)."""
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", text)]


def list_models(pattern: str | Iterable[str] | None = None, family: str | None = None) -> list[ModelEntry]:
    """Registry entries whose name matches ``pattern`` (fnmatch, case-insensitive; several allowed) and
    whose family matches ``family`` (fnmatch too), naturally sorted by name."""
    entries = load_registry().values()
    if pattern:
        pats = [pattern] if isinstance(pattern, str) else list(pattern)
        pats = [p.lower() if any(c in p for c in "*?[") else f"*{p.lower()}*" for p in pats]
        entries = [e for e in entries if any(fnmatch.fnmatchcase(e.name.lower(), p) for p in pats)]
    if family:
        entries = [e for e in entries if fnmatch.fnmatchcase(e.family.lower(), family.lower())]
    return sorted(entries, key=lambda e: natural_key(e.name))


def list_families() -> list[str]:
    """The families present in the loaded registries, sorted."""
    return sorted({e.family for e in load_registry().values()}, key=natural_key)


def get_entry(name: str) -> ModelEntry:
    """The entry called ``name`` in the loaded registry files (curated + user).

    Ad-hoc references (``timm:<arch>``, ``hf-hub:<org>/<repo>``) need torch to derive their stages and are
    resolved one layer up, by ``zoo.resolve.get_entry``, which every command uses.

    Raises:
        UnknownModelError: not in any registry (lists close matches); RegistryError: a file is malformed.
    """
    if not isinstance(name, str) or not name.strip():
        raise UsageError("a model name is required; `zoo list` shows the curated ones")
    name = name.strip()
    if name.startswith(AD_HOC_PREFIXES):
        raise UsageError(f"'{name}' is an ad-hoc reference, not a registry name; resolve it with "
                         "zoo.resolve.get_entry")
    entries = load_registry()
    if name in entries:
        return entries[name]
    folded = {k.lower(): k for k in entries}
    if name.lower() in folded:
        return entries[folded[name.lower()]]
    close = difflib.get_close_matches(name.lower(), list(folded), n=4, cutoff=0.6)
    hint = f"did you mean {', '.join(folded[c] for c in close)}? " if close else ""
    raise UnknownModelError(f"unknown model '{name}'; {hint}`zoo list` shows the zoo, and timm:<arch> uses any "
                            "timm architecture")
