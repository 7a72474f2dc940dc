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

The files that hold option values (a ``--config`` file, a run's config.yaml, a registry: ``load_yaml(...,
as_text=True)``, :class:`TextLoader`) go one step further: only null (``null``/``~``/nothing) is resolved, every
other plain scalar stays its text as written, and each option reads that text by its kind, with the one reader
of that kind: :func:`as_int` (Python's ``int()``, click's INT: ``25_557_032``, ``010`` is 10), :func:`as_float`,
:func:`as_bool` (the words zoo's boolean flags take: click's BOOL) and, for a text option, the text itself
(``out: 1.50`` is the folder ``1.50``, not YAML's float 1.5 written back as ``1.5``). null is "not set" where the
option may be left unset (the caller decides; ``None`` here). No torch."""
from __future__ import annotations

import numbers
import re
from typing import Any

import yaml

__all__ = ["Loader", "UniqueKeysLoader", "TextLoader", "as_int", "as_float", "as_bool"]

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
_TEXT_TAGS = ("tag:yaml.org,2002:null", "tag:yaml.org,2002:merge")     # what TextLoader still resolves
_FLOAT = re.compile(_RESOLVERS[2][1])


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


class TextLoader(UniqueKeysLoader):
    """:class:`UniqueKeysLoader` for the files that hold option values: null resolved, every other plain scalar
    its text as written, for the option to read by its kind (the module's readers)."""

    yaml_implicit_resolvers: dict[Any, Any] = {}


for _tag, _pattern, _first in _RESOLVERS:
    if _tag in _TEXT_TAGS:
        TextLoader.add_implicit_resolver(_tag, re.compile(_pattern), list(_first))


def as_int(value: Any) -> int:
    """A whole number from a file's text: what Python's ``int()`` reads (click's INT, so what the flag typed takes:
    ``25_557_032``, ``010`` is 10, no octal or hex), or a YAML float with a dot that is whole (``20.0``, ``1.0e+3``:
    YAML 1.1 read those as numbers, and the config's whole numbers took them); an integer or a whole number of any
    type (a Python caller's ``numpy.int64``, ``numpy.float32(3.0)``) as a Python int.
    Raises ValueError for anything else (``1e3``, ``2.5``, ``true``, a list)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        return int(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer():
        return int(value)
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            if _FLOAT.match(value) and (number := as_float(value)).is_integer():
                return int(number)
    raise ValueError("not a whole number")     # (no repr: a list of aliases can be billions of items)


def as_float(value: Any) -> float:
    """A number from a file's text: YAML's spellings (``.inf``, ``-.Inf``, ``.nan``, ``1.5e+3``, as yaml.safe_dump
    writes them), else what Python's ``float()`` reads (click's FLOAT: ``1e-3``, ``1_000.5``, ``inf``); a number of
    any type (a Python caller's ``numpy.float32``) as a Python float. Raises ValueError for anything else
    (true/false, text, a list)."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value)
    if isinstance(value, str):
        if _FLOAT.match(value) and value.lstrip("+-").lower() in (".inf", ".nan"):   # (Python's float() has no dot)
            return float(value.replace(".", "", 1))
        return float(value)
    raise ValueError("not a number")


def as_bool(value: Any) -> bool:
    """On or off from a file's text: the words zoo's boolean flags take (click's BOOL, the one table: true/false,
    yes/no, on/off, y/n, t/f, 1/0, any case); a bool as given. Raises ValueError for anything else (empty text,
    a number, null)."""
    if isinstance(value, bool):
        return value
    import click  # lazy: click's table only; finetune's readers need not load click (30 ms)

    if not isinstance(value, str) or not value.strip():
        raise ValueError("not true or false")
    try:        # (click.BOOL's own conversion: BoolParamType.str_to_bool is click 8.3's, pyproject takes 8.2)
        return bool(click.BOOL.convert(value, None, None))
    except click.BadParameter:
        raise ValueError("not true or false") from None
