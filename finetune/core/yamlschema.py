"""What plain YAML text means in the files zoo reads (``finetune.core.io.load_yaml``: a ``--config`` file, a run's
config.yaml, a registry file): PyYAML's safe loader, its plain scalars read by a narrower rule than YAML 1.1's,
so a value means what the same text typed after a flag means.

PyYAML implements YAML 1.1, which reads ``1:0:3`` as 3603 (base 60), ``010`` as 8 (octal), ``0x10`` as 16,
``1_000`` as 1000, ``yes``/``no``/``on``/``off`` as true/false and ``2024-01-01`` as a date: a sweep grid
``lr: 1:0:3``, an ``out: 10:30`` or ``model: 010`` changed meaning without a word. Here only ``true``/``false``,
``null``/``~``/nothing, decimal integers (no leading zero, no ``_``), decimal floats (with a dot, PyYAML's rule:
``1e-3`` is text, which a number option reads as the flag does) and ``.inf``/``.nan`` are resolved; any other
plain text is text, read by the option's own parser (``010`` and ``1_000`` are 10 and 1000 there, as typed).
Every file zoo writes (``yaml.safe_dump``, YAML 1.1's resolver) reads back the same: the dumper quotes each
string its own resolver would read as another type, and this resolver reads a subset of those.
No torch."""
from __future__ import annotations

import re
from typing import Any

import yaml

__all__ = ["Loader", "UniqueKeysLoader"]

_Base = getattr(yaml, "CSafeLoader", yaml.SafeLoader)    # libyaml's parser when PyYAML has it; resolver in Python

# (tag, pattern, first characters): YAML 1.1's resolvers of PyYAML's Resolver, less sexagesimal, octal, hex,
# binary, ``_`` in numbers, yes/no/on/off, timestamps and ``=`` (a "value" tag the safe loader cannot construct)
_RESOLVERS = (
    ("tag:yaml.org,2002:bool", r"^(?:true|True|TRUE|false|False|FALSE)$", "tTfF"),
    ("tag:yaml.org,2002:int", r"^[-+]?(?:0|[1-9][0-9]*)$", "-+0123456789"),
    ("tag:yaml.org,2002:float", r"^(?:[-+]?[0-9]+\.[0-9]*(?:[eE][-+][0-9]+)?|\.[0-9]+(?:[eE][-+][0-9]+)?"
                                r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$", "-+0123456789."),
    ("tag:yaml.org,2002:null", r"^(?:~|null|Null|NULL|)$", ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:merge", r"^(?:<<)$", "<"),
)


class Loader(_Base):      # type: ignore[misc, valid-type]
    """The safe loader with the plain scalars of the module's rule."""

    yaml_implicit_resolvers: dict[Any, Any] = {}


for _tag, _pattern, _first in _RESOLVERS:
    Loader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


class UniqueKeysLoader(Loader):
    """:class:`Loader`, refusing a key written twice in one mapping: PyYAML keeps the last without a word,
    so `lr: 0.01` and a forgotten `lr: 0.5` further down trained at 0.5 (QA). Merge keys (``<<: *base``)
    may still be overridden, as YAML means them to be."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node)
            line = key_node.start_mark.line + 1
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"{key_node.value} is given twice (lines {seen[key]} and {line}), and only the "
                    "last would count: keep one", key_node.start_mark)
            seen[key] = line
        return super().construct_mapping(node, deep=deep)
