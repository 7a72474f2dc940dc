"""The model catalogue: frozen dataclasses, loading + validation of registry files, lookup.

Imports no torch (``zoo list`` must answer in well under a second).
"""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["Source", "Preprocessing", "ModelEntry"]


@dataclass(frozen=True)
class Source:
    """One pinned place the weights can come from."""

    kind: str                          # "hf" | "url" | "file" | "package"
    repo: str | None = None            # hf: "timm/resnet50.a1_in1k"
    revision: str | None = None        # hf: commit hash (or a branch, with a note why)
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

    @property
    def library(self) -> str:
        return self.builder.split(":", 1)[0]

    @property
    def arch(self) -> str:
        return self.builder.split(":", 1)[1]
