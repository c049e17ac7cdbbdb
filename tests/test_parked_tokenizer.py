"""Issue 29 item 3: a training run parks its tokenizer once the data is tokenized (peftkit.train.parked_tokenizer).
The object is freed; the files beside every adapter are the bytes ``save_pretrained`` of the unparked tokenizer
writes; generation-based evaluation loads it again and answers as the unparked one does; the temporary folder
goes when the run ends, an error included. A BPE tokenizer with merges, its own chat template and a pad token,
saved to a folder and loaded through ``model.tokenizer`` (the route a hub tokenizer takes); tiny Llama."""

from __future__ import annotations

import dataclasses
import filecmp
import tempfile
import weakref
from pathlib import Path

import pytest
from train_fixtures import TINY_CONFIGS, read_metrics, write_jsonl

import peftkit.train.run_setup as run_setup
from peftkit.train import from_dict, train
from peftkit.train.build import load_tokenizer
from peftkit.train.loop import evaluate, prepare
from peftkit.train.parked_tokenizer import STAGING_PREFIX, ParkedTokenizer, live

VOCAB = 320
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
            "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
HOOK = '''
SEEN = []

def record(predictions, references):
    SEEN.append((list(predictions), list(references)))
    return {"hook_count": len(references)}
'''


def rows(n: int, seed: int = 0) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"What is {i % 7} plus {seed}? Answer in words."},
                          {"role": "assistant", "content": f"It is {(i % 7 + seed) % 10} exactly."}]}
            for i in range(n)]


def bpe_folder(folder: Path) -> str:
    """A byte-level BPE tokenizer with merges trained on the rows' text, its chat template and special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    text = [m["content"] for r in rows(64) + rows(16, seed=3) for m in r["messages"]]
    backend.train_from_iterator(text * 4, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="<|im_end|>", additional_special_tokens=specials[3:])
    tokenizer.chat_template = TEMPLATE
    tokenizer.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> str:
    return bpe_folder(tmp_path_factory.mktemp("bpe"))


def recipe(tmp_path: Path, tokenizer_dir: str, **training) -> dict:
    return {
        "model": {"config": dict(TINY_CONFIGS["llama"], vocab_size=VOCAB, max_position_embeddings=96),
                  "tokenizer": tokenizer_dir},
        "data": {"train": write_jsonl(tmp_path / "data" / "train.jsonl", rows(8)),
                 "eval": write_jsonl(tmp_path / "data" / "eval.jsonl", rows(3, seed=1)),
                 "format": "messages", "max_length": 96},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "optimizer": {"lr": 1e-2},
        "training": {"max_steps": 2, "batch_size": 2, "log_every": 1, "output_dir": str(tmp_path / "run"),
                     "seed": 1, "eval_max_new_tokens": 5, **training},
        "logging": {"progress_bar": False},
    }


def assert_same_tokenizer_files(expected: Path, folder: Path) -> None:
    """Every file save_pretrained wrote is in ``folder`` with the same bytes, and no other tokenizer file is."""
    names = {p.name for p in expected.iterdir()}
    match, mismatch, errors = filecmp.cmpfiles(expected, folder, sorted(names), shallow=False)
    assert sorted(match) == sorted(names) and not mismatch and not errors, (mismatch, errors)
    others = {p.name for p in folder.iterdir()} - names
    assert all(n.startswith("adapter_") or n in ("README.md", "best.json", "peftkit.json") for n in others), others


def test_the_run_frees_its_tokenizer_and_keeps_what_it_needs(tmp_path, tokenizer_dir, monkeypatch):
    loaded = []

    def load_and_watch(recipe):
        tokenizer = load_tokenizer(recipe)
        loaded.append((weakref.ref(tokenizer), tokenizer.pad_token_id))
        return tokenizer

    monkeypatch.setattr(run_setup, "load_tokenizer", load_and_watch)
    run = prepare(from_dict(recipe(tmp_path, tokenizer_dir)))
    (ref, pad_id), = loaded
    assert ref() is None  # freed by the end of setup, without waiting for a garbage collection
    assert isinstance(run.tokenizer, ParkedTokenizer) and run.tokenizer.pad_token_id == pad_id == 0
    assert run.model.config.pad_token_id == 0
    staging = run.tokenizer.staging
    assert staging.is_dir() and staging.name.startswith(STAGING_PREFIX)
    assert not (tmp_path / "run").exists()  # parking writes nothing into the run folder
    with live(run.tokenizer) as tokenizer:
        assert type(tokenizer).__name__ == "TokenizersBackend" and tokenizer.chat_template == TEMPLATE
        text = "What is 3 plus 1? Answer in words."
        ids = tokenizer(text)["input_ids"]
        assert ids == load_tokenizer(run.recipe)(text)["input_ids"] and len(ids) < len(text) / 2  # merges too
    run.tokenizer.close()
    assert not staging.exists()


def test_saved_tokenizers_are_the_bytes_save_pretrained_writes(tmp_path, tokenizer_dir, monkeypatch):
    (tmp_path / "gen_hook.py").write_text(HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))
    config = recipe(tmp_path, tokenizer_dir, eval_every=1, eval_metrics=["exact_match", "gen_hook:record"],
                    best={"metric": "eval_loss"})
    result = train(from_dict(config))
    assert result.status == "done" and result.best is not None
    expected = tmp_path / "expected"
    load_tokenizer(from_dict(config)).save_pretrained(expected)
    assert {p.name for p in expected.iterdir()} == {"chat_template.jinja", "tokenizer.json", "tokenizer_config.json"}
    assert_same_tokenizer_files(expected, tmp_path / "run" / "adapter")
    assert_same_tokenizer_files(expected, tmp_path / "run" / "best")
    assert [r["step"] for r in read_metrics(tmp_path / "run") if "eval_hook_count" in r] == [1, 2]
    assert list(temporary.iterdir()) == []  # the staging folder is gone once train() returns


def test_generation_eval_answers_as_the_unparked_tokenizer(tmp_path, tokenizer_dir, monkeypatch):
    (tmp_path / "gen_hook2.py").write_text(HOOK)
    monkeypatch.syspath_prepend(str(tmp_path))
    config = from_dict(recipe(tmp_path, tokenizer_dir, eval_metrics=["exact_match", "gen_hook2:record"]))
    run = prepare(config)
    import gen_hook2

    parked = evaluate(run, run.model)
    parked_answers = gen_hook2.SEEN[-1]
    whole = evaluate(dataclasses.replace(run, tokenizer=load_tokenizer(config)), run.model)
    assert parked == whole and gen_hook2.SEEN[-1] == parked_answers
    predictions, references = parked_answers
    assert references == [r["messages"][-1]["content"] for r in rows(3, seed=1)]
    assert len(predictions) == 3 and any(predictions)  # decoded text, not empty strings


def test_the_staging_folder_goes_on_errors(tmp_path, tokenizer_dir, monkeypatch):
    temporary = tmp_path / "tmp"
    temporary.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temporary))

    class Failing:
        pad_token_id = pad_token = eos_token_id = None

        def save_pretrained(self, folder):
            (Path(folder) / "tokenizer.json").write_text("{")
            raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        ParkedTokenizer(Failing())
    assert list(temporary.iterdir()) == []

    def fail(step, record):
        raise RuntimeError("a hook failed")

    with pytest.raises(RuntimeError, match="a hook failed"):
        train(from_dict(recipe(tmp_path, tokenizer_dir)), hooks=[fail])
    assert list(temporary.iterdir()) == []
