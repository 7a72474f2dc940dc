"""CPU transforms built from the model's data config (timm-style): train augmentation and the
fixed evaluation crop, as float (PIL) or uint8 (tensor) pipelines."""
from __future__ import annotations

import math
from typing import Any, Callable

import torch
from PIL import Image
from torchvision.transforms import InterpolationMode, v2 as T

from finetune.core.config import FinetuneConfig
from finetune.core.errors import ConfigError

# ------------------------------------------------------------------------------------ transforms
AUTO_HFLIP = 0.5      # --hflip -1 (auto): the flip probability unless the run turns it off
_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
EVAL_MAX_ASPECT = 2.0  # square eval views: the long side is first centre-cropped to this many times the short


class LimitAspect:
    """Centre-crop the long side to at most ``ratio`` x the short side before an eval resize.

    The eval centre crop keeps only the middle of the image anyway, so this changes nothing visible for
    ordinary photos but stops a 20000x10 strip from being resized into a gigantic intermediate.
    """

    def __init__(self, ratio: float = 2.0) -> None:
        self.ratio = ratio

    def box(self, h: int, w: int) -> tuple[int, int, int, int]:
        """(top, left, height, width) of what an ``h`` x ``w`` image keeps (``geometry.eval_plan`` too)."""
        limit = max(1, int(math.ceil(min(w, h) * self.ratio)))
        if max(w, h) <= limit:
            return 0, 0, h, w
        if w > h:
            return 0, (w - limit) // 2, h, limit
        return (h - limit) // 2, 0, limit, w

    def __call__(self, im):
        tensor = isinstance(im, torch.Tensor)
        h, w = tuple(im.shape[-2:]) if tensor else (im.size[1], im.size[0])
        top, left, bh, bw = self.box(h, w)
        if (bh, bw) == (h, w):
            return im
        return im[..., top:top + bh, left:left + bw] if tensor else im.crop((left, top, left + bw, top + bh))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(ratio={self.ratio})"


class ImageTransform:
    """A transform pipeline plus ``min_size``: the smallest side a decoded image needs (for ``draft``).

    ``output``: "float" (normalised float32) or "uint8" (0-255 pixels; ``mean``/``std`` are then applied
    on the device by :class:`DeviceNormalize`). ``tensor_input``: the pipeline works on uint8 tensors
    (``ImageDataset`` then decodes with :func:`load_image_tensor`); PIL images are accepted either way.
    ``colour_on_device``: the flip and colour jitter are left to :class:`DeviceAugment` (``ImageDataset``
    then hands each sample's key along, from which the device draws them).
    """

    def __init__(self, pipeline: Callable, min_size: int, train: bool, *, output: str = "float",
                 mean: tuple = (), std: tuple = (), tensor_input: bool = False, colour_on_device: bool = False
                 ) -> None:
        self.pipeline = pipeline
        self.min_size = min_size
        self.train = train
        self.output = output
        self.mean = tuple(mean)
        self.std = tuple(std)
        self.tensor_input = tensor_input
        self.colour_on_device = colour_on_device

    def __call__(self, im: Image.Image):
        return self.pipeline(im)

    def __repr__(self) -> str:
        # The float repr is unchanged (it is part of feature-cache keys); uint8 says so and names mean/std.
        extra = f"output=uint8, mean={self.mean}, std={self.std}, " if self.output == "uint8" else ""
        return f"ImageTransform(train={self.train}, min_size={self.min_size}, {extra}{self.pipeline!r})"


def _parse_data_config(data_config: dict) -> tuple[tuple[int, int], str, float, tuple, tuple]:
    try:
        size = tuple(int(x) for x in data_config["input_size"])[-2:]
        mean = tuple(float(x) for x in data_config["mean"])
        std = tuple(float(x) for x in data_config["std"])
    except (KeyError, TypeError, ValueError) as e:
        raise ConfigError(f"data config needs input_size, mean and std (problem: {e}); "
                          "check the model's preprocessing entry") from None
    interp = str(data_config.get("interpolation") or "bilinear").lower()
    if interp == "random":       # timm's train-time random choice; a fixed one keeps runs reproducible
        interp = "bilinear"
    if interp not in _INTERPOLATIONS:
        raise ConfigError(f"data config interpolation {interp!r} is unknown; use one of {', '.join(_INTERPOLATIONS)}")
    crop_pct = float(data_config.get("crop_pct") or 0.875)
    if len(size) != 2 or min(size) < 1 or len(mean) != 3 or len(std) != 3 or min(std) <= 0 or not 0 < crop_pct <= 1:
        raise ConfigError(f"data config is invalid (input_size={data_config.get('input_size')}, mean={mean}, "
                          f"std={std}, crop_pct={crop_pct}); check the model's preprocessing entry")
    return (size[0], size[1]), interp, crop_pct, mean, std


