"""FinetuneConfig: every option of a finetune run, with commented defaults, and ``OPTIONS``: the one
definition of each option's help line, allowed values and numeric range.

YAML overrides the defaults, command-line flags override the YAML; the resolved config is written into
the run folder (``config.yaml``) and into every checkpoint, so a run can be resumed or reproduced.
``FinetuneConfig.validate`` checks every field against ``OPTIONS`` (YAML and flags alike); the CLI builds
the flags of ``zoo finetune``, ``zoo lr-find`` and ``zoo sweep`` (help, choices, ranges) from the same table.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import yaml

from finetune.errors import ConfigError
from finetune.io import load_yaml

__all__ = ["FinetuneConfig", "load_config", "save_config", "Option", "OPTIONS", "OPTIMIZERS", "SCHEDULES", "HEADS",
           "ACTIVATIONS", "MONITORS", "HEAD_SOLVERS", "AUGMENTS", "upgrade_config_dict"]

OPTIMIZERS = ("adam", "sgd", "adamw", "rmsprop", "adagrad", "adadelta")
SCHEDULES = ("step", "exp", "inv", "cosine", "plateau", "none")
HEADS = ("linear", "mlp")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh")
MONITORS = ("val_loss", "val_acc")
HEAD_SOLVERS = ("lbfgs", "gradient")
AUGMENTS = ("standard", "trivial", "none")
# Options that were booleans before they took a closed set of values: YAML files, run folders and
# checkpoints written then still load (True/False -> these values).
_LEGACY_BOOLS = {"augment": {True: "standard", False: "none"}}


@dataclass(frozen=True)
class Option:
    """What one FinetuneConfig field may hold and how it is explained (``--help``, error messages).

    ``choices``: the closed set of values; ``low``/``high``: the numeric range (``*_open``: bound excluded);
    ``sentinels``: values outside the range with a meaning of their own (e.g. -1 = auto).
    """

    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    sentinels: tuple[float, ...] = ()

    def range_text(self) -> str:
        """The allowed values as shown in ``--help`` and in errors: "0 <= x < 1", "x >= 1", "x >= 0 or -1"."""
        if self.choices is not None:
            return ", ".join(self.choices)
        if self.low is None and self.high is None:
            return ""
        lo = "" if self.low is None else f"{_num(self.low)} {'<' if self.low_open else '<='} "
        hi = "" if self.high is None else f" {'<' if self.high_open else '<='} {_num(self.high)}"
        if self.low is not None and self.high is None:
            text = f"x {'>' if self.low_open else '>='} {_num(self.low)}"
        else:
            text = f"{lo}x{hi}"
        return text + "".join(f" or {_num(v)}" for v in self.sentinels)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (the allowed values, to put in a message), or None when it is."""
        if self.choices is not None:
            return None if value in self.choices else "choose one of " + ", ".join(self.choices)
        if self.low is None and self.high is None or isinstance(value, bool):
            return None
        if value in self.sentinels:
            return None
        v = float(value)
        ok = math.isfinite(v)
        if self.low is not None:
            ok = ok and (v > self.low if self.low_open else v >= self.low)
        if self.high is not None:
            ok = ok and (v < self.high if self.high_open else v <= self.high)
        return None if ok else f"allowed: {self.range_text()}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


