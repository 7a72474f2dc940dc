"""config.json of a bundle agrees with its weights' header: plain timm reads the one, zoo the other, so a
hand-edited config.json would make them name the classes, build the model or prepare images differently."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from zoo.errors import BundleError

__all__ = ["check_config", "class_count", "DATA_KEYS", "WEIGHTS"]

WEIGHTS = "model.safetensors"
DATA_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
# what to do about a config.json that disagrees with its weights, whoever wrote the bundle (a run, the Hub)
_FIX = "restore the file as it was written (re-export with `zoo export RUN_DIR`, or pull or download the bundle again)"


def class_count(value: Any, where: Path) -> int:
    """A ``num_classes`` read from a bundle file: a whole number (3 or 3.0), else BundleError (text, null,
    a list, 3.7)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    raise BundleError(f"{where}: num_classes is {json.dumps(value)}, not a number of classes; {_FIX}")


def _same_value(a: Any, b: Any) -> bool:
    """JSON values equal, numbers as numbers (``1`` is ``1.0``) and a list as a tuple."""
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(map(_same_value, a, b))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (a, b))
    return float(a) == float(b) if numeric else type(a) is type(b) and a == b


def _timm_name(builder_arch: str) -> str:
    """The name timm writes as config.json's ``architecture`` for a model built as ``builder_arch``: without a
    tag (``test_resnet.r160_in1k`` -> ``test_resnet``) and, for a deprecated name, its current one
    (``gluon_resnet18_v1b`` -> ``resnet18``): the model's own ``pretrained_cfg``, not the name it was made with."""
    name = builder_arch.split(".", 1)[0]
    try:
        # lazy: only for names that differ; reading a bundle's metadata (zoo push, zoo list --mine) imports no torch
        from timm.models import get_deprecated_models
    except ImportError:         # (timm missing, or too old to map names: the tag rule alone)
        return name
    current = get_deprecated_models().get(name)
    return current.split(".", 1)[0] if isinstance(current, str) else name


def _same_architecture(held: Any, recorded: Any) -> bool:
    """config.json's ``architecture`` names what the header's builds: the same name, or timm's for it."""
    return _same_value(held, recorded) or isinstance(held, str) and isinstance(recorded, str) \
        and held == _timm_name(recorded)


def check_config(config: dict[str, Any], labels: list[str] | None, num_classes: int, path: Path,
                 meta: dict[str, Any] | None = None) -> None:
    """config.json (at ``path``) agrees with the weights' metadata: ``zoo``, ``model_args`` and ``pretrained_cfg``
    are objects, ``num_classes`` and ``label_names`` are those of the weights, and so is the preprocessing in
    ``pretrained_cfg`` (``meta``: the weights' header). Plain timm names the classes and preprocesses the
    images from config.json, zoo from the weights' header: a hand-edited config.json would make them disagree.
    ``labels`` None (weights without zoo's metadata): the types only.

    Raises:
        BundleError: the first field that does not fit, and what to do.
    """
    for key in ("zoo", "model_args", "pretrained_cfg"):
        if key in config and not isinstance(config[key], dict):
            raise BundleError(f"{path}: {key!r} is {json.dumps(config[key])[:40]}, not a JSON object; {_FIX}")
    if labels is None:
        return
    if class_count(config.get("num_classes", num_classes), path) != num_classes:
        raise BundleError(f"{path}: num_classes {config.get('num_classes')} differs from the {num_classes} classes of "
                          f"{WEIGHTS}; {_FIX}")
    names = config.get("label_names")
    if names is not None and (not isinstance(names, list) or [str(x) for x in names] != labels):
        shown = ", ".join(map(str, names[:4])) if isinstance(names, list) else json.dumps(names)[:40]
        raise BundleError(f"{path}: label_names ({shown}...) differ from the classes of {WEIGHTS} "
                          f"({', '.join(labels[:4])}...), so plain timm and zoo would name the classes differently; "
                          f"{_FIX} (class names come from the run's folders)")
    # (a zero std or another architecture in config.json: what timm would build and feed, not zoo: QA)
    fields = [("architecture", config, "architecture")] + [
        (f"pretrained_cfg.{k}", config.get("pretrained_cfg") or {}, k) for k in DATA_KEYS]
    for name, held, key in fields if meta else ():
        same = _same_architecture if key == "architecture" else _same_value
        if key in held and key in meta and not same(held[key], meta[key]):
            raise BundleError(f"{path}: {name} {json.dumps(held[key])[:40]} differs from the "
                              f"{json.dumps(meta[key])[:40]} recorded in {WEIGHTS}, so plain timm would build or "
                              f"feed the model otherwise than zoo; {_FIX}")
