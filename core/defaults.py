"""The one source of recipe defaults: the JSON Schemas (the base recipe schema and each component's
options schema). The API dataclasses, the CLI options and code that may see a recipe whose defaults are
not filled read them here instead of repeating the literal. Pure Python: json and the stdlib only."""
from __future__ import annotations

import copy
import dataclasses
import functools
import json
from importlib import resources
from typing import Any


@functools.lru_cache(maxsize=1)
def _base_schema_text() -> str:
    return resources.files("ftk.schemas").joinpath("recipe.schema.json").read_text(encoding="utf-8")


@functools.lru_cache(maxsize=1)
def _shared_base_schema() -> dict:  # read only: schema_default hands out copies
    return json.loads(_base_schema_text())


def base_schema() -> dict:
    """The base recipe schema (a fresh copy: callers may change it)."""
    return json.loads(_base_schema_text())


def schema_node(path: str, schema: dict | None = None) -> dict:
    """The sub-schema at a dotted path of recipe keys (not a copy: read it, do not change it); ``[]``
    steps into a list's items, e.g. ``"training.learning_rate"``, ``"data.datasets[].weight"``.
    ``schema``: the base schema by default, or a component's options schema (then the path starts at
    one of its keys)."""
    node = _shared_base_schema() if schema is None else schema
    for part in path.split("."):
        key, items = (part[:-2], True) if part.endswith("[]") else (part, False)
        try:
            node = node["properties"][key]
            if items:
                node = node["items"]
        except (KeyError, TypeError):
            raise KeyError(f"{path}: no such key in the schema") from None
    return node


def schema_default(path: str, schema: dict | None = None) -> Any:
    """The schema's default for the key at ``path`` (see :func:`schema_node`); a copy, safe to change."""
    node = schema_node(path, schema)
    if "default" not in node:
        raise KeyError(f"{path}: the schema gives no default")
    return copy.deepcopy(node["default"])


def default_field(path: str, schema: dict | None = None) -> Any:
    """A dataclass field whose default is the schema's default for ``path`` (each instance gets its own
    copy of a list or dict default)."""
    value = schema_default(path, schema)
    if isinstance(value, (list, dict)):
        return dataclasses.field(default_factory=functools.partial(copy.deepcopy, value))
    return dataclasses.field(default=value)


def section_defaults(path: str, schema: dict | None = None) -> dict:
    """``{key: default}`` for every key of the object at ``path`` whose schema gives a default."""
    props = schema_node(path, schema).get("properties") or {}
    return {k: copy.deepcopy(sub["default"]) for k, sub in props.items() if "default" in sub}


def section(recipe: dict, key: str) -> dict:
    """The recipe's top-level section ``key`` with the schema's defaults under it: code that may be handed
    a recipe not filled by load_recipe (benchmarks, notebooks) reads its settings through this, so no
    default is written twice."""
    return {**section_defaults(key), **(recipe.get(key) or {})}
