"""Registry entry -> ``nn.Module``: build the architecture (timm or torchvision), load cached safetensors.

The one model builder of the package: ``build_network`` turns a builder string ("timm:<arch>",
"torchvision:<fn>") into a network; ``build_architecture`` (registry entries) and ``zoo.bundle`` (exported
bundles) both call it. Stage lists and ad-hoc entries live one layer down, in ``zoo.resolve``.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

from zoo.errors import RegistryError, UsageError, WeightsError
from zoo.registry import ModelEntry
from zoo.resolve import get_entry
from zoo.sources import pull
from zoo.text import shell_command

if TYPE_CHECKING:  # torch is imported inside the functions: importing zoo.build stays cheap
    import torch
    from torch import nn

__all__ = [
    "build_network", "build_architecture", "create_model", "load_weights", "data_config", "builder_kwargs",
    "has_fc_dropout", "TORCHVISION_KWARGS", "DROPPED_PREFIXES", "VGG_FC_DROPOUT",
]

# torchvision builders need a few flags to match the published weights / to stay cheap:
#  - googlenet: the checkpoint expects transform_input=True (torchvision sets it when weights are given);
#    aux classifiers are training-only (torchvision drops them after loading); init_weights=False skips
#    the slow truncated-normal init that the loaded weights overwrite anyway.
TORCHVISION_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": False},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": False},
}
# Tensors that published checkpoints carry but the built model deliberately lacks (see above).
# timm's inception_v3 has torchvision's names but no aux classifier (timm builds it without one by default).
DROPPED_PREFIXES: dict[str, tuple[str, ...]] = {
    "torchvision:googlenet": ("aux1.", "aux2."),
    "torchvision:inception_v3": ("AuxLogits.",),
    "timm:inception_v3": ("AuxLogits.",),
}


# The original VGG (and torchvision's) trains its two FC-4096 layers with dropout 0.5; timm's VGG defaults to
# none. timm's drop_rate puts it where torchvision has it: after fc1 (pre_logits.drop) and after fc2
# (head.drop). Dropout acts only in train mode, i.e. in the phases that train those layers: fit's head-only
# phase and the cached-feature path run the network in eval mode.
VGG_FC_DROPOUT = 0.5


def has_fc_dropout(entry: ModelEntry) -> bool:
    """The entry is a timm VGG, whose FC-4096 layers (``pre_logits``) get VGG's dropout back."""
    return entry.library == "timm" and entry.arch.startswith("vgg")


def builder_kwargs(entry: ModelEntry, fc_dropout: float | None = None) -> dict[str, Any]:
    """Constructor arguments beyond ``num_classes`` (recorded in model.json, so exports rebuild the same).

    Args:
        fc_dropout: VGG only: dropout of the FC-4096 layers; None = the original's 0.5; 0 turns it off.
    Raises:
        UsageError: ``fc_dropout`` for a model without FC-4096 layers, or outside [0, 1).
    """
    if not has_fc_dropout(entry):
        if fc_dropout is not None:
            raise UsageError(f"--fc-dropout applies to VGG's FC-4096 layers; {entry.name} has none "
                             "(for a dropout before your new classifier use --head mlp --mlp-dropout P)")
        return {}
    p = VGG_FC_DROPOUT if fc_dropout is None else float(fc_dropout)
    if not 0.0 <= p < 1.0:
        raise UsageError(f"invalid --fc-dropout {fc_dropout}: allowed: 0 <= x < 1 (0 turns it off)")
    return {"drop_rate": p}


def _resolve(name_or_entry: str | ModelEntry) -> ModelEntry:
    return name_or_entry if isinstance(name_or_entry, ModelEntry) else get_entry(name_or_entry)


