"""What every training path asks the same way: the device, the mixed-precision policy, the loss, and
moving a batch to the device. ``fit``, the cached-feature head path, the LR range test, the overfit
check and ``zoo predict`` all call these; none decides any of it on its own."""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from finetune.core import distributed as ddp
from finetune.core.devices import copies_async
from finetune.core.errors import ConfigError
from finetune.core.seeding import preserved_rng

__all__ = ["resolve_device", "check_machine", "idle_gpus_note", "cudnn_autotune", "warms_up", "nhwc", "AmpPolicy",
           "amp_policy", "bf16_native", "to_device", "build_loss", "caller_state_kept"]

# cudnn.benchmark autotunes every new input shape (a few seconds each on first sight): it pays over many
# steps of one shape, and makes a job of a few batches (the feature pass of a small folder sees 4-5
# shapes) slower than on a laptop CPU.
CUDNN_AUTOTUNE_MIN_STEPS = 200


def resolve_device(name: str | None = "auto", info: ddp.DistInfo | None = None) -> torch.device:
    """``config.device`` -> torch.device: "auto" prefers CUDA, then Apple MPS, then CPU.

    A bare "cuda" is the current device, as in torch: under torchrun this process's GPU (cuda:LOCAL_RANK),
    where another index is refused.

    Raises:
        ConfigError: the requested device is not available here.
    """
    info = info or ddp.DistInfo()
    name = (name or "auto").strip().lower()
    mps = getattr(torch.backends, "mps", None)
    has_mps = mps is not None and mps.is_available()
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", info.local_rank if info.enabled else torch.cuda.current_device())
        return torch.device("mps") if has_mps and not info.enabled else torch.device("cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ConfigError(f"invalid device={name!r}: use auto, cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"device={name} but no CUDA device is visible; use --device cpu or auto")
        # a bare "cuda" is torch's current device: this process's GPU, which under torchrun ddp.setup pinned
        # (the tools that run outside the process group, e.g. the LR range test of --lr auto, included)
        index = dev.index if dev.index is not None else (
            info.local_rank if info.enabled else torch.cuda.current_device())
        if info.enabled and index != info.local_rank:
            raise ConfigError(f"device={name} under torchrun: each process trains on its own GPU, cuda:LOCAL_RANK; "
                              "pass --device cuda (or auto) and choose the GPUs with CUDA_VISIBLE_DEVICES")
        if index >= torch.cuda.device_count():
            raise ConfigError(f"device={name}: only {torch.cuda.device_count()} CUDA device(s); use cuda:0..")
        return torch.device("cuda", index)
    if dev.type == "mps" and not has_mps:
        raise ConfigError("device=mps but Apple MPS is not available; use --device cpu or auto")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ConfigError(f"invalid device={name!r}: use auto, cpu, cuda, cuda:N or mps")
    return dev


def check_machine(config: Any, info: ddp.DistInfo | None = None) -> torch.device:
    """What a run needs from this machine, checked before it writes anything (a mistyped ``--device``
    must not leave a half-made run folder): its device, under torchrun a batch that divides by the processes
    and GPUs for ``--sync-bn``, and with ``--tensorboard`` the package.

    Raises:
        ConfigError: either is missing here.
    """
    device = resolve_device(config.device, info)
    if info is not None and info.enabled:     # the loaders' own checks, before the run folder is written (QA)
        ddp.per_rank_batch(int(config.batch_size), info)
        check_sync_bn(config, info, device)
    if getattr(config, "tensorboard", False):
        from finetune.core.monitor import TensorBoardLogger    # lazy: matplotlib is not needed to check
        TensorBoardLogger.writer_class()
    return device


def idle_gpus_note(device: torch.device, info: ddp.DistInfo | None = None, asked: str | None = None) -> str | None:
    """A line for a one-process run on one of several GPUs: which it trains on, and that torchrun trains on all
    (``--batch-size`` is the global batch, so the same options give the same steps). None otherwise (one GPU, no
    GPU, or already under torchrun). ``asked``: the ``--device`` given; one naming a GPU (``cuda:1``) is what
    torchrun refuses (:func:`resolve_device`), so the line says to pass ``--device cuda`` there instead."""
    if device.type != "cuda" or (info is not None and info.enabled):
        return None
    count = torch.cuda.device_count()
    if count < 2:
        return None
    named = (asked or "").strip().lower()
    instead = f" with --device cuda in place of --device {named}" if ":" in named else ""
    return (f"device: {device}, one of the {count} GPUs here; to train on all {count}, start the same command "
            f"as `torchrun --nproc-per-node {count} -m zoo finetune ...`{instead}")


