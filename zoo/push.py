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
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from finetune.io import atomic_write_text
from zoo.bundle.load import _decode_metadata, read_safetensors_metadata
from zoo.cache import sha256_file, zoo_home
from zoo.errors import BundleError, PushError, UsageError
from zoo.registry import public_source_id

__all__ = ["PushPlan", "PushResult", "locate", "plan_push", "push", "model_card", "pushed_models",
           "local_bundles", "rewrite_safetensors_metadata", "HUB_LICENSES"]

WEIGHTS, CONFIG, CARD = "model.safetensors", "config.json", "README.md"
REPO_RE = re.compile(r"[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}")
# licence ids the Hub's metadata validator knows (those the registry uses); anything else is "other"
HUB_LICENSES = ("apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "bsd", "cc-by-4.0", "cc-by-nc-4.0",
                "cc-by-sa-4.0", "cc-by-nc-sa-4.0", "llama2", "openrail", "gpl-3.0", "lgpl-3.0", "agpl-3.0",
                "cc0-1.0", "unlicense")


@dataclass
class PushPlan:
    """The files of the repo, ready to upload (``files``: path in repo -> bytes)."""

    repo: str
    files: dict[str, bytes]
    weights_sha256: str
    bundle: Path
    run: Path | None
    card: str = ""


@dataclass
class PushResult:
    repo: str
    revision: str
    commit: str
    url: str
    files: list[str] = field(default_factory=list)
    unchanged: bool = False


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
            raise BundleError(f"{p} is a run folder without an exported bundle; run `zoo export {p}` first")
        return bundle, p
    if (p / WEIGHTS).is_file() and (p / CONFIG).is_file():
        run = p.parent if (p.parent / "model.json").is_file() else None
        return p, run
    raise BundleError(f"{p} is neither a run folder (model.json) nor a bundle (model.safetensors + config.json); "
                      "pass the folder `zoo finetune` or `zoo export` wrote")


# ---------------------------------------------------------------------------------- safetensors header


def rewrite_safetensors_metadata(data: bytes, metadata: dict[str, str]) -> bytes:
    """``data`` (a safetensors file) with its ``__metadata__`` replaced; the tensor bytes are untouched.

    Raises:
        BundleError: not a safetensors file.
    """
    try:
        (n,) = struct.unpack("<Q", data[:8])
        header = json.loads(data[8:8 + n])
    except (struct.error, ValueError) as err:
        raise BundleError(f"model.safetensors has no readable header ({err}); re-export the bundle") from None
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)          # safetensors keeps the tensor data 8-byte aligned
    return struct.pack("<Q", len(raw)) + raw + data[8 + n:]


def _read_header_metadata(data: bytes) -> dict[str, str]:
    (n,) = struct.unpack("<Q", data[:8])
    return dict(json.loads(data[8:8 + n]).get("__metadata__") or {})


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
        text = (json.dumps(_read_header_metadata(data), ensure_ascii=False) if name == WEIGHTS
                else data.decode("utf-8", "replace"))
        for m in marks:
            if m and m in text:
                raise PushError(f"{name} would publish the local path {m!r}; nothing was uploaded; re-export the "
                                "bundle with this version of zoo (or report the field that holds it)")


