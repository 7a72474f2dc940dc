"""The architecture a registry entry or bundle names, with random weights, and whether a weights file fits it.

``build_network`` turns a builder string ("timm:<arch>", "torchvision:<fn>") into a network;
``build_architecture`` builds a registry entry's; ``weights_misfit`` compares tensor names and shapes with the
entry's network built on the meta device (no memory, no download): the one check of ``zoo import`` and of
``zoo pull`` (``check_fit``: a file of another architecture is refused before it is cached). This module imports
neither ``zoo.sources`` nor the cache, so both they and ``zoo.build`` can import it.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

from zoo.errors import FcDropoutError, RegistryError, UsageError, WeightsError
from zoo.registry import ModelEntry
from zoo.resolve import get_entry
from zoo.weightfiles import check_safetensors

if TYPE_CHECKING:  # torch is imported inside the functions: importing zoo.network stays cheap
    import torch
    from torch import nn

__all__ = [
    "build_network", "build_architecture", "build_to_load", "meta_network", "network_shapes",
    "builder_kwargs", "has_fc_dropout", "weights_misfit",
    "check_fit", "TORCHVISION_KWARGS", "DROPPED_PREFIXES", "VGG_FC_DROPOUT",
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
        FcDropoutError: ``fc_dropout`` for a model without FC-4096 layers; UsageError: outside [0, 1).
    """
    if not has_fc_dropout(entry):
        if fc_dropout is not None:
            raise FcDropoutError(entry.name)
        return {}
    p = VGG_FC_DROPOUT if fc_dropout is None else float(fc_dropout)
    if not 0.0 <= p < 1.0:
        raise UsageError(f"invalid --fc-dropout {fc_dropout}: allowed: 0 <= x < 1 (0 turns it off)")
    return {"drop_rate": p}


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
    entry = get_entry(entry)
    n = entry.num_classes if num_classes is None else int(num_classes)
    return build_network(entry.builder, n, builder_kwargs(entry, fc_dropout),
                         where=f"{entry.origin_file}: entry '{entry.name}'")


def build_to_load(build: Callable[[], "nn.Module"], state: Mapping[str, "torch.Tensor"]) -> "nn.Module":
    """``build()``'s network, to load ``state`` into (``load_state_dict``), without the random init the loaded tensors
    replace (timm's vgg16: 1.3 s of a 1.9 s bundle load on 2 CPU cores, docs/benchmarks.md), and without moving
    the caller's random streams.

    It is built on the meta device and given memory (``to_empty``) when ``state`` holds every tensor of its
    state dict, with the same shapes, and nothing else holds a tensor the constructor computed: no buffer or
    parameter its state dict leaves out (a non-persistent buffer such as an attention index, one a state-dict hook
    drops), no tensor attribute, no parameter shared by two modules (``to_empty`` would part them). That build
    draws no random number, so the process-wide generators are not touched at all: another thread drawing from
    them meanwhile (a training loop) is not disturbed. Otherwise (a head left to its init on purpose, a file that
    does not fit, whose load then fails as it always did, a constructor the meta device cannot run) it is built as
    before, its init drawn from the caller's random streams, which are then put back (``preserved_rng``): the same
    numbers as before this function existed.
    """
    # lazy: zoo --help / list / info import this module and must not import torch
    import torch
    from finetune.core.seeding import preserved_rng  # lazy: as above

    device = torch.get_default_device()      # where a plain build would put it (a `with torch.device(...)` too)
    try:
        with torch.device("meta"):      # (thread-local: another thread's tensors are not made on it)
            model = build()
    except Exception:  # noqa: BLE001 - e.g. "Cannot copy out of meta tensor": the plain build below decides
        model = None
    if model is not None and _filled_by(model, state):
        # (no save and restore of the generators here: a restore would replay another thread's draws made meanwhile)
        return model.to_empty(device=device)
    with preserved_rng():
        return build()


def _filled_by(model: "nn.Module", state: Mapping[str, "torch.Tensor"]) -> bool:
    """Every tensor of ``model`` comes from ``state`` (see ``build_to_load``)."""
    import torch  # lazy: as build_to_load

    own = model.state_dict(keep_vars=True)
    if any(k not in state or tuple(state[k].shape) != tuple(v.shape) for k, v in own.items()):
        return False
    if len({id(p) for p in own.values()}) != len(own):      # a tensor shared by two modules
        return False
    named = {id(v) for v in own.values()}       # what to_empty gives memory to must be what the load fills
    tensors = [*model.parameters(), *model.buffers()]
    if any(id(t) not in named for t in tensors):        # a non-persistent buffer, one a state-dict hook drops
        return False
    return not any(isinstance(v, torch.Tensor) for module in model.modules() for v in vars(module).values())


