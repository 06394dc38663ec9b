"""D4: the schemas' compatibility policy (schemas/CHANGELOG.md) holds.

Each check fails on a change the policy forbids within a major version: a field made required, removed or
narrowed (an example of an earlier release stops validating), an enumeration value removed (no example uses
it any more), a reader schema that closes an object, an epoch-millisecond field without its int64 hint.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from jsonschema import Draft202012Validator

from tests.schemas import SCHEMAS, closed, load

NAMES = sorted(path.name for path in SCHEMAS.glob("*.v*.schema.json"))
EXAMPLES = SCHEMAS / "examples"
INT64_FIELDS = {
    "time",
    "received_at",
    "answered_at",
    "at",
    "epoch",
    "emitted_at",
    "last_seen",
    "since",
    "seq",
}


def _major(name: str) -> int:
    match = re.fullmatch(r"(\w+)\.v(\d+)\.schema\.json", name)
    assert match, f"{name}: schema files are named <topic role>.v<major>.schema.json"
    return int(match.group(2))


def _release(text: str) -> tuple[int, int]:
    major, minor = text.split(".")
    return int(major), int(minor)


def _examples(name: str) -> list[tuple[str, Path]]:
    """(release, file) of every example of the schema's major version, all releases."""
    stem = name.split(".")[0]
    major = _major(name)
    found: list[tuple[str, Path]] = []
    for release_dir in sorted((EXAMPLES / stem).iterdir()):
        if _release(release_dir.name)[0] == major:
            found.extend((release_dir.name, path) for path in sorted(release_dir.glob("*.json")))
    return found


def _walk(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _walk(value, f"{path}/{index}")


@pytest.mark.parametrize("name", NAMES)
def test_every_example_of_every_release_stays_valid_under_the_reader_and_writer_schemas(name: str) -> None:
    examples = _examples(name)
    assert examples, f"{name} has no examples under schemas/examples/"
    schema = load(name)
    Draft202012Validator.check_schema(schema)
    current = _release(schema["x-schema-version"])
    reader = Draft202012Validator(schema)
    writer = Draft202012Validator(closed(schema))
    for release, path in examples:
        assert _release(release) <= current, (
            f"{path}: examples of a release newer than the schema's {current}"
        )
        message = json.loads(path.read_text())
        errors = [e.message for e in reader.iter_errors(message)]
        assert not errors, f"{path} ({release}) is no longer valid under {name}: {errors}"
        errors = [e.message for e in writer.iter_errors(message)]
        assert not errors, f"{path} ({release}) does not match the closed form of {name} (removed?): {errors}"


@pytest.mark.parametrize("name", NAMES)
def test_every_enumeration_value_is_used_by_an_example(name: str) -> None:
    """So removing a value (a breaking change) makes an example invalid instead of passing unnoticed."""
    schema = load(name)
    messages = [json.loads(path.read_text()) for _, path in _examples(name)]
    text = json.dumps(messages)
    for path, node in _walk(schema):
        for keyword in ("enum", "x-extensible-enum"):
            for value in node.get(keyword, ()):
                assert json.dumps(value) in text, f"{name}{path}: no example uses {keyword} value {value!r}"


@pytest.mark.parametrize("name", NAMES)
def test_reader_schemas_accept_unknown_fields_and_open_enum_values(name: str) -> None:
    schema = load(name)
    for path, node in _walk(schema):
        assert node.get("additionalProperties") is not False, f"{name}{path} closes an object for readers"
        if "x-extensible-enum" in node:
            assert "enum" not in node, f"{name}{path}: an open enumeration must not also be closed"
    reader = Draft202012Validator(schema)
    writer = Draft202012Validator(closed(schema))
    message = json.loads(_examples(name)[0][1].read_text())
    message["added_in_a_later_release"] = {"anything": [1, 2]}
    assert reader.is_valid(message), f"{name}: a reader must accept a field it does not know"
    assert not writer.is_valid(message), f"{name}: the closed form must refuse an undeclared field"


def test_an_unknown_cause_event_is_accepted_by_readers_only() -> None:
    schema = load("transitions.v1.schema.json")
    message = json.loads((EXAMPLES / "transitions" / "1.0" / "offline.json").read_text())
    message["cause"]["event"] = "added_in_a_later_release"
    assert Draft202012Validator(schema).is_valid(message)
    assert not Draft202012Validator(closed(schema)).is_valid(message)


@pytest.mark.parametrize("name", NAMES)
def test_epoch_millisecond_integers_carry_the_int64_hint(name: str) -> None:
    for path, node in _walk(load(name)):
        field = path.rsplit("/", 1)[-1]
        if path.split("/")[-2:-1] == ["properties"] and field in INT64_FIELDS:
            assert node.get("type") == "integer", f"{name}{path}"
            assert node.get("format") == "int64", f"{name}{path}: epoch-ms integers need format int64"
            assert node.get("existingJavaType") == "java.lang.Long", f"{name}{path}"


def test_the_changelog_names_every_release() -> None:
    changelog = (SCHEMAS / "CHANGELOG.md").read_text()
    releases = {load(name)["x-schema-version"] for name in NAMES}
    releases |= {path.name for path in EXAMPLES.glob("*/*")}
    for release in releases:
        assert f"### {release} " in changelog, f"schemas/CHANGELOG.md has no entry for release {release}"
