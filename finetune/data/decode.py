"""JPEG decoding and augmentation on the training device (``--decode device``).

When the host's cores cannot decode JPEGs as fast as the GPU trains (docs/benchmarks.md, "Decoding on
the GPU"), the workers only read the files and the device decodes them (``torchvision.io.decode_jpeg``, nvJPEG on
CUDA), crops, flips, jitters and normalises them, in a background thread on its own CUDA stream so
that the next batch is prepared while the current one trains.

* :class:`EncodedImageDataset` ``[i] -> (uint8 tensor, label, i, sample key)``: the file's bytes (1-D) for a
  baseline RGB/grey JPEG without EXIF rotation and not big enough for PIL's reduced-scale decode, else
  the image decoded in the worker exactly as the CPU path does (``load_image``; 3-D, un-augmented):
  PNGs, CMYK, progressive, rotated or big JPEGs still work, through the workers.
* :class:`DeviceTransform` decodes a list of such tensors and applies the model's preprocessing
  (train: random resized crop, flip, brightness/contrast; eval: resize + centre crop) with the same
  parameters as ``build_transform``, drawn from a private seeded ``random.Random`` (reproducible,
  thread-safe); crops and resizes run on the whole batch at once (``finetune.data.geometry``: runs of
  images in two batched products), and so do the flip and colour jitter.
* :class:`DevicePrefetcher` wraps a DataLoader of such batches and yields normalised float batches on
  the device; ``set_epoch(e)`` reseeds the augmentation draws so that a resumed run repeats them.

nvJPEG's hardware engine (A100/H100/H200) writes its output before earlier work queued on its stream
has run, so a buffer the caching allocator just recycled can be overwritten while a kernel still reads
it (pytorch/vision#9606, meta-pytorch/torchcodec#1634: wrong numbers or NaN losses elsewhere). The
decode therefore runs on a stream of its own that is drained right before each decode call, and
every tensor handed to the training stream is ``record_stream``-ed there.
"""
from __future__ import annotations

import io
import math
import queue
import threading
from pathlib import Path
from typing import Any, Sequence

import torch
from torchvision.io import ImageReadMode, decode_jpeg

from finetune.core.config import FinetuneConfig
from finetune.core.devices import copies_async
from finetune.data.device import DeviceAugment, indexed_device
from finetune.data.geometry import Plan, crop_plan, eval_plan, resample
from finetune.data.images import (
    device_decodable,
    load_image_tensor,
    open_image,
    read_image_bytes,
    to_uint8_tensor,
)
from finetune.data.loaders import ImageDataset, close_loader, failure_reason
from finetune.data.transforms import _parse_data_config, augment_mode
from finetune.core.seeding import sample_seed

__all__ = ["EncodedImageDataset", "decoded_in_worker", "collate_encoded", "pack", "unpack", "DeviceTransform",
           "DevicePrefetcher", "device_decodable", "WORKER_SHARE"]

# The share of the device-decodable JPEGs that ``--decode device``'s workers decode themselves (see
# EncodedImageDataset). 0 until measured on a GPU (docs/benchmarks.md, "Both decoders at once"):
# scripts/bench_gpu_parts.py measures the loader's images/s at several shares.
WORKER_SHARE = 0.0


class EncodedImageDataset(ImageDataset):
    """``[i] -> (uint8 tensor, label, i, key)``: encoded JPEG bytes (1-D) or a decoded image (3, H, W), and
    the sample key that seeds the image's crop, flip and jitter on the device (``seeding.sample_seed`` of the
    sampler's (index, epoch seed) key, as ``ImageDataset``'s); None when the file cannot be read or decoded
    (logged like :class:`~finetune.data.ImageDataset`).

    ``min_size``: as ``load_image``'s, for the images decoded in the worker (the CPU path's ``draft``).
    ``worker_share``: the fraction of the JPEGs the device could decode that the worker decodes instead
    (libjpeg-turbo, the same pixels as ``load_image``), so that the host's cores and nvJPEG both decode:
    which images is a function of their sample keys (:func:`decoded_in_worker`), so a run is repeatable.
    """

    def __init__(self, image_set, min_size: int | None = None, failure_log: str | Path | None = None,
                 worker_share: float = 0.0) -> None:
        super().__init__(image_set, None, failure_log)
        self.min_size = min_size
        self.worker_share = float(worker_share)

    @staticmethod
    def collate_fn(batch: list):          # picked up by finetune.data.make_loader
        return collate_encoded(batch)

    def __getitem__(self, key: int | tuple[int, int]):
        index, seed = key if isinstance(key, tuple) else (key, 0)   # no augmentation here: the device draws it
        path, label = self.image_set.items[index]
        draw_key = sample_seed(seed, index)
        try:
            data = read_image_bytes(path)
            plain = device_decodable(data, self.min_size)
            if plain and not decoded_in_worker(draw_key, self.worker_share):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, index, draw_key
            return load_image_tensor(path, self.min_size, data, plain, checked=True), label, index, draw_key
        except Exception as e:   # one bad image must not kill the batch or the worker
            self.log_failure(index, failure_reason(e))
            return None


