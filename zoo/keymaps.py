"""Tensor-name translations for weight files published with another library's module names.

A registry source names its map in ``key_map``; ``KEY_MAPS[name](state_dict)`` returns a new state dict
whose names (and shapes) are those of the timm architecture the entry builds. Pure renaming: no tensor
is modified, so the result is bit-identical to the file's tensors. Imports no torch.
"""
from __future__ import annotations

import re
from typing import Any, Callable, Mapping

from zoo.errors import WeightsError

__all__ = ["KEY_MAPS", "lukemelas_efficientnet", "apply_key_map"]

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


KEY_MAPS: dict[str, Callable[[Mapping[str, Any]], dict[str, Any]]] = {
    "lukemelas_efficientnet": lukemelas_efficientnet,
}


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