def build_transform(data_config: dict, train: bool, config: Any | None = None, *,
                    output: str = "float", colour_on_device: bool = False) -> ImageTransform:
    """PIL image -> normalised float tensor (3, H, W) following the model's timm-style data config.

    Evaluation: resize to ``size / crop_pct`` (shorter side) + centre crop, as timm does. Training
    (``config.augment="standard"``): RandomResizedCrop(scale=(crop_scale_min, 1)), horizontal flip
    (``hflip``), brightness/contrast jitter; a 0 switches one off (``crop_scale_min=1`` switches the random
    crop off). ``"trivial"``: the same crop and flip, then torchvision's ``TrivialAugmentWide`` in place
    of the jitter (as torchvision's reference recipe and timm's ``--aa ta_wide`` do), on the cropped uint8
    image (PIL or tensor), always in the workers: it draws from torch's generator, which
    ``ImageDataset`` seeds per (epoch seed, index), so its draws are reproducible and resume exactly.
    ``"none"``: the evaluation view.

    ``output="uint8"`` stops before the float conversion: the same steps and random draws, a uint8 tensor
    (3, H, W) out (4x fewer bytes through worker queues and to the GPU); :class:`DeviceNormalize` then applies
    ``x / 255``, mean and std on the device with the same float32 operations, so the model sees the same values.

    ``colour_on_device`` (uint8 output only) leaves the flip and the brightness/contrast jitter out of
    the pipeline: :class:`DeviceAugment` applies them to the whole batch on the device (``fit`` does so
    on CUDA), and the workers only decode, crop and resize.

    Raises:
        ConfigError: the data config lacks input_size/mean/std, names an unknown interpolation,
            ``output`` is not "float" or "uint8", or ``colour_on_device`` is asked of float output.
    """
    if output not in ("float", "uint8"):
        raise ConfigError(f"invalid transform output={output!r}: use float or uint8")
    if colour_on_device and output != "uint8":
        raise ConfigError("colour_on_device needs output='uint8' (the device normalises what it augments)")
    if config is None:
        config = FinetuneConfig()
    (h, w), interp, crop_pct, mean, std = _parse_data_config(data_config)
    mode = InterpolationMode(interp)
    scale = (math.floor(h / crop_pct), math.floor(w / crop_pct))

    def fixed() -> list:
        # Square targets resize the shorter side (aspect kept); others resize to the exact scaled box.
        if h == w:
            return [LimitAspect(EVAL_MAX_ASPECT), T.Resize(scale[0], interpolation=mode, antialias=True),
                    T.CenterCrop((h, w))]
        return [T.Resize(scale, interpolation=mode, antialias=True), T.CenterCrop((h, w))]

    # uint8 output (the CUDA path) works on uint8 tensors from the start: torch's resize and jitter
    # kernels do more per worker core than PIL's (docs/benchmarks.md, "CPU-side image work"), and the
    # dataset decodes plain JPEGs straight into a tensor (load_image_tensor). PIL inputs still work.
    # torch has no box/hamming resize: those stay on PIL images.
    tensor_input = output == "uint8" and interp not in ("box", "hamming")
    steps: list = [T.PILToTensor()] if tensor_input else []
    mode_name = augment_mode(config)
    augment = train and mode_name != "none"
    min_size = max(scale)
    if augment and float(config.crop_scale_min) < 1.0:
        steps.append(T.RandomResizedCrop((h, w), scale=(float(config.crop_scale_min), 1.0), interpolation=mode,
                                         antialias=True))
        min_size = max(min_size, crop_min_size((h, w), float(config.crop_scale_min)))
    else:
        steps.extend(fixed())
    colour = augment and not colour_on_device
    flip = flip_probability(config)
    if colour and flip > 0:
        steps.append(T.RandomHorizontalFlip(flip))
    if colour and mode_name == "standard" and (float(config.brightness) > 0 or float(config.contrast) > 0):
        steps.append(T.ColorJitter(brightness=float(config.brightness) or None,
                                   contrast=float(config.contrast) or None))
    if augment and mode_name == "trivial":
        # uint8 in, uint8 out: before the float conversion, so the device path gets the same pixels. Its
        # rotate/shear/translate take nearest or bilinear on tensors: bilinear unless the model asks nearest.
        ta_mode = mode if interp in ("nearest", "bilinear") else InterpolationMode.BILINEAR
        steps.append(T.TrivialAugmentWide(interpolation=ta_mode))
    if not tensor_input:
        steps.append(T.PILToTensor())
    if output == "float":
        steps += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    return ImageTransform(T.Compose(steps), min_size=min_size, train=train, output=output, mean=mean, std=std,
                          tensor_input=tensor_input, colour_on_device=colour_on_device)




def crop_min_size(size: tuple[int, int], scale_min: float) -> int:
    """The short side a big JPEG is decoded at, at least (PIL ``draft``), for random crops of ``scale_min`` of its
    area and more to be resized to ``size`` without enlarging a square one: ``max(size) / sqrt(scale_min)``. At the
    default 0.8 this is below the evaluation's ``size / crop_pct`` (256 for 224), which then decides; at timm's
    0.08 a 224-px view needs 792 px (decoded at 256 px, its smallest crops were 72 px enlarged 3x)."""
    return math.ceil(max(size) / math.sqrt(scale_min))


def flip_probability(config: Any) -> float:
    """``config.hflip``, with -1 (auto) read as ``AUTO_HFLIP``: the probability the training views are
    mirrored (the trainer turns auto's flip off when the cached head finds the images handed)."""
    p = float(getattr(config, "hflip", -1.0))
    return AUTO_HFLIP if p < 0 else p


def trains_mirrored(config: Any) -> bool:
    """Whether a run with ``config`` shows the model mirrored training images: an augmentation that flips
    (not ``none``) at a flip probability above 0. (A run whose auto flip the mirror test turned off records
    that in its summary, ``mirror.dropped``.)"""
    return augment_mode(config) != "none" and flip_probability(config) > 0


def augment_mode(config: Any) -> str:
    """``config.augment``: one of ``finetune.core.config.AUGMENTS`` (a config object without the field means
    standard)."""
    return str(getattr(config, "augment", "standard"))


def with_input_size(data_config: dict, size: int) -> dict:
    """``data_config`` at another square input size (``size`` px; 0 keeps the model's own). The crop
    fraction stays, so evaluation resizes to ``size / crop_pct`` and centre-crops ``size``."""
    if not size:
        return dict(data_config)
    channels = tuple(data_config["input_size"])[0]
    return {**data_config, "input_size": (channels, int(size), int(size))}