# ------------------------------------------------------------------------------------------ run facts


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _recipe(run: Path | None) -> dict[str, Any]:
    if run is None or not (run / "config.yaml").is_file():
        return {}
    try:
        data = yaml.safe_load((run / "config.yaml").read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _test_metrics(path: str | os.PathLike | None) -> dict[str, Any]:
    """Metrics of a `zoo eval` report (its folder or metrics.json): accuracy, top5, n_images."""
    if path is None:
        return {}
    p = Path(path)
    p = p / "metrics.json" if p.is_dir() else p
    doc = _read_json(p)
    if "accuracy" not in doc:
        raise UsageError(f"{p} is not a `zoo eval` metrics.json (no 'accuracy'); pass the report folder "
                         "`zoo eval BUNDLE --data DIR --out REPORT` wrote")
    return doc


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


# ------------------------------------------------------------------------------------------ model card


def model_card(repo: str, meta: dict[str, Any], config: dict[str, Any], run: Path | None,
               test: dict[str, Any] | None = None) -> str:
    """README.md: a YAML header the Hub understands (built with huggingface_hub's ModelCardData, with a
    model-index of the validation and test accuracies) and a body that says what the model is."""
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    labels = [str(x) for x in meta.get("label_names") or config.get("label_names") or []]
    library, _, arch = str(meta.get("builder", "timm:?")).partition(":")
    pcfg = config.get("pretrained_cfg") or {}
    source = public_source_id(meta.get("source") or pcfg.get("source"))
    licence = str(pcfg.get("license") or "unknown").lower()
    base_model = source[3:].split("@", 1)[0] if source and source.startswith("hf:") else None
    scan = _read_json(run / "scan.json") if run else {}
    summary = _read_json(run / "summary.json") if run else {}
    recipe = _recipe(run)
    metrics = dict(meta.get("metrics") or summary.get("metrics") or {})
    data_name = Path(str(scan.get("root") or "image folder")).name or "image folder"
    test = test or {}

    results = []
    if isinstance(metrics.get("val_acc"), (int, float)):
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                  dataset_name=data_name, dataset_split="validation", metric_type="accuracy",
                                  metric_value=float(metrics["val_acc"]), metric_name="validation accuracy"))
    if isinstance(test.get("accuracy"), (int, float)):
        results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                  dataset_name=data_name, dataset_split="test", metric_type="accuracy",
                                  metric_value=float(test["accuracy"]), metric_name="test accuracy"))
        if isinstance(test.get("top5"), (int, float)):
            results.append(EvalResult(task_type="image-classification", dataset_type="imagefolder",
                                      dataset_name=data_name, dataset_split="test", metric_type="top_5_accuracy",
                                      metric_value=float(test["top5"]), metric_name="test top-5 accuracy"))
    card_data = ModelCardData(
        library_name="timm" if library == "timm" else "pytorch", pipeline_tag="image-classification",
        license=licence if licence in HUB_LICENSES else "other",
        license_name=None if licence in HUB_LICENSES else (licence if licence != "unknown" else "unknown"),
        base_model=base_model, tags=["image-classification", library, "zoo-finetune", arch],
        model_name=repo.split("/", 1)[1], eval_results=results or None)

    name = meta.get("model") or arch
    head = (meta.get("head") or {}).get("kind", "linear")
    lines = [f"# {repo.split('/', 1)[1]}", "",
             f"An image classifier for {len(labels)} classes: `{name}` ({meta.get('builder')}, "
             f"{head} head) finetuned with [zoo-finetune](https://github.com/) (`zoo finetune`).", "",
             "## Data", ""]
    counts = scan.get("counts") if isinstance(scan.get("counts"), dict) else {}
    if counts:
        lines += ["| class | " + " | ".join(counts) + " |", "|---|" + "---|" * len(counts)]
        for c in labels[:200]:
            lines.append(f"| {c} | " + " | ".join(str((counts[s] or {}).get(c, 0)) if isinstance(counts[s], dict)
                                                  else "-" for s in counts) + " |")
        totals = {s: sum(v for v in per.values() if isinstance(v, int)) for s, per in counts.items()
                  if isinstance(per, dict)}
        lines += ["", "Images: " + ", ".join(f"{s} {n}" for s, n in totals.items()) + "."]
    else:
        lines.append("Classes: " + ", ".join(f"`{c}`" for c in labels[:200]))
    if run is not None and (run / "exclude.txt").is_file():
        left = [x for x in (run / "exclude.txt").read_text(encoding="utf-8").splitlines() if x.strip()]
        lines += ["", f"`zoo doctor` findings: {len(left)} image(s) (duplicates, near-duplicates across splits or "
                  "suspect labels) were left out of training and validation with `--exclude`."]
    lines += ["", "## Recipe", ""]
    freeze = summary.get("freeze") if isinstance(summary.get("freeze"), dict) else {}
    facts = {"optimizer": recipe.get("optimizer"), "learning rate": recipe.get("lr"),
             "schedule": recipe.get("schedule"), "epochs": recipe.get("epochs"),
             "epochs run": summary.get("epochs_run"), "best epoch": summary.get("best_epoch"),
             "freeze depth": freeze.get("depth", recipe.get("freeze")), "batch size": recipe.get("batch_size"),
             "weight decay": recipe.get("weight_decay"), "phases": ", ".join(summary.get("phases") or []) or None}
    lines += [f"- {k}: {_fmt(v)}" for k, v in facts.items() if v not in (None, "")] or ["- (not recorded)"]
    lines += ["", "## Metrics", ""]
    scalars = {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    lines += [f"- validation {k.removeprefix('val_')}: {_fmt(v)}" for k, v in scalars.items()]
    if test:
        lines += [f"- test accuracy: {_fmt(test['accuracy'])} on {test.get('n_images', '?')} images"
                  + (f" (top-5 {_fmt(test['top5'])})" if isinstance(test.get("top5"), float) else "")]
    if not scalars and not test:
        lines.append("- (none recorded)")
    lines += ["", "## Source weights", "",
              f"- {source or 'none (random initialisation)'}",
              f"- sha256 of the file: {meta.get('source_sha256') or 'unknown'}",
              f"- licence of the base weights: {licence}",
              "", "## Preprocessing", "",
              f"input {tuple(meta.get('input_size', ()))}, {meta.get('interpolation')} resize to input/crop_pct "
              f"(crop_pct {meta.get('crop_pct')}), centre crop, mean {tuple(meta.get('mean', ()))}, "
              f"std {tuple(meta.get('std', ()))}; recorded in config.json's pretrained_cfg.", "", "## Use", ""]
    if library == "timm" and head == "linear":
        lines += ["```python", "import timm, torch", "from PIL import Image", "",
                  f'model = timm.create_model("hf-hub:{repo}", pretrained=True).eval()',
                  "cfg = timm.data.resolve_data_config({}, model=model)",
                  "transform = timm.data.create_transform(**cfg)",
                  'x = transform(Image.open("image.jpg").convert("RGB")).unsqueeze(0)',
                  "probs = model(x).softmax(-1)",
                  'labels = model.pretrained_cfg["label_names"]', "```", ""]
    lines += ["With zoo-finetune (same sha256 checks and cache as its curated models):", "", "```bash",
              f"zoo pull hf-hub:{repo}", f"zoo predict hf-hub:{repo} image.jpg", "```", ""]
    card = ModelCard(f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines))
    return str(card)


