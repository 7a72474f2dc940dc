"""Publish a bundle as a Hugging Face Hub model repo that plain timm loads (``timm.create_model("hf-hub:..")``).

What is uploaded, in ONE commit through huggingface_hub's ``HfApi.create_commit`` (so ``HF_TOKEN``,
``HF_ENDPOINT`` and mirrors work, and a failure anywhere before the commit leaves the repo unchanged):
  model.safetensors  the bundle's weights; its header metadata with public source ids only
  config.json        timm's layout (architecture, num_classes, label_names, pretrained_cfg with the bundle's
                     preprocessing) + the ``zoo`` section, whose ``weights_sha256`` is the uploaded file's:
                     ``zoo pull hf-hub:OWNER/NAME`` checks the download against it
  README.md          a model card whose YAML header the Hub reads (library_name, pipeline_tag, license,
                     base_model, tags, model-index with the validation and test metrics)

Nothing private leaves the machine: sources are named by registry name, hub id or file name + sha256
(``zoo.registry.public_source_id``), and every text is checked for the local folders it could leak (home,
bundle, run and data folders) before anything is sent. No torch here: the safetensors header is rewritten
byte for byte.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.core.io import (SafetensorsHeaderError, read_json_object, rewrite_safetensors_metadata, shell_command,
                              write_json)
from zoo.bundle.load import LOCAL_KEYS, _decode_metadata, _read_json, check_config, read_safetensors_metadata
from zoo.cache import lock, zoo_home
from zoo.entry import HUB_REPO_RE, HUB_REPO_RULE
from zoo.errors import BundleError, CacheError, OfflineError, PushError, UsageError
from zoo.modelcard import HUB_LICENSES, model_card, plain_timm_refusal, run_scan
from zoo.outdir import lock_holder
from zoo.registry import public_source_id
from zoo.hub import hub_transport, is_offline
from zoo.text import first_line

__all__ = ["PushPlan", "PushResult", "locate", "plan_push", "push", "pushed_models",
           "local_bundles", "HUB_LICENSES"]

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"


@dataclass
class PushPlan:
    """The files of the repo, ready to upload (``files``: path in repo -> bytes)."""

    repo: str
    files: dict[str, bytes]
    weights_sha256: str
    bundle: Path
    run: Path | None
    card: str = ""
    timm_refusal: str = ""      # why plain timm cannot rebuild the model ("" when it can): modelcard.plain_timm_refusal


@dataclass
class PushResult:
    repo: str
    revision: str
    commit: str
    url: str
    files: list[str] = field(default_factory=list)
    unchanged: bool = False
    not_recorded: str | None = None     # why ZOO_HOME/pushed.json could not be written (the push itself succeeded)
    timm_refusal: str = ""              # as PushPlan's


# ------------------------------------------------------------------------------------------- locating


def locate(path: str | os.PathLike) -> tuple[Path, Path | None]:
    """(bundle folder, run folder or None) for a run folder (its ``export/``) or a bundle folder.

    Raises:
        BundleError: neither a run with an exported bundle nor a bundle.
    """
    p = Path(path)
    if (p / "model.json").is_file():
        bundle = p / "export"
        if not (bundle / WEIGHTS).is_file():
            raise BundleError(f"{p} is a run folder without an exported bundle; run "
                              f"`{shell_command('zoo', 'export', p)}` first")
        return bundle, p
    if (p / WEIGHTS).is_file() and (p / CONFIG).is_file():
        run = p.parent if (p.parent / "model.json").is_file() else None
        return p, run
    raise BundleError(f"{p} is neither a run folder (model.json) nor a bundle (model.safetensors + config.json); "
                      "pass the folder `zoo finetune` or `zoo export` wrote")


# ----------------------------------------------------------------------------------------- scrubbing


def _public(value: Any, key: str = "") -> Any:
    """``value`` with source ids made public and absolute paths reduced to their file name."""
    if isinstance(value, dict):
        return {k: _public(v, str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_public(v, key) for v in value]
    if isinstance(value, str):
        if key == "source" or key.endswith("_source"):
            return public_source_id(value)
        if key in ("file", "path", "root") and (value.startswith(("/", "~")) or re.match(r"[A-Za-z]:[\\/]", value)):
            return value.replace("\\", "/").rstrip("/").rsplit("/", 1)[-1]
    return value


def _private_markers(bundle: Path, run: Path | None, scan: dict[str, Any]) -> list[str]:
    marks = [str(Path.home()), str(bundle.resolve()), str(Path.cwd().resolve())]
    if run is not None:
        marks.append(str(run.resolve()))
    if scan.get("root"):
        marks.append(str(scan["root"]))
    # "/" or a one-level folder such as "/root" also occurs in innocent text ("input/crop_pct")
    return sorted({m for m in marks if m.count("/") + m.count("\\") >= 2 or (len(m) > 6 and m != "/")}, key=len)


def _check_private(files: dict[str, bytes], marks: list[str]) -> None:
    for name, data in files.items():
        text = (json.dumps(read_safetensors_metadata(name, data=data), ensure_ascii=False) if name == WEIGHTS
                else data.decode("utf-8", "replace"))
        for m in marks:
            if m and m in text:
                raise PushError(f"{name} would publish the local path {m!r}; nothing was uploaded; re-export the "
                                "bundle with this version of zoo (or report the field that holds it)")


# ------------------------------------------------------------------------------------------ run facts


def _test_metrics(path: str | os.PathLike | None, weights_sha256: str, labels: list[str]) -> dict[str, Any]:
    """Metrics of a `zoo eval` report (its folder or metrics.json): accuracy, top5, n_images; refused when
    they are another model's (other weights, where the report records them, or other labels), when they are
    not a held-out accuracy (a report of the folders the model trained or chose its epoch on: published as
    "test accuracy", QA) or not one at all (a number outside 0..1)."""
    if path is None:
        return {}
    p = Path(path)
    p = p / "metrics.json" if p.is_dir() else p
    fix = "pass the report folder `zoo eval BUNDLE --data DIR --out REPORT` wrote; nothing was uploaded"
    if not p.is_file():
        raise UsageError(f"--test-metrics: no {p}; {fix}")
    doc = read_json_object(p)
    if not doc:
        raise UsageError(f"--test-metrics: {p} is not a JSON object (unreadable or damaged); {fix}")
    accuracy = doc.get("accuracy")
    if not (isinstance(accuracy, (int, float)) and not isinstance(accuracy, bool) and 0 <= accuracy <= 1):
        raise UsageError(f"--test-metrics: {p} holds no accuracy between 0 and 1 (accuracy: {accuracy!r}); {fix}")
    if doc.get("seen_in_training"):
        raise UsageError(f"--test-metrics {p} evaluated the {doc['seen_in_training']} folder this model was trained "
                         "on: its accuracy is not a test accuracy; evaluate images it never saw (`zoo eval BUNDLE "
                         "--data DIR --out REPORT`, DIR a held-out folder or one with a test/ split); nothing was "
                         "uploaded")
    evaluated = doc.get("weights_sha256")
    other = (f"other weights (sha256 {str(evaluated)[:12]}..., this bundle's {weights_sha256[:12]}...)"
             if evaluated and evaluated != weights_sha256 else
             f"a model of other classes ({len(doc['labels'])}: {', '.join(map(str, doc['labels'][:4]))}...)"
             if labels and isinstance(doc.get("labels"), list) and list(doc["labels"]) != list(labels) else None)
    if other:
        raise UsageError(f"--test-metrics {p} evaluated {other}: evaluate this bundle with `zoo eval BUNDLE "
                         "--data DIR --out REPORT` and pass that report; nothing was uploaded")
    return doc


# ------------------------------------------------------------------------------------------ planning


def plan_push(path: str | os.PathLike, repo: str, test_metrics: str | os.PathLike | None = None,
              revision: str | None = None) -> PushPlan:
    """The three files to publish for the bundle (or run) at ``path`` to ``repo``'s branch ``revision`` (None:
    main; the card says how to load from it), checked for local paths.

    Raises:
        UsageError: a malformed repo id; BundleError: not a bundle; PushError: a local path would leak.
    """
    if not HUB_REPO_RE.fullmatch(repo or ""):     # (QA: `a--b/c` failed at upload, "run the push again")
        raise UsageError(f"--repo {repo!r} is not a Hub repo id; write OWNER/NAME (e.g. me/cats-vs-dogs), "
                         f"{HUB_REPO_RULE}")
    bundle, run = locate(path)
    try:    # read once: the digest, the header and the published bytes are of the same file (QA: a `zoo export`
        data = (bundle / WEIGHTS).read_bytes()      # replacing it between reads published mixed label names)
    except OSError as err:
        raise BundleError(f"{bundle / WEIGHTS} cannot be read ({err.strerror or err}); nothing was uploaded") from None
    raw_meta = read_safetensors_metadata(bundle / WEIGHTS, data=data)      # (checks the file is whole)
    sha = hashlib.sha256(data).hexdigest()
    config = _read_json(bundle / CONFIG, "re-export the bundle; nothing was uploaded")
    recorded = config["zoo"].get("weights_sha256") if isinstance(config.get("zoo"), dict) else None
    if recorded and recorded != sha:
        writer = lock_holder(bundle)   # config.json read after the weights: a live export replaced both?
        if writer:
            raise BundleError(f"{bundle} cannot be pushed while another process writes it: {writer}; push again "
                              "when it is done; nothing was uploaded")
        raise BundleError(f"{bundle / WEIGHTS} is not the file config.json describes (sha256 {sha[:16]}... vs "
                          f"{str(recorded)[:16]}...); re-export the bundle; nothing was uploaded")
    meta = _decode_metadata(raw_meta, bundle / WEIGHTS)
    labels = [str(x) for x in meta["label_names"]] if isinstance(meta.get("label_names"), list) else None
    check_config(config, labels, len(labels or ()), bundle / CONFIG, meta)   # what zoo predict would refuse
    public_meta = _public({k: v for k, v in meta.items() if k not in LOCAL_KEYS})
    header = {k: (v if k == "format" else json.dumps(v, ensure_ascii=False)) for k, v in public_meta.items()}
    try:
        weights = rewrite_safetensors_metadata(data, header)
    except SafetensorsHeaderError as err:
        raise BundleError(f"{bundle / WEIGHTS} has no readable header ({err}); re-export the bundle") from None
    weights_sha = hashlib.sha256(weights).hexdigest()
    cfg = _public(config)
    cfg.setdefault("zoo", {})["weights_sha256"] = weights_sha
    cfg["zoo"]["published_from_sha256"] = sha          # the local bundle's file, before the header was cleaned
    pc = cfg.setdefault("pretrained_cfg", {})
    pc["hf_hub_id"] = repo
    for k in ("file", "url"):
        if isinstance(pc.get(k), str) and not pc[k].startswith(("http://", "https://")):
            pc.pop(k)
    labels = labels or list(config.get("label_names") or [])
    card_meta = {**public_meta, "label_names": labels, "source": public_meta.get("source") or pc.get("source")}
    card = model_card(card_meta, run, pc.get("license"), repo=repo, test=_test_metrics(test_metrics, sha, labels),
                      revision=revision)
    files = {WEIGHTS: weights, CONFIG: (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
             CARD: card.encode("utf-8")}
    scan = run_scan(run)[0]
    _check_private(files, _private_markers(bundle, run, scan))
    return PushPlan(repo=repo, files=files, weights_sha256=weights_sha, bundle=bundle, run=run, card=card,
                    timm_refusal=plain_timm_refusal(public_meta))


# -------------------------------------------------------------------------------------------- pushing


def _hub_error(err: Exception, repo: str) -> PushError:
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import errors as hf_errors

    status = getattr(getattr(err, "response", None), "status_code", None)
    if isinstance(err, hf_errors.RepositoryNotFoundError) or status == 404:
        return PushError(f"{repo}: repository not found or not yours; check --repo and HF_TOKEN; nothing was changed")
    if status in (401, 403):
        return PushError(f"{repo}: the Hub refused the write ({status}); set HF_TOKEN to a token with write "
                         "access (`hf auth login`); nothing was changed")
    if status == 412:
        return PushError(f"{repo}: the repo changed while pushing; run the push again; nothing was changed")
    first = first_line(err)
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip() and first_line(cause) not in first:   # (often the same words)
        first += f": {first_line(cause)}"
    return PushError(f"upload to {repo} failed ({first}); the repo was left as it was (the commit is made only "
                     "after every file is uploaded); run the push again")


def push(path: str | os.PathLike, repo: str, *, private: bool = False, revision: str | None = None,
         message: str | None = None, overwrite: bool = False, test_metrics: str | os.PathLike | None = None,
         token: str | None = None) -> PushResult:
    """Upload the bundle (or run) at ``path`` to ``repo`` as one commit.

    Args:
        repo: "OWNER/NAME"; created (``private`` or public) when missing.
        revision: a branch; created from main when missing. Default main.
        overwrite: replace a different model already on main (a --revision branch is replaced anyway).
        test_metrics: a `zoo eval` report (folder or metrics.json) for the card's test accuracy.
    Returns:
        PushResult (commit id, url; ``unchanged`` when the repo already held exactly these files).
    Raises:
        UsageError, BundleError, PushError: refused (another model there) or failed (repo unchanged).
        OfflineError: ZOO_OFFLINE or HF_HUB_OFFLINE is set.
    """
    plan = plan_push(path, repo, test_metrics, revision)
    if is_offline():      # huggingface_hub read HF_HUB_OFFLINE once, at its import; ZOO_OFFLINE it never reads
        raise OfflineError("zoo push needs the network, and ZOO_OFFLINE or HF_HUB_OFFLINE is set; unset it to "
                           "push (--dry-run shows what would be sent)")
    httpx2 = hub_transport()
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import CommitOperationAdd, HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hf_errors

    endpoint = os.environ.get("HF_ENDPOINT") or None      # read now: huggingface_hub froze it at import
    api = HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        # create_repo keeps an existing repo's visibility (QA, helper-137: published); asked before a --revision
        # branch is made on it (QA, helper-138: a refused push left a new branch)
        if private and api.repo_info(repo).private is False:
            raise PushError(f"{repo} already exists and is public: --private does not change an existing repo's "
                            "visibility; make it private on the Hub (its Settings) and push again, or push to a new "
                            "repo; nothing was uploaded")
        if revision:
            api.create_branch(repo, branch=revision, exist_ok=True)
        info = api.repo_info(repo, revision=branch)
        present = {s.rfilename for s in info.siblings or []}
        # a branch named with --revision is the user's choice of where this model goes (a new one starts
        # from main, as git branches do); main holding another model needs --overwrite
        if WEIGHTS in present and not overwrite and not revision:
            remote = get_hf_file_metadata(hf_hub_url(repo, WEIGHTS, revision=info.sha, endpoint=endpoint),
                                          token=token)
            etag = (remote.etag or "").strip('"')
            if etag != plan.weights_sha256 and not _pushed_from_this_bundle(repo, info.sha, plan, endpoint, token):
                raise PushError(f"{repo}@{branch} already holds another model (model.safetensors {etag[:12]}...); "
                                "push to a branch with --revision NAME or replace it with --overwrite")
        ops = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=data) for name, data in plan.files.items()]
        message = message or f"zoo push: {plan.files and json.loads(plan.files[CONFIG])['architecture']} " \
                             f"finetuned on {len(json.loads(plan.files[CONFIG]).get('label_names') or [])} classes"
        commit = api.create_commit(repo, ops, commit_message=message, revision=branch, parent_commit=info.sha)
    except PushError:
        raise
    except (hf_errors.HfHubHTTPError, httpx2.HTTPError, RuntimeError, OSError, ValueError) as err:
        raise _hub_error(err, repo) from err
    result = PushResult(repo=repo, revision=branch, commit=commit.oid, url=str(commit.repo_url or repo),
                        files=sorted(plan.files), unchanged=commit.oid == info.sha, timm_refusal=plan.timm_refusal)
    try:
        _record(result, plan)
    except OSError as err:      # the commit is on the Hub: a local bookkeeping failure must not read as a failed push
        result.not_recorded = f"{err.strerror or err} ({err.filename or _pushed_file()})"
    return result


# ---------------------------------------------------------------------------------- "my models"


def _pushed_from_this_bundle(repo: str, commit: str, plan: PushPlan, endpoint: str | None, token: str | None) -> bool:
    """Whether the model at ``repo@commit`` was pushed from this very bundle file (its config.json's
    ``zoo.published_from_sha256``): the same model, whose published bytes differ only because an earlier zoo
    wrote the header in another order. False when that cannot be told."""
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError

    ours = json.loads(plan.files[CONFIG]).get("zoo", {}).get("published_from_sha256")
    try:
        remote = json.loads(Path(hf_hub_download(repo, CONFIG, revision=commit, endpoint=endpoint,
                                                 token=token)).read_text(encoding="utf-8"))
    except (HfHubHTTPError, EntryNotFoundError, OSError, ValueError):     # (no config.json there: not ours)
        return False
    zoo_section = remote.get("zoo") if isinstance(remote, dict) else None
    return bool(ours) and isinstance(zoo_section, dict) and zoo_section.get("published_from_sha256") == ours


def _pushed_file() -> Path:
    return zoo_home() / "pushed.json"


def _record(result: PushResult, plan: PushPlan) -> None:
    path = _pushed_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        guard = lock(path.name)     # read, add, write: two pushes at once would each drop the other's record
    except CacheError as err:
        raise OSError(str(err)) from err
    with guard:
        items = [p for p in pushed_models() if not (p["repo"] == result.repo and p["revision"] == result.revision)]
        items.append({"repo": result.repo, "revision": result.revision, "commit": result.commit,
                      "weights_sha256": plan.weights_sha256, "bundle": str(plan.bundle.resolve()),
                      "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
        write_json(path, items, indent=2)


def pushed_models() -> list[dict[str, Any]]:
    """What ``zoo push`` published from this machine (ZOO_HOME/pushed.json), oldest first."""
    data = _read_json_list(_pushed_file())
    # an entry edited by hand (or cut short) keeps what it has: the fields every reader uses are filled in
    return [{"revision": "main", "commit": "?", **d} for d in data
            if isinstance(d, dict) and isinstance(d.get("repo"), str)]


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def local_bundles(root: str | os.PathLike = ".", depth: int = 3) -> list[dict[str, Any]]:
    """Bundles (model.safetensors + config.json with a ``zoo`` section) under ``root``, at most ``depth``
    folders down (``runs/<run>/export`` is 2): ``path``, ``architecture``, ``num_classes`` and ``model`` (the
    registry name it was finetuned from), as config.json records them; no metric (those are in the weights'
    header and README.md, and ``zoo list --mine`` shows none)."""
    root = Path(root)
    found: list[dict[str, Any]] = []
    for level in range(depth + 1):
        for cfg_path in sorted(root.glob("/".join(["*"] * level + [CONFIG]))):
            folder = cfg_path.parent
            if not (folder / WEIGHTS).is_file():
                continue
            cfg = read_json_object(cfg_path)
            if not isinstance(cfg.get("zoo"), dict):    # not ours, or hand-edited: zoo predict says why
                continue
            found.append({"path": str(folder), "architecture": cfg.get("architecture"),
                          "num_classes": cfg.get("num_classes"), "model": (cfg.get("zoo") or {}).get("model")})
    return found
