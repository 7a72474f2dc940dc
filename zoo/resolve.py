"""Model resolution above the registry: any name -> ModelEntry, including ad-hoc ``timm:<arch>[.<tag>]`` and
``hf-hub:<org>/<repo>`` references, and the stage lists they need.

``zoo.registry`` knows the registry files and stays free of torch; this module adds what needs timm/torch:
an ad-hoc entry is built on the meta device to derive its stages (split at timm's ``feature_info``
modules). ``check_stages`` holds any stage list to the contract finetune freezes by. torch and timm are
imported inside the functions, so importing this module (``zoo info`` does) stays cheap.
"""
from __future__ import annotations

import difflib
import json
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from finetune.core.io import shell_command
from zoo.errors import RegistryError, UnknownModelError, UsageError
from zoo import registry
from zoo.entry import HUB_REPO_RE, HUB_REPO_RULE
from zoo.registry import COMMIT_RE, ModelEntry, Preprocessing, Source

if TYPE_CHECKING:
    from torch import nn

__all__ = ["get_entry", "model_name", "check_hub_repo",
           "timm_entry", "entry_from_hf_config", "hub_config", "describe_timm", "derive_stages", "check_stages",
           "stage_of"]


def get_entry(name: str | ModelEntry) -> ModelEntry:
    """The entry called ``name``: a registry name (``zoo.registry.get_entry``), ``timm:<arch>[.<tag>]`` or
    ``hf-hub:<org>/<repo>`` (ad-hoc entries; these import timm and torch); an entry given is returned as is.

    Raises:
        UnknownModelError: not in any registry / not a timm architecture (close matches listed);
        UsageError: an empty name or a malformed hub reference; RegistryError: a file is malformed.
    """
    if isinstance(name, ModelEntry):
        return name
    text = model_name(name) if isinstance(name, str) else name
    if isinstance(text, str) and text.startswith("timm:"):
        return timm_entry(text[len("timm:"):])
    if isinstance(text, str) and text.startswith("hf-hub:"):
        return _hf_hub_entry(text[len("hf-hub:"):])
    return registry.get_entry(name)


# 'timm: resnet50', 'hf-hub : org/repo': a prefix typed with a space (as a YAML key is), a name of no source
_SPACED_PREFIX = re.compile(r"(timm|hf-hub)(\s+:\s*|\s*:\s+)(\S+)")


def model_name(name: str) -> str:
    """``name`` as the commands read it: stripped, its ``timm:``/``hf-hub:`` prefix checked.

    Raises:
        UnknownModelError: a ``timm:`` prefix with a space around its colon (``timm: resnet50``);
        UsageError: an ``hf-hub:`` prefix with one (``hf-hub: org/repo``): each says the name to write.
    """
    text = name.strip()
    spaced = _SPACED_PREFIX.fullmatch(text)
    if spaced:
        prefix, ref = spaced.group(1), spaced.group(3)
        error = UnknownModelError if prefix == "timm" else UsageError
        raise error(f"{text!r} has a space around the colon of '{prefix}:'; write {prefix}:{ref} (no space)")
    return text


def _family_of(arch: str) -> str:
    # lazy: zoo --help / list / info import this module and must not import torch
    import timm.models

    try:  # timm keeps each family in its own module: timm.models.resnet, timm.models.convnext, ...
        return timm.models.model_entrypoint(arch).__module__.rsplit(".", 1)[-1]
    except Exception:
        return re.sub(r"[\d_]+$", "", arch) or arch


_TIMM_REF = re.compile(r"[A-Za-z0-9_]+(\.[A-Za-z0-9_]+)?")    # every timm name and pretrained tag has this form
_LIST_TIMM = "`python -c \"import timm; print(timm.list_models('*name*'))\"`"


