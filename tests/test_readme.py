"""README.md promises what .ci/run does: the same test command, installs pinned by .ci/constraints.txt within
pyproject's bounds, and a three-line example that runs."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import peftkit
from helpers import tiny_llama, make_batch

REPO = Path(__file__).resolve().parents[1]


def _readme_test_command() -> str:
    text = (REPO / "README.md").read_text()
    section = re.split(r"^## Tests$", text, maxsplit=1, flags=re.M)[1]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if "pytest" in line][0].strip()


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"README's test command {command!r} is not a line of .ci/run"


def test_three_line_example_shape():
    model = tiny_llama()
    model = peftkit.wrap(model, "lora", r=4)
    optimizer = peftkit.optimizer(model, lr=1e-2)
    batch = make_batch(model)
    loss = model(**batch).loss
    loss.backward()
    optimizer.step()
    assert peftkit.trainable_parameters(model).trainable > 0
    assert torch.isfinite(loss)


def _constraints() -> dict[str, str]:
    from packaging.utils import canonicalize_name

    lines = [l.strip() for l in (REPO / ".ci" / "constraints.txt").read_text().splitlines()]
    pins = [l for l in lines if l and not l.startswith("#")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+==[A-Za-z0-9.+!-]+", l) for l in pins), "one name==version per line"
    names = [canonicalize_name(l.split("==")[0]) for l in pins]
    assert names == sorted(names) and len(set(names)) == len(names), "constraints: sorted by name, each once"
    return {name: l.split("==")[1] for name, l in zip(names, pins)}


def test_ci_installs_within_the_constraints_that_pyproject_allows():
    """.ci/run installs every package with -c .ci/constraints.txt, and each pin satisfies pyproject's bounds."""
    tomllib = pytest.importorskip("tomllib")
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    installs = [l for l in (REPO / ".ci" / "run").read_text().splitlines()
                if "pip install" in l and "--upgrade pip" not in l]
    assert installs and all("-c .ci/constraints.txt" in l for l in installs), installs
    pins = _constraints()
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    requirements = project["dependencies"] + [r for extra in ("test", "demo") for r in extras[extra]]
    for requirement in map(Requirement, requirements):
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f".ci/constraints.txt pins no version of {requirement.name}"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name}=={version}"
