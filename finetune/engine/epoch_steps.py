"""How one phase's epochs are computed: the :class:`EpochSteps` protocol the trainer drives, and
:class:`LoaderSteps`, the ordinary path (batches of images from the setup's loaders through the network).
The cached-feature head (``finetune.tools.features.CachedHeadSteps``) is the other implementation."""
from __future__ import annotations

import gc
import math
from typing import Callable, Iterator, Protocol

import torch
from torch import nn

from finetune.core import distributed as ddp
from finetune.core.errors import is_out_of_memory, memory_text
from finetune.core.io import printable_name
from finetune.core.progress import progress_bar
from finetune.core.ema import ModelEma
from finetune.data.loaders import close_loader, train_share
from finetune.data.replay import KeptPass
from finetune.engine.drops import epoch_drops
from finetune.engine.passes import largest_pass, smaller_pass
from finetune.engine.setup import Setup, refused_passes
from finetune.engine.runtime import warms_up
from finetune.engine.steps import evaluate, train_one_epoch, warm_up

__all__ = ["EpochSteps", "LoaderSteps"]

# the most bytes of validation probabilities (images x classes x 4) gathered onto every rank at fit's end under
# torchrun (``all_val_probs``): 50,000 x 1,000 is 191 MiB (1.5-1.7 s and ~480 MiB peak a rank on 2 gloo ranks,
# helper-157); beyond, none (RUN/val_predictions.json unwritten: zoo report predicts again), not gigabytes a rank
GATHER_PROBS_BYTES = 256 << 20
_FITS = 2 ** 62      # (what a rank whose warm-up fitted offers in the ranks' agreement on the passes: more than any)


class EpochSteps(Protocol):
    """How one phase's epochs are computed. ``train_epoch`` returns ``{"loss", "acc", "images_per_s"}`` (and
    ``"data_wait"``, the share of the epoch spent getting its batches, where they are read from files;
    ``"phase_done": True`` when the phase needs no more epochs), ``evaluate`` ``{"loss", "acc"}`` (full
    metrics with ``full=True``)."""

    label: str

    def begin_phase(self, phase: str) -> None: ...

    def train_epoch(self, epoch: int, phase: str, optimizer, scheduler, scaler) -> dict: ...

    def evaluate(self, full: bool = False) -> dict: ...

    def failures(self) -> dict[str, str]: ...     # images that failed to decode: path -> reason


