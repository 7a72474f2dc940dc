"""Lock files: pin exactly what was pulled, the way ``pip --require-hashes`` / ``uv.lock`` do.

``write_lock`` records, for each cached model, the source it came from with the Hub commit a branch
revision resolved to, and the sha256 of the file as downloaded. ``pull_locked`` on another machine fetches
exactly those commits and refuses a byte that differs: the model is then not installed (a model already
cached with the locked digest is left as it is, without a request).

Format (JSON, ``zoo.lock``)::

    {"version": 1, "models": {"resnet50": {"source": {"kind": "hf", "repo": "timm/resnet50.tv_in1k",
     "revision": "<40-hex commit>", "filename": "model.safetensors", "format": "safetensors", "key_map": null},
     "sha256": "<digest of the downloaded file>", "weights_sha256": "<digest of the cached safetensors>"}}}
"""
from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any, Callable, Iterable

from finetune.core.io import atomic_write_text, shell_command
from zoo import cache
from zoo.errors import UsageError
from zoo.outdir import refuse_unexpanded_home
from zoo.entry import HUB_REPO_RE, HUB_REPO_RULE
from zoo.registry import COMMIT_RE, SOURCE_REQUIRED, ModelEntry, Source, parse_digest
from zoo.resolve import get_entry
from zoo.sources import pull

__all__ = ["LOCK_VERSION", "lock_record", "write_lock", "lock_text", "read_lock", "pull_locked"]

LOCK_VERSION = 1
_SOURCE_KEYS = ("kind", "repo", "revision", "filename", "url", "path", "package", "format", "key_map")


def _recorded_source(recorded: str, manifest: dict[str, Any]) -> Source | None:
    """The Source a manifest's ``source`` id names (``Source.id()`` read back), or None if it cannot be."""
    fmt = str(manifest.get("format") or "safetensors")
    common = {"format": fmt, "key_map": manifest.get("key_map")}
    kind, _, rest = recorded.partition(":")
    if kind == "hf" and "@" in rest and "/" in rest.split("@", 1)[1]:
        repo, _, tail = rest.partition("@")
        revision, _, filename = tail.partition("/")
        return Source(kind="hf", repo=repo, revision=manifest.get("revision") or revision, filename=filename, **common)
    if kind == "url" and rest:
        return Source(kind="url", url=rest, **common)
    if kind == "package" and "/" in rest:
        package, _, inner = rest.partition("/")
        return Source(kind="package", package=package, path=inner, **common)
    if kind in ("file", "import") and rest:     # `zoo import`: the file itself is the source
        return Source(kind="file", path=rest, **common)
    return None


def lock_record(manifest: dict[str, Any]) -> dict[str, Any]:
    """The lock entry of one cached model, from its manifest (``zoo.cache.read_manifest``): the source it
    came from (a Hub download: the commit its revision resolved to) and the digests.

    Raises:
        UsageError: the manifest does not say where the file came from, or from which Hub commit.
    """
    name = manifest.get("name", "?")
    source = _recorded_source(str(manifest.get("source") or ""), manifest)
    if source is None or not manifest.get("sha256_download"):
        raise UsageError(f"{name}: its cache manifest does not say where the weights came from; run "
                         f"`{shell_command('zoo', 'pull', name, '--force')}` before locking")
    if source.kind == "hf" and not COMMIT_RE.fullmatch(str(source.revision or "")):
        raise UsageError(f"{name}: the cache does not record which Hub commit it came from; run "
                         f"`{shell_command('zoo', 'pull', name, '--force')}` before locking")
    return {"source": {k: getattr(source, k) for k in _SOURCE_KEYS}, "sha256": manifest["sha256_download"],
            "weights_sha256": manifest.get("sha256")}


def write_lock(path: str | Path | None, names: Iterable[str] | None = None) -> dict[str, Any]:
    """Write the lock file for ``names`` (default: every cached model); returns what was written.

    ``path`` None writes nothing (the caller prints it). A path that is no regular file (``/dev/stdout``, a
    pipe) is written into, not replaced; a symlink's target is replaced, the link stays.

    Raises:
        UsageError: a named model is not cached, or a cached one cannot be locked (see ``lock_record``), or
            ``path`` is a file of the user's (not empty, no lock file), which is left as it is.
    """
    if path is not None:
        refuse_unexpanded_home(Path(path))
    wanted = list(names or [])
    if wanted:
        manifests = []
        for name in wanted:
            entry = get_entry(name)
            manifest = cache.read_manifest(entry.name)
            if not manifest or not cache.is_cached(entry.name):
                raise UsageError(f"{entry.name} is not cached; `{shell_command('zoo', 'pull', entry.name)}` first, "
                                 "then lock it")
            manifests.append(manifest)
    else:
        manifests = [m for m in cache.cached_models() if not m.get("damaged")]
        if not manifests:       # an empty lock over the project's zoo.lock would pin nothing, silently
            raise UsageError(f"nothing is cached in {cache.zoo_home()} to lock; `zoo pull NAME` first"
                             + (f" ({path} was not written)" if path is not None else ""))
    data = {"version": LOCK_VERSION, "models": {m["name"]: lock_record(m) for m in manifests}}
    if path is None:
        return data
    path, text = Path(path), lock_text(data)
    if path.exists() and not path.resolve().is_file():
        # a device or a pipe: the temp file + rename below would put a regular file in its place (as root,
        # over /dev/stdout or /dev/null)
        try:
            with open(path, "w", encoding="utf-8") as fh:
                fh.write(text)
        except OSError as err:      # a write error names no file; the CLI's message should (as atomic_write's)
            err.filename = err.filename or str(path)
            raise
    else:
        target = path.resolve() if path.is_symlink() else path
        _refuse_another_file(target, path)
        atomic_write_text(target, text)
    return data


