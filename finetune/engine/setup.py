"""One training setup, built once and shared by every tool: ``fit`` trains it, the LR range test probes
it, the overfit check overfits it, each sweep trial is one. What is decided here is decided nowhere else:
the device, the mixed-precision policy, the loss, the prepared model (new head, freeze decision,
BatchNorm policy), the datasets and loaders with the device-side preprocessing."""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

from finetune.core import distributed as ddp
from finetune.core.config import FinetuneConfig
from finetune.data import (ImageDataset, ImageSet, build_transform, class_weights, close_loader, device_steps,
                           make_loader, set_loader_epoch)
from finetune.data import decode       # (decode.WORKER_SHARE read at each use: a bench may set it)
from finetune.data.decode import DevicePrefetcher, DeviceTransform, EncodedImageDataset
from finetune.engine.mixing import BatchMix, build_mix
from finetune.engine.passes import largest_pass
from finetune.engine.runtime import (AmpPolicy, amp_policy, build_loss, check_sync_bn, cudnn_autotune, nhwc,
                                     resolve_device)
from finetune.core.errors import BatchNormBatchError, ConfigError, DataError
from finetune.core.optim import build_optimizer, build_scheduler
from finetune.core.policy import (FreezeDecision, batchnorm_batch, default_departure, default_epochs, default_lr,
                                   head_first, head_on_cached_features, head_solved, lr_unused)
from finetune.core.recipe import check_batchnorm_batch, check_input_size, prepare_model
from finetune.core.surgery import sync_batchnorm
from finetune.core.seeding import epoch_seed, seed_everything

__all__ = ["Setup", "build_setup", "refused_passes"]

Log = Callable[[str], None]