def check_sync_bn(config: Any, info: ddp.DistInfo, device: torch.device) -> None:
    """``--sync-bn`` under torchrun needs CUDA devices (torch's SyncBatchNorm has no CPU kernel: the first
    training step would raise).

    With ``--micro-batch`` and ``--bn train`` it is refused (with ``--bn eval`` no layer is synchronised,
    ``setup._sync_bn``): SyncBatchNorm gathers the statistics of every forward pass from all the
    processes, so each must take as many passes, which a process whose images failed to decode (fewer images,
    fewer passes) or that stands in for a batch that failed whole (one pass) does not: the job would hang.

    Raises:
        ConfigError: it is asked for on several processes of another device, or with --micro-batch and --bn train.
    """
    if not (getattr(config, "sync_bn", False) and info.enabled):
        return
    if device.type != "cuda":
        raise ConfigError("--sync-bn needs GPUs: torch's SyncBatchNorm runs on CUDA devices only; leave it out here")
    if int(getattr(config, "micro_batch", 0)) and getattr(config, "bn", "eval") == "train":   # (eval: no layer syncs)
        raise ConfigError("--sync-bn and --micro-batch do not go together: SyncBatchNorm shares each forward pass's "
                          "statistics between the processes, which must then take the same passes (a process that "
                          "lost images to decoding takes fewer); use --bn eval (the default with pretrained weights) "
                          "or leave --micro-batch out")


def cudnn_autotune(device: torch.device, network_steps: int) -> bool:
    """Turn cudnn.benchmark on for a CUDA run whose network takes at least CUDNN_AUTOTUNE_MIN_STEPS
    training steps, off for smaller ones (it is process-wide: a run sets it either way; ``caller_state_kept`` puts
    the caller's back). Returns it."""
    if device.type != "cuda":
        return False
    on = int(network_steps) >= CUDNN_AUTOTUNE_MIN_STEPS
    torch.backends.cudnn.benchmark = on
    return on


@contextlib.contextmanager
def caller_state_kept():
    """A run inside someone else's process (``fit``, the LR range test, the overfit check) leaves it as it found
    it, the one place that says what that takes: the caller's random streams (``seeding.preserved_rng``: Python,
    NumPy, torch's), its cudnn.benchmark (a CUDA run sets it for itself, process-wide: ``cudnn_autotune``) and its
    default dtype come back when the block ends, errors and Ctrl-C included. Inside, the default dtype is float32,
    as in a fresh process: a notebook that had set ``torch.set_default_dtype(torch.float64)`` for its own work drew
    the head's init in double precision, another run from the same seed (tiny model: epoch 1's val loss 1.108
    against 1.086)."""
    dtype, benchmark = torch.get_default_dtype(), torch.backends.cudnn.benchmark
    torch.set_default_dtype(torch.float32)
    try:
        with preserved_rng():
            yield
    finally:
        torch.set_default_dtype(dtype)
        torch.backends.cudnn.benchmark = benchmark


def warms_up(device: torch.device) -> bool:
    """Whether a phase that trains through the network first passes blank batches of its shapes through it
    (``steps.warm_up``): on CUDA, where the first convolutions of each shape pay for cuDNN's set-up and
    lazy kernel loading (GPU run 1: epoch 1 about 1.8 s short of the later ones on both decode paths),
    and where the loader's workers, started ahead, decode the first batches meanwhile. Not on the CPU:
    nothing there is paid on first use at that scale."""
    return device.type == "cuda"


def nhwc(device: torch.device | str, enabled: bool, *, trains: bool) -> bool:
    """The one layout rule: whether a job on ``device`` computes in NHWC (channels_last), given the
    ``channels_last`` option (``enabled``) and whether the network trains (``trains``; False for a job that
    passes each image forward once: doctor's and a head-only run's feature pass, an evaluation).

    On the CPU, NHWC whenever enabled: oneDNN's NHWC kernels (depthwise convolutions above all) take
    0.55-1.01x the CPU time of NCHW for an evaluation forward over every registry architecture, and 0.75x
    for a medium Lite0 run's training step, at no cost in accuracy (docs/benchmarks.md, "NHWC on the CPU").
    On CUDA, only when the network trains: a single forward pass in NHWC pays cuDNN's first-use set-up for
    nothing (an H200, 63-image head-only run: feature pass 5.0 s NHWC, 0.6 s NCHW). Elsewhere (MPS): NCHW.
    Every path that sets a layout asks here, so doctor's feature banks and a run's share their cache key."""
    kind = torch.device(device).type
    return bool(enabled) and (kind == "cpu" or (kind == "cuda" and trains))


