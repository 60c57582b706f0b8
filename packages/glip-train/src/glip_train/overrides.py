"""The one grammar of ``key=value`` overrides: ``glip train CONFIG optim.lr=1e-4`` and ``glip eval --set
fixed_ap=true`` read a value the same way.

Values are YAML-like:

==========================================  =======================================================
text                                        value
==========================================  =======================================================
``none``, ``null``, ``~`` (any case)        ``None``
``true``, ``false`` (any case)              ``True``, ``False``
``12``, ``-3``                              ``int``
``0.5``, ``1e-4``, ``.5``, ``2.``           ``float``
``'text'``, ``"text"``                      the string inside the quotes (``"none"`` stays a string)
``[a, 1, none]``, ``{k: v}``                a list / mapping of such values
anything else (``cuda:0``, ``a b``)         the text as written
==========================================  =======================================================

Where the value goes into a typed field (a dataclass field of a config or a protocol), :func:`parse_for` applies the
field's type: a ``str`` field takes the text as written (``amp=none`` is the string ``"none"``; an optional string
field reads ``none`` as ``None``), a ``float`` field an ``int`` as a float, a ``tuple`` field a list as a tuple. What
the type cannot take is left as parsed, for the config's own validation to reject with its field name.
"""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from typing import Any, Union

from glip_data.validators import NONE_WORDS

__all__ = ["OverrideError", "apply_overrides", "field_type", "parse_for", "parse_value", "split_assignment"]

_INT = re.compile(r"[+-]?\d+")
_FLOAT = re.compile(r"[+-]?(\d+\.\d*|\.\d+|\d+)([eE][+-]?\d+)?")


class OverrideError(ValueError):
    """A ``key=value`` override that cannot be read or applied (the message quotes it)."""


def _scalar(text: str) -> Any:
    """An unquoted scalar by the table of the module doc."""
    low = text.lower()
    if low in NONE_WORDS:
        return None
    if low in ("true", "false"):
        return low == "true"
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


def _node_value(node: Any) -> Any:
    import yaml

    if isinstance(node, yaml.ScalarNode):
        return node.value if node.style else _scalar(node.value)  # a quoted scalar is always a string
    if isinstance(node, yaml.SequenceNode):
        return [_node_value(n) for n in node.value]
    return {str(_node_value(k)): _node_value(v) for k, v in node.value}


def parse_value(text: str) -> Any:
    """The value of an override's text (see the module doc)."""
    text = text.strip()
    if text[:1] in ("[", "{", "'", '"'):
        import yaml

        try:
            node = yaml.compose(text)
        except yaml.YAMLError:
            return text
        if node is not None:
            return _node_value(node)
    return _scalar(text)


def _unquoted(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in ("'", '"'):
        value = parse_value(text)
        return value if isinstance(value, str) else text
    return text


def parse_for(annotation: Any, text: str) -> Any:
    """The value of ``text`` for a field annotated ``annotation`` (``Any``: no type; see the module doc)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is Union:
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and text.strip().lower() in NONE_WORDS:
            return None
        return parse_for(inner[0], text) if len(inner) == 1 else parse_value(text)
    if annotation is str:
        return _unquoted(text)
    return _coerce(annotation, parse_value(text))


def _coerce(annotation: Any, value: Any) -> Any:
    """Convert a parsed value where the type says how (int -> float, list -> tuple); else leave it."""
    origin = typing.get_origin(annotation)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if origin is tuple and isinstance(value, list):
        args = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return tuple(_coerce(args[0], v) for v in value) if len(args) == 1 else tuple(value)
    if annotation is str and value is not None and not isinstance(value, (str, list, dict)):
        return json.dumps(value)
    return value


def split_assignment(item: str, option: str = "override") -> tuple[str, str]:
    """``"key=value"`` -> ``("key", "value")``; ``option`` names the source in the error (e.g. ``"--set"``).

    Raises:
        OverrideError: no ``=``, an empty key, or an empty value (``key=none`` is "no value", ``key=''`` an empty
            string).
    """
    key, sep, text = item.partition("=")
    key = key.strip()
    if not sep or not key:
        raise OverrideError(f"{option} {item!r} is not of the form key=value (e.g. optim.lr=1e-5)")
    if not text.strip():
        raise OverrideError(f"{option} {item!r} has no value: write {key}=none for no value or {key}='' for an "
                            "empty string")
    return key, text


def field_type(schema: Any, parts: list[str]) -> Any:
    """The annotation of the dotted field ``parts`` inside the dataclass ``schema`` (``Any`` where it is not typed:
    a dict field, an unknown key -- which the config then rejects by name)."""
    hint = schema
    for part in parts:
        origin = typing.get_origin(hint)
        if origin is Union:
            inner = [a for a in typing.get_args(hint) if a is not type(None)]
            hint = inner[0] if len(inner) == 1 else Any
            origin = typing.get_origin(hint)
        if dataclasses.is_dataclass(hint):
            hint = typing.get_type_hints(hint).get(part, Any)
        elif origin is tuple and part.isdigit():
            hint = typing.get_args(hint)[0]
        else:
            return Any
    return hint


def apply_overrides(data: dict[str, Any], overrides: list[str], schema: Any = None) -> dict[str, Any]:
    """Apply dotted ``key=value`` overrides to plain config data (a deep copy is returned); list items are indexed by
    number (``data.train.0.weight=2``). ``schema``: the config's dataclass, whose field types :func:`parse_for`
    applies.

    Raises:
        OverrideError: a malformed override, an index out of range, or a value where a section is expected.
    """
    data = json.loads(json.dumps(data))  # a deep copy of plain data
    for item in overrides:
        key, text = split_assignment(item)
        parts = key.split(".")
        if not all(parts):
            raise OverrideError(f"override {item!r}: empty key part")
        node: Any = data
        for depth, part in enumerate(parts):
            where = ".".join(parts[: depth + 1])
            last = depth == len(parts) - 1
            if isinstance(node, list):
                if not part.isdigit() or int(part) >= len(node):
                    raise OverrideError(f"override {item!r}: {where} is not an index of a list of {len(node)}")
                part = int(part)
            elif not last and (part not in node or node[part] is None):
                node[part] = {}
            if last:
                node[part] = parse_for(field_type(schema, parts), text) if schema is not None else parse_value(text)
            else:
                node = node[part]
                if not isinstance(node, (dict, list)):
                    raise OverrideError(f"override {item!r}: {where} is a value, not a section")
    return data
