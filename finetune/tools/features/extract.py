"""One pass of a model without its head over a dataset: the features the head sees."""
import contextlib
import math
from typing import Iterator, Sequence

import torch
from torch import nn

from finetune.data import resolve_workers
from finetune.engine.runtime import AmpPolicy, amp_policy, to_device
from finetune.core.errors import FinetuneError
from finetune.core.host import worker_context
from finetune.core.progress import progress_bar
from finetune.tools.features.cache import FeatureBank


@contextlib.contextmanager
def _features_mode(model: nn.Module, head: str) -> Iterator[nn.Module]:
    """Swap the head for nn.Identity and put the model in eval mode; restore both afterwards.

    Each module's own training flag is restored (not just the root's), so a BatchNorm kept in eval by
    ``set_bn_eval`` under ``model.train()`` stays that way.
    """
    head_module = model.get_submodule(head)
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    modes = [(m, m.training) for m in model.modules()]
    setattr(parent, attr, nn.Identity())
    model.eval()
    try:
        yield head_module
    finally:
        setattr(parent, attr, head_module)
        for m, training in modes:
            m.training = training


class _Indexed(torch.utils.data.Dataset):
    """Wraps a dataset to return ``(i, image, label)`` (or ``(i, None)`` for a bad image) for the ``i``-th of
    ``keys``, the dataset keys to load (default: every index in order)."""

    def __init__(self, dataset: torch.utils.data.Dataset, keys: Sequence | None = None) -> None:
        self.dataset = dataset
        self.keys = range(len(dataset)) if keys is None else keys  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.keys)

    def __getitem__(self, i: int):
        return i, self.dataset[self.keys[i]]


def _collate_indexed(batch):
    good = [(i, s) for i, s in batch if s is not None]
    if not good:
        return None
    idx = torch.tensor([i for i, _ in good], dtype=torch.int64)
    x = torch.stack([s[0] for _, s in good])
    y = torch.tensor([int(s[1]) for _, s in good], dtype=torch.int64)
    return idx, x, y


