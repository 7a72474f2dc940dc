"""Inference on images: batched prediction and the lecture's fixed-crop test-time augmentation.

The single-view path uses ``finetune.data.build_transform(data_config, train=False)``: literally the
validation transform, so a bundle sees the same pixels at prediction time as during validation.
Test-time augmentation averages the softmax over several views of each image: ``flip`` (the validation
view and its horizontal mirror) or ``ten`` (the ten fixed crops: four corners + centre, and their
horizontal flips, optionally at several scales). Library code: raises, never prints. ``zoo eval``'s
folder evaluation and reports are in ``zoo.evaluate``.
"""
from __future__ import annotations

import glob
import math
import os
import re
import threading
from contextlib import closing, nullcontext
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from PIL import Image
from timm.data.transforms import str_to_interp_mode
from torchvision.transforms import functional as F

from finetune.core.devices import copies_async
from finetune.core.io import broken_link, unexpanded_home
from finetune.core.progress import progress_bar
from finetune.core.threads import ordered_map
from finetune.data import IMAGE_EXTENSIONS, build_transform, load_image, pil_warnings, upright_rgb
from finetune.data.images import decode_opened, named_stream, open_image, verified
from finetune.data.loaders import failure_reason, resolve_workers
from finetune.data.transforms import LimitAspect
from finetune.data.files import image_files, is_ignored, refuse_zoo_output
from zoo.errors import UsageError

__all__ = [
    "TTA_VIEWS", "DEFAULT_TTA_VIEWS", "eval_transform", "tta_transform", "parse_scales", "expand_images",
    "model_input", "predict_probs", "topk",
]

# Called with (image, reason) for each image that cannot be read; the image is then skipped.
OnError = Callable[[Any, str], None]
# Test-time augmentation views: flip = the validation view + its mirror; ten = torchvision's ten-crop.
TTA_VIEWS = ("flip", "ten")
DEFAULT_TTA_VIEWS = "flip"     # 2 passes, not 10: neither beat plain evaluation on real photos (docs/peers.md)
# ten-crop TTA cuts a longer side to this many times the short before resizing (QA: a 20000x2 PNG resized to
# 20M x 2048 px took 17 GB); validation cuts at 2x (EVAL_MAX_ASPECT), but its one view is central anyway
TTA_MAX_ASPECT = 8.0


def eval_transform(data_config: dict) -> Callable[[Image.Image], torch.Tensor]:
    """The validation transform (resize + centre crop + normalise) from the shared training code."""
    return build_transform(dict(data_config), train=False)


MAX_TTA_SCALE = 2048       # pixels of the shorter side, as --img-size's bound
MAX_TTA_SCALES = 8          # sizes: ten views each


def parse_scales(text: str | Sequence[int] | None) -> tuple[int, ...] | None:
    """``"224,256,288"`` -> (224, 256, 288). Raises UsageError on anything but positive integers."""
    if text is None or text == "" or (not isinstance(text, str) and len(text) == 0):
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        scales = tuple(int(str(p).strip()) for p in parts if str(p).strip())
    except ValueError:
        raise UsageError(f"--tta-scales {text!r}: give comma-separated pixel sizes, e.g. 224,256,288") from None
    if not scales or any(s <= 0 for s in scales):
        raise UsageError(f"--tta-scales {text!r}: sizes must be positive, e.g. 224,256,288")
    if max(scales) > MAX_TTA_SCALE or len(scales) > MAX_TTA_SCALES:
        # (QA: 100000 resized each image to 30 GB and then called it unreadable)
        raise UsageError(f"--tta-scales {text!r}: at most {MAX_TTA_SCALES} sizes of at most {MAX_TTA_SCALE} pixels "
                         "(each adds ten views per image), e.g. 224,256,288")
    return scales