def timm_entry(ref: str, *, name: str | None = None, pretrained_cfg: dict | None = None,
               sources: tuple[Source, ...] | None = None, num_classes: int | None = None) -> ModelEntry:
    """An ad-hoc entry for any timm model ``<arch>[.<tag>]`` (imports timm and torch).

    Preprocessing comes from the pretrained cfg (timm's, or ``pretrained_cfg`` from a hub config.json);
    stages are derived from a meta-device build (``derive_stages``).

    Raises:
        UnknownModelError: timm does not know the architecture (close matches listed).
    """
    if not _TIMM_REF.fullmatch(ref):   # a path, an empty architecture: said "has no architecture ''" (QA)
        raise UnknownModelError(f"{name or 'timm:' + ref!r} is not a timm model name: timm: takes an architecture, "
                                "with a pretrained tag or without, in letters, digits and '_' (timm:resnet50, "
                                f"timm:resnet18.a1_in1k); {_LIST_TIMM} lists them")
    # lazy: zoo --help / list / info import this module and must not import torch
    import timm
    from timm.models import get_pretrained_cfg, split_model_name_tag

    arch, tag = split_model_name_tag(ref)
    if not timm.is_model(arch):
        close = difflib.get_close_matches(arch, timm.list_models(), n=4, cutoff=0.6)
        hint = f"did you mean {', '.join('timm:' + c for c in close)}? " if close else ""
        raise UnknownModelError(f"timm {timm.__version__} has no architecture '{arch}'; {hint}"
                                f"{_LIST_TIMM} lists them")
    cfg = dict(pretrained_cfg or {})
    if not cfg:
        found = None
        if tag or timm.models.is_model_pretrained(arch):
            try:
                found = get_pretrained_cfg(f"{arch}.{tag}" if tag else arch, allow_unregistered=False)
            except RuntimeError:  # timm's way of saying "no such tag"
                found = None
        if found is None and tag:
            tags = timm.list_pretrained(f"{arch}.*")
            raise UnknownModelError(f"timm has no pretrained tag '{arch}.{tag}'; available: "
                                    f"{', '.join(tags) or 'none'}; use one of them or timm:{arch}")
        cfg = found.to_dict() if found is not None else {}
    tag = tag or cfg.get("tag") or ""
    if sources is None:
        sources = ()
        note = "ad-hoc timm reference: no pinned digest; trust-on-first-use (digest recorded in the cache manifest)"
        if cfg.get("hf_hub_id"):
            sources = (Source(kind="hf", repo=cfg["hf_hub_id"], revision="main",
                              revision_note="ad-hoc timm reference: follows the repo's main branch",
                              filename=cfg.get("hf_hub_filename") or "model.safetensors", sha256=None,
                              sha256_note=note),)
        elif cfg.get("url"):
            fmt = "safetensors" if str(cfg["url"]).endswith(".safetensors") else "pth"
            sources = (Source(kind="url", url=cfg["url"], sha256=None, sha256_note=note, format=fmt),)
    n_classes = num_classes or cfg.get("num_classes") or 1000
    params, stages, classifier = describe_timm(arch, n_classes, cfg.get("classifier"))
    full = f"{arch}.{tag}" if tag else arch
    prep = Preprocessing(
        input_size=tuple(cfg.get("input_size") or (3, 224, 224)), interpolation=cfg.get("interpolation") or "bicubic",
        crop_pct=float(cfg.get("crop_pct") or 0.875), mean=tuple(cfg.get("mean") or (0.485, 0.456, 0.406)),
        std=tuple(cfg.get("std") or (0.229, 0.224, 0.225)),
        origin=f"timm pretrained_cfg ({full})" if cfg else "timm defaults (no pretrained cfg)")
    paper = cfg.get("paper_ids") or ""
    return ModelEntry(
        name=name or f"timm:{ref}", builder=f"timm:{arch}", sources=tuple(sources), preprocessing=prep,
        stages=stages, classifier=classifier, params=params, top1=None, license=cfg.get("license") or "unknown",
        paper=paper if isinstance(paper, str) else ", ".join(paper), year=None, family=_family_of(arch),
        num_classes=n_classes, description=f"ad-hoc timm model {full}; stages derived automatically",
        origin_file="(ad-hoc)")


