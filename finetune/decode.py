"""JPEG decoding and augmentation on the training device (``--decode device``).

When the host's cores cannot decode JPEGs as fast as the GPU trains (measured: 15 workers of a 16-core
H200 host peak at about 2,750 img/s on 500x375 photos, below the ResNet-50 step's ~4,500 img/s), the
workers only read the files and the device decodes them (``torchvision.io.decode_jpeg``, nvJPEG on
CUDA), crops, flips, jitters and normalises them, in a background thread on its own CUDA stream so
that the next batch is prepared while the current one trains.

* :class:`EncodedImageDataset` ``[i] -> (uint8 tensor, label)``: the file's bytes (1-D) for a baseline
  or progressive RGB/grey JPEG without EXIF rotation, else the image decoded in the worker exactly as
  the CPU path does (``load_image``; 3-D, un-augmented): PNGs, CMYK or rotated JPEGs still work.
* :class:`DeviceTransform` decodes a list of such tensors and applies the model's preprocessing
  (train: random resized crop, flip, brightness/contrast; eval: resize + centre crop) with the same
  parameters as ``build_transform`` and a private seeded generator (reproducible, thread-safe).
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
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from finetune.data import DeviceNormalize, ImageDataset, _parse_data_config, _printable, load_image
from finetune.errors import DataError

__all__ = ["EncodedImageDataset", "collate_encoded", "pack", "unpack", "DeviceTransform", "DevicePrefetcher",
           "device_decodable"]

_SOI = b"\xff\xd8\xff"
_ORIENTATION = 0x0112


def device_decodable(data: bytes) -> bool:
    """True for a JPEG that ``decode_jpeg`` turns into the same upright RGB image as ``load_image``:
    RGB or greyscale (not CMYK/YCCK), no EXIF rotation, within PIL's decompression-bomb limit."""
    if not data.startswith(_SOI):
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data)) as im:     # header only: no pixel is decoded here
                if im.format != "JPEG" or im.mode not in ("RGB", "L"):
                    return False
                return int(im.getexif().get(_ORIENTATION, 1) or 1) == 1
    except Exception:        # unreadable header, bomb, odd EXIF: the CPU path decides (and reports)
        return False


class EncodedImageDataset(ImageDataset):
    """``[i] -> (uint8 tensor, label, i)``: encoded JPEG bytes (1-D) or a decoded image (3, H, W); None
    when the file cannot be read or decoded (logged like :class:`~finetune.data.ImageDataset`).

    ``min_size``: as ``load_image``'s, for the images decoded in the worker (the CPU path's ``draft``).
    """

    def __init__(self, image_set, min_size: int | None = None, failure_log: str | Path | None = None) -> None:
        super().__init__(image_set, None, failure_log)
        self.min_size = min_size

    @staticmethod
    def collate_fn(batch: list):          # picked up by finetune.data.make_loader
        return collate_encoded(batch)

    def __getitem__(self, index: int):
        path, label = self.image_set.items[index]
        try:
            try:
                data = Path(path).read_bytes()
            except OSError as e:
                raise DataError(f"cannot read {_printable(str(path))}: {e.strerror or e}; fix or remove the file") from None
            if device_decodable(data):
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), label, index
            im = load_image(path, self.min_size)
            return torch.from_numpy(_rgb_array(im)).permute(2, 0, 1).contiguous(), label, index
        except Exception as e:   # one bad image must not kill the batch or the worker
            self.log_failure(index, str(e) if isinstance(e, DataError) else f"{type(e).__name__}: {e}")
            return None

    def log_failure(self, index: int, reason: str) -> None:
        """Record that image ``index`` failed (listed by ``failures()``; safe from worker processes)."""
        with open(self.failure_log, "a", encoding="utf-8") as fh:
            fh.write(f"{int(index)}\t{_printable(reason)}".replace("\n", " ") + "\n")


def _rgb_array(im: Image.Image):
    import numpy as np

    return np.array(im.convert("RGB"), dtype=np.uint8)    # a writable copy


