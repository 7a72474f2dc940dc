"""Model surgery: replace the classifier, freeze / unfreeze by stage, BatchNorm statistics policy.

A model is described by its *stages* (lists of module-name prefixes, input -> output, classifier
excluded) and the module name of its classifier (``head``). A parameter named ``p`` belongs to the
stage prefix ``s`` when ``p == s`` or ``p.startswith(s + ".")`` (docs/internals.md).
"""
from __future__ import annotations

import functools
from collections import OrderedDict
from typing import Iterable, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from finetune.core.errors import ConfigError

__all__ = [
    "MLPHead",
    "sync_batchnorm",
    "replace_head",
    "head_in_features",
    "stage_parameters",
    "apply_freeze",
    "set_bn_eval",
    "belongs_to",
]

_ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),
    "leaky_relu": lambda: nn.LeakyReLU(0.01, inplace=True),
    "elu": lambda: nn.ELU(inplace=True),
    "tanh": nn.Tanh,
}


def belongs_to(name: str, prefix: str) -> bool:
    """True when the parameter/module ``name`` lies under the module-name ``prefix``."""
    return name == prefix or name.startswith(prefix + ".")


class MLPHead(nn.Sequential):
    """Linear(in, hidden) -> BatchNorm1d -> activation -> Dropout -> Linear(hidden, C).

    BatchNorm sits after the hidden FC and before the nonlinearity, as the lecture places it. The
    BatchNorm1d is new (no pretrained statistics), so ``set_bn_eval`` never freezes it.

    ``fc1.bias`` stays at zero (``FIXED``: ``apply_freeze`` never trains it): the BatchNorm after it always trains on
    batch statistics and subtracts it again, so its gradient is zero in exact arithmetic, and Adam, which divides
    by the gradient's own scale, turned the float noise into lr-sized steps: the bias (and the running mean, which
    lags it) walked by the summation order, and 1 and 2 processes exported other heads (helper-97). Kept as a
    parameter so that the head's keys are those of earlier runs and bundles.
    """

    FIXED = ("fc1.bias",)

    def __init__(self, in_features: int, num_classes: int, hidden: int = 512, dropout: float = 0.2,
                 activation: str = "relu") -> None:
        super().__init__(OrderedDict([
            ("fc1", nn.Linear(in_features, hidden)),
            ("bn", nn.BatchNorm1d(hidden)),
            ("act", _ACTIVATIONS[activation]()),
            ("drop", nn.Dropout(dropout)),
            ("fc2", nn.Linear(hidden, num_classes)),
        ]))
        self.activation = activation
        self.reset_parameters()

    @property
    def in_features(self) -> int:
        return self.fc1.in_features

    @property
    def out_features(self) -> int:
        return self.fc2.out_features

    def reset_parameters(self) -> None:
        """Init matched to the activation: Kaiming (fan_in) before relu/leaky_relu/elu, Xavier before
        tanh; the output layer is Xavier; biases zero; BatchNorm gamma 1, beta 0."""
        if self.activation == "tanh":
            nn.init.xavier_uniform_(self.fc1.weight)
        elif self.activation == "leaky_relu":
            nn.init.kaiming_normal_(self.fc1.weight, a=0.01, mode="fan_in", nonlinearity="leaky_relu")
        else:
            # torch has no ELU gain; ELU is ReLU-like for positive inputs, so the ReLU gain is the usual choice.
            nn.init.kaiming_normal_(self.fc1.weight, mode="fan_in", nonlinearity="relu")
        nn.init.zeros_(self.fc1.bias)
        self.bn.reset_parameters()
        nn.init.xavier_uniform_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)


def _get_module(model: nn.Module, name: str) -> nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        raise ConfigError(f"the model has no module named {name!r}; pass the classifier's module name "
                          "(e.g. fc, head.fc, classifier.6)") from None


def head_in_features(model: nn.Module, head_name: str) -> int:
    """Number of features entering the classifier ``head_name``.

    Raises:
        ConfigError: the module is missing or is not a Linear/MLP head and the model has no ``num_features``.
    """
    module = _get_module(model, head_name)
    n = getattr(module, "in_features", None)
    if isinstance(n, int) and n > 0:
        return n
    n = getattr(model, "num_features", None)  # timm models built with num_classes=0 have an Identity head
    if isinstance(n, int) and n > 0:
        return n
    raise ConfigError(f"module {head_name!r} is a {type(module).__name__}, not a Linear classifier; "
                      "name the model's final Linear layer as its classifier")