def _refuse_another_file(target: Path, path: Path) -> None:
    """UsageError when ``target`` is a file of the user's (not empty, not a zoo lock file): `zoo lock --out
    notes.txt` (a typo, a tab completion) replaced it without a word (QA). A lock file of any version is zoo's,
    and so is one that no longer parses but holds a lock's ``"models": {`` (git's conflict markers in it, a
    hand edit's stray comma): `zoo pull --locked` tells the user to write it again with `zoo lock` (review)."""
    try:
        if not target.is_file() or target.stat().st_size == 0:
            return
        text = target.read_text(encoding="utf-8")
    except (OSError, ValueError):
        text = ""
    try:
        data = json.loads(text)
    except ValueError:
        data = '"models": {' in text
    if not (data is True or isinstance(data, dict) and isinstance(data.get("models"), dict)):
        raise UsageError(f"{path} exists and is not a zoo lock file, and zoo lock replaces only a lock file: "
                         f"choose another --out (e.g. {shell_command('zoo', 'lock', '--out', 'zoo.lock')}); "
                         f"{path} was not written")


def lock_text(data: dict[str, Any]) -> str:
    """A lock file's text (what ``write_lock`` writes)."""
    return json.dumps(data, indent=2, sort_keys=True) + "\n"


# what each kind of locked source needs to be fetched again
def read_lock(path: str | Path) -> dict[str, dict[str, Any]]:
    """The ``models`` of a lock file, checked.

    Raises:
        UsageError: missing, not JSON, another version, or an entry without a source and a sha256.
    """
    path = Path(path)
    try:        # "-": stdin, as in `zoo lock --out - | ssh gpu-box zoo pull --locked -`
        data = json.loads(sys.stdin.read() if str(path) == "-" else path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"{path}: no such lock file; write one with "
                         f"`{shell_command('zoo', 'lock', '--out', path)}`") from None
    except (OSError, ValueError) as err:
        raise UsageError(f"{path}: not a readable lock file ({err}); write it again with `zoo lock`") from None
    if not isinstance(data, dict) or data.get("version") != LOCK_VERSION or not isinstance(data.get("models"), dict):
        raise UsageError(f"{path}: not a version-{LOCK_VERSION} zoo lock file; write it again with `zoo lock`")
    for name, item in data["models"].items():
        if not (isinstance(item, dict) and isinstance(item.get("source"), dict) and item.get("sha256")
                and item["source"].get("kind") in SOURCE_REQUIRED):
            raise UsageError(f"{path}: entry {name!r} lacks its source or sha256; write the lock file again")
        src = item["source"]
        lacking = [k for k in SOURCE_REQUIRED[src["kind"]] if not (isinstance(src.get(k), str) and src[k])]
        if lacking:     # (a hand-edited lock: the download would fail deep inside huggingface_hub)
            raise UsageError(f"{path}: entry {name!r}: its {src['kind']} source lacks {', '.join(lacking)}; write "
                             "the lock file again with `zoo lock`")
        if src["kind"] == "hf" and not HUB_REPO_RE.fullmatch(src["repo"]):   # (QA: HFValidationError traceback)
            raise UsageError(f"{path}: entry {name!r}: its hf source's repo {src['repo']!r} is no Hub repository "
                             f"({HUB_REPO_RULE}); write the lock file again with `zoo lock`")
        parse_digest(item["sha256"], what=f"{path}: {name}: sha256")
    return data["models"]


def _locked_entry(entry: ModelEntry, item: dict[str, Any]) -> ModelEntry:
    """``entry`` with its sources replaced by the one locked source, pinned to the locked digest."""
    fields = {k: item["source"].get(k) for k in _SOURCE_KEYS if item["source"].get(k) is not None}
    source = Source(**fields, sha256=str(item["sha256"]).lower(), sha256_note=None)
    return dataclasses.replace(entry, sources=(source,))


def pull_locked(path: str | Path, names: Iterable[str] | None = None, *, progress: bool = True,
                say: Callable[[str, str], None] | None = None) -> list[tuple[str, Path]]:
    """Fetch exactly what the lock file pins (``names``: a subset); returns ``[(name, cached path)]``.

    A model cached with the locked digest is kept without a request; otherwise it is fetched from the
    locked source (the locked commit for the Hub) and its sha256 must equal the locked one.

    Raises:
        UsageError: a name the lock file lacks; IntegrityError: bytes that differ (nothing installed);
        DownloadError/OfflineError from the fetch.
    """
    locked = read_lock(path)
    wanted = list(names or locked)
    missing = [n for n in wanted if n not in locked]
    if missing:
        raise UsageError(f"{', '.join(missing)} not in {path}; lock them first (`zoo lock`) or drop them")
    done = []
    for name in wanted:
        item = locked[name]
        entry = _locked_entry(get_entry(name), item)
        manifest = cache.read_manifest(entry.name) if cache.is_cached(entry.name) else None
        if manifest and manifest.get("sha256_download") == entry.sources[0].sha256:
            done.append((entry.name, cache.weights_path(entry.name)))
            if say:
                say(entry.name, "already cached with the locked sha256")
            continue
        done.append((entry.name, pull(entry, force=True, progress=progress)))
        if say:
            say(entry.name, f"pulled {entry.sources[0].id()}, sha256 matches the lock")
    return done