@dataclass(frozen=True)
class AmpPolicy:
    """The one mixed-precision policy: on CUDA with ``amp``, bf16 where supported, else fp16 with a
    GradScaler; full precision elsewhere. Losses are always computed in float32."""

    device_type: str
    dtype: torch.dtype | None          # autocast dtype, None = full precision

    @property
    def enabled(self) -> bool:
        return self.dtype is not None

    @property
    def needs_scaler(self) -> bool:
        return self.dtype == torch.float16

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device_type, dtype=self.dtype)

    def make_scaler(self):
        """A fresh GradScaler for fp16, else None."""
        return torch.amp.GradScaler(self.device_type) if self.needs_scaler else None


def amp_policy(device: torch.device | str, enabled: bool, info: ddp.DistInfo | None = None) -> AmpPolicy:
    """The policy for ``config.amp`` (``enabled``) on ``device``. Under torchrun (``info``) every process takes
    the same one: bf16 only where every process's GPU computes it, else fp16 with a GradScaler on all (GPUs of
    two generations: each its own precision, DDP averaged the fp16 ranks' scaled gradients, 65,536x, with the
    others' unscaled ones, and the ranks' weights went apart)."""
    device = torch.device(device)
    if device.type != "cuda" or not enabled:
        return AmpPolicy(device.type, None)
    bf16 = bf16_native(device)
    if info is not None and info.enabled:
        bf16 = ddp.all_true(bf16, device, info)
    return AmpPolicy("cuda", torch.bfloat16 if bf16 else torch.float16)


def bf16_native(device: torch.device) -> bool:
    """Whether the CUDA ``device`` itself (not the current one) computes in bfloat16: compute capability 8.0
    (Ampere) or later, or ROCm. ``torch.cuda.is_bf16_supported()`` also answers yes on a V100 or T4 (7.x),
    where bf16 is only emulated (no tensor cores: slower than fp32), and asks the current device only."""
    if torch.version.hip:
        return True
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.cuda.get_device_capability(index)[0] >= 8


def to_device(x: torch.Tensor, y: torch.Tensor, device: torch.device, channels_last: bool = False,
              normalize: Callable | None = None, keys: torch.Tensor | None = None
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch on ``device``: uint8 batches through ``normalize`` (a ``DeviceNormalize``; ``keys``, the
    images' sample keys when the batch carries them, seed each image's device augmentation), float
    ones copied (NHWC with ``channels_last``); asynchronously but on MPS (``core.devices.copies_async``)."""
    later = copies_async(device)
    if normalize is not None:     # uint8 batch: copied as uint8, converted and normalised on the device
        if keys is not None:
            return normalize(x, device, channels_last, keys=keys.tolist()), y.to(device, non_blocking=later)
        return normalize(x, device, channels_last), y.to(device, non_blocking=later)
    x = x.to(device, non_blocking=later)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device, non_blocking=later)


def build_loss(config: Any, class_weights: list[float] | None, device: torch.device, *,
               train: bool = True) -> nn.Module:
    """Cross-entropy, weighted by inverse class frequency with ``class_weights=auto``
    (``class_weights``: ``finetune.data.class_weights(train_set)``), with ``config.label_smoothing``
    for the training loss (``train``; torch's semantics, which timm's ``LabelSmoothingCrossEntropy``
    shares). It takes class indices or class probabilities (mixup/cutmix targets: smoothed the same way).

    The evaluation loss (``train=False``) is never smoothed: validation loss, early stopping on it and
    the best checkpoint compare runs with and without smoothing on the same scale.
    """
    weight = None
    if config.class_weights == "auto":
        weight = torch.tensor(class_weights, dtype=torch.float32, device=device)
    smoothing = float(getattr(config, "label_smoothing", 0.0)) if train else 0.0
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing).to(device)