def decoded_in_worker(key: int, share: float) -> bool:
    """Whether the image drawn with sample key ``key`` is one of the ``share`` (0..1) of the device-decodable
    JPEGs that a worker decodes: a hash of the key (another image set each epoch), the same in every run."""
    return share > 0 and ((int(key) * 0x9E3779B97F4A7C15) % 2**64) < share * 2**64


def collate_encoded(batch: list):
    """((packed pixels, shapes), int64 labels, dataset indices, sample keys) without the samples that
    failed; None when all failed. The batch's images travel as ONE uint8 tensor (see :func:`pack`): a tensor per
    image would take one shared-memory file descriptor each on its way out of a worker and run out."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return (pack([b[0] for b in batch]), torch.tensor([int(b[1]) for b in batch], dtype=torch.int64),
            [int(b[2]) for b in batch], [int(b[3]) for b in batch])


def pack(items: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 tensors (encoded 1-D or decoded (3, H, W)) -> (all bytes in one flat tensor, (N, 3) shapes;
    a 1-D item's row is (length, -1, -1))."""
    shapes = torch.tensor([[t.numel(), -1, -1] if t.dim() == 1 else list(t.shape) for t in items],
                          dtype=torch.int64)
    return torch.cat([t.reshape(-1) for t in items]), shapes


def unpack(flat: torch.Tensor, shapes: torch.Tensor) -> list[torch.Tensor]:
    """The inverse of :func:`pack` (views into ``flat``, no copy)."""
    rows = shapes.tolist()
    sizes = [r[0] if r[1] < 0 else r[0] * r[1] * r[2] for r in rows]
    return [part if r[1] < 0 else part.view(*r) for part, r in zip(torch.split(flat, sizes), rows)]