def replace_head(model: nn.Module, head_name: str, num_classes: int, kind: str = "linear", hidden: int = 512,
                 dropout: float = 0.2, activation: str = "relu") -> nn.Module:
    """Replace the classifier ``head_name`` with a new FC-C (or a small MLP) for ``num_classes`` classes.

    The linear head is Xavier-uniform with zero bias; see :class:`MLPHead` for the MLP layout and init.
    The new head is created on the old head's device and dtype, and ``model.num_classes`` is updated
    when the model has one (timm models).

    Args:
        model: the network, modified in place.
        head_name: module name of the classifier, e.g. "fc", "head.fc", "classifier.6".
        num_classes: C, at least 2.
        kind: "linear" or "mlp".
        hidden, dropout, activation: MLP options (ignored for "linear").

    Returns:
        The new head module (already installed in ``model``).

    Raises:
        ConfigError: unknown module name, kind or activation, or invalid sizes.
    """
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes={num_classes}: a classifier needs at least 2 classes")
    if kind not in ("linear", "mlp"):
        raise ConfigError(f"invalid head={kind!r}: choose linear or mlp")
    old = _get_module(model, head_name)
    in_features = head_in_features(model, head_name)
    if kind == "linear":
        new: nn.Module = nn.Linear(in_features, num_classes)
        nn.init.xavier_uniform_(new.weight)
        nn.init.zeros_(new.bias)
    else:
        if activation not in _ACTIVATIONS:
            raise ConfigError(f"invalid mlp_activation={activation!r}: choose one of {', '.join(_ACTIVATIONS)}")
        if int(hidden) < 1:
            raise ConfigError(f"invalid mlp_hidden={hidden}: must be at least 1")
        if not 0.0 <= float(dropout) < 1.0:
            raise ConfigError(f"invalid mlp_dropout={dropout}: use a probability in [0, 1)")
        new = MLPHead(in_features, num_classes, int(hidden), float(dropout), activation)
    ref = next(iter(old.parameters()), None)
    if ref is not None:
        new = new.to(device=ref.device, dtype=ref.dtype)
    parent_name, _, child = head_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)
    if isinstance(getattr(model, "num_classes", None), int):
        model.num_classes = int(num_classes)
    return new


def stage_parameters(model: nn.Module, stages: Sequence[Sequence[str]]) -> list[list[tuple[str, nn.Parameter]]]:
    """Group the model's named parameters by stage.

    Args:
        model: the network.
        stages: module-name prefixes per stage, input -> output.

    Returns:
        One list of ``(name, parameter)`` per stage; a parameter goes to the first stage that claims it.

    Raises:
        ConfigError: a prefix names no module or parameter of the model (a wrong stage list).
    """
    known = {n for n, _ in model.named_modules()} | {n for n, _ in model.named_parameters()}
    for i, stage in enumerate(stages):
        for prefix in stage:
            if prefix not in known:
                raise ConfigError(f"stage {i} names {prefix!r}, which is not a module of this model; "
                                  "fix the model's stage list")
    out: list[list[tuple[str, nn.Parameter]]] = [[] for _ in stages]
    for name, p in model.named_parameters():
        for i, stage in enumerate(stages):
            if any(belongs_to(name, s) for s in stage):
                out[i].append((name, p))
                break
    return out


def apply_freeze(model: nn.Module, stages: Sequence[Sequence[str]], head_name: str, trainable_stages: int) -> None:
    """Make the last ``trainable_stages`` stages and the head trainable; freeze everything else.

    ``0`` trains the head only; ``len(stages)`` trains every parameter, including any that no stage
    lists. With fewer stages, unlisted parameters stay frozen (stage lists start at the input, so an
    unlisted parameter is a pretrained one). BatchNorm affine parameters follow their stage.

    Raises:
        ConfigError: ``trainable_stages`` is negative or larger than the number of stages.
    """
    n = len(stages)
    k = int(trainable_stages)
    if not 0 <= k <= n:
        raise ConfigError(f"cannot train the last {k} stages: this model has {n} stages (use 0 to {n}, "
                          "head or none)")
    _get_module(model, head_name)
    grouped = stage_parameters(model, stages)
    everything = k == n and n > 0  # an empty stage list means "head only", not "everything"
    for p in model.parameters():
        p.requires_grad_(everything)
    if not everything:
        for stage in grouped[n - k:]:
            for _, p in stage:
                p.requires_grad_(True)
    fixed = {f"{head_name}.{name}" for name in getattr(_get_module(model, head_name), "FIXED", ())}
    for name, p in model.named_parameters():
        if belongs_to(name, head_name):
            p.requires_grad_(name not in fixed)      # (an MLP head's bias before its BatchNorm: MLPHead.FIXED)


