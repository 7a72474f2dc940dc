"""Tensor-name translations for weight files published with another library's module names.

A registry source names its map in ``key_map``; ``KEY_MAPS[name](state_dict)`` returns a new state dict
whose names (and shapes) are those of the timm architecture the entry builds. No value is modified:
names change, and at most a tensor is reshaped (a view: torchvision's VGG Linear layers become timm's
7x7 / 1x1 convolutions), so the result holds the file's numbers bit for bit. Imports no torch.
``IMPORT_KEY_MAPS`` lists, per builder, the maps ``zoo import`` also tries (published checkpoints of
another library for that architecture).
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from zoo.errors import WeightsError

__all__ = ["KEY_MAPS", "IMPORT_KEY_MAPS", "lukemelas_efficientnet", "torchvision_vgg", "apply_key_map",
           "import_key_maps"]

# Blocks per stage of EfficientNet-B0 and the Lite0 variant (depth multiplier 1.0). lukemelas numbers the
# blocks 0..15 across all stages; timm nests them as blocks.<stage>.<index>.
_B0_REPEATS = (1, 2, 2, 3, 3, 4, 1)

_TOP = {
    "_conv_stem": "conv_stem", "_bn0": "bn1", "_conv_head": "conv_head", "_bn1": "bn2", "_fc": "classifier",
}
# A block without an expansion conv is timm's DepthwiseSeparableConv; the others are InvertedResidual.
_DS_BLOCK = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_IR_BLOCK = {"_expand_conv": "conv_pw", "_bn0": "bn1", "_depthwise_conv": "conv_dw", "_bn1": "bn2",
             "_project_conv": "conv_pwl", "_bn2": "bn3",
             "_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
_BLOCK_RE = re.compile(r"^_blocks\.(\d+)\.(\w+)\.(.+)$")


def lukemelas_efficientnet(state_dict: Mapping[str, Any], repeats: tuple[int, ...] = _B0_REPEATS) -> dict[str, Any]:
    """Rename lukemelas EfficientNet-PyTorch keys (``_blocks.3._expand_conv.weight``) to timm's.

    Args:
        state_dict: tensors named as in ``efficientnet_pytorch.EfficientNet`` (B0 / Lite0 depth).
        repeats: blocks per stage; the default fits B0 and Lite0.
    Returns:
        A new dict with timm ``efficientnet_*`` / ``tf_efficientnet_*`` names.
    Raises:
        WeightsError: a key that has no timm counterpart, or a block count that does not fit ``repeats``.
    """
    flat_to_nested: list[tuple[int, int]] = [(s, i) for s, n in enumerate(repeats) for i in range(n)]
    expanded = {int(m.group(1)) for k in state_dict if (m := _BLOCK_RE.match(k)) and m.group(2) == "_expand_conv"}
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        m = _BLOCK_RE.match(key)
        if m:
            flat, module, rest = int(m.group(1)), m.group(2), m.group(3)
            if flat >= len(flat_to_nested):
                raise WeightsError(f"key {key!r}: block {flat} beyond the {len(flat_to_nested)} blocks of this "
                                   "architecture; the file is for a deeper EfficientNet, pick the matching model")
            table = _IR_BLOCK if flat in expanded else _DS_BLOCK
            if module not in table:
                raise WeightsError(f"key {key!r}: unknown block module {module!r} for key map "
                                   "'lukemelas_efficientnet'; check the source's key_map")
            stage, index = flat_to_nested[flat]
            out[f"blocks.{stage}.{index}.{table[module]}.{rest}"] = value
            continue
        head, _, rest = key.partition(".")
        if head not in _TOP:
            raise WeightsError(f"key {key!r} has no timm counterpart under key map 'lukemelas_efficientnet'; "
                               "check the source's key_map")
        out[f"{_TOP[head]}.{rest}"] = value
    return out


# torchvision VGG: classifier.0/3/6 are Linear(512*7*7, 4096), Linear(4096, 4096), Linear(4096, C); timm holds
# the first two as pre_logits.fc1 (7x7 conv) and fc2 (1x1 conv), the last as head.fc (timm's vgg._filter_fn).
_TV_VGG_FC = {"classifier.0": ("pre_logits.fc1", (512, 7, 7)), "classifier.3": ("pre_logits.fc2", None),
              "classifier.6": ("head.fc", ())}


def torchvision_vgg(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """torchvision ``vgg*`` / ``vgg*_bn`` keys and shapes -> timm's: ``features.*`` unchanged, the FC layers as
    convolutions (weights reshaped, values untouched).

    Raises:
        WeightsError: a key that is neither ``features.*`` nor one of the three classifier layers.
    """
    out: dict[str, Any] = {}
    for key, value in state_dict.items():
        if key.startswith("features."):
            out[key] = value
            continue
        module, _, param = key.rpartition(".")
        if module not in _TV_VGG_FC or param not in ("weight", "bias"):
            raise WeightsError(f"key {key!r} is not a torchvision VGG tensor (features.*, classifier.0/3/6); "
                               "check you have the weights of this architecture")
        name, kernel = _TV_VGG_FC[module]
        if param == "weight" and kernel != ():
            # (out, in) -> (out, in / k*k, k, k): fc1 from the flattened 512x7x7 map, fc2 as a 1x1 conv
            shape = kernel if kernel is not None else (value.shape[1], 1, 1)
            value = value.reshape(value.shape[0], *shape)
        out[f"{name}.{param}"] = value
    return out


KEY_MAPS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "lukemelas_efficientnet": lukemelas_efficientnet,
    "torchvision_vgg": torchvision_vgg,
}
# builder prefix -> key maps `zoo import` tries when a file's names do not fit directly
IMPORT_KEY_MAPS: dict[str, tuple[str, ...]] = {
    "timm:vgg": ("torchvision_vgg",),
}


def import_key_maps(builder: str) -> tuple[str, ...]:
    """The key maps ``zoo import`` tries for a builder ("timm:vgg16" -> ("torchvision_vgg",))."""
    return tuple(m for prefix, maps in IMPORT_KEY_MAPS.items() if builder.startswith(prefix) for m in maps)


def apply_key_map(name: str | None, state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``KEY_MAPS[name](state_dict)``, or a plain copy when ``name`` is None.

    Raises:
        WeightsError: ``name`` is not a known key map.
    """
    if name is None:
        return dict(state_dict)
    if name not in KEY_MAPS:
        raise WeightsError(f"unknown key_map {name!r}; known: {', '.join(sorted(KEY_MAPS))}; fix the registry entry")
    return KEY_MAPS[name](state_dict)
