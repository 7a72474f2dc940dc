"""FinetuneConfig: every option of a finetune run, with commented defaults.

YAML overrides the defaults, command-line flags override the YAML; the resolved config is written into
the run folder (``config.yaml``) and into every checkpoint, so a run can be resumed or reproduced.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError

__all__ = ["FinetuneConfig", "load_config", "save_config", "OPTIMIZERS", "SCHEDULES", "HEADS", "ACTIVATIONS"]

OPTIMIZERS = ("adam", "sgd", "adamw", "rmsprop", "adagrad", "adadelta")
SCHEDULES = ("step", "exp", "inv", "cosine", "plateau", "none")
HEADS = ("linear", "mlp")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh")
MONITORS = ("val_loss", "val_acc")


@dataclass
class FinetuneConfig:
    # --- data ---
    val_split: float = 0.2          # fraction held out per class when DIR has no train/val folders
    strict: bool = False            # unreadable images are an error instead of skipped with a warning
    batch_size: int = 32
    workers: int = -1               # DataLoader workers; -1 = auto (CUDA: cores - 1; else min(8, cores - 1))
    class_weights: str = "none"     # "none" | "auto" (inverse class frequency in the loss)
    sampler: str = "random"         # "random" | "balanced" (oversample rare classes)
    # --- augmentation (train only; evaluation is resize + centre crop) ---
    augment: bool = True
    crop_scale_min: float = 0.35    # RandomResizedCrop scale range lower bound (upper is 1.0)
    hflip: float = 0.5              # horizontal flip probability (0 disables)
    brightness: float = 0.2         # ColorJitter brightness strength (0 disables)
    contrast: float = 0.2           # ColorJitter contrast strength (0 disables)
    # --- model surgery and freezing ---
    head: str = "linear"            # "linear" (FC-C, Xavier) or "mlp"
    mlp_hidden: int = 512
    mlp_dropout: float = 0.2
    mlp_activation: str = "relu"
    freeze: str = "auto"            # "auto" | "head" | "<k>" (train the last k stages) | "none"
    small_per_class: int = 100      # auto: fewer images per class than this -> head only
    small_total: int = 1000         # auto: ... or fewer images in total than this -> head only
    large_per_class: int = 1000     # auto: at least this many per class -> everything unfrozen
    medium_stages: int = 2          # auto: stages unfrozen (besides the head) for a medium dataset
    head_epochs: int = -1           # head-only warm-up epochs before unfreezing; -1 = until val loss stops improving (capped at 10); 0 = off
    bn: str = "eval"                # "eval" (frozen pretrained statistics) | "train"
    # --- optimisation ---
    optimizer: str = "adam"
    lr: float = 1e-3                # head learning rate
    backbone_lr_mult: float = 0.1   # pretrained layers train at lr * this
    momentum: float = 0.9           # sgd / rmsprop
    nesterov: bool = False
    weight_decay: float = 1e-4      # not applied to biases and norm parameters
    schedule: str = "cosine"
    warmup_epochs: float = 0.0      # linear warm-up (fractional epochs allowed)
    step_size: int = 10             # step: decay every N epochs
    gamma: float = 0.1              # step/exp/inv/plateau decay factor
    # --- the loop ---
    epochs: int = 30                # maximum epochs (early stopping usually ends sooner)
    patience: int = 5               # early stopping: epochs without improvement
    min_delta: float = 1e-4
    monitor: str = "val_loss"       # "val_loss" | "val_acc"
    seed: int = 0
    device: str = "auto"            # "auto" | "cpu" | "cuda" | "cuda:N" | "mps"
    amp: bool = True                # mixed precision on CUDA (bf16 where supported, else fp16 + scaler)
    channels_last: bool = True      # on CUDA
    gpu_normalize: bool = True      # on CUDA: uint8 batches from the workers, normalised on the GPU
    decode: str = "workers"         # "workers" (PIL in DataLoader workers) | "device" (JPEGs decoded on the GPU)
    compile: bool = False           # torch.compile
    fast_head: bool = True          # head-only training on cached backbone features
    aug_views: int = 0              # fast path: augmented views cached per image (0 = un-augmented only)
    overfit_batches: int = 0        # sanity check: train on N fixed batches only
    tensorboard: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field and the allowed values."""
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"invalid {name}={getattr(self, name)!r}: {allowed}")

        choices = {"optimizer": OPTIMIZERS, "schedule": SCHEDULES, "head": HEADS,
                   "mlp_activation": ACTIVATIONS, "monitor": MONITORS, "bn": ("eval", "train"),
                   "class_weights": ("none", "auto"), "sampler": ("random", "balanced"),
                   "decode": ("workers", "device")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise bad(name, "choose one of " + ", ".join(allowed))
        if self.freeze not in ("auto", "head", "none") and not str(self.freeze).isdigit():
            raise bad("freeze", "use auto, head, none or a number of stages")
        if not 0.0 < self.val_split < 1.0:
            raise bad("val_split", "use a fraction between 0 and 1, e.g. 0.2")
        for name in ("batch_size", "epochs"):
            if int(getattr(self, name)) < 1:
                raise bad(name, "must be at least 1")
        if not self.lr > 0:
            raise bad("lr", "must be positive, e.g. 1e-3")
        if not 0.0 < self.crop_scale_min <= 1.0:
            raise bad("crop_scale_min", "use a fraction in (0, 1]")
        if not 0.0 <= self.hflip <= 1.0:
            raise bad("hflip", "use a probability between 0 and 1 (0 disables)")
        for name in ("brightness", "contrast"):
            if not getattr(self, name) >= 0.0:
                raise bad(name, "use a strength >= 0, e.g. 0.2 (0 disables)")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; see `zoo finetune --help`")
        typed: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                typed[f.name] = _coerce(f, data[f.name], source)
        return cls(**typed)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    kind = type(f.default)
    try:
        if kind is bool and not isinstance(value, bool):
            raise ValueError
        if kind is str:
            return str(value)
        return kind(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{source}: {f.name}={value!r} should be a {kind.__name__}") from None


def load_config(path: str | Path) -> FinetuneConfig:
    """Read a YAML config (safe loader). Raises ConfigError with the file name on any problem."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except yaml.YAMLError as e:
        # One line (PyYAML's message spans several): where, and what. Python tags (!!python/...) land here
        # too: the safe loader refuses them, nothing is constructed or run.
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = " ".join((getattr(e, "problem", None) or str(e)).split())
        raise ConfigError(f"{path} is not valid YAML{at}: {problem}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return FinetuneConfig.from_dict(data, source=str(path))


def save_config(config: FinetuneConfig, path: str | Path) -> None:
    from finetune.io import atomic_write_text

    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