def entry_from_hf_config(repo: str, config: dict, revision: str = "main") -> ModelEntry:
    """An ad-hoc entry for a timm-format Hub repo from its ``config.json`` (``architecture``,
    ``num_classes``, ``pretrained_cfg``). The weights: ``model.safetensors`` at ``revision``, TOFU.

    Raises:
        UsageError: the config is not a timm model config.
    """
    arch = config.get("architecture") if isinstance(config, dict) else None
    if not isinstance(arch, str):
        raise UsageError(f"hf-hub:{repo}: config.json has no 'architecture' (not a timm model repo); add an entry "
                         "for it to your ZOO_REGISTRY file instead")
    # lazy: zoo.modelcard (yaml, the card) only for an hf-hub: name
    from zoo.modelcard import download_command, plain_timm_refusal

    why = plain_timm_refusal(config["zoo"]) if isinstance(config.get("zoo"), dict) else ""
    if why:     # a repo `zoo push` wrote of such a model: said to be another architecture's weights (QA, helper-137)
        raise UsageError(f"hf-hub:{repo} holds a model timm cannot build ({why}), so zoo cannot from an hf-hub: "
                         f"name either; download its bundle files (`{download_command(repo, 'DIR')}`) and give the "
                         "folder: zoo predict DIR IMAGE")
    # A repo `zoo push` wrote records its weights' sha256: checked like a curated entry's pin.
    pinned = (config.get("zoo") or {}).get("weights_sha256") if isinstance(config.get("zoo"), dict) else None
    pinned = pinned if isinstance(pinned, str) and re.fullmatch(r"[0-9a-f]{64}", pinned) else None
    src = Source(kind="hf", repo=repo, revision=revision,
                 revision_note=None if COMMIT_RE.fullmatch(revision) else "ad-hoc hf-hub reference: follows the branch",
                 filename="model.safetensors", sha256=pinned,
                 sha256_note=None if pinned else
                 "ad-hoc hf-hub reference: trust-on-first-use (digest recorded in the cache manifest)")
    cfg = dict(config.get("pretrained_cfg") or {})
    cfg.setdefault("num_classes", config.get("num_classes"))
    return timm_entry(arch, name=f"hf-hub:{repo}", pretrained_cfg=cfg, sources=(src,),
                      num_classes=config.get("num_classes"))


