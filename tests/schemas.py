"""The published JSON Schemas in their two forms (policy: schemas/CHANGELOG.md).

The files under ``schemas/`` are **reader** schemas: they accept fields and values of open enumerations
(``x-extensible-enum``) they do not know, so a consumer validating with them survives every v1 addition.
Producers' own tests validate against the **closed** (writer) form built here: every declared object closed
(``additionalProperties: false``) and every open enumeration restricted to its known values, so a producer
cannot start emitting a field or a value before the schema, its examples and the changelog say so.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

SCHEMAS = Path(__file__).resolve().parents[1] / "schemas"


def load(name: str) -> dict[str, Any]:
    """The reader schema ``schemas/<name>`` (e.g. ``transitions.v1.schema.json``)."""
    schema: dict[str, Any] = json.loads((SCHEMAS / name).read_text())
    return schema


def closed(schema: dict[str, Any]) -> dict[str, Any]:
    """The writer form of a reader schema: objects closed, open enumerations restricted to known values."""

    def close(node: Any) -> Any:
        if isinstance(node, dict):
            node = {key: close(value) for key, value in node.items()}
            if "properties" in node:
                node["additionalProperties"] = False
            if "x-extensible-enum" in node:
                node["enum"] = list(node["x-extensible-enum"])
            return node
        if isinstance(node, list):
            return [close(item) for item in node]
        return node

    result: dict[str, Any] = close(copy.deepcopy(schema))
    return result


def reader_validator(name: str) -> Draft202012Validator:
    return Draft202012Validator(load(name))


def writer_validator(name: str) -> Draft202012Validator:
    """For producers' tests: what they publish must match the schema exactly (no undeclared field)."""
    return Draft202012Validator(closed(load(name)))
