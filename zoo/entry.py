"""What a catalogue entry is: frozen dataclasses (``Source``, ``Preprocessing``, ``ModelEntry``) and the
sha256 pins of its weight files. No torch, no file reading: ``zoo.registry`` loads and validates the files."""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import Any

from zoo.errors import UsageError

__all__ = ["Source", "Preprocessing", "ModelEntry", "public_source_id", "COMMIT_RE", "HUB_REPO_RE",
           "HUB_REPO_RULE", "MIN_PREFIX", "parse_digest", "matches_pin", "entry_pin", "weights_tag"]

_HEX_RE = re.compile(r"[0-9a-f]+")
COMMIT_RE = re.compile(r"[0-9a-f]{40}")   # a full Hub commit hash
# The Hub's rule for a repository id <org>/<repo> (huggingface_hub's validate_repo_id): ASCII letters, digits, '-',
# '_', '.', neither beginning nor ending with '-' or '.', no '--' or '..', at most 96 characters, the id not ending
# in '.git' (case-sensitive, as the Hub's check: `a/b.git` gave HFValidationError's traceback, QA). Ids that passed a
# looser pattern (`hf-hub:../x`, `repo: a/..` in a registry) reached huggingface_hub, whose HFValidationError
# ended the command in a traceback (QA).
_HUB_PART = r"(?!.*(?:--|\.\.))[A-Za-z0-9_](?:[A-Za-z0-9_.-]{0,94}[A-Za-z0-9_])?"
HUB_REPO_RE = re.compile(f"{_HUB_PART}/{_HUB_PART}(?<!\\.git)")
HUB_REPO_RULE = ("each in letters, digits, '-', '_' and '.' (no '--' or '..'), beginning and ending with a letter, "
                 "digit or '_', the name not ending in '.git'")
MIN_PREFIX = 8                            # hex digits a sha256 prefix pin needs (torchvision publishes 8)


@dataclass(frozen=True)
class Source:
    """One pinned place the weights can come from."""

    kind: str                          # "hf" | "url" | "file" | "package"
    repo: str | None = None            # hf: "timm/resnet50.a1_in1k"
    revision: str | None = None        # hf: commit hash (or a branch, with a note why)
    revision_note: str | None = None   # hf: why ``revision`` is a branch rather than a commit hash
    filename: str | None = None        # hf: "model.safetensors"
    url: str | None = None             # url: https://...
    path: str | None = None            # file: local path; package: path inside the package
    package: str | None = None         # package: importable Python package that ships the file
    sha256: str | None = None          # full hex digest of the file as fetched; None => trust-on-first-use
    sha256_prefix: str | None = None   # e.g. torchvision's file names carry the first 8 hex digits
    sha256_note: str | None = None     # why there is no full digest (required when sha256 is None)
    format: str = "safetensors"        # "safetensors" | "pth"
    key_map: str | None = None         # name in zoo.keymaps.KEY_MAPS when tensor names differ

    def id(self) -> str:
        """A stable, human-readable identifier, recorded in the cache manifest and in bundles."""
        if self.kind == "hf":
            return f"hf:{self.repo}@{self.revision or 'main'}/{self.filename}"
        if self.kind == "url":
            return f"url:{self.url}"
        if self.kind == "package":
            return f"package:{self.package}/{self.path}"
        return f"file:{self.path}"


def public_source_id(source_id: str | None) -> str | None:
    """A source id fit to publish: ``file:``/``import:`` ids name the file, never its local folder
    (``import:/home/me/w/x.pth`` -> ``import:x.pth``); hub, URL and package ids are public already."""
    if not source_id:
        return source_id
    kind, sep, rest = str(source_id).partition(":")
    if sep and kind in ("file", "import"):
        return f"{kind}:{rest.replace(chr(92), '/').rstrip('/').rsplit('/', 1)[-1]}"
    return str(source_id)


@dataclass(frozen=True)
class Preprocessing:
    """How the pretrained network expects its input (from timm's pretrained_cfg or torchvision's meta)."""

    input_size: tuple[int, int, int] = (3, 224, 224)
    interpolation: str = "bicubic"
    crop_pct: float = 0.875
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    origin: str = "timm pretrained_cfg"

    def data_config(self) -> dict:
        """timm-style data config (what timm.data.resolve_model_data_config returns)."""
        return {"input_size": tuple(self.input_size), "interpolation": self.interpolation,
                "crop_pct": float(self.crop_pct), "crop_mode": "center",
                "mean": tuple(self.mean), "std": tuple(self.std)}


@dataclass(frozen=True)
class ModelEntry:
    """One model of the zoo."""

    name: str
    builder: str                                   # "timm:resnet50" | "torchvision:alexnet"
    sources: tuple[Source, ...]
    preprocessing: Preprocessing
    stages: tuple[tuple[str, ...], ...]            # module-name prefixes per stage, input -> output
    classifier: str                                # module name of the final Linear
    params: int | None = None
    top1: float | None = None
    license: str = "unknown"
    paper: str = ""
    year: int | None = None
    family: str = ""
    num_classes: int = 1000
    description: str = ""
    origin_file: str = field(default="", compare=False)   # the registry file it came from
    top1_source: str = ""                          # where ``top1`` comes from (meta, README, model card)

    @property
    def library(self) -> str:
        return self.builder.split(":", 1)[0]

    @property
    def arch(self) -> str:
        return self.builder.split(":", 1)[1]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready view (tuples become lists); what ``zoo info --json`` prints and bundles record."""
        return json.loads(json.dumps(dataclasses.asdict(self)))



# ----------------------------------------------------------------------------------------------- digests
def parse_digest(text: str, what: str = "--sha256") -> str:
    """A sha256 pin as typed: 64 hex digits, or a prefix of at least ``MIN_PREFIX`` (e.g. the 8 digits in a
    torchvision file name; weaker than the full digest). Returns it lowercased.

    Raises:
        UsageError: not hex, or too short.
    """
    pin = str(text).strip().lower()
    if not (MIN_PREFIX <= len(pin) <= 64 and _HEX_RE.fullmatch(pin)):
        raise UsageError(f"{what} {text!r}: give the file's sha256 as 64 hex digits, or at least its first "
                         f"{MIN_PREFIX} (as in torchvision file names, e.g. alexnet-owt-7be5be79.pth)")
    return pin


def matches_pin(digest: str, pin: str | None) -> bool:
    """``digest`` (full hex) equals ``pin``, or starts with it when ``pin`` is a prefix."""
    return bool(pin) and digest.lower().startswith(pin.lower()) and len(pin) >= MIN_PREFIX


def entry_pin(entry: ModelEntry, digest: str) -> Source | None:
    """The entry's source whose pinned sha256 (or prefix) ``digest`` matches: such a file is verified."""
    for source in entry.sources:
        if matches_pin(digest, source.sha256) or (source.sha256 is None and matches_pin(digest, source.sha256_prefix)):
            return source
    return None


def weights_tag(entry: ModelEntry) -> str | None:
    """The pretrained tag of the entry's weights ("tv_in1k" for repo timm/resnet18.tv_in1k), or None when the
    sources do not say (e.g. a torchvision URL)."""
    for source in entry.sources:
        if source.kind == "hf" and source.repo:
            name = source.repo.rsplit("/", 1)[-1]
            if name.startswith(entry.arch + ".") and len(name) > len(entry.arch) + 1:
                return name[len(entry.arch) + 1:]
    return None