# ------------------------------------------------------------------------------------------ planning


def plan_push(path: str | os.PathLike, repo: str, test_metrics: str | os.PathLike | None = None) -> PushPlan:
    """The three files to publish for the bundle (or run) at ``path``, checked for local paths.

    Raises:
        UsageError: a malformed repo id; BundleError: not a bundle; PushError: a local path would leak.
    """
    if not REPO_RE.fullmatch(repo or ""):
        raise UsageError(f"--repo {repo!r} is not a Hub repo id; write OWNER/NAME (e.g. me/cats-vs-dogs)")
    bundle, run = locate(path)
    sha = sha256_file(bundle / WEIGHTS)
    try:
        config = json.loads((bundle / CONFIG).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise BundleError(f"{bundle / CONFIG} is unreadable ({err}); re-export the bundle") from None
    recorded = (config.get("zoo") or {}).get("weights_sha256")
    if recorded and recorded != sha:
        raise BundleError(f"{bundle / WEIGHTS} is not the file config.json describes (sha256 {sha[:16]}... vs "
                          f"{str(recorded)[:16]}...); re-export the bundle; nothing was uploaded")
    raw_meta = read_safetensors_metadata(bundle / WEIGHTS)
    meta = _decode_metadata(raw_meta, bundle / WEIGHTS)
    public_meta = _public({k: v for k, v in meta.items()})
    header = {k: (v if k == "format" else json.dumps(v, ensure_ascii=False)) for k, v in public_meta.items()}
    weights = rewrite_safetensors_metadata((bundle / WEIGHTS).read_bytes(), header)
    weights_sha = hashlib.sha256(weights).hexdigest()
    cfg = _public(config)
    cfg.setdefault("zoo", {})["weights_sha256"] = weights_sha
    cfg["zoo"]["published_from_sha256"] = sha          # the local bundle's file, before the header was cleaned
    pc = cfg.setdefault("pretrained_cfg", {})
    pc["hf_hub_id"] = repo
    for k in ("file", "url"):
        if isinstance(pc.get(k), str) and not pc[k].startswith(("http://", "https://")):
            pc.pop(k)
    card = model_card(repo, public_meta, cfg, run, _test_metrics(test_metrics))
    files = {WEIGHTS: weights, CONFIG: (json.dumps(cfg, indent=2, ensure_ascii=False) + "\n").encode("utf-8"),
             CARD: card.encode("utf-8")}
    scan = _read_json(run / "scan.json") if run else {}
    _check_private(files, _private_markers(bundle, run, scan))
    return PushPlan(repo=repo, files=files, weights_sha256=weights_sha, bundle=bundle, run=run, card=card)


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
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    cause = err.__cause__ or err.__context__
    if cause is not None and str(cause).strip():
        first += f": {str(cause).strip().splitlines()[0]}"
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
    """
    plan = plan_push(path, repo, test_metrics)
    # lazy: zoo list --mine imports this module; huggingface_hub (slow to import) only to push
    import httpx2
    from huggingface_hub import CommitOperationAdd, HfApi, get_hf_file_metadata, hf_hub_url
    from huggingface_hub import errors as hf_errors

    endpoint = os.environ.get("HF_ENDPOINT") or None      # read now: huggingface_hub froze it at import
    api = HfApi(endpoint=endpoint, token=token)
    branch = revision or "main"
    try:
        api.create_repo(repo, private=private, exist_ok=True)
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
            if etag != plan.weights_sha256:
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
                        files=sorted(plan.files), unchanged=commit.oid == info.sha)
    _record(result, plan)
    return result


# ---------------------------------------------------------------------------------- "my models"


def _pushed_file() -> Path:
    return zoo_home() / "pushed.json"


def _record(result: PushResult, plan: PushPlan) -> None:
    items = [p for p in pushed_models() if not (p["repo"] == result.repo and p["revision"] == result.revision)]
    items.append({"repo": result.repo, "revision": result.revision, "commit": result.commit,
                  "weights_sha256": plan.weights_sha256, "bundle": str(plan.bundle.resolve()),
                  "time": time.strftime("%Y-%m-%dT%H:%M:%S")})
    path = _pushed_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(items, indent=2) + "\n")


def pushed_models() -> list[dict[str, Any]]:
    """What ``zoo push`` published from this machine (ZOO_HOME/pushed.json), oldest first."""
    data = _read_json_list(_pushed_file())
    return [d for d in data if isinstance(d, dict) and "repo" in d]


def _read_json_list(path: Path) -> list:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return []
    return data if isinstance(data, list) else []


def local_bundles(root: str | os.PathLike = ".", depth: int = 3) -> list[dict[str, Any]]:
    """Bundles (model.safetensors + config.json with a ``zoo`` section) under ``root``, at most ``depth``
    folders down (``runs/<run>/export`` is 2): path, architecture, classes, validation accuracy."""
    root = Path(root)
    found: list[dict[str, Any]] = []
    for level in range(depth + 1):
        for cfg_path in sorted(root.glob("/".join(["*"] * level + [CONFIG]))):
            folder = cfg_path.parent
            if not (folder / WEIGHTS).is_file():
                continue
            cfg = _read_json(cfg_path)
            if "zoo" not in cfg:
                continue
            found.append({"path": str(folder), "architecture": cfg.get("architecture"),
                          "num_classes": cfg.get("num_classes"), "model": (cfg.get("zoo") or {}).get("model")})
    return found
