"""The device side of the preprocessing: uint8 batches normalised (and, for training, flipped and
colour-jittered) on the accelerator."""
from __future__ import annotations

import random
from typing import Any, Sequence

import torch

from finetune.core.devices import copies_async
from finetune.data.transforms import _parse_data_config, augment_mode, flip_probability
from finetune.core.errors import ConfigError


# Mixed into each image's seed: a worker seeds Python's global ``random`` with the same sample seed, and this
# stream stays apart from it. An int (not a tagged string, as ``reseed``'s): half the cost, once per image.
_IMAGE_TAG = int.from_bytes(b"zoo.aug", "big")


def indexed_device(device: torch.device | str) -> torch.device:
    """``device`` as a torch.device, a bare "cuda" as the current GPU with its index (cuda:N)."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class DeviceNormalize:
    """uint8 batches (N, 3, H, W) from ``build_transform(..., output="uint8")`` -> normalised float32 on
    the device: ``(x / 255 - mean) / std``, the float pipeline's own operations (``ToDtype`` multiplies
    by 1/255, ``Normalize`` subtracts then divides), so results match it to float rounding (bit for bit
    on CPU). The batch travels as uint8 (pinned memory makes the copy asynchronous).
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise ConfigError(f"DeviceNormalize needs 3 means and 3 positive stds (got {mean}, {std})")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        self._cache: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    @classmethod
    def from_data_config(cls, data_config: dict) -> "DeviceNormalize":
        _, _, _, mean, std = _parse_data_config(data_config)
        return cls(mean, std)

    def _stats(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        # Made once per device: a fresh host tensor per step would mean a small synchronous copy each time.
        if device not in self._cache:
            self._cache[device] = (torch.tensor(self.mean, dtype=torch.float32).view(1, 3, 1, 1).to(device),
                                   torch.tensor(self.std, dtype=torch.float32).view(1, 3, 1, 1).to(device))
        return self._cache[device]

    def __call__(self, x: torch.Tensor, device: torch.device | str, channels_last: bool = False,
                 draws: tuple[list[bool], list[list[tuple[str, float]]]] | None = None,
                 keys: Sequence[int] | None = None) -> torch.Tensor:
        """``draws``: each image's augmentation, drawn by the caller; else ``keys``: the images' sample keys
        (``ImageDataset``'s third item), each image's draws from its key (:meth:`DeviceAugment.draws_for`)."""
        if x.dtype != torch.uint8:
            raise TypeError(f"DeviceNormalize expects a uint8 batch, got {x.dtype}; build the dataset's "
                            "transform with output='uint8'")
        device = indexed_device(device)
        if draws is None and keys is not None:
            draws = self.draws_for(keys)
        x = self.augment(x.to(device, non_blocking=copies_async(device)), draws)
        if channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)   # on uint8: 4x less to move than float
        mean, std = self._stats(device)
        return x.to(torch.float32).mul_(1.0 / 255).sub_(mean).div_(std)   # elementwise: keeps the layout

    def augment(self, x: torch.Tensor, draws=None) -> torch.Tensor:
        """The uint8 batch on the device before normalisation: as is here (see :class:`DeviceAugment`)."""
        return x

    def draws_for(self, keys: Sequence[int]):
        """Nothing is drawn here (see :class:`DeviceAugment`)."""
        return None

    def __repr__(self) -> str:
        return f"DeviceNormalize(mean={self.mean}, std={self.std})"