# One entry per FinetuneConfig field (a test checks it): the help line of its flag, its allowed values.
OPTIONS: dict[str, Option] = {
    "val_split": Option("Fraction of each class held out for validation when DIR has no train/val folders.",
                        low=0, high=1, low_open=True, high_open=True),
    "strict": Option("Unreadable images are an error instead of being skipped with a warning."),
    "batch_size": Option("Global batch size (split across processes under torchrun).", low=1),
    "workers": Option("DataLoader worker processes; -1 = auto (on CUDA all CPUs but one, shared by torchrun's "
                      "local processes; on a CPU none up to 4 cores, one per 4 cores above, at most 8), 0 = load in "
                      "the main process.", low=0,
                      sentinels=(-1,)),
    "class_weights": Option("auto: weight the loss by inverse class frequency (imbalanced data).",
                            choices=("none", "auto")),
    "sampler": Option("balanced: oversample rare classes in each epoch.", choices=("random", "balanced")),
    "augment": Option("Training augmentation: standard (random crop-and-scale, flip, brightness/contrast), "
                      "trivial (crop-and-scale, flip, then torchvision's TrivialAugmentWide instead of the "
                      "jitter) or none; --no-augment = none.", choices=AUGMENTS),
    "crop_scale_min": Option("Smallest area fraction of the random crop.", low=0, high=1, low_open=True),
    "hflip": Option("Horizontal flip probability (0 disables; for data whose mirror image is another class). "
                    "Head-only runs on cached features then also drop the mirrored view.", low=0, high=1),
    "brightness": Option("Brightness jitter strength (0 disables).", low=0),
    "contrast": Option("Contrast jitter strength (0 disables).", low=0),
    "head": Option("New classifier: linear (FC-C, Xavier init) or a small MLP.", choices=HEADS),
    "mlp_hidden": Option("MLP head: hidden units.", low=1),
    "mlp_dropout": Option("MLP head: dropout probability.", low=0, high=1, high_open=True),
    "mlp_activation": Option("MLP head: activation.", choices=ACTIVATIONS),
    "freeze": Option("What trains: auto (from the dataset size), head, none (everything) or K (the last K stages)."),
    "small_per_class": Option("auto freeze: fewer images per class than this -> head only.", low=0),
    "small_total": Option("auto freeze: fewer images in total than this -> head only.", low=0),
    "large_per_class": Option("auto freeze: at least this many per class -> everything unfrozen.", low=0),
    "medium_stages": Option("auto freeze: stages unfrozen for a medium-sized dataset.", low=0),
    "head_epochs": Option("Head-only epochs before unfreezing; -1 = until its val loss stops improving (max 10); "
                          "0 = off.", low=0, sentinels=(-1,)),
    "head_guard": Option("After a head phase, keep the head-phase weights unless the finetuned ones are right on "
                         "significantly more validation images (one-sided exact McNemar test, 5%). "
                         "--no-head-guard keeps the finetuned weights whenever they have the better val metric."),
    "bn": Option("BatchNorm statistics: eval keeps the pretrained ones frozen; train updates those of the "
                 "trained stages (frozen stages keep theirs); with --no-pretrained the default is train.",
                 choices=("eval", "train")),
    "optimizer": Option("Optimizer.", choices=OPTIMIZERS),
    "lr": Option("Head learning rate, or 'auto' to run the LR range test first.", low=0, low_open=True),
    "backbone_lr_mult": Option("Pretrained layers train at lr x this.", low=0),
    "momentum": Option("Momentum (sgd, rmsprop).", low=0, high=1, high_open=True),
    "nesterov": Option("Nesterov momentum (sgd)."),
    "weight_decay": Option("L2 weight decay (not on biases and norm parameters).", low=0),
    "schedule": Option("Learning-rate schedule (stepped per batch; plateau per epoch).", choices=SCHEDULES),
    "warmup_epochs": Option("Linear LR warm-up, in epochs (fractions allowed).", low=0),
    "step_size": Option("step/exp schedules: decay every N epochs.", low=1),
    "gamma": Option("Decay factor of the step/exp/inv/plateau schedules (step/exp: at most 1; plateau: below 1).",
                    low=0, low_open=True),
    "epochs": Option("Maximum epochs in total (early stopping usually ends sooner).", low=1),
    "patience": Option("Early stopping: epochs without improvement before stopping.", low=0),
    "min_delta": Option("Early stopping: smallest change that counts as an improvement.", low=0),
    "monitor": Option("Metric for early stopping and the best checkpoint.", choices=MONITORS),
    "seed": Option("Seed of the split, the initialisation and the data order.", low=0),
    "device": Option("auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps."),
    "amp": Option("Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling)."),
    "channels_last": Option("channels_last memory format on CUDA."),
    "gpu_normalize": Option("On CUDA: workers decode, crop and send uint8 batches; the GPU flips, jitters and "
                            "normalises them."),
    "decode": Option("Where images are decoded: workers (PIL, in DataLoader processes) or device (JPEGs decoded, "
                     "cropped and flipped on the GPU with nvJPEG; workers only read files): for hosts whose cores "
                     "cannot keep the GPU fed.", choices=("workers", "device")),
    "compile": Option("torch.compile the model (slower start, faster epochs)."),
    "fast_head": Option("Head-only training on cached backbone features (much faster; same result)."),
    "aug_views": Option("Fast head path: augmented views cached per image (0 = un-augmented only).", low=0),
    "img_size": Option("Input size in pixels for training and evaluation (recorded in the bundle, so predict "
                       "and eval use it too); 0 = the model's own (e.g. 224). Lower is faster on a CPU.",
                       low=16, sentinels=(0,)),
    "head_solver": Option("How a linear head trains on cached features: lbfgs (full-batch L-BFGS to convergence, "
                          "its L2 strength picked on the validation split, like a logistic-regression probe) or "
                          "gradient (--optimizer/--lr epoch by epoch).", choices=HEAD_SOLVERS),
    # --- EMA / layer decay (issue 16) ---
    "ema": Option("Validate, keep and export an exponential moving average of the weights, updated after every "
                  "optimizer step of the finetune phase, with this decay (warm-up: min(decay, (1+t)/(10+t)) after "
                  "t steps); 0 = off. The head phase (solved on cached features) is not averaged.", low=0, high=1,
                  high_open=True),
    "layer_decay": Option("Layer-wise LR decay: the head trains at --lr, the last stage at lr x "
                          "--backbone-lr-mult x F, each earlier stage F times the one after it; 1 = off.",
                          low=0, high=1, low_open=True),
    "overfit_batches": Option("Sanity check instead of training: try to overfit N fixed batches, then exit "
                              "(0 = off).", low=0),
    # --- modern regularisers (issue 16) ---
    "label_smoothing": Option("Label smoothing of the training loss (torch/timm semantics: the target puts "
                              "1 - F + F/C on the true class, F/C on every other); validation loss stays plain "
                              "cross-entropy.", low=0, high=1, high_open=True),
    "mixup": Option("Mixup alpha: each training batch is blended with itself reversed, lambda ~ Beta(A, A), "
                    "targets mixed alike (timm's batch mode); 0 = off. Image-space: a head-only run then trains "
                    "the head through the network, not on cached features.", low=0),
    "cutmix": Option("CutMix alpha: a box of the reversed batch is pasted in, lambda ~ Beta(A, A) corrected to "
                     "the box's area; with --mixup too, each batch picks one of the two (probability 1/2); "
                     "0 = off.", low=0),
    "tensorboard": Option("Also log to RUN/tensorboard (needs the tensorboard package)."),
    "quiet": Option("No progress bars or per-epoch lines."),
}


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
    augment: str = "standard"       # "standard" | "trivial" (TrivialAugmentWide) | "none"; true/false = standard/none
    crop_scale_min: float = 0.8     # RandomResizedCrop scale range lower bound (upper is 1.0); docs/peers.md
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
    head_guard: bool = True         # after a head phase: finetuned weights replace the head's only if significantly better on val
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
    head_solver: str = "lbfgs"      # linear head on cached features: lbfgs (converged, L2 on val) | gradient
    img_size: int = 0               # input size in px for training and evaluation; 0 = the model's own
    # --- modern regularisers (issue 16) ---
    label_smoothing: float = 0.0    # training loss only; the default follows the measurement (docs/peers.md)
    mixup: float = 0.0              # Beta(A, A) mixup alpha per training batch (timm batch mode); 0 = off
    cutmix: float = 0.0             # Beta(A, A) CutMix alpha; both > 0: each batch picks one (p = 1/2)
    # --- EMA / layer decay (issue 16) ---
    ema: float = 0.0                # EMA decay of the weights (finetune phase); 0 = off
    layer_decay: float = 1.0        # stage k steps before the head trains at lr * backbone_lr_mult * F**k; 1 = off
    overfit_batches: int = 0        # sanity check: train on N fixed batches only
    tensorboard: bool = False
    quiet: bool = False

    def __post_init__(self) -> None:
        for name, values in _LEGACY_BOOLS.items():       # FinetuneConfig(augment=False) still means none
            value = getattr(self, name)
            if isinstance(value, bool):
                setattr(self, name, values[value])
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the field, its flag and the allowed values (``OPTIONS``)."""
        def bad(name: str, allowed: str) -> ConfigError:
            return ConfigError(f"invalid {name}={getattr(self, name)!r} (--{name.replace('_', '-')}): {allowed}")

        for name, option in OPTIONS.items():
            problem = option.problem(getattr(self, name))
            if problem is not None:
                raise bad(name, problem)
        if self.freeze not in ("auto", "head", "none") and not str(self.freeze).isdigit():
            raise bad("freeze", "use auto, head, none or a number of stages")
        # A decay factor above 1 makes these schedules raise the LR; ReduceLROnPlateau refuses factor >= 1.
        if self.schedule in ("step", "exp") and self.gamma > 1:
            raise bad("gamma", f"the {self.schedule} schedule needs a decay factor 0 < x <= 1")
        if self.schedule == "plateau" and self.gamma >= 1:
            raise bad("gamma", "the plateau schedule needs a decay factor 0 < x < 1")
        # TrivialAugment runs in the workers on decoded images; --decode device decodes and crops on the GPU.
        if self.augment == "trivial" and self.decode == "device":
            raise bad("augment", "trivial runs in the DataLoader workers; use --decode workers with it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}; see `zoo finetune --help`")
        data = upgrade_config_dict(data)
        typed: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                typed[f.name] = _coerce(f, data[f.name], source)
        return cls(**typed)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)


def upgrade_config_dict(data: dict[str, Any]) -> dict[str, Any]:
    """``data`` (a config mapping: YAML, a run's config.yaml, a checkpoint's) with the values of options
    that used to be booleans mapped to their current names (``augment: true`` -> ``standard``)."""
    out = dict(data)
    for name, values in _LEGACY_BOOLS.items():
        if isinstance(out.get(name), bool):
            out[name] = values[out[name]]
    return out


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
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
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
