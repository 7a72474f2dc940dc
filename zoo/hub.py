"""The Hub and the network, as every command meets them: offline mode (``ZOO_OFFLINE``, ``HF_HUB_OFFLINE``),
timeouts (``ZOO_HTTP_TIMEOUT``), huggingface_hub's transport, and ``hf-hub:`` names, whose ``config.json`` says
what they are: fetched into the Hugging Face cache once (:func:`fetch_hub_config`), then resolved like any name
(:func:`resolve_entry`). ``zoo.sources`` fetches weights; ``zoo.push`` publishes; both stand on this module."""
from __future__ import annotations

import os
import re
from pathlib import Path

from finetune.core.io import shell_command
from zoo.errors import DownloadError, OfflineError, UsageError
from zoo.registry import ModelEntry, Source
from zoo.resolve import check_hub_repo, get_entry, model_name
from zoo.text import first_line

__all__ = ["fetch_hub_config", "resolve_entry", "resolve_early", "is_offline", "hub_transport", "http_timeout",
           "USER_AGENT"]

USER_AGENT = "zoo-finetune/0.1"


def http_timeout() -> float:
    """Seconds to wait for a connection or the next bytes (``ZOO_HTTP_TIMEOUT``, default 10)."""
    try:
        return float(os.environ.get("ZOO_HTTP_TIMEOUT", "10"))
    except ValueError as err:
        raise UsageError("ZOO_HTTP_TIMEOUT must be a number of seconds, e.g. ZOO_HTTP_TIMEOUT=10") from err


def _truthy(value: str | None) -> bool:
    return (value or "").strip().lower() in {"1", "true", "yes", "on"}


def is_offline() -> bool:
    """``ZOO_OFFLINE`` or ``HF_HUB_OFFLINE`` set (read now, not at import: tests and users change them)."""
    return _truthy(os.environ.get("ZOO_OFFLINE")) or _truthy(os.environ.get("HF_HUB_OFFLINE"))


HUB_MIN = (2, 0)    # huggingface_hub 2.0 moved its transport to httpx2, whose errors the Hub calls below catch


def hub_transport():
    """``httpx2``, the transport of huggingface_hub 2.x, whose errors its calls raise (connection refused,
    timeout, a cut stream). An older huggingface_hub (1.x: httpx) raises errors none of our handlers
    name, a traceback instead of one line; it is refused here, at the first Hub request, instead.

    Raises:
        DownloadError: the installed huggingface_hub is older than 2.0, or httpx2 is missing.
    """
    # lazy: zoo --help / list / info import this module; huggingface_hub is slow to import
    import huggingface_hub

    have = huggingface_hub.__version__
    release = tuple(int(n) for n in re.findall(r"\d+", have)[:2])
    try:
        # lazy: the transport of huggingface_hub 2.x, installed with it
        import httpx2
    except ImportError:
        release = (0, 0)
    if release < HUB_MIN:
        raise DownloadError(f"the Hub needs huggingface_hub>={HUB_MIN[0]}.{HUB_MIN[1]} and its transport httpx2 "
                            f"(this environment has huggingface_hub {have}); run "
                            "`pip install -U 'huggingface_hub>=2.0'`")
    return httpx2


def _cached_config(repo: str, revision: str = "main") -> Path | None:
    """The cached ``config.json`` of Hub repo ``repo`` (its name checked first), or None; no request."""
    check_hub_repo(repo)            # huggingface_hub's own refusal is a traceback
    # lazy: zoo --help / list / info import this module; huggingface_hub is slow to import
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE") or None,
                                    revision=revision)
    return Path(cached) if isinstance(cached, str) else None


def fetch_hub_config(repo: str, revision: str = "main") -> Path:
    """Download ``config.json`` of Hub repo ``repo`` into the Hugging Face cache (what ``hf-hub:`` names are
    resolved from: architecture, classes, preprocessing, and for ``zoo push`` repos the weights' sha256).
    A config already cached is used as it is, without a request.

    Raises:
        OfflineError: not cached and offline / unreachable; DownloadError: no such repo or file.
    """
    def offline(why: str) -> OfflineError:
        return OfflineError(f"hf-hub:{repo} is not cached and {why}; on a connected machine run "
                            f"`{shell_command('zoo', 'pull', 'hf-hub:' + repo)}` and copy ZOO_HOME and the Hugging "
                            "Face cache (HF_HOME) here")

    cached = _cached_config(repo, revision)
    if cached is not None:
        return cached
    source = Source(kind="hf", repo=repo, revision=revision, filename="config.json", sha256_note="config")
    if is_offline():
        raise offline("offline mode is on (ZOO_OFFLINE / HF_HUB_OFFLINE)")
    httpx2 = hub_transport()
    # lazy: zoo --help / list / info import this module; huggingface_hub is slow to import
    from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
    from huggingface_hub import errors as hf_errors

    try:    # one HEAD without retries first, as _pull_hf: hf_hub_download retries a refused connection for ~25 s
        get_hf_file_metadata(hf_hub_url(repo, "config.json", revision=revision), timeout=http_timeout())
        return Path(hf_hub_download(repo, "config.json", revision=revision, etag_timeout=http_timeout(),
                                    cache_dir=os.environ.get("HF_HUB_CACHE") or None))
    except (httpx2.ConnectError, httpx2.TimeoutException, hf_errors.OfflineModeIsEnabled,
            hf_errors.LocalEntryNotFoundError) as err:
        raise offline(f"the Hub is unreachable ({first_line(err)})") from err
    except hf_errors.RepositoryNotFoundError as err:
        raise DownloadError(f"{source.id()}: repository not found (or private: set HF_TOKEN)") from err
    except (hf_errors.RevisionNotFoundError, hf_errors.RemoteEntryNotFoundError) as err:
        raise DownloadError(f"{source.id()}: the repo has no config.json at {revision}; it is not a timm model "
                            "repo") from err
    except (hf_errors.HfHubHTTPError, httpx2.HTTPError, OSError) as err:
        raise DownloadError(f"{source.id()}: download failed ({first_line(err)}); run the command again") from err


def resolve_entry(name: str | ModelEntry) -> ModelEntry:
    """``zoo.resolve.get_entry(name)``, after fetching an ``hf-hub:`` name's ``config.json`` when the Hugging Face
    cache lacks it (:func:`fetch_hub_config`: the network, once; it says the architecture, classes and
    preprocessing), as timm's ``create_model("hf-hub:...")`` does. Every command that takes a model name from
    the user resolves it here; ``get_entry`` itself never touches the network.

    Raises:
        UnknownModelError, UsageError: as ``get_entry``; OfflineError, DownloadError: as :func:`fetch_hub_config`.
    """
    if isinstance(name, str) and model_name(name).startswith("hf-hub:"):
        fetch_hub_config(model_name(name)[len("hf-hub:"):])
    return get_entry(name)


def resolve_early(name: str) -> ModelEntry | None:
    """``name``'s entry, resolved before a command scans its data, so that a mistyped name is refused in a second,
    not after the scan of a big folder (QA): a registry or ``timm:`` name, or an ``hf-hub:`` name whose
    config.json is cached. None for an ``hf-hub:`` name not cached (its repo name is checked): its config.json is
    fetched after the scan (:func:`resolve_entry`), so that data that cannot be trained on downloads nothing.

    Raises:
        UnknownModelError, UsageError: as ``get_entry`` (the close matches listed).
    """
    text = model_name(name) if isinstance(name, str) else name
    if isinstance(text, str) and text.startswith("hf-hub:") and _cached_config(text[len("hf-hub:"):]) is None:
        return None
    return get_entry(name)