def collate_encoded(batch: list):
    """((packed pixels, shapes), int64 labels, dataset indices) without the samples that failed; None
    when all failed. The batch's images travel as ONE uint8 tensor (see :func:`pack`): a tensor per
    image would take one shared-memory file descriptor each on its way out of a worker and run out."""
    batch = [b for b in batch if b is not None]
    if not batch:
        return None
    return (pack([b[0] for b in batch]), torch.tensor([int(b[1]) for b in batch], dtype=torch.int64),
            [int(b[2]) for b in batch])


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
    ``size / crop_pct``, centre crop). Resizing is torch's antialiased interpolation instead of PIL's, so
    pixels differ slightly from the worker path (by a few levels), the distribution does not.
    """

    def __init__(self, data_config: dict, train: bool, config: Any | None = None) -> None:
        if config is None:
            from finetune.config import FinetuneConfig
            config = FinetuneConfig()
        (self.h, self.w), interp, crop_pct, mean, std = _parse_data_config(data_config)
        if interp not in ("nearest", "bilinear", "bicubic"):
            interp = "bilinear"        # torch has no box/hamming/lanczos; bilinear + antialias is closest
        from torchvision.transforms import InterpolationMode
        self.mode = InterpolationMode(interp)
        self.scale = (math.floor(self.h / crop_pct), math.floor(self.w / crop_pct))
        self.train = train
        augment = train and bool(getattr(config, "augment", True))
        self.crop_scale = (float(config.crop_scale_min), 1.0) if augment and float(config.crop_scale_min) < 1 else None
        self.hflip = float(config.hflip) if augment else 0.0
        self.brightness = float(config.brightness) if augment else 0.0
        self.contrast = float(config.contrast) if augment else 0.0
        self.normalize = DeviceNormalize(mean, std)
        self.generator = torch.Generator().manual_seed(int(getattr(config, "seed", 0)))
        self.failed: list[tuple[int, str]] = []   # (position in its batch, reason), reset per call

    def reseed(self, seed: int) -> None:
        self.generator.manual_seed(int(seed))

    # -- decoding
    def decode(self, items: Sequence[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
        """uint8 tensors (encoded 1-D or decoded 3-D) -> decoded (3, H, W) uint8 on ``device``; None for
        an image that decodes neither on the device nor on the CPU."""
        from torchvision.io import ImageReadMode, decode_jpeg

        out: list[torch.Tensor | None] = [None] * len(items)
        encoded = [i for i, t in enumerate(items) if t.dim() == 1]
        for i, t in enumerate(items):
            if t.dim() == 3:
                out[i] = t.to(device, non_blocking=True)
        if encoded:
            if device.type == "cuda":
                torch.cuda.current_stream(device).synchronize()   # nvJPEG ordering bug: see module doc
            try:
                images = decode_jpeg([items[i] for i in encoded], mode=ImageReadMode.RGB, device=device)
                for i, im in zip(encoded, images):
                    out[i] = im
            except RuntimeError:           # one bad file fails the whole batched call: retry one by one
                for i in encoded:
                    out[i] = self._decode_one(items[i], device)
                    if out[i] is None:
                        self.failed.append((i, self._reason))
        return out

    def _decode_one(self, data: torch.Tensor, device: torch.device) -> torch.Tensor | None:
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB).to(device, non_blocking=True)
        except RuntimeError:
            try:
                with Image.open(io.BytesIO(data.numpy().tobytes())) as im:
                    im.load()
                    return torch.from_numpy(_rgb_array(im)).permute(2, 0, 1).contiguous().to(device)
            except Exception as e:
                self._reason = f"cannot decode ({type(e).__name__}: {e}); fix or remove the file"
                return None

    # -- geometry and colour (parameters drawn from self.generator, on the host)
    def _uniform(self, lo: float, hi: float) -> float:
        return lo + (hi - lo) * float(torch.rand((), generator=self.generator))

    def _crop_box(self, height: int, width: int) -> tuple[int, int, int, int]:
        """torchvision's RandomResizedCrop.get_params, drawing from the private generator."""
        area = height * width
        log_ratio = (math.log(3 / 4), math.log(4 / 3))
        for _ in range(10):
            target = area * self._uniform(*self.crop_scale)
            aspect = math.exp(self._uniform(*log_ratio))
            w = int(round(math.sqrt(target * aspect)))
            h = int(round(math.sqrt(target / aspect)))
            if 0 < w <= width and 0 < h <= height:
                top = int(torch.randint(0, height - h + 1, (1,), generator=self.generator))
                left = int(torch.randint(0, width - w + 1, (1,), generator=self.generator))
                return top, left, h, w
        in_ratio = width / height          # fallback: the whole image at a clamped aspect ratio, centred
        if in_ratio < 3 / 4:
            w, h = width, int(round(width / (3 / 4)))
        elif in_ratio > 4 / 3:
            h, w = height, int(round(height * (4 / 3)))
        else:
            w, h = width, height
        return (height - h) // 2, (width - w) // 2, h, w

    def _one(self, im: torch.Tensor) -> torch.Tensor:
        from torchvision.transforms.v2 import functional as F

        _, height, width = im.shape
        if self.crop_scale is not None:
            top, left, h, w = self._crop_box(height, width)
            im = F.resized_crop(im, top, left, h, w, [self.h, self.w], interpolation=self.mode, antialias=True)
        else:
            if self.h == self.w:
                short = min(height, width)
                limit = max(1, int(math.ceil(short * 2.0)))     # data._LimitAspect(2.0)
                if width > limit:
                    left = (width - limit) // 2
                    im = im[:, :, left:left + limit]
                elif height > limit:
                    top = (height - limit) // 2
                    im = im[:, top:top + limit, :]
                im = F.resize(im, [self.scale[0]], interpolation=self.mode, antialias=True)
            else:
                im = F.resize(im, list(self.scale), interpolation=self.mode, antialias=True)
            im = F.center_crop(im, [self.h, self.w])
        if self.hflip > 0 and float(torch.rand((), generator=self.generator)) < self.hflip:
            im = F.horizontal_flip(im)
        if self.brightness > 0 or self.contrast > 0:
            order = torch.randperm(2, generator=self.generator).tolist()    # ColorJitter's random order
            b = self._uniform(max(0.0, 1 - self.brightness), 1 + self.brightness) if self.brightness > 0 else None
            c = self._uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) if self.contrast > 0 else None
            for k in order:
                if k == 0 and b is not None:
                    im = F.adjust_brightness(im, b)
                elif k == 1 and c is not None:
                    im = F.adjust_contrast(im, c)
        return im

    def __call__(self, items, labels: torch.Tensor, device: torch.device | str,
                 channels_last: bool = False) -> tuple[torch.Tensor, torch.Tensor] | None:
        device = torch.device(device)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if isinstance(items, tuple):        # (flat, shapes) from collate_encoded
            items = unpack(*items)
        self.failed = []
        images = self.decode(items, device)
        keep = [i for i, im in enumerate(images) if im is not None]
        if not keep:
            return None
        x = torch.stack([self._one(images[i]) for i in keep])
        y = labels[keep] if len(keep) < len(images) else labels
        return self.normalize(x, device, channels_last), y.to(device, non_blocking=True)


