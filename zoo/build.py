"""Registry entry -> ``nn.Module`` with its pretrained weights: the architecture (``zoo.network``, re-exported
here), the cached safetensors loaded into it (pulled first when needed).

The one model builder of the package: ``build_network`` turns a builder string ("timm:<arch>",
"torchvision:<fn>") into a network; ``build_architecture`` (registry entries) and ``zoo.bundle`` (exported
bundles) both call it. Stage lists and ad-hoc entries live one layer down, in ``zoo.resolve``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from finetune.core.io import shell_command
from zoo.errors import WeightsError
from zoo.network import (DROPPED_PREFIXES, TORCHVISION_KWARGS, VGG_FC_DROPOUT, build_architecture, build_network,
                         build_to_load, builder_kwargs, has_fc_dropout)
from zoo.registry import ModelEntry
from zoo.resolve import get_entry
from zoo.sources import pull

if TYPE_CHECKING:  # torch is imported inside the functions: importing zoo.build stays cheap
    import torch
    from torch import nn

__all__ = [
    "build_network", "build_architecture", "create_model", "load_weights", "data_config", "builder_kwargs",
    "has_fc_dropout", "TORCHVISION_KWARGS", "DROPPED_PREFIXES", "VGG_FC_DROPOUT",
]


def create_model(name: str | ModelEntry, num_classes: int | None = None, pretrained: bool = True, *,
                 fc_dropout: float | None = None) -> "nn.Module":
    """Build model ``name`` and, when ``pretrained``, load its cached weights (pulling them first if needed).

    With ``num_classes`` different from the entry's, the classifier keeps its fresh initialisation and
    every other tensor is loaded strictly (the head is replaced by finetune anyway). A pretrained model is built
    without the random init its weights replace, and leaves the caller's random streams as they were
    (``zoo.network.build_to_load``); ``pretrained=False`` draws its init from them, as timm's does.

    Raises:
        UnknownModelError, DownloadError/OfflineError (from pull), WeightsError: the file does not fit.
    """
    entry = get_entry(name)
    if not pretrained:     # a random init asked for: drawn from the caller's random streams, as timm's
        return build_architecture(entry, num_classes, fc_dropout=fc_dropout)
    path = pull(entry)
    # lazy: zoo --help / list / info import this module and must not import torch
    from safetensors import SafetensorError
    from finetune.core.checkpoint import read_tensors  # lazy: as above

    try:
        state = read_tensors(path)
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"{path}: not a readable safetensors file ({err}); run "
                           f"`{shell_command('zoo', 'pull', entry.name, '--force')}` to fetch it again") from None
    skip = num_classes is not None and num_classes != entry.num_classes
    state = _kept(state, entry, skip)
    model = build_to_load(lambda: build_architecture(entry, num_classes, fc_dropout=fc_dropout), state)
    load_weights(model, state, entry, skip_classifier=skip, where=str(path))
    return model


def _kept(state: dict[str, "torch.Tensor"], entry: ModelEntry, skip_classifier: bool) -> dict[str, "torch.Tensor"]:
    """``state`` less what the built network lacks on purpose: ``DROPPED_PREFIXES``, and the classifier when its
    width is not the file's (``skip_classifier``)."""
    drop, cls = DROPPED_PREFIXES.get(entry.builder, ()), entry.classifier
    return {k: v for k, v in state.items()
            if not k.startswith(drop) and not (skip_classifier and (k == cls or k.startswith(cls + ".")))}


def load_weights(model: "nn.Module", state: dict[str, "torch.Tensor"], entry: ModelEntry, *,
                 skip_classifier: bool = False, where: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly (optionally leaving the classifier alone).

    Raises:
        WeightsError: missing, unexpected or wrongly shaped tensors (the first few are named).
    """
    cls = entry.classifier
    state = _kept(state, entry, skip_classifier)
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        # (QA: a pinned file of another architecture passes its sha256 check; fetching it again changes nothing)
        raise WeightsError(f"{where}: {len(wrong)} tensors have the wrong shape for {entry.name} ({entry.builder}), "
                           f"e.g. {', '.join(wrong[:3])}: weights of another architecture; fix the entry's builder or "
                           f"source (`{shell_command('zoo', 'pull', entry.name, '--force')}` fetches the same file "
                           "again: it only helps a file changed in the cache)")
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys
               if not (skip_classifier and (k == cls or k.startswith(cls + ".")))]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if result.unexpected_keys:
        problems.append(f"{len(result.unexpected_keys)} unexpected (e.g. {', '.join(result.unexpected_keys[:3])})")
    if problems:
        raise WeightsError(f"{where}: weights do not fit {entry.name} ({entry.builder}): {'; '.join(problems)}; "
                           f"run `{shell_command('zoo', 'pull', entry.name, '--force')}` or fix the entry's key_map")


def data_config(entry: str | ModelEntry) -> dict:
    """timm-style data config (input_size, interpolation, crop_pct, crop_mode, mean, std) of the entry."""
    return get_entry(entry).preprocessing.data_config()
