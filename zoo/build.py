"""Registry entry -> ``nn.Module``: build the architecture (timm or torchvision), load cached safetensors.

Also the torch-side helpers of the catalogue: deriving stages for ad-hoc timm models and checking that a
stage list covers every parameter exactly once (finetune freezes "all but the last k stages" by it).
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from zoo.errors import RegistryError, WeightsError
from zoo.registry import ModelEntry, get_entry

if TYPE_CHECKING:  # torch stays out of module import: zoo.registry imports this lazily for ad-hoc entries
    import torch
    from torch import nn

__all__ = [
    "build_architecture", "create_model", "load_weights", "data_config", "derive_stages", "check_stages",
    "stage_of", "describe_timm",
]

# torchvision builders need a few flags to match the published weights / to stay cheap:
#  - googlenet: the checkpoint expects transform_input=True (torchvision sets it when weights are given);
#    aux classifiers are training-only (torchvision drops them after loading); init_weights=False skips
#    the slow truncated-normal init that the loaded weights overwrite anyway.
_TV_KWARGS: dict[str, dict[str, Any]] = {
    "googlenet": {"aux_logits": False, "transform_input": True, "init_weights": False},
    "inception_v3": {"aux_logits": False, "transform_input": True, "init_weights": False},
}
# Tensors that published checkpoints carry but the built model deliberately lacks (see above).
_DROPPED_PREFIXES: dict[str, tuple[str, ...]] = {
    "torchvision:googlenet": ("aux1.", "aux2."),
    "torchvision:inception_v3": ("AuxLogits.",),
}


def _resolve(name_or_entry: str | ModelEntry) -> ModelEntry:
    return name_or_entry if isinstance(name_or_entry, ModelEntry) else get_entry(name_or_entry)


def build_architecture(entry: str | ModelEntry, num_classes: int | None = None) -> "nn.Module":
    """The entry's network with random weights (no download). Honours an active ``torch.device`` context,
    so ``with torch.device("meta"): build_architecture(e)`` costs no memory.

    Args:
        entry: a ModelEntry or a name for ``get_entry``.
        num_classes: classifier width; None keeps the entry's (ImageNet: 1000); 0 drops the classifier (timm).

    Raises:
        RegistryError: the builder names an architecture the installed timm/torchvision lacks.
    """
    entry = _resolve(entry)
    n = entry.num_classes if num_classes is None else int(num_classes)
    if entry.library == "timm":
        import timm

        if not timm.is_model(entry.arch):
            raise RegistryError(f"{entry.origin_file}: entry '{entry.name}': field 'builder': timm "
                                f"{timm.__version__} has no architecture '{entry.arch}'; upgrade timm or fix the entry")
        return timm.create_model(entry.arch, pretrained=False, num_classes=n)
    if entry.library == "torchvision":
        import torchvision.models

        fn = getattr(torchvision.models, entry.arch, None)
        if not callable(fn):
            raise RegistryError(f"{entry.origin_file}: entry '{entry.name}': field 'builder': torchvision "
                                f"has no model function '{entry.arch}'; upgrade torchvision or fix the entry")
        return fn(weights=None, num_classes=n, **_TV_KWARGS.get(entry.arch, {}))
    raise RegistryError(f"{entry.origin_file}: entry '{entry.name}': field 'builder': unknown library "
                        f"'{entry.library}'; use timm:<arch> or torchvision:<fn>")


def _pull(entry: ModelEntry) -> Path:
    # Imported here: zoo.sources pulls in huggingface_hub and the cache, not needed to build random models.
    from zoo.sources import pull

    return pull(entry)


def create_model(name: str | ModelEntry, num_classes: int | None = None, pretrained: bool = True) -> "nn.Module":
    """Build model ``name`` and, when ``pretrained``, load its cached weights (pulling them first if needed).

    With ``num_classes`` different from the entry's, the classifier keeps its fresh initialisation and
    every other tensor is loaded strictly (the head is replaced by finetune anyway).

    Raises:
        UnknownModelError, DownloadError/OfflineError (from pull), WeightsError: the file does not fit.
    """
    entry = _resolve(name)
    model = build_architecture(entry, num_classes)
    if pretrained:
        path = _pull(entry)
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"{path}: not a readable safetensors file ({err}); run `zoo pull {entry.name} "
                               "--force` to fetch it again") from None
        skip = num_classes is not None and num_classes != entry.num_classes
        load_weights(model, state, entry, skip_classifier=skip, where=str(path))
    return model


def load_weights(model: "nn.Module", state: dict[str, "torch.Tensor"], entry: ModelEntry, *,
                 skip_classifier: bool = False, where: str = "weights") -> None:
    """Load ``state`` into ``model`` strictly (optionally leaving the classifier alone).

    Raises:
        WeightsError: missing, unexpected or wrongly shaped tensors (the first few are named).
    """
    drop = _DROPPED_PREFIXES.get(entry.builder, ())
    cls = entry.classifier
    state = {k: v for k, v in state.items()
             if not k.startswith(drop) and not (skip_classifier and (k == cls or k.startswith(cls + ".")))}
    own = model.state_dict()
    wrong = [f"{k} {tuple(v.shape)} vs {tuple(own[k].shape)}" for k, v in state.items()
             if k in own and tuple(v.shape) != tuple(own[k].shape)]
    if wrong:
        raise WeightsError(f"{where}: {len(wrong)} tensors have the wrong shape for {entry.name} ({entry.builder}), "
                           f"e.g. {', '.join(wrong[:3])}; run `zoo pull {entry.name} --force` or fix the entry")
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
                           f"run `zoo pull {entry.name} --force` or fix the entry's key_map")


def data_config(entry: str | ModelEntry) -> dict:
    """timm-style data config (input_size, interpolation, crop_pct, crop_mode, mean, std) of the entry."""
    return _resolve(entry).preprocessing.data_config()


# ----------------------------------------------------------------------------------------------- stages
def stage_of(param: str, stages: Iterable[Iterable[str]]) -> list[int]:
    """Indices of the stages holding parameter ``param`` (p is in prefix s when p == s or starts with s + ".")."""
    return [i for i, stage in enumerate(stages)
            if any(param == s or param.startswith(s + ".") for s in stage)]


def check_stages(model: "nn.Module", stages: Iterable[Iterable[str]], classifier: str) -> list[str]:
    """Problems with a stage list for ``model``; empty when every parameter except the classifier's is in
    exactly one stage, the classifier exists and holds parameters, and every prefix matches something."""
    stages = [tuple(s) for s in stages]
    problems = []
    names = [n for n, _ in model.named_parameters()]
    in_cls = [n for n in names if n == classifier or n.startswith(classifier + ".")]
    if not in_cls:
        problems.append(f"classifier '{classifier}' holds no parameters")
    for n in names:
        if n in in_cls:
            continue
        hits = stage_of(n, stages)
        if len(hits) != 1:
            problems.append(f"parameter '{n}' is in {len(hits)} stages" + (f" ({hits})" if hits else ""))
    for i, stage in enumerate(stages):
        for s in stage:
            if not any(n == s or n.startswith(s + ".") for n in names):
                problems.append(f"stage {i} prefix '{s}' matches no parameter")
    return problems


def derive_stages(model: "nn.Module", classifier: str, boundaries: Iterable[str] = ()) -> tuple[tuple[str, ...], ...]:
    """Stages for a model without a curated list: split at ``boundaries`` (timm's ``feature_info``
    modules, input -> output), or at the top-level children when there are none. Parameters after the
    last boundary (e.g. a head norm or conv_head) join the last stage; the classifier is excluded.
    Each stage is written with the shortest prefixes that hold only its own parameters."""
    boundaries = [b for b in boundaries if b]
    if not boundaries:
        boundaries = [n for n, m in model.named_children()
                      if n != classifier and not classifier.startswith(n + ".")
                      and any(True for _ in m.parameters())]
    bset = set(boundaries)
    is_cls = lambda n: n == classifier or n.startswith(classifier + ".")  # noqa: E731
    stage_of_param: dict[str, int] = {}
    stage, open_boundary, closed = 0, None, 0
    for mod_name, module in model.named_modules():  # pre-order == forward order for these networks
        if open_boundary is not None and not (mod_name == open_boundary or mod_name.startswith(open_boundary + ".")):
            # Left the boundary module: the stage ends here (later params go to the next one).
            open_boundary, closed = None, closed + 1
            stage = min(closed, len(boundaries) - 1)
        if mod_name in bset and open_boundary is None:
            open_boundary = mod_name
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mod_name}.{pname}" if mod_name else pname
            if not is_cls(full):
                stage_of_param[full] = stage
    # Shortest prefix whose parameters all sit in the same stage (and which does not contain the classifier).
    owners: dict[str, set[int]] = {}
    for full, s in stage_of_param.items():
        parts = full.split(".")
        for k in range(1, len(parts) + 1):
            owners.setdefault(".".join(parts[:k]), set()).add(s)
    for n, _ in model.named_parameters():
        if is_cls(n):
            parts = n.split(".")
            for k in range(1, len(parts) + 1):
                owners.setdefault(".".join(parts[:k]), set()).add(-1)
    out: list[list[str]] = [[] for _ in range(max(stage_of_param.values(), default=-1) + 1)]
    for full, s in stage_of_param.items():
        parts = full.split(".")
        for k in range(1, len(parts) + 1):
            prefix = ".".join(parts[:k])
            if owners[prefix] == {s}:
                if prefix not in out[s]:
                    out[s].append(prefix)
                break
    return tuple(tuple(s) for s in out if s)


def _module_name(model: "nn.Module", target: "nn.Module") -> str | None:
    for name, module in model.named_modules():
        if module is target and name:
            return name
    return None


def describe_timm(arch: str, num_classes: int, classifier: str | None = None) -> tuple[int, tuple, str]:
    """(params, stages, classifier) of a timm architecture, from a build on the meta device (no memory,
    no init cost). Used for ad-hoc ``timm:``/``hf-hub:`` entries."""
    import timm
    import torch

    with torch.device("meta"):
        model = timm.create_model(arch, pretrained=False, num_classes=num_classes)
    names = {n for n, _ in model.named_modules()}
    if not classifier or classifier not in names:
        try:
            classifier = _module_name(model, model.get_classifier()) or ""
        except Exception:  # a model without timm's classifier interface
            classifier = ""
    if not classifier:
        raise RegistryError(f"timm:{arch}: cannot tell which module is the classifier; add an entry for it to "
                            "your ZOO_REGISTRY file with an explicit 'classifier'")
    boundaries = [f["module"] for f in getattr(model, "feature_info", None) or [] if isinstance(f, dict)]
    stages = derive_stages(model, classifier, boundaries)
    params = sum(p.numel() for p in model.parameters())
    return params, stages, classifier
