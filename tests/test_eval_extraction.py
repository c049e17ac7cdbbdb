"""Issue 28 item 2: exact match on extracted answers (training.answer_extraction) and metric hooks checked
before the run builds anything."""

from __future__ import annotations

import sys
import textwrap

import pytest
from train_fixtures import llama_chat_recipe

from peftkit.errors import ConfigError
from peftkit.train import from_dict, train
from peftkit.train.evaluation import check_hooks, compute, extract_answer


@pytest.mark.parametrize("text, how, expected", [
    ("3 + 4 = 7, so the total is 1,234.50 dollars", "last_number", "1234.5"),
    ("It costs $18.", "last_number", "18"),
    ("-3.0", "last_number", "-3"),
    ("no number here", "last_number", None),
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "gsm8k", "72"),
    ("#### 1,000", "gsm8k", "1000"),
    ("the total is 72", "gsm8k", None),  # strict: no answer line, no answer
    ("The answer is (C) because", "choice", "C"),
    ("answer: d", "choice", None),  # choices are capital letters
    ("B. Paris", "choice", "B"),
    ("(A)", "choice", "A"),
    ("Paris", "choice", None),
    ("  keep  ", None, "keep"),
])
def test_extract_answer(text, how, expected):
    assert extract_answer(text, how) == expected


def test_exact_match_compares_extracted_answers():
    predictions = ["Step by step: 5 x 3 = 15. #### 15", "#### 7", "I think 4", "#### 1,000"]
    references = ["He has 15 apples.\n#### 15", "#### 8", "#### 4", "#### 1000"]
    assert compute(["exact_match"], predictions, references) == {"eval_exact_match": 0.0}  # whole strings
    assert compute(["exact_match"], predictions, references, "gsm8k") == {"eval_exact_match": 0.5}
    assert compute(["exact_match"], predictions, references, "last_number") == {"eval_exact_match": 0.75}
    # regex: the first match's first group
    got = compute(["exact_match"], ["Answer: cat.", "Answer: dog"], ["Answer: cat", "Answer: cow"], "regex",
                  r"Answer: (\w+)")
    assert got == {"eval_exact_match": 0.5}


def test_a_hook_is_imported_and_checked_before_the_model_is_built(tmp_path, monkeypatch):
    (tmp_path / "myhooks.py").write_text(textwrap.dedent("""
        def one_argument(predictions):
            return 0.0

        def fine(predictions, references):
            return 1.0
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    check_hooks(["myhooks:fine", "exact_match"])
    with pytest.raises(ConfigError, match="'myhooks:one_argument' cannot be called as fn"):
        check_hooks(["myhooks:one_argument"])
    with pytest.raises(ConfigError, match="cannot import 'nohooks_xyz:score'"):
        check_hooks(["nohooks_xyz:score"])

    import peftkit.train.run_setup as run_setup

    def must_not_build(*args, **kwargs):
        raise AssertionError("the model was built before the hook was checked")

    monkeypatch.setattr(run_setup, "load_model", must_not_build)
    monkeypatch.setattr(run_setup, "load_examples", must_not_build)
    recipe = from_dict(llama_chat_recipe(tmp_path, training__eval_metrics=["myhooks:missing"]))
    with pytest.raises(ConfigError, match="myhooks:missing"):
        train(recipe)
    sys.modules.pop("myhooks", None)


@pytest.mark.parametrize("training, message", [
    ({"answer_extraction": "gsm8k"}, "no exact_match"),
    ({"answer_extraction": "regex", "eval_metrics": ["exact_match"]}, "training.answer_pattern"),
    ({"answer_pattern": "x(", "answer_extraction": "regex", "eval_metrics": ["exact_match"]}, "not a valid regex"),
    ({"answer_extraction": "last_digit", "eval_metrics": ["exact_match"]}, "training.answer_extraction"),
])
def test_answer_extraction_settings_are_checked(tmp_path, training, message):
    recipe = llama_chat_recipe(tmp_path)
    recipe["training"].update(training)
    with pytest.raises(ConfigError, match=message):
        from_dict(recipe)


def test_the_gsm8k_recipe_validates_as_written():
    from pathlib import Path

    from peftkit.train.recipe import read_yaml

    recipe = from_dict(read_yaml(Path(__file__).parent.parent / "recipes" / "eval" / "gsm8k-exact-match.yaml"))
    assert recipe.training.answer_extraction == "gsm8k" and recipe.training.eval_metrics == ["exact_match"]