class DeviceTransform:
    """Decode + preprocess uint8 images on ``device`` -> (normalised float batch, labels). The images: a
    list of tensors (encoded 1-D or decoded 3-D) or :func:`pack`'s (flat, shapes).

    Same steps and parameters as ``finetune.data.build_transform`` (``RandomResizedCrop(scale=(
    crop_scale_min, 1), ratio=(3/4, 4/3))``, flip with probability ``hflip``, brightness/contrast jitter
    in random order; eval: the long side limited to 2x the short, shorter side resized to
    ``size / crop_pct``, centre crop: ``geometry.eval_plan``). Resizing has the weights of torch's
    antialiased interpolation, rounded between the axes in PIL's order (``finetune.data.geometry``: the whole
    batch at once): the PIL path's pixels (``zoo eval``/``zoo predict``) to a level. Box/hamming/lanczos resize
    as bilinear here.
    """

    def __init__(self, data_config: dict, train: bool, config: Any | None = None) -> None:
        if config is None:
            config = FinetuneConfig()
        (self.h, self.w), interp, crop_pct, _, _ = _parse_data_config(data_config)
        if interp not in ("nearest", "bilinear", "bicubic"):
            interp = "bilinear"        # not every device's tensor resize has box/hamming/lanczos: bilinear + antialias
        self.mode = interp
        self.crop_pct = float(crop_pct)
        self.train = train
        augment = train and augment_mode(config) != "none"
        self.crop_scale = (float(config.crop_scale_min), 1.0) if augment and float(config.crop_scale_min) < 1 else None
        # flip, jitter and normalisation: the batched ops of the workers path's device side, drawing from
        # the same generator as the crops
        self.colour = DeviceAugment.from_config(data_config, config, train)
        self.rng = self.colour.rng
        self.rng.seed(int(getattr(config, "seed", 0)))
        self.failed: list[tuple[int, str]] = []   # (position in its batch, reason), reset per call

    def reseed(self, seed: int) -> None:
        """Restart the draws of batches without sample keys from ``seed``. With the batch's keys
        (``__call__``), each image's crop, flip and jitter come from its key alone, whatever the batch,
        worker or number of processes it is in."""
        self.rng.seed(int(seed))

    # -- decoding
    def decode(self, items: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """uint8 tensors (encoded 1-D or decoded 3-D) -> decoded (3, H, W) uint8 on ``device``; None for
        an image that decodes neither on the device nor on the CPU (its reason goes to ``failed``)."""
        out: list[torch.Tensor | None] = [None] * len(items)
        encoded = [i for i, t in enumerate(items) if t.dim() == 1]
        for i, t in enumerate(items):
            if t.dim() == 3:
                out[i] = t.to(device, non_blocking=copies_async(device))
        if not encoded:
            return out
        cuda = device.type == "cuda"
        if cuda:
            torch.cuda.current_stream(device).synchronize()   # nvJPEG ordering bug: see module doc
        try:
            images = decode_jpeg([items[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
            for i, im in zip(encoded, images):     # (decoded on the CPU but for CUDA's nvJPEG: then moved there)
                out[i] = im.to(device, non_blocking=copies_async(device))
            return out
        except RuntimeError:            # one bad file fails the whole batched call: retry one by one
            if cuda:                    # work it queued may still write into blocks it gave back
                torch.cuda.synchronize(device)
        for i in encoded:
            try:
                if cuda:
                    torch.cuda.current_stream(device).synchronize()
                out[i] = decode_jpeg(items[i], mode=ImageReadMode.RGB, device=device).to(device)
            except RuntimeError:
                if cuda:
                    torch.cuda.synchronize(device)
                out[i] = self._decode_on_cpu(items[i], device)
                if out[i] is None:
                    self.failed.append((i, self._reason))
        return out

    def _decode_on_cpu(self, data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB).to(device, non_blocking=copies_async(device))
        except RuntimeError:
            try:
                with open_image(io.BytesIO(data.numpy().tobytes())) as im:
                    im.load()
                    return to_uint8_tensor(im).to(device)
            except Exception as e:
                self._reason = f"cannot decode ({type(e).__name__}: {e}); fix or remove the file"
                return None

    # -- geometry (per image; colour per batch: DeviceAugment); parameters drawn on the host from self.rng
    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawing from the private generator (``self.rng``)."""
        area = height * width
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * self.rng.uniform(*self.crop_scale)
            aspect = math.exp(self.rng.uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                return self.rng.randint(0, height - h), self.rng.randint(0, width - w), h, w
        in_ratio = width / height          # fallback: the whole image at a clamped aspect ratio, centred
        if in_ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif in_ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _plan(self, im: torch.Tensor) -> Plan:
        """What one decoded image becomes: a random resized crop (train) or the eval resize + centre crop."""
        _, height, width = im.shape
        if self.crop_scale is not None:
            top, left, h, w = self._crop_box(height, width)
            return crop_plan(top, left, h, w, (self.h, self.w))
        return eval_plan(height, width, (self.h, self.w), self.crop_pct)

    def __call__(self, items, labels: torch.Tensor, device: torch.device | str, channels_last: bool = False,
                 keys: Sequence[int] | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
        device = indexed_device(device)
        if isinstance(items, tuple):        # (flat, shapes) from collate_encoded
            items = unpack(*items)
        self.failed = []
        images = self.decode(items, device)
        keep = [i for i, im in enumerate(images) if im is not None]
        if not keep:
            return None
        plans, draws = [], None
        if keys is not None and (self.crop_scale is not None or self.colour.active):
            draws = ([], [])
            for i in keep:      # each image's draws from its sample key: f(epoch seed, dataset index, repeat)
                self.rng.seed(int(keys[i]))
                plans.append(self._plan(images[i]))
                flips, ops = self.colour.draw(1)
                draws[0].extend(flips)
                draws[1].extend(ops)
        else:
            plans = [self._plan(images[i]) for i in keep]
        x = resample([images[i] for i in keep], plans, (self.h, self.w), self.mode)
        y = labels[keep] if len(keep) < len(images) else labels
        return self.colour(x, device, channels_last, draws), y.to(device, non_blocking=copies_async(device))


class DevicePrefetcher:
    """Iterate a DataLoader of :func:`collate_encoded` batches as normalised float batches on ``device``
    (None for a batch whose every image failed, as the loader gives it: one item per batch of ``loader``).

    A background thread decodes and transforms batch k+1 (on its own CUDA stream) while batch k trains.
    ``len()``, ``sampler``, ``dataset`` and the other DataLoader attributes are those of ``loader``.
    """

    def __init__(self, loader, transform: DeviceTransform, device: torch.device | str, *,
                 channels_last: bool = False, depth: int = 2) -> None:
        self.loader = loader
        self.transform = transform
        self.device = indexed_device(device)
        self.channels_last = channels_last
        self.depth = max(1, int(depth))
        self._thread: threading.Thread | None = None
        self._stop: threading.Event | None = None

    def __len__(self) -> int:
        return len(self.loader)

    def close(self) -> None:
        """Stop the background thread of a pass (left early, or started ahead and never read) and the
        loader's worker processes."""
        if self._stop is not None:
            self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None
        close_loader(self.loader)

    def __getattr__(self, name: str):
        if name == "loader":           # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)

    def _log_failure(self, index: int, reason: str) -> None:
        dataset = self.loader.dataset
        dataset = getattr(dataset, "dataset", dataset)          # a DDP Subset wraps the dataset
        if hasattr(dataset, "log_failure"):
            dataset.log_failure(index, reason)

    def set_epoch(self, epoch: int, seed: int = 0) -> None:
        """Reseed the draws of batches without sample keys from (seed, epoch); batches with keys (the
        training sampler's) draw each image from its key alone."""
        self.transform.reseed((int(seed) * 1_000_003 + int(epoch)) % 2**63)

    def __iter__(self):
        # The loader's workers start reading now (a pass started ahead reads ahead); the decoding thread,
        # and the device memory its batches take, start at the first next(), as for a pass started on time.
        self._stop_running()
        return self._pass(iter(self.loader))

    def _stop_running(self) -> None:
        """Stop the thread of an earlier pass (left early, or never finished): two threads must never
        iterate the same (persistent-worker) loader at once."""
        if self._thread is None or not self._thread.is_alive():
            return
        if self._stop is not None:
            self._stop.set()
        self._thread.join(timeout=120)
        if self._thread.is_alive():
            raise RuntimeError("the previous pass over the data is still running in the background; "
                               "restart the run (--resume continues it)")

    def _pass(self, source):
        cuda = self.device.type == "cuda"
        side = torch.cuda.Stream(self.device) if cuda else None
        results: queue.Queue = queue.Queue(maxsize=self.depth)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    results.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def work() -> None:
            try:
                if cuda:
                    torch.cuda.set_device(self.device)
                for batch in source:
                    if stop.is_set():
                        return
                    if batch is None:      # every image failed in the workers: a step all the same (below)
                        if not put((None, None)):
                            return
                        continue
                    if cuda:
                        with torch.cuda.stream(side):
                            out = self.transform(batch[0], batch[1], self.device, self.channels_last, batch[3])
                            event = torch.cuda.Event()
                            event.record(side)
                    else:
                        out, event = self.transform(batch[0], batch[1], self.device, self.channels_last,
                                                    batch[3]), None
                    for pos, reason in self.transform.failed:
                        self._log_failure(batch[2][pos], reason)
                    if not put((out, event)):
                        return
                put(done)
            except BaseException as e:     # surfaced in the training thread
                put(e)

        self._stop_running()     # a newer pass started between this one's iter() and its first next()
        thread = threading.Thread(target=work, name="zoo-device-decode", daemon=True)
        self._thread, self._stop = thread, stop
        thread.start()
        try:
            while True:
                try:
                    item = results.get(timeout=0.5)
                except queue.Empty:
                    if not thread.is_alive() and results.empty():
                        raise RuntimeError("this pass over the data was stopped: a newer pass of the same loader "
                                           "started; read one pass at a time") from None
                    continue
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                if item[0] is None:    # a batch whose every image failed: None, as the loader's, so that each
                    yield None         # rank of a DDP job takes as many steps as the others (passes.stand_in_step)
                    continue
                (x, y), event = item
                if cuda:
                    current = torch.cuda.current_stream(self.device)
                    current.wait_event(event)
                    x.record_stream(current)
                    y.record_stream(current)
                yield x, y
        finally:
            stop.set()
            thread.join(timeout=30)