@torch.no_grad()
def _extract(model: nn.Module, head: str, dataset: torch.utils.data.Dataset, batch_size: int,
             device: torch.device, *, workers: int = 0, amp: AmpPolicy | None = None, channels_last: bool = False,
             desc: str | None = None, quiet: bool = True,
             normalize=None, mirror: bool = False, flipped: bool = False, allow_empty: bool = False,
             fixed_shape: bool | None = None, keys: Sequence | None = None) -> FeatureBank | None:
    """One pass of ``model`` without its head over ``dataset``: a single-view bank (bad images -> -1).
    ``keys``: the dataset keys to load, one bank row each (default: every index in order); an
    ``ImageDataset`` key ``(index, seed)`` seeds that image's augmentation draws by itself.
    ``mirror``: a second view, each batch's horizontal mirror, from the same decoded batch (one pass
    over the files, two forward passes); ``flipped``: the mirror view alone (the bank's one view), forwarded
    in the batches ``mirror`` forwards it in.

    With ``desc`` and not ``quiet``, a progress bar on stderr (off a terminal, a line a minute: ``progress_bar``).
    ``normalize``: a ``finetune.data.DeviceNormalize`` when the dataset yields uint8 images.
    ``allow_empty``: None instead of an error when no image decodes (one rank's shard under torchrun).
    ``fixed_shape``: pad the last batch to ``batch_size`` (None: on CUDA, see below).
    """
    items = _Indexed(dataset, keys)
    n = len(items)
    # On CUDA every batch goes through at one shape (the last one padded): cuDNN plans, and may compile,
    # kernels per input shape, seconds that a small folder's 4-5 shapes (full and last batch, train and
    # val, the head check) would pay each; a CPU has no such cost and skips the padded rows' work.
    fixed_shape = device.type == "cuda" if fixed_shape is None else fixed_shape
    workers = resolve_workers(int(workers), device.type, -(-n // max(1, int(batch_size))), single_pass_images=n)
    # A generator of its own, always: without one, the DataLoader draws its workers' base seed from the global
    # RNG, which the head's dropout then continues from (QA: lr-find on cached features with an MLP head gave
    # other losses on a cache miss than on a hit). Augmented views are seeded per image (``keys``), not by it.
    gen = torch.Generator().manual_seed(0)
    loader = torch.utils.data.DataLoader(
        items, batch_size=batch_size, shuffle=False, num_workers=workers,
        collate_fn=_collate_indexed, pin_memory=device.type == "cuda", generator=gen,
        persistent_workers=False, prefetch_factor=4 if workers else None,
        multiprocessing_context=worker_context() if workers else None)
    feats: torch.Tensor | None = None
    labels = torch.full((n,), -1, dtype=torch.int64)
    shape: tuple[int, ...] = ()
    checked = False
    bar = progress_bar(n, desc, unit="img", quiet=quiet or desc is None)
    amp = amp or amp_policy(device, False)
    with _features_mode(model, head) as head_module, amp.autocast(), bar:
        for batch in loader:
            if batch is None:
                continue
            bar.update(int(batch[0].shape[0]))
            idx, x, y = batch
            real = int(x.shape[0])
            if fixed_shape and real < batch_size:   # eval mode: the padded rows change no real row's features
                x = torch.cat([x, x.new_zeros((batch_size - real, *x.shape[1:]))])
            x, _ = to_device(x, y, device, channels_last, normalize)   # uint8 batches normalised there
            if flipped:   # the per-channel normalisation commutes with the flip
                x = torch.flip(x, dims=(-1,))
            f = model(x)
            if not checked:
                shape = tuple(f.shape[1:])
                probe = slice(None) if fixed_shape else slice(0, 2)
                _check_head_is_last(model, head, head_module, x[probe], f[probe], amp)
                feats = torch.zeros((2 if mirror else 1, n, math.prod(shape)), dtype=torch.float32)
                checked = True
            feats[0, idx] = f[:real].reshape(real, -1).float().cpu()
            if mirror:   # the per-channel normalisation commutes with the flip
                feats[1, idx] = model(torch.flip(x, dims=(-1,)))[:real].reshape(real, -1).float().cpu()
            labels[idx] = y
    if feats is None:
        if allow_empty:
            return None
        raise FinetuneError("no image of this split could be decoded; check the data folder")
    return FeatureBank(feats, labels, shape)


def _check_head_is_last(model: nn.Module, head: str, head_module: nn.Module, x: torch.Tensor,
                        f: torch.Tensor, amp: AmpPolicy | None = None) -> None:
    """The fast path computes logits as ``head(features)``: verify that on two images, so a model that
    transforms the head's output (or feeds it anything but the pooled features) fails loudly instead
    of training the wrong function. Features that are not finite are the weights' fault (or float16's range),
    and said so."""
    if not bool(torch.isfinite(f).all()):
        if amp is not None and amp.dtype == torch.float16:
            raise FinetuneError("the backbone's features are NaN or infinite on the first images under float16 "
                                "mixed precision (this GPU has no bfloat16): run with --no-amp; if they still are, "
                                "its weights are damaged")
        raise FinetuneError("the backbone's features are NaN or infinite on the first images: its weights are "
                            "damaged (e.g. a diverged checkpoint, a negative BatchNorm variance); pull or import "
                            "sound weights, or train with --no-pretrained")
    parent_name, _, attr = head.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    was = head_module.training
    head_module.eval()
    setattr(parent, attr, head_module)
    try:
        full = model(x).float()
        fast = _logits(head_module, f).float()
    except Exception as e:  # noqa: BLE001 - any failure here means the head does not take these features
        fast, full, err = None, None, e
    else:
        err = None
    finally:
        setattr(parent, attr, nn.Identity())
        head_module.train(was)
    if err is None and fast.shape == full.shape:
        scale = float(full.abs().max()) + 1e-6
        if float((fast - full).abs().max()) <= 1e-3 + 5e-2 * scale:
            return
    why = f" ({type(err).__name__}: {err})" if err is not None else ""
    raise FinetuneError(f"the fast head path needs the model's output to be {head!r}(pooled features), and "
                        f"it is not for this model{why}; run with fast_head off")


def _logits(head_module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    out = head_module(x)
    # A 1x1-conv classifier yields (B, C, 1, 1); the models that use one flatten it right after.
    return out.flatten(1) if out.dim() > 2 else out


def extract_features(model: nn.Module, head: str, dataset: torch.utils.data.Dataset, batch_size: int = 64,
                     device: str | torch.device = "cpu", *, workers: int = 0, amp: bool = False,
                     channels_last: bool = False, desc: str | None = None,
                     quiet: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """The features the head sees, for every decodable item of ``dataset``.

    The head is swapped for ``nn.Identity`` and the model run once in eval mode under ``no_grad``
    (modes and the head are restored afterwards).

    Args:
        model: the full network; ``head`` names its classifier module ("fc", "head.fc", "classifier").
        dataset: yields ``(image tensor, label)``, or None for an undecodable image (dropped).
        batch_size, device, workers: of the extraction pass (``workers`` -1 = min(8, cpus - 1)).
        amp: autocast (bf16 where supported) on CUDA; channels_last: NHWC inputs (the caller's layout,
            ``finetune.engine.runtime.nhwc``).
        desc, quiet: with ``desc`` and not ``quiet``, the pass's progress bar (``progress_bar``).

    Returns:
        ``(features, labels)``: float32 ``(N_ok, *feature_shape)`` and int64 ``(N_ok,)``, dataset order.

    Raises:
        FinetuneError: no image could be decoded, or the model's output is not ``head(features)``.
    """
    dev = torch.device(device)
    bank = _extract(model, head, dataset, batch_size, dev, workers=workers, amp=amp_policy(dev, amp),
                    channels_last=channels_last, desc=desc, quiet=quiet)
    ok = bank.valid
    return bank.features[0, ok].reshape(-1, *bank.feature_shape), bank.labels[ok]