class DevicePrefetcher:
    """Iterate a DataLoader of :func:`collate_encoded` batches as normalised float batches on ``device``.

    A background thread decodes and transforms batch k+1 (on its own CUDA stream) while batch k trains.
    ``len()``, ``sampler``, ``dataset`` and the other DataLoader attributes are those of ``loader``.
    """

    def __init__(self, loader, transform: DeviceTransform, device: torch.device | str, *,
                 channels_last: bool = False, depth: int = 2) -> None:
        self.loader = loader
        self.transform = transform
        self.device = torch.device(device)
        self.channels_last = channels_last
        self.depth = max(1, int(depth))

    def __len__(self) -> int:
        return len(self.loader)

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
        """Reseed the augmentation draws from (seed, epoch): an epoch's crops depend on nothing else."""
        self.transform.reseed(int(seed) * 1_000_003 + int(epoch))

    def __iter__(self):
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
                for batch in self.loader:
                    if stop.is_set():
                        return
                    if batch is None:
                        continue
                    if cuda:
                        with torch.cuda.stream(side):
                            out = self.transform(batch[0], batch[1], self.device, self.channels_last)
                            event = torch.cuda.Event()
                            event.record(side)
                    else:
                        out, event = self.transform(batch[0], batch[1], self.device, self.channels_last), None
                    for pos, reason in self.transform.failed:
                        self._log_failure(batch[2][pos], reason)
                    if out is not None and not put((out, event)):
                        return
                put(done)
            except BaseException as e:     # surfaced in the training thread
                put(e)

        thread = threading.Thread(target=work, name="zoo-device-decode", daemon=True)
        thread.start()
        try:
            while True:
                item = results.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
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
