"""README.md promises what .ci/run does: the same test command, and a three-line example that runs."""

from __future__ import annotations

import re
from pathlib import Path

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