@dataclass
class Setup:
    """Everything a training path needs, prepared once (see :func:`build_setup`)."""

    model: nn.Module                 # prepared, on ``device`` (NHWC with channels_last)
    head: str
    stages: list[list[str]]
    data_config: dict
    config: FinetuneConfig
    train_set: ImageSet
    val_set: ImageSet
    decision: FreezeDecision
    device: torch.device
    info: ddp.DistInfo
    amp: AmpPolicy
    loss_fn: nn.Module               # the training loss (label smoothing; soft targets too)
    eval_loss_fn: nn.Module          # validation loss: plain (class-weighted) cross-entropy, never smoothed
    channels_last: bool
    output: str                      # "float" | "uint8": what the workers hand over
    normalize: Callable | None       # device-side normalisation of uint8 evaluation batches
    train_normalize: Callable | None  # device-side flip/jitter/normalise of uint8 training batches
    mix: BatchMix | None = None      # mixup/cutmix of training batches that go through the network
    train_loader: Any = None
    val_loader: Any = None
    datasets: list = field(default_factory=list)
    # what the set-up decided from the freeze decision or noticed (auto epochs, the LR warm-up, a dtype converted):
    # lines for the caller to say after the decision's own "freeze:" line (helper-149: they came before it)
    notes: list[str] = field(default_factory=list)
    # the policy's picks for options left auto, by option ("epochs", "lr"): said by a run after its "freeze:" line,
    # not by the LR range test, which uses neither (it trains steps, at the LRs it sweeps)
    chosen: dict[str, str] = field(default_factory=dict)

    @property
    def classes(self) -> list[str]:
        return list(self.train_set.classes)

    @property
    def pass_images(self) -> int:
        """The most images one training forward pass of a rank takes: its share of the global batch
        (``ddp.per_rank_batch``) in passes of at most ``--micro-batch`` (``passes.largest_pass``). The cached head's
        feature pass takes as many, so that no pass of the run needs more memory than training's."""
        return largest_pass(ddp.per_rank_batch(int(self.config.batch_size), self.info), int(self.config.micro_batch))

    @property
    def head_module(self) -> nn.Module:
        return self.model.get_submodule(self.head)

    @property
    def head_only(self) -> bool:
        return self.decision.trainable_stages == 0

    @property
    def head_first(self) -> bool:
        """Whether a head phase precedes the finetune phase (which then starts from the solved head)."""
        return head_first(self.config, self.decision.trainable_stages)

    @property
    def in_effect(self) -> dict[str, bool]:
        """The device options as this run used them (summary.json's ``in_effect``; report.html's config table):
        config.yaml's ``amp``, ``channels_last`` and ``gpu_normalize`` say what was asked, true by default on
        any device, though amp and gpu_normalize act on CUDA only (``runtime.amp_policy``, ``device_steps``) and
        channels_last on CUDA only where the network trains (``runtime.nhwc``)."""
        return {"amp": self.amp.enabled, "channels_last": self.channels_last, "gpu_normalize": self.output == "uint8"}

    @property
    def has_val(self) -> bool:
        return len(self.val_set.items) > 0

    @property
    def cached_head(self) -> bool:
        """Whether a head phase may train on cached backbone features (``policy.head_on_cached_features``:
        ``config.fast_head``, not a head-only run with mixup or CutMix; under torchrun each rank extracts its
        shard and every rank gets them all)."""
        return head_on_cached_features(self.config, self.decision.trainable_stages)

    @property
    def features_io(self) -> tuple[str, Callable | None]:
        """``(output, normalize)`` of the cached-feature passes and the overfit check's fixed batches: the
        workers path's evaluation pipeline. With ``--decode device`` the loaders hand over batches the
        DevicePrefetcher already normalised; those passes read the files themselves, so on CUDA they get
        uint8 batches and the device normalisation that goes with them, as without ``--decode device``."""
        if self.config.decode == "device":
            output, normalize, _ = device_steps(self.config.replace(decode="workers"), self.data_config, self.device)
            return output, normalize
        return self.output, self.normalize

    def full_batch_loss(self, device: torch.device) -> nn.Module:
        """The training loss of a solve over the whole training set at once (the head's L-BFGS) on ``device``.
        ``--sampler balanced`` draws every class as often: over an epoch, in expectation, that weighs the loss
        by inverse class frequency, so a solve, which no sampler feeds, takes those class weights."""
        if self.config.sampler == "balanced" and self.config.class_weights != "auto":
            return build_loss(self.config.replace(class_weights="auto"), class_weights(self.train_set), device)
        return copy.deepcopy(self.loss_fn).to(device)

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train_loader))

    def seed_train_loader(self, epoch: int) -> None:
        """Before epoch ``epoch``: the training loader's order, its samples' augmentation and the device
        augmentation become a function of (seed, epoch): each image's draws are the same on any number of
        processes, as are each step's mixup/CutMix kind, lambda and box (and its pairs, ``engine.mixing.partner``)."""
        set_loader_epoch(self.train_loader, self.config.seed, epoch, self.info.rank)
        if self.train_normalize is not None:
            self.train_normalize.reseed(epoch_seed(self.config.seed, epoch), self.info.rank, self.info.world_size)
        if self.mix is not None:
            self.mix.reseed(epoch_seed(self.config.seed, epoch))

    def optimizer(self, config: FinetuneConfig | None = None) -> torch.optim.Optimizer:
        """The recipe's optimizer over the model's trainable parameters (head LR, backbone x mult, per-stage
        layer decay)."""
        return build_optimizer(config or self.config, self.model, self.head, self.stages)

    def scheduler(self, optimizer: torch.optim.Optimizer, config: FinetuneConfig | None = None):
        return build_scheduler(config or self.config, optimizer, self.steps_per_epoch)

    def dataset(self, image_set: ImageSet, train: bool, *, augment: bool | None = None,
                config: FinetuneConfig | None = None):
        """The dataset ``fit`` reads ``image_set`` with (``train``: augmented unless ``augment="none"``;
        ``--decode device``: the encoded files, decoded on the device); ``config``: instead of the setup's."""
        cfg = config or self.config
        cfg = cfg if augment is None or augment else cfg.replace(augment="none")
        if cfg.decode == "device":      # the worker's draft decodes as large as the CPU path's (its random crops)
            return EncodedImageDataset(image_set, build_transform(self.data_config, train, cfg).min_size,
                                       worker_share=decode.WORKER_SHARE)
        if train:
            tf = build_transform(self.data_config, True, cfg, output=self.output,
                                 colour_on_device=self.train_normalize is not None)
        else:
            tf = build_transform(self.data_config, False, cfg, output=self.output)
        return ImageDataset(image_set, tf)

    def train_without_flip(self) -> None:
        """From now on the training views are not mirrored (``--hflip`` auto, when the cached head's handedness
        test found the images handed): a new training pipeline at ``hflip=0``; the run's options stay as given."""
        cfg = self.config.replace(hflip=0.0)
        close_loader(self.train_loader)
        _, _, self.train_normalize = device_steps(cfg, self.data_config, self.device)
        train_ds = self.dataset(self.train_set, True, config=cfg)
        self.datasets.append(train_ds)
        self.train_loader = _train_loader(self, train_ds, cfg)

    def close(self) -> None:
        """Stop the loaders' worker processes and prefetch threads (the end of ``fit``, errors included)."""
        for loader in (self.train_loader, self.val_loader):
            if loader is not None:
                close_loader(loader)

    def failures(self) -> dict[str, str]:
        """Images that failed to decode in this setup's datasets: path -> reason."""
        failed: dict[str, str] = {}
        for ds in self.datasets:
            failures = getattr(getattr(ds, "dataset", ds), "failures", None)   # a DDP Subset wraps it
            for path, reason in (failures() if failures is not None else []):
                failed.setdefault(path, reason)
        return failed