class LoaderSteps:
    """The ordinary path: batches of images from the setup's loaders through the whole network.

    With ``--ema`` the finetune phase keeps a weight average (``self.ema``, started from the weights the
    phase begins with) and validates it instead of the trained weights: the epoch's val metrics, early
    stopping and the best checkpoint (hence the exported bundle) are the average's.

    Passes start ahead, so that the loader's workers never wait at an epoch's edges: the run's first
    training pass before the run's own set-up (:meth:`start_ahead`), the validation pass as an epoch starts
    training (its images do not depend on the weights), the next epoch's training pass as validation
    starts. Each pass's order (the rank's share of one permutation) and augmentation (each image's, from
    (seed, epoch) and its index) depend on nothing else, so the batches are the ones a pass started on time
    would give. The validation pass's batches are the same every epoch: after its first full pass they are
    served from memory (``finetune.data.replay``, within a budget), and no later pass is started."""

    label = ""

    def __init__(self, setup: Setup, folder=None, say: Callable[[str], None] = lambda _msg: None) -> None:
        self.s = setup
        self.folder, self.say = folder, say     # (the RunFolder whose config.yaml records passes made smaller)
        self.ran_out: int | None = None     # a warm-up's pass that ran out of memory and could not be made smaller
        self.net: nn.Module = setup.model
        self.eval_net: nn.Module = setup.model
        self.ema: ModelEma | None = None
        self.val_probs: torch.Tensor | None = None     # of the last evaluation (see FitResult.val_probs)
        self.val_correct: torch.Tensor | None = None   # of the last evaluation: hits on this rank's images
        self.val_losses: torch.Tensor | None = None    # ... and their cross-entropy (float64)
        # "train"/"val" -> (epoch, loader, its pass started ahead)
        self._ahead: dict[str, tuple[int, object, Iterator]] = {}
        self._epoch = 0     # the epoch last trained: its validation bar's label
        self._val = KeptPass()      # the validation batches, after a first full pass

    def begin_phase(self, phase: str) -> None:
        s = self.s
        self.net = ddp.wrap_model(s.model, s.device, s.info)     # DDP sees this phase's trainable set
        self.ema = (ModelEma(s.model, s.config.ema, warmup=not s.head_first)
                    if (phase == "finetune" and s.config.ema > 0) else None)
        self.eval_net = s.model if self.ema is None else self.ema.module
        if warms_up(s.device):   # eager, before compiling: the passes that fit (a compiled step that still runs
            self._warm_up(phase)  # out of memory stops as any later out-of-memory does, naming --micro-batch)
        if s.config.compile:     # (compiling happens on the first real batch, of the passes the warm-up chose)
            self.net, self.eval_net = torch.compile(self.net), torch.compile(self.eval_net)

    def _shape(self, train: bool) -> tuple[int, ...]:
        """A full pass of this rank's training (``train``) or validation images: ``(n, C, H, W)``."""
        s = self.s
        per_rank = ddp.per_rank_batch(int(s.config.batch_size), s.info)
        n = -(-len((s.train_set if train else s.val_set).items) // s.info.world_size)
        size = largest_pass(min(per_rank, n), int(s.config.micro_batch))     # in passes of at most --micro-batch
        return (size, *(int(v) for v in s.data_config["input_size"]))

    @property
    def pass_images(self) -> int:
        """The most images one training forward pass of this rank takes (the batch, or ``--micro-batch``); after a
        warm-up that ran out of memory in a pass that could not be made smaller, that pass's."""
        return self.ran_out or self._shape(True)[0]

    def refused(self, micro: int) -> str | None:
        """Whether the run refuses passes of ``micro`` images (``setup.refused_passes``: the option that lifts it)."""
        return refused_passes(self.s, micro)

    def _warm_up(self, phase: str) -> None:
        """The device's first-use costs for this phase's shapes, paid now (``steps.warm_up``).

        A pass that runs out of device memory here (a batch too big for the device) is taken in passes of fewer
        images: ``passes.smaller_pass`` as often as it takes, every rank the same (:func:`_agreed`), the
        memory freed before each try. The run trains on in them (``--micro-batch``: the same steps; it sets the
        validation passes too), one line says so, and config.yaml records them, where a resume reads its options.
        Where the run takes no fewer images a pass, the OutOfMemoryError stops it (``RunFolder.stopped``).
        """
        s, first = self.s, None
        while True:
            ran_out = self._warmed(phase)      # (returned out of its except block: the error's frames are gone)
            if ran_out is not None and s.device.type == "cuda":
                gc.collect()      # (the tensors of the pass that ran out, in reference cycles)
                torch.cuda.empty_cache()
            smaller, agreed = _agreed(ran_out, self.refused, s.device, s.info)
            if agreed is None:
                break
            first = first or agreed
            if smaller is None:     # stopped as an out-of-memory later in the run: what is saved, how to go on
                self.ran_out = agreed[0]
                raise torch.OutOfMemoryError(ran_out[2] if ran_out else "another process ran out of device memory")
            s.config = s.config.replace(micro_batch=smaller)
        if first is not None:
            micro = int(s.config.micro_batch)
            self.say(f"out of memory in a {'validation ' * first[1]}pass of {first[0]} images: "
                     f"{'validating' if first[1] else 'training'} in passes of {micro} (--micro-batch {micro}: "
                     "the same steps)")
            if self.folder is not None:
                self.folder.record_passes(micro)

    def _warmed(self, phase: str) -> tuple[int, bool, str] | None:
        """One warm-up of the training pass, then the validation pass; None when both fitted, else the images of
        the one that ran out of device memory, whether it was validation's, and what torch said."""
        s = self.s
        only = s.head_module if phase == "head" else None
        for val, shape in ((False, self._shape(True)), *(((True, self._shape(False)),) if s.has_val else ())):
            try:
                warm_up(s.model, None if val else shape, shape if val else None, s.loss_fn, s.device, amp=s.amp,
                        channels_last=s.channels_last, only_train=only)
            except (MemoryError, RuntimeError) as e:
                if not is_out_of_memory(e):
                    raise
                return shape[0], val, memory_text(e)
        return None

    def _blank(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Under torchrun, what a rank trains on, weighing 0, in a step whose every image failed to decode
        (``passes.stand_in_step``): zeros shaped as a full training pass, as the loader hands it to the network
        (normalised float, NHWC with channels_last: the shape and layout a compiled model already knows)."""
        s = self.s
        shape = self._shape(True)
        fmt = torch.channels_last if s.channels_last else torch.contiguous_format
        return (torch.zeros(shape, device=s.device).contiguous(memory_format=fmt),
                torch.zeros(shape[0], dtype=torch.int64, device=s.device))

    def train_epoch(self, epoch: int, phase: str, optimizer, scheduler, scaler) -> dict:
        s = self.s
        self._epoch = epoch
        self.start_ahead(epoch)
        batches = self._take("train", epoch)
        if s.has_val and "val" not in self._ahead and self._val.get(s.val_loader) is None:
            self._ahead["val"] = (epoch, s.val_loader, iter(s.val_loader))
        bar = progress_bar(len(s.train_loader), f"epoch {epoch}/{s.config.epochs} {phase}", unit="batch",
                           quiet=s.config.quiet or not s.info.is_main)
        try:
            out = train_one_epoch(self.net, batches, optimizer, scheduler, s.loss_fn, s.device, amp=s.amp,
                                  scaler=scaler, progress=bar, epoch=epoch, channels_last=s.channels_last,
                                  only_train=s.head_module if phase == "head" else None, info=s.info,
                                  normalize=s.train_normalize, mix=s.mix, ema=self.ema, blank=self._blank,
                                  share=train_share(s.train_loader),     # the padding copies
                                  drops=epoch_drops(s.config, epoch, s.info), micro=int(s.config.micro_batch))
        finally:
            if bar is not None:
                bar.close()
        if s.info.enabled:
            # DDP gives every rank rank 0's buffers before each forward, so after the epoch's last step each rank's
            # BatchNorm statistics (--bn train, an MLP head's) are its own: validation (each rank its shard), the
            # weight average and the head guard take rank 0's, those of the weights the run saves
            for module in (s.model, *((self.ema.module,) if self.ema is not None else ())):
                ddp.broadcast_module(module, s.info, buffers_only=True)
        if epoch < int(s.config.epochs):
            self.start_ahead(epoch + 1)
        return out

    def start_ahead(self, epoch: int) -> None:
        """Start epoch ``epoch``'s training pass now, unless it has started: its workers read while the
        caller does other work (the trainer calls this before its own set-up, so that the first batches
        are decoded while it writes the run folder and builds the optimizer)."""
        if self._take("train", epoch, keep=True) is None:
            self.s.seed_train_loader(epoch)
            self._ahead["train"] = (epoch, self.s.train_loader, iter(self.s.train_loader))

    def _take(self, which: str, epoch: int | None, keep: bool = False) -> Iterator | None:
        """The pass started ahead for ``which`` (for ``epoch`` when given) from the setup's current loader
        (a phase may have replaced it, e.g. the flip dropped), else None; ``keep``: leave it there."""
        started = self._ahead.get(which) if keep else self._ahead.pop(which, None)
        loader = self.s.train_loader if which == "train" else self.s.val_loader
        if started is None or started[1] is not loader or (epoch is not None and started[0] != epoch):
            return None
        return started[2]

    def evaluate(self, full: bool = False) -> dict:
        s = self.s
        self.val_probs = self.val_correct = self.val_losses = None
        if not s.has_val:
            return {"loss": math.nan, "acc": math.nan}
        probs: list = []     # (this rank's shard under torchrun: ``all_val_probs`` gathers the ranks')
        correct: list = []
        losses: list = []
        batches = kept = self._val.get(s.val_loader)
        if kept is None:
            started = self._take("val", None)
            batches = self._val.record(s.val_loader, s.val_loader if started is None else started)
        # the same bar as the training pass's (7-8 s a pass at medium size on 2 CPU cores: helper-149): an epoch's
        # own, or, ``full`` (the head guard's and the final evaluation), the weights' after training
        desc = "validation" if full else f"epoch {self._epoch}/{s.config.epochs} validation"
        bar = progress_bar(len(s.val_loader), desc, unit="batch", quiet=s.config.quiet or not s.info.is_main)
        try:
            out = evaluate(s.model if full else self.eval_net, batches, s.eval_loss_fn, s.device, s.classes,
                           amp=s.amp, channels_last=s.channels_last, info=s.info, normalize=s.normalize,
                           probs=probs, correct=correct, losses=losses, micro=int(s.config.micro_batch), progress=bar)
        finally:
            bar.close()
        if kept is None and self._val.get(s.val_loader) is not None:
            close_loader(s.val_loader)      # kept: its workers have nothing left to do
        self.val_correct = torch.cat(correct) if correct else torch.zeros(0, dtype=torch.bool)
        self.val_losses = torch.cat(losses) if losses else torch.zeros(0, dtype=torch.float64)
        self.val_probs = self._val_rows(probs)
        return out

    def _val_rows(self, probs: list) -> torch.Tensor | None:
        """The softmax rows of this rank's validation images (its strided shard of val_set under torchrun, all
        of val_set in one process), in order, an image that failed to decode a row of NaN; None when the rows
        cannot be told apart (an image that failed in an earlier pass was read in this one)."""
        s = self.s
        mine = s.val_set.items[s.info.rank::s.info.world_size]
        rows = torch.cat(probs) if probs else torch.zeros((0, len(s.classes)))
        if len(rows) == len(mine):
            return rows
        failed = s.failures()
        read = torch.tensor([path not in failed for path, _ in mine], dtype=torch.bool)
        if int(read.sum()) != len(rows):
            return None
        out = torch.full((len(mine), rows.shape[1]), math.nan, dtype=rows.dtype)
        out[read] = rows
        return out

    def all_val_probs(self, probs: torch.Tensor | None) -> torch.Tensor | None:
        """``probs`` (an evaluation's ``val_probs``: this rank's) as every validation image's, in val_set order:
        under torchrun the ranks' shards gathered, on every rank (a collective, which every rank calls at the
        same point); None when a rank's are unknown, or the table would pass ``GATHER_PROBS_BYTES``."""
        s = self.s
        if not s.info.enabled:
            return probs
        if len(s.val_set.items) * len(s.classes) * 4 > GATHER_PROBS_BYTES:     # (the same answer on every rank)
            return None
        if not ddp.all_true(probs is not None, s.device, s.info):
            return None
        return ddp.gather_strided(probs, len(s.val_set.items), s.info)

    def close(self) -> None:
        """Let go of the kept validation batches and of any pass started ahead (the end of ``fit``): a sweep's
        next fit must not find them still held, as they would be until a garbage collection found the trainer."""
        self._val.clear()
        self._ahead.clear()

    def failures(self) -> dict[str, str]:
        """Every rank's images that failed to decode so far (path -> reason), on every rank: a collective,
        which every rank calls at the same point (the end of an epoch, of the run)."""
        failed: dict[str, str] = {}
        for part in ddp.gather_objects(self.s.failures(), self.s.info):
            for path, reason in part.items():
                failed.setdefault(path, reason)
        return failed

    def nothing_loaded(self, trained: dict, evaluated: dict, failed: dict[str, str]) -> str | None:
        """What to say when an epoch loaded no image of a split (``images`` 0 in its metrics: its NaN numbers
        would read as a divergence), or when every training image of a class has failed to load (``failed``:
        the epoch's steps' failures, all ranks'), which would train a head that never sees it. The folder
        moved or changed since the scan. None when neither (the cached-feature steps load no ``images``)."""
        for split, n in (("training", trained.get("images")),
                         ("validation", evaluated.get("images") if self.s.has_val else None)):
            if n == 0:
                example = next(iter(failed.items()), None)
                return f"no {split} image could be loaded" + (f" (e.g. {_failed(*example)})" if example else "")
        return _lost_class(self.s.train_set, failed)


