"""requirements.lock pins what pyproject.toml asks for, and this environment was installed from it."""

from __future__ import annotations

import importlib.metadata
import json
import re
import sys

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

from tests.conftest import ROOT

PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
# The notebooks run in a Jupyter kernel: ipykernel (pinned in the notebook extra) brings IPython.
KERNEL_PROVIDES = {"IPython"}


def lock_for(extra: str | None) -> dict[str, list[Requirement]]:
    """The pins of requirements.lock, or of requirements-<extra>.lock for an extra locked apart."""
    apart = ROOT / f"requirements-{extra}.lock"
    path = apart if extra and apart.is_file() else ROOT / "requirements.lock"
    pins: dict[str, list[Requirement]] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line and not line.startswith((" ", "#", "-")):
            requirement = Requirement(line)
            pins.setdefault(canonicalize_name(requirement.name), []).append(requirement)
    return pins


def pinned_version(pins: list[Requirement]) -> str:
    """The version the lock gives this Python (universal locks pin per Python version with markers)."""
    here = [p for p in pins if p.marker is None or p.marker.evaluate()]
    assert len(here) == 1, here
    (spec,) = here[0].specifier
    assert spec.operator == "==", here[0]
    return spec.version


def project_requirements() -> list[tuple[str | None, Requirement]]:
    requirements = [(None, Requirement(r)) for r in PROJECT["dependencies"]]
    for extra, listed in PROJECT["optional-dependencies"].items():
        requirements += [(extra, Requirement(r)) for r in listed]
    return requirements


@pytest.mark.parametrize(("extra", "requirement"), project_requirements(), ids=str)
def test_every_requirement_is_pinned_and_the_lock_agrees(extra, requirement):
    specifiers = list(requirement.specifier)
    assert len(specifiers) == 1 and specifiers[0].operator == "==", f"{requirement}: pin it with =="
    pins = lock_for(extra).get(canonicalize_name(requirement.name))
    assert pins, f"{requirement.name} is not in the lock: run make lock"
    assert {str(p.specifier) for p in pins} == {str(requirement.specifier)}, (
        f"pyproject.toml says {requirement}, the lock {[str(p) for p in pins]}: run make lock"
    )


def test_this_environment_was_installed_from_the_lock():
    pins = lock_for(None)
    drift = []
    for dist in importlib.metadata.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        # ==2.13.0 admits the local builds 2.13.0+cpu and 2.13.0+cu130 (PEP 440), as pip does.
        if name in pins and not SpecifierSet(f"=={pinned_version(pins[name])}").contains(dist.version):
            drift.append(f"{name} {dist.version} (lock: {pinned_version(pins[name])})")
    assert not drift, f"installed versions differ from requirements.lock: {drift}; run make venv"


def test_torch_is_pinned_so_that_the_cuda_and_the_cpu_build_both_satisfy_it():
    (torch,) = lock_for(None)["torch"]
    assert "+" not in str(torch.specifier)  # a +cpu or +cu130 pin would exclude the other build
    assert torch.specifier.contains("2.13.0") and torch.specifier.contains("2.13.0+cpu")
    assert torch.specifier.contains(importlib.metadata.version("torch"))  # whichever build is here


def test_what_the_notebooks_import_is_declared():
    declared = {canonicalize_name(Requirement(r).name) for r in PROJECT["dependencies"]}
    declared |= {canonicalize_name(Requirement(r).name) for r in PROJECT["optional-dependencies"]["notebook"]}
    distributions = importlib.metadata.packages_distributions()
    own = {"training", "serving"}
    missing = []
    for notebook in sorted((ROOT / "notebooks").glob("*.ipynb")):
        for cell in json.loads(notebook.read_text(encoding="utf-8"))["cells"]:
            if cell["cell_type"] != "code":
                continue
            for module in re.findall(r"^\s*(?:from|import)\s+(\w+)", "".join(cell["source"]), flags=re.M):
                if module in own or module in KERNEL_PROVIDES or module in sys.stdlib_module_names:
                    continue
                names = {canonicalize_name(d) for d in distributions.get(module, [module])}
                if not names & declared:
                    missing.append(f"{notebook.name}: {module}")
    assert not missing, f"imported by notebooks but not declared in pyproject.toml: {missing}"
