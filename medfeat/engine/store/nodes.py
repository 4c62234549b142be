"""Typed access to the nodes and JSON attributes of a Zarr group.

zarr types ``group[path]`` as ``Array | Group`` and each attribute as any JSON value. The
store knows what each path holds; these accessors narrow once, and a damaged or foreign
store that holds something else gets one line (a StoreError) instead of an AttributeError
somewhere later.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import zarr

from medfeat.errors import StoreError

#: A JSON object as it reads back from attributes.
JSONDict = dict[str, Any]


def array_at(group: zarr.Group, path: str) -> zarr.Array:
    """The array at ``path`` under ``group``."""
    node = group[path]
    if not isinstance(node, zarr.Array):
        raise StoreError(f"{group.store_path}/{path}: a group where the store keeps an array")
    return node


def group_at(group: zarr.Group, path: str) -> zarr.Group:
    """The group at ``path`` under ``group``."""
    node = group[path]
    if not isinstance(node, zarr.Group):
        raise StoreError(f"{group.store_path}/{path}: an array where the store keeps a group")
    return node


def attr_dict(attrs: Mapping[str, object], key: str) -> JSONDict:
    """Attribute ``key``, a JSON object (``{}`` when absent), as a new dict."""
    value = attrs.get(key, {})
    if not isinstance(value, Mapping):
        raise StoreError(f"attribute {key!r} holds {type(value).__name__}, not a JSON object")
    return dict(value)


def attr_list(attrs: Mapping[str, object], key: str) -> list[object]:
    """Attribute ``key``, a JSON list (``[]`` when absent), as a new list."""
    value = attrs.get(key, [])
    if not isinstance(value, (list, tuple)):
        raise StoreError(f"attribute {key!r} holds {type(value).__name__}, not a JSON list")
    return list(value)


def attr_records(attrs: Mapping[str, object], key: str) -> list[JSONDict]:
    """Attribute ``key``, a JSON list of objects (``[]`` when absent), as new dicts."""
    records = []
    for value in attr_list(attrs, key):
        if not isinstance(value, Mapping):
            raise StoreError(f"attribute {key!r} holds {type(value).__name__} among its records")
        records.append(dict(value))
    return records
