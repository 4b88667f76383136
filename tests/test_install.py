"""Reproducible installs: pyproject allows only what the pinned environments (constraints/*.txt) hold, and the
environment running these tests is exactly the pinned one (a drifted ./.venv or ./.venv-xla fails here first)."""

import re
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

# core: must also pass on the trn1 stack (torch 2.9 + transformers 4.57); the XLA tier runs it there too.
pytestmark = pytest.mark.core

ROOT = Path(__file__).resolve().parents[1]
LOCKS = {"cpu": ROOT / "constraints" / "cpu.txt", "xla": ROOT / "constraints" / "xla.txt"}

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    tomllib = pytest.importorskip("tomli")


def _pins(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[_norm(name)] = Version(version)
    return pins


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["dev"]]


@pytest.mark.parametrize("lock", sorted(LOCKS))
def test_every_dependency_is_pinned_within_pyprojects_bounds(lock):
    pins = _pins(LOCKS[lock])
    for req in _requirements():
        assert _norm(req.name) in pins, f"{req.name} is not pinned in {LOCKS[lock].name}"
        assert req.specifier.contains(pins[_norm(req.name)], prereleases=True), (
            f"{LOCKS[lock].name} pins {req.name}=={pins[_norm(req.name)]}, outside pyproject's {req.specifier}"
        )


def test_pyproject_allows_no_torch_or_transformers_line_that_ci_does_not_run():
    tested = {name: {_pins(p)[name] for p in LOCKS.values()} for name in ("torch", "transformers")}
    for req in _requirements():
        if req.name in tested:
            low = min(tested[req.name])
            high = max(tested[req.name])
            # nothing of an older minor line than the oldest tested release, nor a newer one than the newest
            assert not req.specifier.contains(Version(f"{low.major}.{low.minor - 1}.999")), (req, low)
            assert not req.specifier.contains(Version(f"{high.major}.{high.minor + 1}")), (req, high)


def test_the_running_environment_is_the_pinned_one():
    import torch

    lock = "xla" if torch.__version__.startswith("2.9") else "cpu"
    pins = _pins(LOCKS[lock])
    drift = []
    for dist in metadata.distributions():
        name = _norm(dist.metadata["Name"])
        if name in pins and Version(dist.version).public != pins[name].public:
            drift.append(f"{name} {dist.version} (pinned {pins[name]})")
    assert not drift, f"the environment differs from {LOCKS[lock].name}: {', '.join(drift)}; rerun the setup script"