def tta_transform(data_config: dict, scales: Sequence[int] | None = None, views: str = "ten",
                  mirror: bool = True) -> Callable[[Image.Image], torch.Tensor]:
    """Test-time augmentation views of one image, stacked: (V, 3, H, W).

    ``views="flip"``: the validation view (:func:`eval_transform`, the very pixels validation sees) and
    its horizontal mirror (V = 2). ``views="ten"``: ten-crop (V = 10 x n_scales): without ``scales`` the
    shorter side is resized as in validation (input size / crop_pct); with ``scales`` it is resized to
    each scale in turn, its long side first centre-cropped to ``TTA_MAX_ASPECT`` times the short (only extreme
    strips: the corner crops of a panorama still reach its corners). Each resized image gives the four corner
    crops, the centre crop and their horizontal flips at the model's input size.

    ``mirror=False`` (a model that never saw a mirrored image: ``Bundle.tta_mirror``) leaves the mirrored
    views out: "flip" is then the validation view alone (V = 1), "ten" the five crops of each scale.

    Raises:
        UsageError: an unknown ``views``, scales with ``flip``, or a scale smaller than the input size.
    """
    if views not in TTA_VIEWS:
        raise UsageError(f"--tta-views {views!r}: choose one of {', '.join(TTA_VIEWS)}")
    if views == "flip":
        if scales:
            raise UsageError("--tta-scales ten-crops each scale: use it with --tta-views ten")
        single = eval_transform(data_config)

        def flipped(img: Image.Image) -> torch.Tensor:
            x = single(img)
            return torch.stack([x, x.flip(-1)] if mirror else [x])

        flipped.min_size = getattr(single, "min_size", None)   # the decode size validation uses
        return flipped
    _, h, w = (int(v) for v in data_config["input_size"])
    interp = str_to_interp_mode(str(data_config.get("interpolation", "bilinear")))
    mean = torch.tensor(data_config["mean"], dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(data_config["std"], dtype=torch.float32).view(3, 1, 1)
    if scales:
        sizes = [int(s) for s in scales]
    else:
        # timm's eval transform: scale_size = floor(img_size / crop_pct)
        sizes = [int(math.floor(min(h, w) / float(data_config.get("crop_pct") or 1.0)))]
    too_small = [s for s in sizes if s < max(h, w)]
    if too_small:
        raise UsageError(f"TTA scale(s) {too_small} smaller than the model's input size {h}x{w}; "
                         f"use scales of at least {max(h, w)}")

    limit = LimitAspect(TTA_MAX_ASPECT)      # a 20000x2 strip is not resized to 20M x 2048 px

    def transform(img: Image.Image) -> torch.Tensor:
        views = []
        img = limit(img)
        for size in sizes:
            resized = F.resize(img, size, interpolation=interp)
            for crop in (F.ten_crop(resized, [h, w]) if mirror else F.five_crop(resized, [h, w])):
                views.append((F.to_tensor(crop) - mean) / std)
        return torch.stack(views)

    return transform


def _pattern_images(pattern: str, unlisted: list[tuple[str, str]] | None = None,
                    others: list[tuple[str, str]] | None = None, hidden: list[tuple[str, int]] | None = None
                    ) -> list[Path]:
    """The images a glob pattern names, as the shell would hand them over: the image files it matches, and the
    images of the folders it matches (``'photos/*'``); what a folder walk skips (``@eaDir``, ``__MACOSX``) is
    skipped below the pattern's literal part too. Each image once, in the order found."""
    parts = Path(pattern).parts
    literal = next((i for i, n in enumerate(parts) if glob.has_magic(n)), len(parts))    # leading plain names
    matches = sorted(glob.glob(pattern, recursive=True))
    found: dict[Path, None] = {}
    for q in matches:
        if any(is_ignored(n) for n in Path(q).parts[literal:]):
            continue
        if os.path.isdir(q):
            found.update(dict.fromkeys(map(Path, image_files(q, unlisted, others, hidden))))
        elif os.path.splitext(q)[1].lower() in IMAGE_EXTENSIONS:
            found[Path(q)] = None
    if not found:
        raise UsageError(f"no image matches {pattern}" + (f" ({len(matches)} other match(es), none an image file "
                                                          "or a folder of images)" if matches else ""))
    return list(found)


def expand_images(inputs: Iterable[str | os.PathLike], unlisted: list[tuple[str, str]] | None = None,
                  others: list[tuple[str, str]] | None = None, hidden: list[tuple[str, int]] | None = None
                  ) -> tuple[list[Path], bool]:
    """Files as given, folders expanded recursively to their images (sorted), and a glob pattern that names no
    file (quoted, so the shell left it: ``'photos/*/*.jpg'``, ``**`` recursive) to the images it matches.
    Folders below them that cannot be listed go to ``unlisted`` (folder, reason), their files not named as images
    (a HEIC photo, a file without an extension) to ``others`` (path, reason: the training scan's words), hidden
    folders below them holding images (``.edits/``: skipped, as the training scan skips them) to ``hidden``
    (folder, images; :func:`finetune.data.scan.hidden_note` says so).

    Returns:
        (paths, any_folder) — the second tells the caller a progress bar is worth showing.
    Raises:
        UsageError: an argument that does not exist, or is empty; DataError: a folder a zoo command wrote.
    """
    out: list[Path] = []
    any_dir = False
    for item in inputs:
        p = Path(item)
        if str(item) == "":     # Path("") is ".": every image below the current folder was predicted (QA)
            raise UsageError("an image argument is empty (an unset shell variable?): give an image or a folder "
                             "(. for the current one)")
        if not p.exists() and glob.has_magic(str(item)):     # a quoted pattern (or a shell that left it as is)
            any_dir = True
            out.extend(_pattern_images(str(item), unlisted, others, hidden))
        elif p.is_dir():
            any_dir = True
            refuse_zoo_output(str(p), "to classify: give the folder of the images, or name its files")
            out.extend(map(Path, image_files(str(p), unlisted, others, hidden)))
        elif p.exists():
            out.append(p)
        elif str(item) == "-" and os.path.exists("/dev/stdin"):     # `zoo predict BUNDLE - < cat.jpg`
            out.append(Path("/dev/stdin"))
        elif (link := broken_link(p)) is not None:     # a link to nothing, one that loops, or below one
            raise UsageError(f"{link}; fix or remove it")
        elif re.match(r"(https?|ftp|s3|gs)://?", str(item)):     # (a Path argument holds one slash)
            url = re.sub(r":/+", "://", str(item), count=1)
            raise UsageError(f"{url} is a URL: zoo reads local files; download the image first")
        else:
            home = unexpanded_home(item)      # (audit: a quoted "~/photos" was "no such image or folder")
            raise UsageError(f"no such image or folder: {item}" + (f" (the ~ is expanded by the shell only when it "
                                                                   f"is not quoted: give {home})" if home else ""))
    return out, any_dir


# A PIL image given to predict_probs may be opened lazily (Image.open) and given more than once: its first load()
# decodes from its file on whichever decoding thread gets there, and two at once broke the decode (review: [im] * 8
# on 4 threads, 3-4 of 8 "unreadable": AssertionError, "broken data stream"). Loaded one at a time; once loaded,
# load() returns at once and the resizes that follow only read it.
_PIL_LOAD = threading.Lock()


def _load(item: Any, min_size: int | None) -> Image.Image:
    if isinstance(item, Image.Image):    # as training converts a file: EXIF-upright, 16-bit scaled, alpha on white
        with _PIL_LOAD:     # (its EXIF, parsed once and kept on it, too)
            unread = _unread(item)
            if unread is not None:    # as its file: a big JPEG at the reduced scale (session 30: 0.727 vs 0.747),
                with unread, verified(unread, item.fp) as ready:        # a PNG's checksums checked (helper-147)
                    return decode_opened(ready, min_size)
            item.load()
            return upright_rgb(item)
    # Same decode as validation (finetune.data.ImageDataset): JPEG draft down to what the resize needs.
    return load_image(item, min_size)


def _unread(item: Image.Image) -> Image.Image | None:
    """A second opening of the file of a PIL image as ``Image.open`` returned it (not decoded yet, first frame, no
    ``draft`` of the caller's), or None for any other image, which is used as given. Its file decodes as the path's
    (``decode_opened``, the one draft decision), and the caller's image is left as it was: neither decoded at the
    reduced scale (its size would change under the caller) nor its file closed."""
    fp = getattr(item, "fp", None)
    if not getattr(item, "tile", None) or getattr(item, "decoderconfig", ()) or fp is None or item.tell() != 0:
        return None
    try:
        return open_image(fp)     # (Image.open reads an image's file from its start: the caller's did too)
    except Exception:     # a format zoo's readers leave to Pillow (an ICO the caller opened): the image as given
        return None


def model_input(batch: torch.Tensor, device: torch.device) -> torch.Tensor:
    """An evaluation batch on ``device``, in the layout of an evaluation there (``finetune.engine.runtime.nhwc``:
    NHWC on the CPU, where `zoo eval` of 440 images took 0.68x the time of NCHW; NCHW on CUDA). Only the input
    changes layout: oneDNN then runs NHWC kernels for the model as it is (Lite0, 32 images: 0.53 s both ways,
    0.85 s NCHW), and the model a bundle hands out keeps torch's standard layout (saveable by safetensors)."""
    from finetune.engine.runtime import nhwc   # lazy: finetune.engine's package adds 0.4 s to `zoo predict`'s start

    batch = batch.to(device, non_blocking=copies_async(device))     # (blocking on MPS: core.devices)
    if batch.dim() == 4 and nhwc(device, True, trains=False):
        batch = batch.contiguous(memory_format=torch.channels_last)
    return batch


@torch.inference_mode()
def predict_probs(model: torch.nn.Module, images: Sequence[Any], data_config: dict, *, tta: bool = False,
                  tta_scales: Sequence[int] | None = None, tta_views: str = DEFAULT_TTA_VIEWS,
                  batch_size: int = 32, progress: bool = False, on_error: OnError | None = None,
                  mirror: bool = True, threads: int | None = None,
                  on_batch: Callable[[list[int], torch.Tensor], None] | None = None) -> tuple[list[int], torch.Tensor]:
    """Softmax probabilities for each readable image, batched, on the model's device.

    Args:
        model: a classifier in eval mode.
        images: paths or PIL images.
        data_config: timm-style preprocessing (input_size, interpolation, crop_pct, mean, std).
        tta: average the softmax over the views of :func:`tta_transform` (``tta_views``: flip or ten;
            ten-crop at each of ``tta_scales`` when given; ``mirror=False``: without the mirrored views).
        batch_size: images per forward pass (with TTA each image contributes all its views).
        progress: show a tqdm bar (quiet anyway when stderr is not a terminal).
        on_error: called with (image, reason) for an unreadable image, which is then skipped;
            without it the error propagates.
        threads: images decoded and transformed at once (:func:`_prepared`); None: the training loaders'
            worker count for the model's device (``resolve_workers``: every core but one on CUDA, none on a CPU
            of up to 4 cores).
        on_batch: called with (indices, probabilities) of each batch as soon as it is predicted (``zoo predict``
            prints as it goes: the first lines of 10,000 images come in seconds, and a Ctrl-C keeps them).
    Returns:
        (indices of the images that were read, float tensor [n_read, C] on the CPU).
    """
    if tta or tta_scales:
        views = "ten" if tta_scales else tta_views
        transform = tta_transform(data_config, tta_scales, views, mirror=mirror)
        min_size = max(tta_scales) if tta_scales else getattr(transform, "min_size", None)
    else:
        transform = eval_transform(data_config)
        min_size = getattr(transform, "min_size", None)
    try:
        device = next(model.parameters()).device
    except StopIteration:
        device = torch.device("cpu")
    model.eval()
    kept: list[int] = []
    chunks: list[torch.Tensor] = []
    pending: list[torch.Tensor] = []
    pending_idx: list[int] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack(pending)  # [B, V, 3, H, W] or [B, 3, H, W]
        views = batch.shape[1] if batch.dim() == 5 else 1
        logits = model(model_input(batch.flatten(0, 1) if batch.dim() == 5 else batch, device))
        # Average probabilities, not logits: the lecture averages the crops' predictions.
        probs = logits.float().softmax(dim=-1).view(len(pending), views, -1).mean(dim=1)
        chunks.append(probs.cpu())
        kept.extend(pending_idx)
        if on_batch is not None:
            on_batch(list(pending_idx), chunks[-1])
        pending.clear()
        pending_idx.clear()

    # never more threads than images, and none for one image (bundle.predict(img), zoo predict BUNDLE cat.jpg;
    # zoo serve has its own batcher): nothing to overlap; none
    # either where a stream is read (`zoo predict BUNDLE - a.jpg`): a Ctrl-C while a thread waited on the pipe's
    # writer waited with it (the pool's threads are joined), where the main thread's read is interrupted
    threads = min(resolve_workers(-1, device.type) if threads is None else int(threads), max(0, len(images) - 1))
    threads = 0 if any(isinstance(item, (str, os.PathLike)) and named_stream(item) for item in images) else threads
    with progress_bar(len(images), "predicting", unit="img", quiet=not progress) as bar:
        for i, tensor in _prepared(images, lambda item: transform(_load(item, min_size)), threads, batch_size):
            if isinstance(tensor, Exception):  # any decoder failure: the image is skipped, the run goes on
                if on_error is None:
                    raise tensor
                on_error(images[i], failure_reason(tensor))    # in the words the training loaders log
                bar.update(1)
                continue
            pending.append(tensor)
            pending_idx.append(i)
            if len(pending) >= batch_size:
                flush()
            bar.update(1)
        flush()
    if not chunks:
        return [], torch.empty(0, 0)
    return kept, torch.cat(chunks)


def _prepared(images: Sequence[Any], prepare: Callable[[Any], torch.Tensor], threads: int,
              batch_size: int) -> Iterator[tuple[int, torch.Tensor | Exception]]:
    """``(index, prepare(image))`` for each image in order, or the exception that preparing it raised. With
    ``threads`` > 0 the images are decoded and transformed that many at a time, up to a batch and two per thread
    ahead of the one consumed, so the next batch is ready when the model is (PIL's decoders and resizes and
    torch's ops let go of the GIL: docs/benchmarks.md, "Decoding for predict and eval"); 0: one after another, here."""
    def attempt(item: Any) -> torch.Tensor | Exception:
        try:
            return prepare(item)
        except Exception as err:
            return err

    # load_image's own pil_warnings (catch_warnings) is not thread-safe: entered and left on several threads at
    # once, one thread restored the filters another had set, which then outlived the run (every later decompression-
    # bomb warning of the process an error) or left a decode without them. Entered once here, around the threads,
    # every interleaving restores a list that holds these filters, and leaving it restores the process's own. An
    # error or Ctrl-C in the consumer: the images queued ahead are dropped, not decoded (ordered_map).
    with pil_warnings() if threads > 0 else nullcontext(), \
            closing(ordered_map(attempt, images, threads, batch_size + 2 * threads, "zoo-decode")) as done:
        yield from enumerate(done)


def topk(probs: torch.Tensor, labels: Sequence[str], k: int = 5) -> list[list[tuple[str, float]]]:
    """[(label, prob), ...] per row, best first; k is capped at the number of classes."""
    if probs.numel() == 0:
        return []
    k = max(1, min(int(k), probs.shape[1]))
    values, indices = probs.topk(k, dim=1)
    return [[(labels[j], float(v)) for v, j in zip(vs.tolist(), js.tolist())] for vs, js in zip(values, indices)]