def _sync_bn(model: nn.Module, head: str, config: FinetuneConfig, info: ddp.DistInfo, device: torch.device,
             say: Callable[[str], None]) -> None:
    """``--sync-bn`` under torchrun: the backbone's BatchNorm layers become SyncBatchNorm (``--bn train``), or a
    note that frozen statistics have nothing to synchronise."""
    check_sync_bn(config, info, device)
    if not (config.sync_bn and info.enabled):
        return
    if config.bn == "train":
        n = sync_batchnorm(model, config.bn, exclude=(head,))
        say(f"BatchNorm: {n} layers synchronised across the {info.world_size} processes (--sync-bn)")
    else:
        say("note: --sync-bn has no effect with --bn eval: the pretrained statistics stay frozen")


def build_setup(model: nn.Module, stages: Sequence[Sequence[str]], data_config: dict, train_set: ImageSet,
                val_set: ImageSet | None, config: FinetuneConfig, *, head: str, reset_head: bool = True,
                copy_model: bool = False, distributed: bool = True) -> Setup:
    """Prepare ``model`` (or a deep copy of it) and the data the way every tool trains them.

    Args:
        model: a pretrained network; modified in place unless ``copy_model``.
        stages: module-name prefixes per stage, input -> output, classifier excluded.
        data_config: timm-style preprocessing (input_size, interpolation, crop_pct, mean, std).
        train_set, val_set: ``finetune.data.ImageSet`` with the same classes (val may be None: empty).
        config: every option.
        head: module name of the classifier.
        reset_head: False when the head was already replaced for these classes.
        copy_model: work on a deep copy (the diagnostics: the caller's model stays as it was).
        distributed: join the torchrun process group when there is one (``fit``); the diagnostics run
            in one process.
    Raises:
        ConfigError: bad options, train/val classes differ, device not available.
    """
    notes: list[str] = []      # for the caller to say after the freeze decision (Setup.notes)
    say = notes.append
    _check_kinds(config, train_set, val_set)
    if val_set is None:
        val_set = ImageSet(items=[], classes=list(train_set.classes))
    if list(train_set.classes) != list(val_set.classes):
        raise ConfigError("train and val sets have different class lists; build both from one scan")
    info = ddp.setup(config.device) if distributed else ddp.DistInfo()
    device = resolve_device(config.device, info)

    # the model: head, freeze decision, BatchNorm policy (seeded: the new head's init is reproducible)
    seed_everything(config.seed)
    work = copy.deepcopy(model) if copy_model else model
    counts = train_set.class_counts()
    decision = prepare_model(work, stages, head, len(counts), counts, config, reset_head=reset_head)
    _check_batch(work, config, decision, info, data_config, head)
    config, chosen = _auto_choices(config, decision)
    _sync_bn(work, head, config, info, device, say)
    _to_float32(work, say)
    work.to(device)
    weights = class_weights(train_set) if config.class_weights == "auto" else None
    output, normalize, train_normalize = device_steps(config, data_config, device)
    setup = Setup(model=work, head=head, stages=[list(s) for s in stages], data_config=data_config,
                  config=config, train_set=train_set, val_set=val_set, decision=decision, device=device, info=info,
                  amp=amp_policy(device, bool(config.amp), info), loss_fn=build_loss(config, weights, device),
                  channels_last=False, output=output, normalize=normalize,
                  train_normalize=train_normalize, eval_loss_fn=build_loss(config, weights, device, train=False),
                  mix=build_mix(config, len(counts)), notes=notes, chosen=chosen)
    # the layout (runtime.nhwc): NHWC on the CPU, and on CUDA when the network trains (not for a head-only
    # run on cached features, which passes each image forward once)
    setup.channels_last = nhwc(device, config.channels_last, trains=not (setup.head_only and setup.cached_head))
    if setup.channels_last:
        work.to(memory_format=torch.channels_last)
    if setup.mix is not None:
        _mix_notes(setup, say)

    # the loaders
    train_ds, val_ds = setup.dataset(train_set, True), setup.dataset(val_set, False)
    setup.datasets = [train_ds, val_ds]
    setup.train_loader = _train_loader(setup, train_ds, config)
    per_rank = ddp.per_rank_batch(int(config.batch_size), info)
    if info.enabled:
        # Strided shards without padding: every validation image is counted exactly once.
        val_ds = torch.utils.data.Subset(val_ds, list(range(info.rank, len(val_ds), info.world_size)))
    setup.val_loader = make_loader(val_ds, per_rank, train=False, workers=config.workers, device=device.type)
    config = _resolve_departure(setup, say)
    network_steps = 0 if (setup.head_only and setup.cached_head) else setup.steps_per_epoch * int(config.epochs)
    cudnn_autotune(device, network_steps)
    if config.decode == "device":   # workers read the files; JPEGs are decoded and augmented on the device
        if device.type != "cuda" and network_steps:    # (a head on cached features reads through its own passes)
            say(f"warning: --decode device on {device.type} decodes in one thread of the main process; "
                "it is meant for CUDA (nvJPEG): the workers path is usually faster here")
        setup.val_loader = DevicePrefetcher(setup.val_loader, DeviceTransform(data_config, False, config),
                                            device, channels_last=setup.channels_last)
    return setup