def build_network(builder: str, num_classes: int, kwargs: dict[str, Any] | None = None, *,
                  where: str = "") -> "nn.Module":
    """The network a builder string names, with random weights (no download).

    Args:
        builder: "timm:<arch>" or "torchvision:<fn>".
        num_classes: classifier width; 0 drops the classifier (timm).
        kwargs: extra constructor arguments; torchvision builders start from ``TORCHVISION_KWARGS``.
        where: prefix of error messages (the registry entry or bundle that asked).
    Raises:
        RegistryError: an unknown library, or an architecture the installed timm/torchvision lacks.
    """
    library, _, arch = builder.partition(":")
    where = f"{where}: " if where else ""
    kwargs = {k: v for k, v in dict(kwargs or {}).items() if k != "num_classes"}   # num_classes wins
    if library == "timm":
        # lazy: zoo --help / list / info import this module and must not import torch
        import timm

        if not timm.is_model(arch):
            raise RegistryError(f"{where}field 'builder': timm {timm.__version__} has no architecture '{arch}'; "
                                "upgrade timm or fix the entry")
        return timm.create_model(arch, pretrained=False, num_classes=int(num_classes), **kwargs)
    if library == "torchvision":
        # lazy: zoo --help / list / info import this module and must not import torch
        import torchvision.models

        fn = getattr(torchvision.models, arch, None)
        if not callable(fn):
            raise RegistryError(f"{where}field 'builder': torchvision has no model function '{arch}'; "
                                "upgrade torchvision or fix the entry")
        return fn(weights=None, num_classes=int(num_classes), **{**TORCHVISION_KWARGS.get(arch, {}), **kwargs})
    raise RegistryError(f"{where}field 'builder': unknown library '{library}'; use timm:<arch> or "
                        "torchvision:<fn>")


def build_architecture(entry: str | ModelEntry, num_classes: int | None = None, *,
                       fc_dropout: float | None = None) -> "nn.Module":
    """The entry's network with random weights (no download). Honours an active ``torch.device`` context,
    so ``with torch.device("meta"): build_architecture(e)`` costs no memory.

    Args:
        entry: a ModelEntry or a name for ``zoo.resolve.get_entry``.
        num_classes: classifier width; None keeps the entry's (ImageNet: 1000); 0 drops the classifier (timm).
        fc_dropout: see ``builder_kwargs`` (VGG: 0.5 unless told otherwise).

    Raises:
        RegistryError: the builder names an architecture the installed timm/torchvision lacks.
    """
    entry = _resolve(entry)
    n = entry.num_classes if num_classes is None else int(num_classes)
    return build_network(entry.builder, n, builder_kwargs(entry, fc_dropout),
                         where=f"{entry.origin_file}: entry '{entry.name}'")


def create_model(name: str | ModelEntry, num_classes: int | None = None, pretrained: bool = True, *,
                 fc_dropout: float | None = None) -> "nn.Module":
    """Build model ``name`` and, when ``pretrained``, load its cached weights (pulling them first if needed).

    With ``num_classes`` different from the entry's, the classifier keeps its fresh initialisation and
    every other tensor is loaded strictly (the head is replaced by finetune anyway).

    Raises:
        UnknownModelError, DownloadError/OfflineError (from pull), WeightsError: the file does not fit.
    """
    entry = _resolve(name)
    model = build_architecture(entry, num_classes, fc_dropout=fc_dropout)
    if pretrained:
        path = pull(entry)
        # lazy: zoo --help / list / info import this module and must not import torch
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err}); run "
                               f"`{shell_command('zoo', 'pull', entry.name, '--force')}` to fetch it again") from None
        skip = num_classes is not None and num_classes != entry.num_classes
        load_weights(model, state, entry, skip_classifier=skip, where=str(path))
    return model


def load_weights(model: "nn.Module", state: dict[str, "torch.Tensor"], entry: ModelEntry, *,
                 skip_classifier: bool = False, where: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly (optionally leaving the classifier alone).

    Raises:
        WeightsError: missing, unexpected or wrongly shaped tensors (the first few are named).
    """
    drop = DROPPED_PREFIXES.get(entry.builder, ())
    cls = entry.classifier
    state = {k: v for k, v in state.items()
             if not k.startswith(drop) and not (skip_classifier and (k == cls or k.startswith(cls + ".")))}
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
    return _resolve(entry).preprocessing.data_config()
