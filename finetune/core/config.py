"""FinetuneConfig: every option of a finetune run, one record per option (default, help line, allowed
values, whether it may change on resume), and ``OPTIONS``, the table derived from those records.

YAML overrides the defaults, command-line flags override the YAML; the resolved config is written into
the run folder (``config.yaml``) and into every checkpoint, so a run can be resumed or reproduced.
``FinetuneConfig.validate`` checks every field against ``OPTIONS`` (YAML and flags alike); the CLI builds
the flags of ``zoo finetune``, ``zoo lr-find`` and ``zoo sweep`` (help, choices, ranges) from the same table.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import re
import reprlib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

import yaml

from finetune.core import yamlschema
from finetune.core.errors import ConfigError
from finetune.core.io import atomic_write_text, load_yaml, read_user_text, yaml_problem

__all__ = ["FinetuneConfig", "load_resume_config", "read_config_file", "save_config", "short_repr", "unknown_options",
           "Option", "OPTIONS", "range_text", "OPTIMIZERS", "SCHEDULES", "HEADS", "ACTIVATIONS", "MONITORS",
           "HEAD_SOLVERS", "AUGMENTS", "RESUME_FREE"]

OPTIMIZERS = ("adam", "sgd", "adamw", "rmsprop", "adagrad", "adadelta")
SCHEDULES = ("step", "exp", "inv", "cosine", "plateau", "none")
HEADS = ("linear", "mlp")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "tanh")
MONITORS = ("val_loss", "val_acc")
HEAD_SOLVERS = ("lbfgs", "gradient")
AUGMENTS = ("standard", "trivial", "none")


@dataclass(frozen=True)
class Option:
    """What one FinetuneConfig field may hold and how it is explained (``--help``, error messages).

    ``choices``: the closed set of values; ``low``/``high``: the numeric range (``*_open``: bound excluded);
    ``sentinels``: values outside the range with a meaning of their own (e.g. -1 = auto); ``resume_free``:
    the option may change when a run is resumed (it changes speed or output, not the maths of the epochs
    still to run; epochs and patience may be raised to train longer).
    """

    help: str
    choices: tuple[str, ...] | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    sentinels: tuple[float, ...] = ()
    resume_free: bool = False

    def range_text(self) -> str:
        """The allowed values as shown in ``--help`` and in errors (:func:`range_text`), or the choices."""
        if self.choices is not None:
            return ", ".join(self.choices)
        return range_text(self.low, self.high, self.low_open, self.high_open, self.sentinels)

    def problem(self, value: Any) -> str | None:
        """Why ``value`` is not allowed (the allowed values, to put in a message), or None when it is."""
        if self.choices is not None:
            return None if value in self.choices else "choose one of " + ", ".join(self.choices)
        if self.low is None and self.high is None or isinstance(value, bool):
            return None
        if value in self.sentinels:
            return None
        # an int is compared as it is: float() rounds 2**63 - 1 up to 2**63 and overflows past 1e308
        v = value if isinstance(value, int) else float(value)
        ok = isinstance(v, int) or math.isfinite(v)
        if self.low is not None:
            ok = ok and (v > self.low if self.low_open else v >= self.low)
        if self.high is not None:
            ok = ok and (v < self.high if self.high_open else v <= self.high)
        return None if ok else f"allowed: {self.range_text()}"


def range_text(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False,
               sentinels: tuple[float, ...] = ()) -> str:
    """The one form of an allowed range, in every command's ``--help`` (the config's options and click's ranges,
    zoo.cli.options) and error: "0 <= x < 1", "x >= 1", "x > 0", "x <= 9", "x >= 0 or -1"; "" when unbounded."""
    if low is None and high is None:
        return ""
    lo = "" if low is None else f"{_num(low)} {'<' if low_open else '<='} "
    hi = "" if high is None else f" {'<' if high_open else '<='} {_num(high)}"
    text = f"x {'>' if low_open else '>='} {_num(low)}" if high is None else f"{lo}x{hi}"
    return text + "".join(f" or {_num(v)}" for v in sentinels)


def _num(v: float) -> str:
    if isinstance(v, int) and v >= 2**32 and v & (v - 1) == 0:     # a power of two past 2**32: 2**63, not 19 digits
        return f"2**{v.bit_length() - 1}"
    return str(int(v)) if float(v).is_integer() else f"{v:g}"


def option(default: Any, help: str, *, choices: tuple[str, ...] | None = None, low: float | None = None,
           high: float | None = None, low_open: bool = False, high_open: bool = False,
           sentinels: tuple[float, ...] = (), resume_free: bool = False) -> Any:
    """A FinetuneConfig field with its :class:`Option` (help, allowed values, resume rule) as metadata."""
    return field(default=default, metadata={"option": Option(help, choices, low, high, low_open, high_open,
                                                             sentinels, resume_free)})


@dataclass
class FinetuneConfig:
    """Every option of a finetune run: its default, ``--help`` line, allowed values and resume rule, in one
    record per field (``OPTIONS`` below is derived from them)."""

    # --- data ---
    val_split: float = option(0.2,
        "Fraction of each class held out for validation when DIR has no train/val folders.",
        low=0, high=1, low_open=True, high_open=True)
    strict: bool = option(False, "Unreadable images are an error instead of being skipped with a warning.")
    # (at most what torch's samplers take: 1e20 passed the range and was a ValueError traceback after the run
    # folder was written, in the cached head's batches: QA)
    batch_size: int = option(32, "Global batch size (split across processes under torchrun).", low=1, high=2**63,
                             high_open=True)
    micro_batch: int = option(0,
        "The most images one forward pass takes per process: a bigger batch is stepped in several passes whose "
        "gradients add up, the same steps in less GPU memory (a training BatchNorm normalises per pass); 0 = the "
        "whole batch in one pass (on a GPU a batch that does not fit is split itself, in the warm-up before each "
        "phase). config.yaml records the passes: a resume given none (or 0) takes them, one given is recorded "
        "(whole batches again: the batch size).", low=0, high=2**63, high_open=True, resume_free=True)
    workers: int = option(-1,
        "DataLoader worker processes; -1 = auto (on CUDA all CPUs but one, shared by torchrun's local "
        "processes; on a CPU none up to 4 cores, one per 4 cores above, at most 8, of each process's share), "
        "0 = load in the main process. At most 512: each is a process with its own copy of torch.",
        low=0, high=512, sentinels=(-1,), resume_free=True)
    class_weights: str = option("none",
        "auto: weight the loss by inverse class frequency (imbalanced data).", choices=("none", "auto"))
    sampler: str = option("random",
        "balanced: oversample rare classes in each epoch (a head solved by L-BFGS takes the equivalent class "
        "weights).", choices=("random", "balanced"))
    # --- augmentation (train only; evaluation is resize + centre crop) ---
    augment: str = option("standard",
        "Training augmentation: standard (random crop-and-scale, flip, brightness/contrast), trivial "
        "(crop-and-scale, flip, then torchvision's TrivialAugmentWide instead of the jitter) or none.",
        choices=AUGMENTS)
    crop_scale_min: float = option(0.8, "Smallest area fraction of the random crop.", low=0, high=1, low_open=True)
    hflip: float = option(-1.0,
        "Horizontal flip probability (0 disables, for data whose mirror image is another class; the cached "
        "head then drops its mirrored view). -1 = auto: 0.5, or 0 in a run that trains layers when the "
        "features tell an image from its mirror (digits, text; at least 10 training images per class).",
        low=0, high=1, sentinels=(-1,))
    # The jitter factor is drawn from [max(0, 1 - F), 1 + F]: at 10 an image may be 11x brighter, white already;
    # past float32 (a mistyped 1e300) every image failed in the workers, told as "has the data folder moved?".
    brightness: float = option(0.2, "Brightness jitter strength (0 disables).", low=0, high=10)
    contrast: float = option(0.2, "Contrast jitter strength (0 disables).", low=0, high=10)
    # --- model surgery and freezing ---
    head: str = option("linear", "New classifier: linear (FC-C, Xavier init) or a small MLP.", choices=HEADS)
    mlp_hidden: int = option(512,
        "MLP head: hidden units. At most 65536: the first layer holds features x this weights (a mistyped "
        "1e11 would take the machine's memory).", low=1, high=65536)
    mlp_dropout: float = option(0.2, "MLP head: dropout probability.", low=0, high=1, high_open=True)
    mlp_activation: str = option("relu", "MLP head: activation.", choices=ACTIVATIONS)
    freeze: str = option("auto",
        "What trains: auto (from the dataset size), head, none (everything) or K (the last K stages).")
    small_per_class: int = option(50, "auto freeze: fewer images per class than this -> head only.", low=0)
    small_total: int = option(500, "auto freeze: fewer images in total than this -> head only.", low=0)
    large_per_class: int = option(1000, "auto freeze: at least this many per class -> everything unfrozen.", low=0)
    medium_stages: int = option(2, "auto freeze: stages unfrozen for a medium-sized dataset.", low=0)
    head_epochs: int = option(-1,
        "Head-only epochs before unfreezing; -1 = until its val loss stops improving (max 10); 0 = off.",
        low=0, sentinels=(-1,))
    head_guard: bool = option(True,
        "After a head phase: with fewer than 10 validation images per class, keep the head-phase weights "
        "unless the finetuned ones are significantly better on the validation images (one-sided, 5%: exact "
        "McNemar on the images either gets wrong); with more, keep the finetuned weights the val metric picked "
        "unless the head is significantly better (McNemar, or a paired bootstrap of the per-image loss when "
        "it fixes more images than it breaks). "
        "--no-head-guard keeps the finetuned weights whenever they have the better val metric.",
        resume_free=True)
    bn: str = option("eval",
        "BatchNorm statistics: eval keeps the pretrained ones frozen; train updates those of the trained "
        "stages (frozen stages keep theirs); with --no-pretrained the default is train.",
        choices=("eval", "train"))
    sync_bn: bool = option(False,
        "Under torchrun on GPUs with --bn train: BatchNorm statistics over the whole global batch "
        "(SyncBatchNorm, one all-reduce per layer and step), as one process computes them; without it each GPU "
        "normalises by its own share. No effect in one process or with --bn eval; GPUs only.")
    # --- optimisation ---
    optimizer: str = option("adam", "Optimizer.", choices=OPTIMIZERS)
    lr: float = option(0.0, "Head LR (layers: x --backbone-lr-mult); 0 = auto: 1e-2 finetuning from a solved head, "
                       "else 1e-3 (rmsprop 1e-3/1e-4, adagrad 1e-2, adadelta 1); 'auto': LR range test.", low=0)
    backbone_lr_mult: float = option(0.1, "Pretrained layers train at lr x this.", low=0)
    momentum: float = option(0.9, "Momentum (sgd, rmsprop).", low=0, high=1, high_open=True)
    nesterov: bool = option(False, "Nesterov momentum (sgd).")
    weight_decay: float = option(1e-4, "L2 weight decay (not on biases and norm parameters).", low=0)
    schedule: str = option("cosine",
        "Learning-rate schedule (stepped per batch; plateau per epoch).", choices=SCHEDULES)
    warmup_epochs: float = option(-1.0,
        "Linear LR warm-up, in epochs (fractions allowed); -1 = auto: 1 for a finetune phase that starts from "
        "the solved head (Adam's first steps at the full LR would throw it off), else 0.", low=0, sentinels=(-1,))
    step_size: int = option(10, "step/exp schedules: decay every N epochs.", low=1)
    gamma: float = option(0.1,
        "Decay factor of the step/exp/inv/plateau schedules (step/exp: at most 1; plateau: below 1).",
        low=0, low_open=True)
    # --- the loop ---
    epochs: int = option(0,
        "Maximum epochs in total (early stopping may end sooner); 0 = auto: 8 when layers are finetuned "
        "(a cosine schedule that ends; 7 after the head's own epochs, at most 10, when the head warm-up trains "
        "by gradient, e.g. --head mlp), 30 when only the head trains.", low=1, sentinels=(0,), resume_free=True)
    patience: int = option(5, "Early stopping: epochs without improvement before stopping (0: stop at the first one).",
                           low=0, resume_free=True)
    min_delta: float = option(1e-4,
        "Early stopping: smallest change that counts as an improvement (val_acc: a fraction, 0.001 = 0.1 point).",
        low=0, resume_free=True)
    monitor: str = option("val_loss", "Metric for early stopping and the best checkpoint.", choices=MONITORS)
    # torch takes seeds below 2**64; the seeds derived from this one (finetune.core.seeding) stay below 2**63
    seed: int = option(0, "Seed of the split, the initialisation and the data order.", low=0, high=2**63,
                       high_open=True)
    device: str = option("auto", "auto (CUDA, then Apple MPS, then CPU), cpu, cuda, cuda:N or mps.", resume_free=True)
    amp: bool = option(True,
        "Mixed precision on CUDA (bf16 where supported, else fp16 with loss scaling).", resume_free=True)
    channels_last: bool = option(True, "channels_last (NHWC) memory format: on the CPU always, on CUDA when "
                                   "the network trains.", resume_free=True)
    gpu_normalize: bool = option(True,
        "On CUDA: workers decode, crop and send uint8 batches; the GPU flips, jitters and normalises them.",
        resume_free=True)
    decode: str = option("workers",
        "Where images are decoded: workers (PIL, in DataLoader processes) or device (JPEGs decoded, cropped "
        "and flipped on the GPU with nvJPEG; workers only read files): for hosts whose cores cannot keep the "
        "GPU fed.", choices=("workers", "device"), resume_free=True)
    compile: bool = option(False, "torch.compile the model (slower start, faster epochs).", resume_free=True)
    fast_head: bool = option(True, "Head-only training on cached backbone features (much faster; same result).")
    aug_views: int = option(0,
        "Fast head path: augmented views cached per image (0 = un-augmented only). At most 100: each view is "
        "one more pass of the backbone over the training images, its features kept in memory.", low=0, high=100)
    head_solver: str = option("lbfgs",
        "How a linear head trains on cached features: lbfgs (full-batch L-BFGS to convergence, fewer "
        "iterations for a very large solve, its L2 "
        "strength picked on the validation split, like a logistic-regression probe) or gradient "
        "(--optimizer/--lr epoch by epoch).", choices=HEAD_SOLVERS)
    img_size: int = option(0,
        "Input size in pixels for training and evaluation (recorded in the bundle, so predict and eval use it"
        " too); 0 = the model's own (e.g. 224). Lower is faster on a CPU. At most 2048: a batch's memory grows"
        " with its square (a mistyped 100000 would take the machine's memory).", low=16, high=2048, sentinels=(0,))
    # --- modern regularisers (off by default until they win: docs/peers.md) ---
    label_smoothing: float = option(0.0,
        "Label smoothing of the training loss (torch/timm semantics: the target puts 1 - F + F/C on the true "
        "class, F/C on every other); validation loss stays plain cross-entropy.", low=0, high=1, high_open=True)
    mixup: float = option(0.0,
        "Mixup alpha: each training image is blended with the one half a batch away (the same pairs on any "
        "number of processes), lambda ~ Beta(A, A) per batch, targets mixed alike (timm's batch mode); 0 = off. "
        "Image-space: a head-only run then trains the head through the network, not on cached features.", low=0)
    cutmix: float = option(0.0,
        "CutMix alpha: a box of the image half a batch away is pasted in, lambda ~ Beta(A, A) corrected to the "
        "box's area; with --mixup too, each batch picks one of the two (probability 1/2); 0 = off.", low=0)
    # --- EMA / layer decay ---
    ema: float = option(-1.0,
        "Validate, keep and export an exponential moving average of the weights, updated after every "
        "optimizer step of the finetune phase, with this decay; 0 = off; -1 = auto: an average over about "
        "one epoch (1 - 1/steps per epoch) when the finetune phase starts from the solved head, else off. "
        "The average starts from the weights the phase begins with; when that head is untrained "
        "(--head-epochs 0) the decay warms up: min(decay, (1+t)/(10+t)) after t steps. The head phase is "
        "not averaged.", low=0, high=1, high_open=True, sentinels=(-1,))
    layer_decay: float = option(1.0,
        "Layer-wise LR decay: the head trains at --lr, the last stage at lr x --backbone-lr-mult x F, each "
        "earlier stage F times the one after it; 1 = off.", low=0, high=1, low_open=True)
    overfit_batches: int = option(0,
        "Sanity check instead of training: try to overfit N fixed batches, then exit (0 = off).", low=0)
    tensorboard: bool = option(False,
        "Also log to RUN/tensorboard (needs the tensorboard package).", resume_free=True)
    quiet: bool = option(False, "No progress bars or per-epoch lines.", resume_free=True)

    def __post_init__(self) -> None:
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
            raise bad("freeze", f"use {_VALUE_WORDS['freeze']}")
        # the spelling here, so that a --config file's `device: gpu` is named with its file (QA); whether the
        # device is there is engine.runtime's to say (cpu:0 and mps:0 are torch's too: a run started so resumes)
        if not re.fullmatch(r"auto|(cpu|mps|cuda)(:\d+)?", str(self.device).strip().lower()):
            raise bad("device", f"use {_VALUE_WORDS['device']}")
        # A decay factor above 1 makes these schedules raise the LR; ReduceLROnPlateau refuses factor >= 1.
        if self.schedule in ("step", "exp") and self.gamma > 1:
            raise bad("gamma", f"the {self.schedule} schedule needs a decay factor 0 < x <= 1")
        if self.schedule == "plateau" and self.gamma >= 1:
            raise bad("gamma", "the plateau schedule needs a decay factor 0 < x < 1")
        # Checked here, not only when the optimizer is built: by then the run folder held a config that no
        # --resume could get past (QA).
        if self.optimizer == "sgd" and self.nesterov and not self.momentum > 0:
            raise bad("nesterov", "Nesterov momentum needs --momentum above 0; set --momentum 0.9 or drop --nesterov")
        # TrivialAugment runs in the workers on decoded images; --decode device decodes and crops on the GPU.
        if self.augment == "trivial" and self.decode == "device":
            raise bad("augment", "trivial runs in the DataLoader workers; use --decode workers with it")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "FinetuneConfig":
        if set(data) - set(_FIELDS):
            raise unknown_options(set(data) - set(_FIELDS), _FIELDS, source)
        typed: dict[str, Any] = {}
        for f in fields(cls):
            if f.name in data:
                typed[f.name] = _coerce(f, data[f.name], source)
        return cls(**typed)

    def replace(self, **changes: Any) -> "FinetuneConfig":
        return dataclasses.replace(self, **changes)


# The option table, derived from the fields: the CLI builds its flags from it, validate() checks against it.
OPTIONS: dict[str, Option] = {f.name: f.metadata["option"] for f in fields(FinetuneConfig)}
RESUME_FREE = frozenset(name for name, o in OPTIONS.items() if o.resume_free)
_FIELDS = {f.name: f for f in fields(FinetuneConfig)}

# What a value of each option type is called in messages (every FinetuneConfig field is one of these), and the
# values of the text options that have no closed set (validate and _coerce say them alike).
_KIND_WORDS = {bool: "true or false", int: "a whole number", float: "a number", str: "text"}
_VALUE_WORDS = {"freeze": "auto, head, none or a number of stages", "device": "auto, cpu, cuda, cuda:N or mps"}


def unknown_options(keys: Any, known: Any, source: str, command: str = "finetune") -> ConfigError:
    """The error for keys that name no option of ``command``: the key meant named where one is close (`batch-size:`
    as the flag is spelled, `Lr:`: QA). str: YAML keys may be numbers or null (QA)."""
    unknown = sorted(str(k) for k in keys)
    meant = [m[0] for k in unknown if (m := difflib.get_close_matches(k.lower().replace("-", "_"), sorted(known), n=1))]
    hint = f" (did you mean {', '.join(meant)}?)" if meant else ""
    return ConfigError(f"{source}: unknown option(s) {', '.join(unknown)}{hint}; keys are the option names with "
                       f"underscores, see `zoo {command} --help`")


def _wanted(f: dataclasses.Field) -> str:
    """What option ``f`` takes, as its messages say: its values (`freeze: null` in a file was "should be text"),
    else its kind (validate() then says its range)."""
    option = OPTIONS[f.name]
    if f.name in _VALUE_WORDS or option.choices:
        return _VALUE_WORDS.get(f.name) or ", ".join(option.choices[:-1]) + " or " + option.choices[-1]
    return _KIND_WORDS[type(f.default)]


def short_repr(value: Any) -> str:
    """``repr(value)`` cut short: a list of YAML aliases (``[*a, *a, ...]``, nine deep) is a few lines of
    file but billions of items to print, and the message took minutes and gigabytes (QA)."""
    short = reprlib.Repr()
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother = 2, 4, 4, 60, 60
    return short.repr(value)


def _coerce(f: dataclasses.Field, value: Any, source: str) -> Any:
    """``value`` (a file's text, read with ``as_text``, or a Python value) read by the kind of ``f``, with the one
    reader of that kind (``finetune.core.yamlschema``): text kept as written, `yes`/`on` for an on/off option."""
    kind = type(f.default)
    try:
        if kind is str:
            if isinstance(value, bool) or not isinstance(value, (str, int, float)):  # (a list's text is no value)
                raise ValueError
            return str(value)
        return {bool: yamlschema.as_bool, int: yamlschema.as_int, float: yamlschema.as_float}[kind](value)
    except (TypeError, ValueError):
        hint = ("; auto is taken on the command line only (--lr auto): in a file give the learning rate, e.g. "
                "lr: 0.001" if f.name == "lr" and isinstance(value, str) and value.strip().lower() == "auto" else "")
        raise ConfigError(f"{source}: {f.name}={short_repr(value)} should be {_wanted(f)}{hint}") from None


def read_config_file(path: str | Path, ours: Callable[[Any, Any], bool] | None = None) -> tuple[FinetuneConfig, dict]:
    """A YAML config (safe loader) and the file's own mapping (which says what the file set, e.g. a ``bn``
    equal to the default), from one read of the file; ``ours(key, value)``: which keys are the config's (the
    others are the caller's: a command's own options, zoo.cli.options). Raises ConfigError naming the file."""
    path, data = Path(path), _read_mapping(Path(path))
    return _from_file({k: v for k, v in data.items() if ours is None or ours(k, v)}, path), data


def load_resume_config(path: str | Path, overrides: dict[str, Any] | None = None) -> tuple[FinetuneConfig, list[str]]:
    """A run's saved config (``path``) with ``overrides`` (the options given to the resume) on top, and the
    notes to show.

    A resume-free option whose saved value is no longer allowed (written by an older version with another
    range, or edited: ``workers: 1000``) does not block the resume, as it changes nothing in the maths: the
    value given now, else the default, replaces it, and a note says so. A resume-free flag given now also
    settles a rule across options its saved value breaks (``decode: device`` beside ``augment: trivial``,
    with ``--decode workers``). Any other option out of bounds is the ConfigError :func:`read_config_file` raises.
    """
    path, overrides = Path(path), dict(overrides or {})
    data, notes = _read_mapping(path), []
    for name in sorted(RESUME_FREE & {k for k in data if isinstance(k, str)}):
        saved = data[name]
        try:
            saved = _coerce(_FIELDS[name], saved, str(path))     # (said as read: workers=1000, not '1000')
            problem = OPTIONS[name].problem(saved)
        except ConfigError:
            problem = f"should be {_wanted(_FIELDS[name])}"
        if problem is not None:
            now, why = (overrides[name], "given now") if name in overrides else (_FIELDS[name].default, "the default")
            notes.append(f"{path}: {name}={short_repr(saved)} is out of bounds ({problem}); this resume "
                         f"uses {name}={now!r} ({why})")
            data = {**data, name: now}
    try:
        config = _from_file(data, path)
    except ConfigError as err:
        # a rule across options (decode: device beside augment: trivial) or a spelling (device: gpu) that a
        # resume-free flag given now settles: that saved value is not the one the resume uses
        free = {k: v for k, v in overrides.items() if k in RESUME_FREE}
        try:
            config = _from_file({**data, **free}, path) if free else None
        except ConfigError:
            config = None
        if config is None:
            raise err from None
    if overrides:
        config = FinetuneConfig.from_dict({**config.to_dict(), **overrides}, source="--resume options")
    return config, notes


def _read_mapping(path: Path) -> dict[str, Any]:
    """The YAML mapping in ``path``. Raises ConfigError with the file name on any problem."""
    try:
        data = load_yaml(read_user_text(path), as_text=True) or {}     # each value read by its option's kind
    except OSError as e:
        raise ConfigError(f"cannot read config {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path} is not UTF-8 text (nor UTF-16/32 with a byte-order mark): save it as "
                          "UTF-8") from None
    except yaml.YAMLError as e:
        # One line (PyYAML's message spans several): where, and what. Python tags (!!python/...) land here
        # too: the safe loader refuses them, nothing is constructed or run.
        raise ConfigError(f"{path} is not valid YAML{yaml_problem(e)}; fix the file") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of option: value")
    return data


def _from_file(data: dict[str, Any], path: Path) -> FinetuneConfig:
    try:
        return FinetuneConfig.from_dict(data, source=str(path))
    except ConfigError as err:      # validate()'s "invalid augment='x' (--augment)" names a flag: say which file
        if str(err).startswith(str(path)):
            raise
        raise ConfigError(f"{path}: {err}") from None


def save_config(config: FinetuneConfig, path: str | Path) -> None:
    atomic_write_text(Path(path), yaml.safe_dump(config.to_dict(), sort_keys=False))