def _check_batch(work: nn.Module, config: FinetuneConfig, decision: FreezeDecision, info: ddp.DistInfo,
                 data_config: dict, head: str) -> None:
    """Refuse an image size the prepared model ``work`` cannot take (``recipe.check_input_size``), and a batch, or
    passes of it (``--micro-batch``), that leaves a training BatchNorm layer one value per channel
    (``recipe.check_batchnorm_batch``: a BatchNormBatchError)."""
    check_input_size(work, data_config["input_size"])
    bn_batch = batchnorm_batch(config, decision.trainable_stages, ddp.per_rank_batch(int(config.batch_size), info))
    check_batchnorm_batch(work, data_config["input_size"], bn_batch, head=head, processes=info.world_size,
                          synced=bool(config.sync_bn and info.enabled), micro=int(config.micro_batch))


def refused_passes(setup: Setup, micro: int) -> str | None:
    """Whether the run of ``setup`` refuses ``--micro-batch micro`` (the check its set-up made, which a resume in
    such passes makes again): the option that lifts the refusal (``--bn eval``, ``--head linear``: a BatchNorm layer
    that trains, left one value per channel by a pass of one image), or None where it takes them. No device memory
    is used (the check runs on the meta device): it answers after the device ran out of it (``passes.smaller_pass``).
    ``--sync-bn`` with ``--bn train`` under torchrun takes no passes at all (``runtime.check_sync_bn``):
    ``--no-sync-bn``.
    """
    try:
        check_sync_bn(setup.config.replace(micro_batch=int(micro)), setup.info, setup.device)
    except ConfigError:     # (a resume in passes was refused by it, after the out-of-memory line named one: QA)
        return "--no-sync-bn"
    try:
        _check_batch(setup.model, setup.config.replace(micro_batch=int(micro)), setup.decision, setup.info,
                     setup.data_config, setup.head)
    except BatchNormBatchError as e:
        return e.way
    return None


def _check_kinds(config: Any, train_set: Any, val_set: Any) -> None:
    """A config or image set of another kind (a dict, a list, a torchvision dataset) is one clear error."""
    if not isinstance(config, FinetuneConfig):
        raise ConfigError(f"config must be a finetune.FinetuneConfig (e.g. FinetuneConfig(epochs=10, lr=1e-3)), "
                          f"not a {type(config).__name__}")
    for name, image_set in (("train_set", train_set), ("val_set", val_set)):
        if not isinstance(image_set, ImageSet) and not (name == "val_set" and image_set is None):
            raise DataError(f"{name} must be a finetune.data.ImageSet (scan_folder(...).train / .val), not a "
                            f"{type(image_set).__name__}")


