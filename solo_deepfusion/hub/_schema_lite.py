"""A small JSON-Schema subset validator, used when ``jsonschema`` is not installed.

It understands the keywords in :data:`SUPPORTED` (all that ``zoo/manifest.schema.json`` uses) and
raises ``NotImplementedError`` on any other, so the schema cannot silently outgrow it.

>>> list(iter_errors({"type": "object", "required": ["a"]}, {}))
[((), "'a' is a required property", 'required', 'a')]
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping
from typing import Any

SUPPORTED = frozenset(
    {
        "$schema", "$defs", "$ref", "title", "description", "type", "required", "properties",
        "additionalProperties", "items", "minItems", "enum", "const", "pattern", "minLength",
        "maxLength", "minimum", "exclusiveMinimum",
    }
)  # fmt: skip

Error = tuple[tuple[Any, ...], str, str, Any]  # (path, message, keyword, detail)

_TYPES: dict[str, Any] = {
    "object": lambda v: isinstance(v, Mapping),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
}


def _resolve(root: Mapping[str, Any], ref: str) -> Mapping[str, Any]:
    if not ref.startswith("#/"):
        raise NotImplementedError(f"only local $ref are supported: {ref!r}")
    node: Any = root
    for key in ref[2:].split("/"):
        node = node[key]
    return node


def iter_errors(
    schema: Mapping[str, Any],
    instance: Any,
    path: tuple[Any, ...] = (),
    root: Mapping[str, Any] | None = None,
) -> Iterator[Error]:
    """Yield ``(path, message, keyword, detail)`` for each violation of ``schema``."""
    root = schema if root is None else root
    unknown = set(schema) - SUPPORTED
    if unknown:
        raise NotImplementedError(f"schema keywords not supported here: {sorted(unknown)}")
    if "$ref" in schema:
        yield from iter_errors(_resolve(root, schema["$ref"]), instance, path, root)
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](instance) for t in types):
            yield (
                path,
                f"{instance!r} is not of type {' or '.join(map(repr, types))}",
                "type",
                instance,
            )
            return
    if "const" in schema and instance != schema["const"]:
        yield path, f"{schema['const']!r} was expected", "const", None
    if "enum" in schema and instance not in schema["enum"]:
        yield path, f"{instance!r} is not one of {schema['enum']!r}", "enum", None
    if isinstance(instance, str):
        if "minLength" in schema and len(instance) < schema["minLength"]:
            yield path, f"{instance!r} is too short", "minLength", None
        if "maxLength" in schema and len(instance) > schema["maxLength"]:
            yield path, f"{instance!r} is too long", "maxLength", None
        if "pattern" in schema and not re.search(schema["pattern"], instance):
            yield path, f"{instance!r} does not match {schema['pattern']!r}", "pattern", None
    if _TYPES["number"](instance):
        if "minimum" in schema and instance < schema["minimum"]:
            yield (
                path,
                f"{instance!r} is less than the minimum of {schema['minimum']!r}",
                "minimum",
                None,
            )
        lo = schema.get("exclusiveMinimum")
        if lo is not None and instance <= lo:
            yield path, f"{instance!r} is less than or equal to {lo!r}", "exclusiveMinimum", None
    if isinstance(instance, list):
        if "minItems" in schema and len(instance) < schema["minItems"]:
            yield (
                path,
                f"{instance!r} should have at least {schema['minItems']} item(s)",
                "minItems",
                None,
            )
        if "items" in schema:
            for i, item in enumerate(instance):
                yield from iter_errors(schema["items"], item, (*path, i), root)
    if isinstance(instance, Mapping):
        for key in schema.get("required", []):
            if key not in instance:
                yield path, f"{key!r} is a required property", "required", key
        props = schema.get("properties", {})
        for key, value in instance.items():
            if key in props:
                yield from iter_errors(props[key], value, (*path, key), root)
                continue
            extra = schema.get("additionalProperties", True)
            if extra is False:
                yield (
                    path,
                    f"additional property {key!r} is not allowed",
                    "additionalProperties",
                    key,
                )
            elif isinstance(extra, Mapping):
                yield from iter_errors(extra, value, (*path, key), root)
