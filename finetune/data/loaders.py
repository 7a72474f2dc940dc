"""Datasets and DataLoaders: per-image decode failures dropped from their batch, seeded order."""
from __future__ import annotations

import contextlib
import itertools
import os
import random
import secrets
import tempfile
import weakref
from pathlib import Path
from typing import Callable, NamedTuple

import torch
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, WeightedRandomSampler,
                              default_collate, get_worker_info)

from finetune.data.images import load_image, load_image_tensor
from finetune.data.imageset import ImageSet
from finetune.core.errors import ConfigError, DataError
from finetune.core.host import process_cpus, worker_context
from finetune.core.io import printable_name
from finetune.core.seeding import epoch_seed, repeat_seed, sample_seed, seed_host


# -------------------------------------------------------------------------------- dataset/loader
class ImageDataset(Dataset):
    """``ImageDataset(image_set, transform)[i] -> (tensor, label)``, or None when image i fails to decode.
    A key ``(i, epoch seed)`` (the training samplers') seeds the image's augmentation; with a
    ``colour_on_device`` transform a third item, the sample's key (``seeding.sample_seed``), seeds the
    flip and jitter that ``DeviceAugment`` draws for it.

    Failures are recorded as ``index<TAB>reason`` lines in ``failure_log`` (a temp file unless given, made
    by the first failure; appends from worker processes are safe), and ``failures()`` lists them as (path,
    reason).
    """

    def __init__(self, image_set: ImageSet, transform: Callable | None = None,
                 failure_log: str | Path | None = None) -> None:
        self.image_set = image_set
        self.transform = transform
        self.min_size = getattr(transform, "min_size", None)
        if failure_log is None:
            # Named now, made by the first failure (_append_line): a process killed (SIGKILL, OOM) before its
            # finalizer ran left one empty file per dataset in the temp dir, whether or not an image failed.
            # The name is random (as mkstemp's), so no other user can put a link there first.
            failure_log = os.path.join(tempfile.gettempdir(),
                                       f"zoo-decode-failures-{os.getpid()}-{secrets.token_hex(8)}.tsv")
            # Only the creating process removes it: workers get pickled copies without this finalizer.
            weakref.finalize(self, _unlink_quietly, failure_log)
        self.failure_log = str(failure_log)

    @property
    def classes(self) -> list[str]:
        return self.image_set.classes

    @property
    def targets(self) -> list[int]:
        return self.image_set.targets

    def __len__(self) -> int:
        return len(self.image_set.items)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, None)
        if seed is None:
            return self._load(index, sample_seed(0, index))
        draw_key = sample_seed(seed, index)
        with seeded_sample(draw_key):   # augmentation draws: f(epoch seed, index) only
            return self._load(index, draw_key)

    def _load(self, index: int, draw_key: int):
        path, label = self.image_set.items[index]
        try:
            if getattr(self.transform, "tensor_input", False):    # a tensor pipeline: decode to a tensor
                im = load_image_tensor(path, self.min_size, checked=True)    # (the scan checked each file)
            else:
                im = load_image(path, self.min_size, checked=True)
            out = self.transform(im) if self.transform is not None else im
            # the device draws this image's flip and jitter from its sample's key (DeviceAugment.draws_for)
            return (out, label, draw_key) if getattr(self.transform, "colour_on_device", False) else (out, label)
        except Exception as e:   # one bad image must not kill the batch or the worker
            self.log_failure(index, failure_reason(e))
            return None

    def log_failure(self, index: int, reason: str) -> None:
        """Record that image ``index`` failed (listed by ``failures()``; safe from worker processes)."""
        line = f"{int(index)}\t{printable_name(reason)}".replace("\n", " ") + "\n"
        # O_APPEND: each line is one write, whole, whichever process writes it; O_NOFOLLOW: never through a link
        fd = os.open(self.failure_log, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        with open(fd, "a", encoding="utf-8") as fh:
            fh.write(line)

    def failures(self) -> list[tuple[str, str]]:
        """(path, reason) for every image that failed to decode so far, in dataset order."""
        seen: dict[int, str] = {}
        try:
            with open(self.failure_log, encoding="utf-8") as fh:
                for line in fh:
                    idx, _, reason = line.rstrip("\n").partition("\t")
                    if idx.isdigit():
                        seen.setdefault(int(idx), reason)
        except FileNotFoundError:
            pass
        return [(self.image_set.items[i][0], r) for i, r in sorted(seen.items()) if i < len(self)]


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def collate_skip_none(batch: list):
    """Default collate without the samples that failed to decode; None when the whole batch failed."""
    batch = [b for b in batch if b is not None]
    return default_collate(batch) if batch else None


# A single pass over fewer images than this decodes in the main process: starting and stopping worker
# processes costs more than the decoding (docs/benchmarks.md, "Worker processes").
MIN_IMAGES_FOR_WORKERS = 256


def resolve_workers(workers: int, device: str = "cpu", batches: int | None = None,
                    single_pass_images: int | None = None, images: int | None = None) -> int:
    """The DataLoader worker count; a number >= 0 is used as given (0 = load in the main process).

    -1 (auto), from this process's share of the usable cores (``finetune.core.host.process_cpus``: a container's
    CPU quota counts, and under torchrun the node's cores are divided between its processes): on CUDA every core
    of it but one (decoding is what keeps a GPU waiting); on a CPU none up to 4 cores, then one per 4 cores (at
    most 8), since the training itself runs one thread per core (docs/benchmarks.md). Never more than ``batches``,
    the batches one pass over the loader holds: a worker prepares whole batches, so more would only start
    processes that get nothing to do (a 3-batch pass gets 3 workers, not 15).
    A loader read once (``single_pass_images``: its image count, e.g. a feature pass) of fewer than
    MIN_IMAGES_FOR_WORKERS images gets none; so does any loader whose pass holds fewer (``images``) where workers
    start afresh (:func:`finetune.core.host.worker_context` not fork: macOS's and Windows' spawn, and 3.14's
    forkserver on Linux, whose preloaded server still imports torch once before the first batch), as each then
    imports torch before its first batch, seconds where a fork takes 0.04 s (docs/benchmarks.md, "Worker
    processes"): a 3-batch run on a Mac decodes in the main process rather than waiting for 2 x import torch.
    """
    if workers >= 0:
        return workers
    cpus = process_cpus()     # (torchrun's processes on one machine split its cores, GPU or CPU)
    if str(device).startswith("cuda"):
        auto = max(0, cpus - 1)
    else:
        auto = 0 if cpus <= 4 else min(8, cpus // 4)
    if single_pass_images is not None and single_pass_images < MIN_IMAGES_FOR_WORKERS:
        return 0
    if images is not None and images < MIN_IMAGES_FOR_WORKERS and worker_context().get_start_method() != "fork":
        return 0
    return auto if batches is None else min(auto, max(0, int(batches)))


def class_weights(image_set: ImageSet) -> list[float]:
    """Inverse class frequency, normalised to mean 1 over classes with images (0 for empty classes)."""
    counts = image_set.class_counts()
    inv = [1.0 / c if c else 0.0 for c in counts]
    present = [v for v in inv if v]
    if not present:
        raise DataError("cannot compute class weights: the training set is empty; check the data folder")
    mean = sum(present) / len(present)
    return [v / mean for v in inv]


DROP_LAST_FRACTION = 0.05   # a last partial batch is dropped only when it holds at most this share of the set


def drop_last_partial(n: int, batch_size: int, world_size: int = 1) -> bool:
    """Whether a training loader over ``n`` images at the global ``batch_size`` drops its last partial batch.

    Dropping it keeps every step's batch statistics sound (a batch of one breaks BatchNorm in train
    mode), but on a small set it throws away a large share of every epoch (48 images at batch 32 would
    train on 32). The rule: drop it only when it is a single image, or at most ``DROP_LAST_FRACTION`` (5%)
    of the set; otherwise every image trains in every epoch. It is decided on the whole set and the global
    batch, so N processes take the steps one takes, except that a last batch that leaves some rank of
    ``world_size`` a single image (at most ``world_size`` images) is dropped too, as BatchNorm runs per rank.
    """
    rem = int(n) % int(batch_size)
    if rem == 0 or n <= batch_size:
        return False
    return rem == 1 or rem <= DROP_LAST_FRACTION * n or (int(world_size) > 1 and rem <= int(world_size))


class EpochSeededSampler(torch.utils.data.Sampler):
    """Wraps an index sampler to yield ``(index, epoch seed)``: ``ImageDataset`` seeds each sample's
    augmentation from (epoch seed, index), so an epoch's draws depend on nothing that workers did before
    (persistent workers included) and are the same with any worker count, across a resume too. An index
    drawn again within the epoch (the balanced sampler draws with replacement) comes with
    ``seeding.repeat_seed(epoch seed, k)`` at its k-th repeat: each copy of an oversampled image is
    augmented anew, not repeated pixel for pixel.

    A wrapped sampler that draws from its own ``generator`` (the balanced one) has it seeded with the
    epoch seed: the order is then a function of (seed, epoch) alone, whoever iterates it. ``shard=(rank,
    world_size)`` makes it one process's share of that global order under torchrun (every rank draws the same;
    rank r takes positions r, r + world_size, ..., padded as ``DistributedSampler`` pads), repeats counted on the
    whole order: the ranks together take the one-process run's samples, keys included. ``limit``: the indices
    per epoch (of this share)."""

    def __init__(self, sampler, limit: int | None = None, shard: tuple[int, int] = (0, 1)) -> None:
        self.sampler = sampler
        self.rank, self.world = int(shard[0]), int(shard[1])
        share = -(-len(sampler) // self.world)
        self.limit = share if limit is None else min(int(limit), share)
        self.seed = 0

    def set_epoch(self, epoch: int, seed: int | None = None) -> None:
        if hasattr(self.sampler, "set_epoch"):
            self.sampler.set_epoch(int(epoch))
        if seed is not None:
            self.seed = int(seed)
            generator = getattr(self.sampler, "generator", None)
            if generator is not None:
                generator.manual_seed(self.seed)

    def __iter__(self):
        seed, drawn = self.seed, {}
        if isinstance(self.sampler, DistributedSampler):     # a permutation's share: no index twice, nothing to count
            return ((int(i), seed) for i in itertools.islice(self.sampler, self.limit))
        if self.world == 1:
            order = (int(i) for i in itertools.islice(self.sampler, self.limit))
            return ((i, repeat_seed(seed, count_draw(drawn, i))) for i in order)
        order = [int(i) for i in self.sampler]
        while order and len(order) % self.world:          # padded to a whole number of rows of ranks
            order += order[:-len(order) % self.world]
        keys = [(i, repeat_seed(seed, count_draw(drawn, i))) for i in order]     # repeats counted on the whole order
        return itertools.islice(keys[self.rank::self.world], self.limit)

    def __len__(self) -> int:
        return self.limit

    def counted(self) -> int:
        """How many of this share's samples, from its first, are the set's own: the rest (the last one of
        some ranks) are the copies that pad the global order to a whole number of rows of ranks
        (``DistributedSampler``'s, or the balanced draw's above). They train, so that every rank takes the
        same steps, but add nothing to the loss (``engine.passes.Pads``); an epoch's metrics leave them out
        (``engine.steps._tally``)."""
        n, rank, world = self._layout()
        return min(self.limit, max(0, -(-(n - rank) // world)))

    def share(self, batch_size: int) -> Share:
        """This rank's :class:`Share` of an epoch in batches of ``batch_size``: the copies, when there are any, lie
        past the set's last image in the global order, so all in the last step (the ranks' shares have one
        length), which holds the global order's last images; the earlier steps hold ``batch_size`` x world each.
        Every rank finds the same step and count, with no collective."""
        n, _, world = self._layout()
        if self.limit * world <= n:      # no copies (or a dropped last partial batch: the limit stops short)
            return Share(self.counted())
        last = -(-self.limit // int(batch_size))
        return Share(self.counted(), last, n - (last - 1) * int(batch_size) * world)

    def _layout(self) -> tuple[int, int, int]:
        """(the set's samples in an epoch's global order, this rank, the ranks)."""
        if isinstance(self.sampler, DistributedSampler):
            return len(self.sampler.dataset), self.sampler.rank, self.sampler.num_replicas
        return len(self.sampler), self.rank, self.world


class Share(NamedTuple):
    """A rank's part of an epoch's training order under torchrun (:meth:`EpochSeededSampler.share`):
    ``counted``, how many of its images, from its first, are the set's own (the rest are the copies that pad
    the ranks' shares to one length); ``padded``, the step whose global batch holds copies (0: none does);
    ``images``, the set's own images in that global batch, all ranks together."""
    counted: int
    padded: int = 0
    images: int = 0


def train_share(loader) -> Share | None:
    """This rank's :class:`Share` of an epoch of a training ``loader`` (:func:`make_loader`, or a
    ``DevicePrefetcher`` around one); None for another loader."""
    loader = getattr(loader, "loader", loader)
    sampler = getattr(loader, "sampler", None)
    return sampler.share(loader.batch_size) if isinstance(sampler, EpochSeededSampler) else None


def count_draw(drawn: dict[int, int], index: int) -> int:
    """How many times ``index`` was drawn before in this pass (0 at its first draw); ``drawn``, the pass's
    counts, is updated."""
    repeat = drawn.get(index, 0)
    drawn[index] = repeat + 1
    return repeat


def train_batches(dataset, batch_size: int, *, sampler: str = "random", seed: int = 0, world_size: int = 1,
                  rank: int = 0, processes: int | None = None) -> BatchSampler:
    """The training order: batches of ``(index, epoch seed)`` keys, set per epoch by :func:`set_epoch_order`.

    With ``sampler="random"`` a ``DistributedSampler`` permutation seeded by ``seed + epoch`` in one process
    too (``world_size=1``): a one-process run takes exactly the batches that an N-process run splits
    between its ranks. ``"balanced"`` oversamples rare classes (WeightedRandomSampler, inverse class
    frequency, drawing from its own generator; needs ``dataset.targets``), the same global draw on every rank,
    each taking its strided share (:class:`EpochSeededSampler`'s ``shard``). The last
    partial batch is dropped by :func:`drop_last_partial`'s rule, decided on the global batch (``batch_size``
    x ``world_size``): a dropping rank then stops after the one-process run's full batches (its sampler's
    ``limit``; a padded shard could hold one more). :func:`make_loader` hands this sampler,
    batch size and drop_last to its DataLoader; the cached-feature head iterates the same batches without one.
    ``processes`` (with ``world_size=1``): the global batches of a run on that many processes, the ranks' steps
    together, their last partial batch dropped as they drop it (the cached head under torchrun: the LR schedule
    counts the loaders' steps).

    Raises:
        ConfigError: unknown sampler.
    """
    check_sampler(sampler)
    shard = (0, 1)
    if sampler == "balanced":
        targets = getattr(dataset, "targets", None)
        if targets is None:
            raise ConfigError("--sampler balanced needs a dataset with class labels (targets)")
        counts: dict[int, int] = {}
        for t in targets:
            counts[int(t)] = counts.get(int(t), 0) + 1
        weights = torch.tensor([1.0 / counts[int(t)] for t in targets], dtype=torch.double)
        base = WeightedRandomSampler(weights, num_samples=len(targets), replacement=True,
                                     generator=torch.Generator().manual_seed(int(seed)))
        shard = (int(rank), int(world_size))
    else:
        base = DistributedSampler(dataset, num_replicas=int(world_size), rank=int(rank), shuffle=True,
                                  seed=int(seed), drop_last=False)
    n, global_batch = len(dataset), int(batch_size) * int(world_size)
    drop = drop_last_partial(n, global_batch, int(processes or world_size))
    limit = n // global_batch * int(batch_size) if drop else None
    return BatchSampler(EpochSeededSampler(base, limit, shard), int(batch_size), drop)


def check_sampler(sampler: str) -> None:
    """Raise ConfigError for an unknown ``sampler``; checked before a run writes anything, and by the loaders."""
    if sampler not in ("random", "balanced"):
        raise ConfigError(f"invalid sampler={sampler!r}: choose one of random, balanced")


def set_epoch_order(sampler: EpochSeededSampler, seed: int, epoch: int) -> None:
    """Make a training sampler's order and its samples' seeds a function of (seed, epoch): the same on
    every rank, so that an image's augmentation in an epoch is the same whatever the number of processes
    (the ranks split one permutation of the global indices, and each sample's draws come from its index)."""
    sampler.set_epoch(int(epoch), epoch_seed(seed, epoch))


def make_loader(dataset, batch_size: int, *, train: bool, workers: int = -1, device: str = "cpu",
                sampler: str = "random", seed: int = 0, world_size: int = 1, rank: int = 0):
    """A seeded DataLoader that drops undecodable samples (``collate_skip_none``, or the dataset's own
    ``collate_fn`` attribute when it has one). A batch whose every image failed comes out as None: skip it.

    Training loaders (``train=True``) take the order of :func:`train_batches` (``sampler``, ``seed``,
    ``world_size``, ``rank`` are its arguments; ``batch_size`` is per process); call
    :func:`set_loader_epoch` before each epoch. Evaluation loaders keep the dataset order. Workers persist
    across epochs; memory is pinned for CUDA.

    Raises:
        ConfigError: unknown sampler.
    """
    check_sampler(sampler)
    chosen = None
    drop_last = False
    if train:
        order = train_batches(dataset, batch_size, sampler=sampler, seed=seed, world_size=world_size, rank=rank)
        chosen, drop_last = order.sampler, order.drop_last
    n_workers = resolve_workers(int(workers), device, _batches(dataset, chosen, int(batch_size), drop_last),
                                images=len(chosen) if chosen is not None else len(dataset))
    pin = str(device).startswith("cuda") and torch.cuda.is_available()
    base = getattr(dataset, "dataset", dataset)            # a DDP Subset wraps the dataset
    return DataLoader(
        dataset,
        batch_size=int(batch_size),
        shuffle=False,
        sampler=chosen,
        num_workers=n_workers,
        collate_fn=getattr(base, "collate_fn", collate_skip_none),
        pin_memory=pin,
        drop_last=drop_last,
        persistent_workers=n_workers > 0,
        generator=torch.Generator().manual_seed(int(seed)),    # the workers' seeds
        multiprocessing_context=worker_context() if n_workers > 0 else None,
    )


def _batches(dataset, sampler, batch_size: int, drop_last: bool) -> int:
    """How many batches one pass over the loader yields."""
    n = len(sampler) if sampler is not None else len(dataset)
    return n // batch_size if drop_last else -(-n // batch_size)


def close_loader(loader) -> None:
    """Stop ``loader``'s persistent worker processes now (they would otherwise live until the loader is
    garbage-collected, and at interpreter exit their shutdown can wait on a pin-memory thread). A
    ``DevicePrefetcher`` closes its own thread and its loader. Safe to call twice, and the loader stays
    usable: a later pass starts new workers."""
    closer = getattr(type(loader), "close", None)
    if closer is not None:
        closer(loader)
        return
    it = getattr(loader, "_iterator", None)
    if it is not None and hasattr(it, "_shutdown_workers"):
        it._shutdown_workers()
    if hasattr(loader, "_iterator"):
        loader._iterator = None


def failure_reason(err: Exception) -> str:
    """Why an image that passed the scan could not be loaded, in one line (the readers' DataError says it
    whole, a file gone since the scan included; anything else is named by its type)."""
    return str(err) if isinstance(err, DataError) else f"{type(err).__name__}: {err}"


def set_loader_epoch(loader, seed: int, epoch: int, rank: int = 0) -> None:
    """Make the loader's order (this rank's share of one permutation), its samples' augmentation (of
    (seed, epoch) and each image's index: the same on any number of ranks) and its workers' seeds a
    function of (seed, epoch, rank)."""
    s = epoch_seed(seed, epoch, rank)
    sampler = getattr(loader, "sampler", None)
    if isinstance(sampler, EpochSeededSampler):
        set_epoch_order(sampler, seed, epoch)
    elif hasattr(sampler, "set_epoch"):
        sampler.set_epoch(int(epoch))
    if hasattr(loader, "set_epoch"):   # finetune.data.decode.DevicePrefetcher: per image, as the samples' draws
        loader.set_epoch(int(epoch), epoch_seed(seed, epoch))
    gen = getattr(loader, "generator", None)
    if gen is not None:          # worker seeds
        gen.manual_seed(s)


@contextlib.contextmanager
def seeded_sample(seed: int):
    """Seed torch's CPU and Python's generators for one sample (``seeding.seed_host``: not CUDA's); in the
    main process (``workers=0``) they are restored afterwards, so loading draws nothing from what dropout
    sees."""
    if get_worker_info() is not None:      # a worker process: its generators serve only the samples
        seed_host(seed)
        yield
        return
    state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        seed_host(seed)
        try:
            yield
        finally:
            random.setstate(state)