def meta_network(entry: str | ModelEntry, *, fc_dropout: float | None = None) -> "nn.Module | None":
    """``build_architecture(entry)`` on the meta device (no memory, no init), or None for a network whose
    constructor needs real numbers (torchvision's RegNets copy a computed tensor out: "Cannot copy out of meta
    tensor"): a check made on it is then left to the real build.

    Raises:
        RegistryError, UsageError: as ``build_architecture``.
    """
    # lazy: zoo --help / list / info import this module and must not import torch
    import torch

    try:
        with torch.device("meta"):
            return build_architecture(entry, fc_dropout=fc_dropout)
    except (NotImplementedError, RuntimeError):     # (our own errors are neither)
        return None


def network_shapes(entry: ModelEntry) -> dict[str, tuple[int, ...]] | None:
    """Every tensor name and shape of ``build_architecture(entry)``, built on the meta device once, or None
    when it cannot be built there (``meta_network``). Hand it to ``weights_misfit`` to check several files
    (or one file under several key maps) against a single build.

    Raises:
        RegistryError: the builder names an architecture the installed timm/torchvision lacks.
    """
    model = meta_network(entry)
    return None if model is None else {k: tuple(v.shape) for k, v in model.state_dict().items()}


_BUILD: Any = object()      # weights_misfit's `expected` not given: build the network to know it
_SHOWN = 5                  # names weights_misfit gives of each kind of problem


def weights_misfit(entry: ModelEntry, shapes: Mapping[str, tuple[int, ...]], *,
                   expected: Mapping[str, tuple[int, ...]] | None = _BUILD) -> str:
    """What keeps tensors of these names and shapes from loading into ``build_architecture(entry)`` (built on
    the meta device): "" when they fit, or when the network cannot be built there (``meta_network``: loading
    the file into the real network checks it). Tensors in ``DROPPED_PREFIXES`` (googlenet's aux heads) are
    ignored.

    Args:
        shapes: tensor name -> shape, e.g. from a safetensors header.
        expected: ``network_shapes(entry)`` when already known, None included (not built again).
    Returns:
        e.g. ``"2 missing: fc.weight, fc.bias; 1 shape mismatch: conv1.weight (8, 3, 7, 7) != (24, 3, 7, 7)"``.
    Raises:
        RegistryError: the builder names an architecture the installed timm/torchvision lacks.
    """
    if expected is _BUILD:
        expected = network_shapes(entry)
    if expected is None:
        return ""
    dropped = DROPPED_PREFIXES.get(entry.builder, ())
    got = {k: tuple(v) for k, v in shapes.items() if not (dropped and k.startswith(dropped))}
    # a BatchNorm count absent from the file (saved before PyTorch 0.4) is filled in by the load: not missing
    missing = [k for k in expected if k not in got and not k.endswith(".num_batches_tracked")]
    unexpected = [k for k in got if k not in expected]
    wrong = [f"{k} {got[k]} != {expected[k]}" for k in expected if k in got and got[k] != expected[k]]
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", wrong)):
        if items:
            more = f" (+{len(items) - _SHOWN} more)" if len(items) > _SHOWN else ""
            parts.append(f"{len(items)} {label}: {', '.join(items[:_SHOWN])}{more}")
    return "; ".join(parts)


def check_fit(entry: ModelEntry, path: Path, *, where: str, pinned: bool) -> None:
    """Refuse a safetensors file (a pull's, before it is cached) whose tensors do not fit the entry's
    architecture: its digest may match the pin, but the pin is then of another model's file.

    It imports torch and timm (or torchvision) on the download path: ~2.4 s of the 2.9 s `zoo pull` of a local
    1.8 MB file on a 2-core CPU (helper-63). Kept: the names and shapes to compare come only from the
    architecture's own code (a build on the meta device); a check without it (the stage prefixes, the
    classifier's name) would pass a ResNet-101 file pinned under a ResNet-50 entry, found only when training.

    Args:
        where: the source it came from, first in the message.
        pinned: its sha256 matched a pin (else: trusted on first use).
    Raises:
        WeightsError: names or shapes differ (``weights_misfit``), or the file is not safetensors.
    """
    header = check_safetensors(path)
    problem = weights_misfit(entry, {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"})
    if problem:
        fix = "source and its sha256 pin" if pinned else "source"
        raise WeightsError(f"{where}: the file does not fit {entry.name} ({entry.builder}): {problem}; "
                           f"{'its sha256 matches the pin, but ' if pinned else ''}it holds the weights of another "
                           f"architecture; nothing was cached; fix the entry's {fix} (or its builder) in the registry")