def _agreed(ran_out: tuple[int, bool, str] | None, refused: Callable[[int], str | None], device: torch.device,
            info: ddp.DistInfo) -> tuple[int | None, tuple[int, bool] | None]:
    """Every rank's warm-up outcome (``ran_out``: this rank's, :meth:`LoaderSteps._warmed`) made one: the
    ``--micro-batch`` every rank trains in next (the smallest any rank needs; ``passes.smaller_pass``; None
    where a rank can take no smaller) and the largest pass that ran out on any rank with whether it was a
    validation pass, or ``(None, None)`` where every rank's fitted. One all-reduce that every rank reaches, each
    time (the warm-up runs on every rank: ``runtime.warms_up`` is the device's, the same for all)."""
    want, which = _FITS, 0
    if ran_out is not None:
        want = smaller_pass(ran_out[0], refused)[0] or 0
        which = 2 * ran_out[0] + int(ran_out[1])
    both = torch.tensor([-want, which], dtype=torch.int64, device=device)
    ddp.all_reduce_max(both, info)       # (the smallest pass wanted, the largest that ran out)
    want, which = -int(both[0]), int(both[1])
    if want == _FITS:
        return None, None
    return (want or None), (which // 2, bool(which % 2))


def _lost_class(train_set, failed: dict[str, str]) -> str | None:
    """Which class of ``train_set`` (an ImageSet) has every image in ``failed`` (path -> reason), said as
    the run's error says it; None when each class has an image that loaded (or is yet to be read)."""
    if not failed:
        return None
    left = train_set.class_counts()
    for path, label in train_set.items:
        left[label] -= path in failed
    for label, (n, total) in enumerate(zip(left, train_set.class_counts())):
        if total and n == 0:
            path = next(p for p, y in train_set.items if y == label)
            return (f"no training image of class {printable_name(train_set.classes[label])!r} could be loaded "
                    f"(all {total} failed, e.g. {_failed(path, failed[path])})")
    return None


def _failed(path: str, reason: str) -> str:
    """One failed image in a message: its reason, which names it (the readers' DataError), or path: reason."""
    name = printable_name(path)
    return reason if name in reason else f"{name}: {reason}"
