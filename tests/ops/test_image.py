"""The product image's inputs, checked offline without building it: requirements.lock pins exactly what
pyproject.toml asks for (every dependency, nothing else, each with hashes), and the Dockerfile installs from it,
copies every package, pins its base by digest, runs as its UID build argument and carries OCI labels.

Building and running the image is scripts/container-check (minutes, needs podman or docker; docs/operations.md)."""

from __future__ import annotations

import fnmatch
import importlib.metadata
import re
import subprocess
import tomllib
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

pytestmark = pytest.mark.ops

ROOT = Path(__file__).resolve().parents[2]
LOCK = ROOT / "requirements.lock"
DOCKERFILE = ROOT / "Dockerfile"
REGENERATE = "run scripts/lock and commit requirements.lock"

# Where the image runs: CPython 3.11 on Linux (markers are evaluated for it, not for the machine running the test).
IMAGE_ENVIRONMENT: dict[str, str] = {
    "implementation_name": "cpython",
    "implementation_version": "3.11.16",
    "platform_python_implementation": "CPython",
    "python_version": "3.11",
    "python_full_version": "3.11.16",
    "os_name": "posix",
    "sys_platform": "linux",
    "platform_system": "Linux",
    "platform_machine": "x86_64",
    "platform_release": "",
    "platform_version": "",
}


@dataclass
class Locked:
    version: str
    hashes: list[str] = field(default_factory=list)
    options: list[str] = field(default_factory=list)


def pyproject() -> dict[str, Any]:
    with (ROOT / "pyproject.toml").open("rb") as f:
        return tomllib.load(f)


def parse_lock(text: str) -> dict[str, Locked]:
    """requirements.lock as {canonical name: pin}: one `name==version` per entry, then its `--hash` options."""
    entries: dict[str, Locked] = {}
    logical: list[str] = []
    current = ""
    for raw in text.splitlines():
        line = raw.split(" #", 1)[0].strip() if not raw.lstrip().startswith("#") else ""
        if not line:
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        logical.append(current + line)
        current = ""
    assert not current.strip(), "the lock ends in a continued line"
    for entry in logical:
        requirement, *options = entry.split(" --")
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;]+)\s*", requirement)
        assert match, f"not an exact pin: {requirement!r} ({REGENERATE})"
        name = canonicalize_name(match[1])
        assert name not in entries, f"{name} is locked twice"
        locked = Locked(match[2])
        for option in (o.strip() for o in options):
            if option.startswith("hash="):
                locked.hashes.append(option.removeprefix("hash="))
            else:
                locked.options.append(option)
        entries[name] = locked
    return entries


def lock() -> dict[str, Locked]:
    return parse_lock(LOCK.read_text())


def requirements_of_project() -> list[Requirement]:
    document = pyproject()
    return [
        Requirement(r) for r in document["project"]["dependencies"] + document["build-system"]["requires"]
    ]


def applies(requirement: Requirement, extras: set[str]) -> bool:
    if requirement.marker is None:
        return True
    for extra in extras | {""}:
        environment: dict[str, str | AbstractSet[str]] = {**IMAGE_ENVIRONMENT, "extra": extra}
        if requirement.marker.evaluate(environment):
            return True
    return False


def dependency_closure(roots: list[Requirement]) -> tuple[set[str], set[str]]:
    """Every package the roots need in the image, from the installed packages' metadata; also the names that are
    not installed here (their own dependencies cannot be followed)."""
    wanted: dict[str, set[str]] = {}
    unknown: set[str] = set()
    pending = [(r, set(r.extras)) for r in roots if applies(r, set())]
    while pending:
        requirement, extras = pending.pop()
        name = canonicalize_name(requirement.name)
        seen = wanted.get(name)
        if seen is not None and extras <= seen:
            continue
        wanted[name] = (seen or set()) | extras
        try:
            requires = importlib.metadata.distribution(name).requires or []
        except importlib.metadata.PackageNotFoundError:
            unknown.add(name)
            continue
        for text in requires:
            dependency = Requirement(text)
            if applies(dependency, wanted[name]):
                pending.append((dependency, set(dependency.extras)))
    return set(wanted), unknown


def test_every_locked_package_is_one_exact_version_with_sha256_hashes() -> None:
    entries = lock()
    assert len(entries) > 10
    for name, locked in entries.items():
        Version(locked.version)  # a release, not a URL or a path
        assert locked.hashes, f"{name} has no --hash ({REGENERATE})"
        assert all(re.fullmatch(r"sha256:[0-9a-f]{64}", h) for h in locked.hashes), name
        assert not locked.options, f"{name}: unexpected options {locked.options}"
    assert not re.search(r"^\s*(-e|--index-url|--extra-index-url|--find-links)\b", LOCK.read_text(), re.M)


def test_the_lock_satisfies_every_requirement_of_pyproject() -> None:
    entries = lock()
    for requirement in requirements_of_project():
        name = canonicalize_name(requirement.name)
        assert name in entries, f"{requirement} is not in requirements.lock ({REGENERATE})"
        version = entries[name].version
        assert requirement.specifier.contains(version, prereleases=True), (
            f"pyproject.toml asks for {requirement}, the lock pins {version} ({REGENERATE})"
        )