class DeviceAugment(DeviceNormalize):
    """:class:`DeviceNormalize` preceded by the training flip and brightness/contrast jitter, run on the
    whole uint8 batch on the device instead of image by image in the workers.

    Same operations and parameters as ``build_transform``'s ``RandomHorizontalFlip(hflip)`` +
    ``ColorJitter(brightness, contrast)`` (factors uniform in [max(0, 1 - s), 1 + s], the two in random
    order; torchvision's uint8 arithmetic: blend in float, clamp, truncate; the same pixels but for a
    rare one-level rounding difference in the contrast blend, see :meth:`apply`; tested), drawn
    per image on the host from a private ``random.Random``: ``reseed`` it per epoch and a resumed run
    repeats the draws. Pair it with ``build_transform(..., output="uint8", colour_on_device=True)``,
    whose workers then only decode, crop and resize (more images per worker core: docs/benchmarks.md,
    "CPU-side image work").
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float], *, hflip: float = 0.0,
                 brightness: float = 0.0, contrast: float = 0.0, seed: int = 0,
                 rng: random.Random | None = None) -> None:
        super().__init__(mean, std)
        if not (0.0 <= hflip <= 1.0 and brightness >= 0.0 and contrast >= 0.0):   # FinetuneConfig checks fit's
            raise ConfigError(f"invalid device augmentation (hflip={hflip}, brightness={brightness}, "
                              f"contrast={contrast}): hflip is a probability, the strengths are >= 0")
        self.hflip, self.brightness, self.contrast = float(hflip), float(brightness), float(contrast)
        self.rng = rng if rng is not None else random.Random(int(seed))
        self.shard = (0, 1)        # (rank, world size): see reseed

    @classmethod
    def from_config(cls, data_config: dict, config: Any, train: bool = True) -> "DeviceAugment":
        """The flip/jitter ``build_transform(data_config, train, config)`` would apply (none for eval or
        ``augment="none"``), seeded with ``config.seed``."""
        _, _, _, mean, std = _parse_data_config(data_config)
        mode = augment_mode(config)
        on = train and mode != "none"
        jitter = on and mode == "standard"      # trivial: TrivialAugmentWide in the workers replaces the jitter
        return cls(mean, std, hflip=flip_probability(config) if on else 0.0,
                   brightness=float(config.brightness) if jitter else 0.0,
                   contrast=float(config.contrast) if jitter else 0.0, seed=int(getattr(config, "seed", 0)))

    @property
    def active(self) -> bool:
        return self.hflip > 0 or self.brightness > 0 or self.contrast > 0

    def reseed(self, seed: int, rank: int = 0, world_size: int = 1) -> None:
        """Restart the draws from ``seed`` (an epoch's: the same on every rank). Given the batch's sample
        keys (the training loader's batches carry them: ``ImageDataset`` with a ``colour_on_device``
        transform), each image draws from its key alone (:meth:`draws_for`) and ``seed`` is not used. Without
        them the batch draws from one stream: under torchrun each rank draws for the whole global batch and keeps its
        own images' rows (the ranks split each global batch strided: rank r holds rows r, r + world_size,
        ...), which holds only while no image fails to load."""
        # tagged: fit seeds Python's global ``random`` with the same epoch seed; this stream stays apart
        self.rng.seed(f"zoo.DeviceAugment:{int(seed)}")
        self.shard = (int(rank), int(world_size))

    def draws_for(self, keys: Sequence[int]) -> tuple[list[bool], list[list[tuple[str, float]]]] | None:
        """Each image's flip and factors from its sample key, ``seeding.sample_seed(epoch seed, dataset
        index)`` (another for each repeat of an image in the epoch: ``EpochSeededSampler``), the seed of its
        crop in the worker: an image that failed to load, a batch that failed whole, or the rank an image is
        on change no other image's draws. None when nothing is drawn."""
        if not self.active:
            return None
        flips, ops = [], []
        for key in keys:
            self.rng.seed(int(key) ^ _IMAGE_TAG)
            f, o = self.draw(1)
            flips += f
            ops += o
        return flips, ops

    def draw(self, n: int) -> tuple[list[bool], list[list[tuple[str, float]]]]:
        """Per image: flip or not, and ColorJitter's brightness/contrast factors in its random order."""
        flips, ops = [], []
        for _ in range(n):
            flips.append(self.hflip > 0 and self.rng.random() < self.hflip)
            steps = []
            if self.brightness > 0 or self.contrast > 0:
                order = [0, 1] if self.rng.random() < 0.5 else [1, 0]
                b = (self.rng.uniform(max(0.0, 1 - self.brightness), 1 + self.brightness) if self.brightness > 0
                     else None)
                c = self.rng.uniform(max(0.0, 1 - self.contrast), 1 + self.contrast) if self.contrast > 0 else None
                steps = [("b", b) if k == 0 else ("c", c) for k in order if (b if k == 0 else c) is not None]
            ops.append(steps)
        return flips, ops

    @staticmethod
    def apply(x: torch.Tensor, flips: list[bool], ops: list[list[tuple[str, float]]]) -> torch.Tensor:
        """Flip + brightness/contrast on a uint8 batch (N, 3, H, W), each image with its own factors and
        order, with torchvision's uint8 arithmetic (its grey chain, ``1 - factor`` in double). One
        difference: torchvision's contrast blend adds ``(1 - f) * mean`` in one fused multiply-add, here
        in two roundings, so a rare pixel lands one level away. The per-image parameters reach the
        device as one small tensor (pinned, asynchronous on CUDA): no host sync per batch."""
        n = x.shape[0]
        steps = max((len(o) for o in ops), default=0)
        if not any(flips) and steps == 0:
            return x
        # columns: flip, then per step (is contrast, factor, 1 - factor); steps past an image's own
        # list are brightness 1 (a no-op)
        rows = [[float(f)] + [v for k in range(steps) for v in
                              ((float(o[k][0] == "c"), float(o[k][1]), 1.0 - float(o[k][1])) if k < len(o)
                               else (0.0, 1.0, 0.0))]
                for f, o in zip(flips, ops)]
        params = torch.tensor(rows, dtype=torch.float32)
        if x.device.type == "cuda":
            params = params.pin_memory()
        params = params.to(x.device, non_blocking=copies_async(x.device)).view(n, -1, 1, 1, 1)
        if any(flips):
            x = torch.where(params[:, 0].bool(), x.flip(-1), x)
        for step in range(steps):
            contrast, factor, rest = (params[:, 1 + 3 * step + k] for k in range(3))
            other = torch.zeros((), device=x.device)
            if any(step < len(o) and o[step][0] == "c" for o in ops):
                r, g, b = x.unbind(dim=1)          # torchvision's _rgb_to_grayscale_image, then floor
                grey = r.mul(0.2989).add_(g, alpha=0.587).add_(b, alpha=0.114).floor_().mean(dim=(-2, -1))
                other = torch.where(contrast.bool(), grey.view(n, 1, 1, 1), other)
            # brightness blends with black, contrast with the image's mean grey; factor 1 leaves it as is
            x = x.mul(factor).add_(other * rest).clamp_(0, 255).to(torch.uint8)
        return x

    def augment(self, x: torch.Tensor, draws=None) -> torch.Tensor:
        """``draws``: each image's ``(flips, ops)`` drawn by the caller (``decode.DeviceTransform``, per
        image); None: drawn here for the batch."""
        if not self.active or x.dim() != 4 or x.shape[0] == 0:
            return x
        if draws is not None:
            return self.apply(x, *draws)
        rank, world = self.shard
        flips, ops = self.draw(x.shape[0] * world)      # every image of the global batch draws the same amount
        return self.apply(x, flips[rank::world], ops[rank::world])

    def __repr__(self) -> str:
        return (f"DeviceAugment(hflip={self.hflip}, brightness={self.brightness}, contrast={self.contrast}, "
                f"mean={self.mean}, std={self.std})")


def device_steps(config: Any, data_config: dict, device: torch.device | str):
    """What of the preprocessing the workers path leaves to the training device:
    ``(output, normalize, train_normalize)``.

    On CUDA (``gpu_normalize``, the default) workers send uint8 batches, normalised on the GPU (same
    values; 4x fewer bytes to move, no float work in the workers), and the training flip and colour
    jitter run there too, on the whole batch (``DeviceAugment``, reseeded per epoch): the workers only
    decode, crop and resize. ``output`` is then "uint8", ``normalize`` a ``DeviceNormalize`` (evaluation)
    and ``train_normalize`` a ``DeviceAugment``. Elsewhere, or with ``--decode device`` (which does all of
    it in ``finetune.data.decode``), float batches ("float", None, None) or ("uint8", None, None): on a
    CPU the uint8 path measured within noise of the float one (docs/benchmarks.md), and feature-cache
    keys and behaviour stay as they were.
    """
    if not (bool(config.gpu_normalize) and torch.device(device).type == "cuda"):
        return "float", None, None
    if config.decode == "device":
        return "uint8", None, None
    return "uint8", DeviceNormalize.from_data_config(data_config), DeviceAugment.from_config(data_config, config)