def hub_config(repo: str) -> dict | None:
    """The cached ``config.json`` of Hub repo ``repo`` (None when not cached or unreadable). No network."""
    # lazy: zoo --help / list / info import this module; huggingface_hub is slow to import
    from huggingface_hub import try_to_load_from_cache

    cached = try_to_load_from_cache(repo, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    if not isinstance(cached, str):
        return None
    try:
        data = json.loads(Path(cached).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def check_hub_repo(repo: str) -> str:
    """``repo`` of an ``hf-hub:<org>/<repo>`` name, checked before huggingface_hub sees it.

    Raises:
        UsageError: not ``<org>/<repo>``; a revision (``@v2``), which zoo does not take in a name.
    """
    if "@" in repo and HUB_REPO_RE.fullmatch(repo.partition("@")[0]):
        name, _, rev = repo.partition("@")
        raise UsageError(f"hf-hub:{repo}: zoo takes no revision in an hf-hub: name (it reads the main branch); for "
                         f"branch {rev!r} add an entry with its source's `revision: {rev}` to your ZOO_REGISTRY file "
                         f"(schema: the header of registry.yaml), or use hf-hub:{name}")
    if not HUB_REPO_RE.fullmatch(repo):
        raise UsageError(f"'hf-hub:{repo}' is not a Hub reference; write hf-hub:<org>/<repo>, {HUB_REPO_RULE}")
    return repo


def _hf_hub_entry(repo: str) -> ModelEntry:
    check_hub_repo(repo)
    # lazy: zoo --help / list / info import this module; huggingface_hub is slow to import
    from huggingface_hub import try_to_load_from_cache

    # Only the local HF cache is consulted: resolving a name must never touch the network. The cache dir
    # is read from the environment now (huggingface_hub froze its constant at import time).
    cached = try_to_load_from_cache(repo, "config.json", cache_dir=os.environ.get("HF_HUB_CACHE") or None)
    if not isinstance(cached, str):
        raise UsageError(f"hf-hub:{repo}: its config.json is not in the Hugging Face cache, so the architecture is "
                         f"unknown; run `{shell_command('hf', 'download', repo, 'config.json')}` (or add an entry to "
                         "your ZOO_REGISTRY file)")
    try:
        config = json.loads(Path(cached).read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UsageError(f"hf-hub:{repo}: cached config.json is unreadable ({err}); run "
                         f"`{shell_command('hf', 'download', repo, 'config.json', '--force-download')}`") from None
    return entry_from_hf_config(repo, config)


# ----------------------------------------------------------------------------------------------- stages
def stage_of(param: str, stages: Iterable[Iterable[str]]) -> list[int]:
    """Indices of the stages holding parameter ``param`` (p is in prefix s when p == s or starts with s + ".")."""
    return [i for i, stage in enumerate(stages)
            if any(param == s or param.startswith(s + ".") for s in stage)]


def check_stages(model: "nn.Module", stages: Iterable[Iterable[str]], classifier: str) -> list[str]:
    """Problems with a stage list for ``model``; empty when every parameter except the classifier's is in
    exactly one stage, the classifier exists and holds parameters, and every prefix matches something."""
    stages = [tuple(s) for s in stages]
    problems = []
    names = [n for n, _ in model.named_parameters()]
    in_cls = [n for n in names if n == classifier or n.startswith(classifier + ".")]
    if not in_cls:
        problems.append(f"classifier '{classifier}' holds no parameters")
    for n in names:
        if n in in_cls:
            continue
        hits = stage_of(n, stages)
        if len(hits) != 1:
            problems.append(f"parameter '{n}' is in {len(hits)} stages" + (f" ({hits})" if hits else ""))
    for i, stage in enumerate(stages):
        for s in stage:
            if not any(n == s or n.startswith(s + ".") for n in names):
                problems.append(f"stage {i} prefix '{s}' matches no parameter")
    return problems


def derive_stages(model: "nn.Module", classifier: str, boundaries: Iterable[str] = ()) -> tuple[tuple[str, ...], ...]:
    """Stages for a model without a curated list: split at ``boundaries`` (timm's ``feature_info``
    modules, input -> output), or at the top-level children when there are none. Parameters after the
    last boundary (e.g. a head norm or conv_head) join the last stage; the classifier is excluded.
    Each stage is written with the shortest prefixes that hold only its own parameters."""
    boundaries = [b for b in boundaries if b]
    if not boundaries:
        boundaries = [n for n, m in model.named_children()
                      if n != classifier and not classifier.startswith(n + ".")
                      and any(True for _ in m.parameters())]
    bset = set(boundaries)
    is_cls = lambda n: n == classifier or n.startswith(classifier + ".")  # noqa: E731
    stage_of_param: dict[str, int] = {}
    stage, open_boundary, closed = 0, None, 0
    for mod_name, module in model.named_modules():  # pre-order == forward order for these networks
        if open_boundary is not None and not (mod_name == open_boundary or mod_name.startswith(open_boundary + ".")):
            # Left the boundary module: the stage ends here (later params go to the next one).
            open_boundary, closed = None, closed + 1
            stage = min(closed, len(boundaries) - 1)
        if mod_name in bset and open_boundary is None:
            open_boundary = mod_name
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if not is_cls(full):
                stage_of_param[full] = stage
    # Shortest prefix whose parameters all sit in the same stage (and which does not contain the classifier).
    owners: dict[str, set[int]] = {}
    for full, s in stage_of_param.items():
        parts = full.split(".")
        for k in range(1, len(parts) + 1):
            owners.setdefault(".".join(parts[:k]), set()).add(s)
    for n, _ in model.named_parameters():
        if is_cls(n):
            parts = n.split(".")
            for k in range(1, len(parts) + 1):
                owners.setdefault(".".join(parts[:k]), set()).add(-1)
    out: list[list[str]] = [[] for _ in range(max(stage_of_param.values(), default=-1) + 1)]
    for full, s in stage_of_param.items():
        parts = full.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if owners[prefix] == {s}:
                if prefix not in out[s]:
                    out[s].append(prefix)
                break
    return tuple(tuple(s) for s in out if s)


def _module_name(model: "nn.Module", target: "nn.Module") -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return name
    return None


def describe_timm(arch: str, num_classes: int, classifier: str | None = None) -> tuple[int, tuple, str]:
    """(params, stages, classifier) of a timm architecture, from a build on the meta device (no memory,
    no init cost). Used for ad-hoc ``timm:``/``hf-hub:`` entries."""
    # lazy: zoo --help / list / info import this module and must not import torch
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    names = {n for n, _ in model.named_modules()}
    if not classifier or classifier not in names:
        try:
            classifier = _module_name(model, model.get_classifier()) or ""
        except Exception:  # a model without timm's classifier interface
            classifier = ""
    if not classifier:
        raise RegistryError(f"timm:{arch}: cannot tell which module is the classifier; add an entry for it to "
                            "your ZOO_REGISTRY file with an explicit 'classifier'")
    boundaries = [f["module"] for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict)]
    stages = derive_stages(model, classifier, boundaries)
    params = sum(p.numel() for p in model.parameters())
    return params, stages, classifier