def _train_stay_eval(module: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``_BatchNorm.train``: the layer keeps using its frozen running statistics."""
    module.training = False
    for child in module.children():
        child.train(mode)
    return module


_FROZEN_FLAG = "_finetune_bn_frozen"
_FOLLOWS_FLAG = "_finetune_bn_follows_stage"


def _stage_trains(module: nn.Module) -> bool:
    """Whether a BatchNorm layer's stage is trained, read from its own affine parameters (which
    ``apply_freeze`` sets with the stage). An affine-free layer has none to read: it counts as trained."""
    params = list(module.parameters(recurse=False))
    return not params or any(p.requires_grad for p in params)


def _train_if_stage_trains(module: nn.Module, mode: bool = True) -> nn.Module:
    """Replacement for ``_BatchNorm.train`` under ``bn="train"``: the running statistics update only while
    the layer's stage trains. Asked at every ``model.train()``, so it follows each phase's ``apply_freeze``
    (head phase: every backbone layer keeps its statistics; after unfreezing: the trained stages update)."""
    module.training = bool(mode) and _stage_trains(module)
    for child in module.children():
        child.train(mode)
    return module


def set_bn_eval(model: nn.Module, mode: str = "eval", exclude: Iterable[str] = ()) -> None:
    """Apply the BatchNorm statistics policy.

    ``mode="eval"`` (the default recipe): every BatchNorm layer switches to eval mode and *stays* there
    when ``model.train()`` is called later, so the pretrained running mean/var are used and never
    updated. ``mode="train"``: under ``model.train()`` a layer updates its running statistics only when
    its stage is trained (its affine parameters require grad, as ``apply_freeze`` leaves them); the
    layers of frozen stages keep theirs, exactly as under "eval". Both work by shadowing the layer's
    ``train`` method with an instance attribute (a ``functools.partial`` of a module-level function):
    ``nn.Module.train`` recurses through ``child.train(mode)``, so every caller (DDP, torch.compile's
    wrapper, user code) sees it; state dicts are unchanged and the model still pickles and deep-copies.

    Layers inside an :class:`MLPHead` or under an ``exclude`` prefix (the new head) are left alone:
    they have no pretrained statistics to keep.

    Raises:
        ConfigError: ``mode`` is not "eval" or "train".
    """
    if mode not in ("eval", "train"):
        raise ConfigError(f"invalid bn={mode!r}: choose eval or train")
    exclude = tuple(exclude)
    skip: set[int] = set()
    for name, m in model.named_modules():
        if isinstance(m, MLPHead) or any(belongs_to(name, e) for e in exclude if e):
            skip.update(id(x) for x in m.modules())
    flag, other, replacement = ((_FROZEN_FLAG, _FOLLOWS_FLAG, _train_stay_eval) if mode == "eval"
                                else (_FOLLOWS_FLAG, _FROZEN_FLAG, _train_if_stage_trains))
    for m in model.modules():
        if not isinstance(m, _BatchNorm) or id(m) in skip:
            continue
        m.__dict__.pop(other, None)
        m.train = functools.partial(replacement, m)  # type: ignore[method-assign]
        setattr(m, flag, True)
        m.train(model.training)


def sync_batchnorm(model: nn.Module, mode: str, exclude: Iterable[str] = ()) -> int:
    """Make the model's BatchNorm layers SyncBatchNorm (``--sync-bn``): under torchrun their training
    statistics come from the whole global batch. timm's converter keeps timm's BatchNorm + activation layers
    whole (torch's would drop the activation); the parameters and buffers are the same tensors, so state
    dicts, the optimizer's parameters and the freeze are unchanged, and :func:`set_bn_eval`'s ``mode`` is
    applied to the new layers. Layers under an ``exclude`` prefix (the new head, trained the same on every
    rank from cached features) stay as they are. Returns the number of layers converted.

    Raises:
        ConfigError: a BatchNorm subclass that neither converter knows (its own forward would be lost).
    """
    from timm.layers import BatchNormAct2d, convert_sync_batchnorm   # lazy: timm only for --sync-bn

    exclude = tuple(e for e in exclude if e)
    known = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, BatchNormAct2d)
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, _BatchNorm) and name
               and not any(belongs_to(name, e) for e in exclude)]
    odd = sorted({type(m).__name__ for _, m in targets if type(m) not in known})
    if odd:
        raise ConfigError(f"--sync-bn cannot convert this model's {', '.join(odd)} layers; leave --sync-bn out")
    for name, m in targets:
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, convert_sync_batchnorm(m))
    set_bn_eval(model, mode, exclude=exclude)
    return len(targets)