def test_the_lock_holds_the_whole_dependency_closure_and_nothing_else() -> None:
    entries = lock()
    needed, unknown = dependency_closure(requirements_of_project())
    build_tools = {canonicalize_name(Requirement(r).name) for r in pyproject()["build-system"]["requires"]}
    # Metadata of the versions installed here; when they differ from the pins, say so (it may explain a diff).
    differing = sorted(
        f"{name} {importlib.metadata.version(name)} here, {entries[name].version} locked"
        for name in needed & set(entries)
        if name not in unknown | build_tools and importlib.metadata.version(name) != entries[name].version
    )
    missing = sorted(needed - set(entries))
    assert not missing, f"needed but not locked: {missing} ({REGENERATE}); differing versions: {differing}"
    # The build backend's own tools are not installed here, so their dependencies cannot all be followed.
    extra = sorted(set(entries) - needed)
    assert not extra, f"locked but needed by nothing: {extra} ({REGENERATE}); differing versions: {differing}"


def test_the_lock_check_catches_a_stale_pin_and_a_missing_package() -> None:
    entries = lock()
    aiokafka = next(r for r in requirements_of_project() if r.name == "aiokafka")
    assert not aiokafka.specifier.contains("0.1.0")
    stale = LOCK.read_text().replace(f"aiokafka=={entries['aiokafka'].version}", "aiokafka==0.1.0")
    assert parse_lock(stale)["aiokafka"].version == "0.1.0"
    trimmed = parse_lock(re.sub(r"(?m)^orjson==.*(\n\s+--hash=.*)+", "", LOCK.read_text()))
    assert "orjson" not in trimmed and len(trimmed) == len(entries) - 1
    with pytest.raises(AssertionError, match="not an exact pin"):
        parse_lock("fastapi>=0.115 \\\n    --hash=sha256:" + "0" * 64 + "\n")


# ----------------------------------------------------------------------------------------------- Dockerfile


def dockerfile() -> str:
    return DOCKERFILE.read_text()


def stages(text: str) -> list[str]:
    return re.split(r"(?m)^FROM ", text)[1:]


def project_packages() -> list[str]:
    patterns = pyproject()["tool"]["setuptools"]["packages"]["find"]["include"]
    return sorted(
        path.name
        for path in ROOT.iterdir()
        if (path / "__init__.py").is_file() and any(fnmatch.fnmatch(path.name, p) for p in patterns)
    )


def test_the_base_image_is_pinned_by_digest_and_used_by_every_stage() -> None:
    text = dockerfile()
    match = re.search(r"(?m)^ARG BASE_IMAGE=(\S+)$", text)
    assert match, "ARG BASE_IMAGE=<image>@sha256:<digest> before the first FROM"
    assert re.fullmatch(r"[\w./-]+:[\w.-]+@sha256:[0-9a-f]{64}", match[1]), match[1]
    assert text.index("ARG BASE_IMAGE=") < text.index("\nFROM ")
    for stage in stages(text):
        assert stage.startswith("${BASE_IMAGE}"), stage.splitlines()[0]


def test_python_packages_come_from_the_lock_with_hashes_and_installers_stay_out() -> None:
    build, runtime = stages(dockerfile())
    assert "COPY requirements.lock" in build
    assert re.search(
        r"pip install --no-deps --require-hashes --only-binary=:all: -r requirements\.lock$", build, re.M
    )
    # The project itself: built offline with the locked setuptools, no dependency resolved on the side.
    assert re.search(r"pip install --no-deps --no-build-isolation --no-index \.", build)
    assert re.search(r"pip uninstall --yes setuptools wheel pip", build)
    assert "pip install" not in runtime
    assert re.search(r"for module in pip setuptools wheel", runtime), "the runtime stage proves they are gone"


def test_every_package_of_the_project_is_copied_into_the_build() -> None:
    build = stages(dockerfile())[0]
    packages = project_packages()
    assert {"presence", "gateway", "streams"} <= set(packages)
    for package in packages:
        assert re.search(rf"(?m)^COPY {package} \./{package}$", build), (
            f"the Dockerfile does not COPY {package}/"
        )
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert not set(packages) & set(ignored)
    assert "requirements.lock" not in ignored and "README.md" not in ignored


def test_the_user_is_the_uid_build_argument() -> None:
    runtime = stages(dockerfile())[1]
    assert re.search(r"(?m)^ARG UID=10001$", runtime), "default UID 10001, as the chart's runAsUser"
    assert re.search(r"(?m)^USER \$\{UID\}:\$\{UID\}$", runtime)
    assert '--uid "${UID}"' in runtime and '--gid "${UID}"' in runtime
    assert not re.search(r"(?m)^USER \d", runtime)
    values = (ROOT / "charts" / "presence" / "values.yaml").read_text()
    assert re.search(r"(?m)^\s+runAsUser: 10001$", values), "the chart's runAsUser is the image's default UID"


def test_oci_labels_describe_the_image() -> None:
    runtime = stages(dockerfile())[1]
    labels = dict(re.findall(r'(org\.opencontainers\.image\.[a-z.]+)="([^"]*)"', runtime))
    project = pyproject()["project"]
    for key in ("title", "description", "version", "revision", "created", "licenses", "base.name"):
        assert labels.get(f"org.opencontainers.image.{key}"), key
    assert labels["org.opencontainers.image.licenses"] == project["license"]["text"]
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert re.search(rf"(?m)^ARG VERSION={re.escape(project['version'])}$", runtime), (
        "the image's default version label follows pyproject.toml's version"
    )


def test_container_check_explains_itself_without_a_container_engine() -> None:
    done = subprocess.run(
        [str(ROOT / "scripts" / "container-check"), "--help"], capture_output=True, text=True, timeout=30
    )
    assert done.returncode == 0, done.stderr
    assert "--local-base" in done.stdout and "SIGTERM" in done.stdout
    assert "scripts/container-check" in (ROOT / "docs" / "operations.md").read_text()