def _auto_choices(config: FinetuneConfig, decision: FreezeDecision) -> tuple[FinetuneConfig, dict[str, str]]:
    """``config`` with its auto (0) epochs and lr resolved from what trains (the setup's config holds the numbers)
    and a line for each (``Setup.chosen``); none for an lr that nothing uses (a head solved by L-BFGS:
    ``policy.lr_unused``)."""
    lines, k = {}, decision.trainable_stages
    if int(config.epochs) == 0:
        config = config.replace(epochs=default_epochs(config, k))
        lines["epochs"] = f"epochs: at most {config.epochs} (auto for freeze {decision.label}; pass --epochs to choose)"
    if float(config.lr) == 0:
        config = config.replace(lr=default_lr(config, k))
        if not lr_unused(config, k):
            layers = f", pretrained layers at {config.lr * config.backbone_lr_mult:g}" if k > 0 else ""
            lines["lr"] = f"lr: {config.lr:g}{layers} (auto for freeze {decision.label}; pass --lr to choose)"
    return config, lines


def _mix_notes(setup: Setup, say: Log) -> None:
    """What ``--mixup``/``--cutmix`` change in how ``setup`` trains, one line each: a head-only run trains through
    the network; under torchrun an odd per-process batch mixes other pairs than one process (``engine.mixing``:
    the partner half a global batch away lies on the same process only when each holds an even share)."""
    config, info = setup.config, setup.info
    if setup.head_only and config.fast_head:
        say("note: --mixup/--cutmix mix images, so the head trains through the network (not on cached "
            "features); drop them for the fast cached-feature head")
    per_rank, n = ddp.per_rank_batch(int(config.batch_size), info), info.world_size
    if info.enabled and per_rank % 2:
        even = " or ".join(str(b) for b in (config.batch_size - n, config.batch_size + n) if b > 0)
        say(f"note: --mixup/--cutmix on {n} processes mix the pairs one process mixes only when each process's "
            f"batch is even (here {per_rank} of {config.batch_size}): --batch-size {even} trains as one process")


def _to_float32(model: nn.Module, say: Log) -> None:
    """The recipe trains float32 weights (``amp`` gives mixed precision) and feeds float32 batches: a model
    handed over in half, bfloat16 or double precision is converted in place, and the log says so."""
    dtypes = {t.dtype for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()}
    if dtypes - {torch.float32}:
        model.float()
        say(f"note: the model's {', '.join(sorted(str(d).replace('torch.', '') for d in dtypes))} weights were "
            "converted to float32 to train (mixed precision on CUDA comes from the config's amp option)")


def _resolve_departure(setup: Setup, say: Log) -> FinetuneConfig:
    """The auto LR warm-up and EMA (``policy.default_departure``) resolved into ``setup.config``, which is
    returned; a run that finetunes after its head phase says what it got."""
    config = setup.config
    warmup, ema = default_departure(config, setup.decision.trainable_stages, setup.steps_per_epoch)
    if (warmup, ema) == (config.warmup_epochs, config.ema):
        return config
    setup.config = config.replace(warmup_epochs=warmup, ema=ema)
    gentle = ([f"the LR warms up over {warmup:g} epoch{'' if warmup == 1 else 's'}"] if warmup else []) + (
        [f"the weights are averaged over about {_span(ema, setup.steps_per_epoch)} (EMA decay {ema:.4g})"]
        if ema else [])
    if setup.head_first and gentle:
        head = "solved" if head_solved(config, setup.decision.trainable_stages) else "trained"
        say(f"finetune: leaving the {head} head gently: {' and '.join(gentle)}; pass --warmup-epochs 0 "
            "--ema 0 to turn off")
    return setup.config


def _span(decay: float, steps_per_epoch: int) -> str:
    """The EMA's time constant, 1 / (1 - decay) steps, in words: "1 epoch", "2.5 epochs", "0 epochs"."""
    text = f"{(1.0 / (1.0 - decay)) / steps_per_epoch if decay > 0 else 0.0:.2g}"
    return f"{text} epoch{'' if text == '1' else 's'}"


def _train_loader(setup: Setup, train_ds, config: FinetuneConfig):
    """The training loader over ``train_ds`` (with ``--decode device``, its device-side decoder in front)."""
    info, device = setup.info, setup.device
    loader = make_loader(train_ds, ddp.per_rank_batch(int(config.batch_size), info), train=True,
                         workers=config.workers, device=device.type, sampler=config.sampler, seed=config.seed,
                         world_size=info.world_size, rank=info.rank)
    if config.decode == "device":
        loader = DevicePrefetcher(loader, DeviceTransform(setup.data_config, True, config), device,
                                  channels_last=setup.channels_last)
    return loader
