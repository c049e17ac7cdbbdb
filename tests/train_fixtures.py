"""Tiny recipes for the training-engine tests: config-built models, the built-in byte tokenizer, local data.

Import as ``from train_fixtures import ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import torch
from safetensors.torch import load_file

BYTE_VOCAB = 259  # the byte tokenizer's vocabulary

TINY_CONFIGS = {
    "llama": {"model_type": "llama", "hidden_size": 32, "intermediate_size": 48, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": BYTE_VOCAB,
              "max_position_embeddings": 64, "tie_word_embeddings": False},
    # wide enough (every projection >= 64) for the recipes' ranks: EVA's r = 16 with rho = 2 reaches 32
    "qwen2": {"model_type": "qwen2", "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": BYTE_VOCAB,
              "max_position_embeddings": 64, "tie_word_embeddings": False},
    "gpt2": {"model_type": "gpt2", "n_embd": 32, "n_layer": 2, "n_head": 4, "vocab_size": BYTE_VOCAB,
             "n_positions": 64},
    "roberta": {"model_type": "roberta", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                "intermediate_size": 48, "vocab_size": BYTE_VOCAB, "max_position_embeddings": 72,
                "pad_token_id": 0},
    "bert": {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
             "intermediate_size": 48, "vocab_size": BYTE_VOCAB, "max_position_embeddings": 64},
}

WORDS = ("the cat sat on a mat while rain fell over quiet hills and seven birds sang of bread salt iron "
         "lamps rivers").split()


def sentences(n: int, seed: int = 0, words: int = 8) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(words)) for _ in range(n)]


def write_jsonl(path: Path, rows: list[dict]) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def text_rows(n: int, seed: int = 0, column: str = "text") -> list[dict]:
    return [{column: s} for s in sentences(n, seed)]


def instruction_rows(n: int, seed: int = 0, prompt: str = "prompt", response: str = "response") -> list[dict]:
    return [{prompt: f"repeat: {s}", response: s} for s in sentences(n, seed, words=4)]


def varied_instruction_rows(n: int, seed: int = 0) -> list[dict]:
    """Single-turn instructions whose answers differ in length (1 to 6 words: about 3 to 40 target tokens with
    the byte tokenizer), as in chat data: micro-batches and processes hold different numbers of target tokens,
    so a mean of per-batch means differs from the mean over the global batch's tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        answer = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        rows.append({"prompt": f"echo: {rng.choice(WORDS)}", "response": answer})
    return rows


def classification_rows(n: int, seed: int = 0, text: str = "text", label: str = "label",
                        pair: str | None = None) -> list[dict]:
    rows = []
    for i, s in enumerate(sentences(n, seed, words=5)):
        row = {text: s, label: i % 2 if pair is None else int("cat" in s)}
        if pair:
            row[pair] = s[::-1]
        rows.append(row)
    return rows


def llama_text_recipe(tmp_path: Path, **overrides) -> dict:
    """A causal-LM recipe on a tiny Llama with packed local text (every block exactly max_length tokens)."""
    train = write_jsonl(tmp_path / "data" / "train.jsonl", text_rows(64, seed=1))
    evaluation = write_jsonl(tmp_path / "data" / "eval.jsonl", text_rows(16, seed=2))
    recipe = {
        "model": {"config": dict(TINY_CONFIGS["llama"]), "tokenizer": "bytes", "task": "causal-lm"},
        "data": {"train": train, "eval": evaluation, "format": "text", "max_length": 16},
        "adapter": {"method": "lora", "r": 4, "alpha": 8},
        "optimizer": {"lr": 1e-2},
        "training": {"max_steps": 6, "batch_size": 4, "log_every": 1, "lr_schedule": "cosine", "warmup": 2,
                     "output_dir": str(tmp_path / "run"), "seed": 3},
        "logging": {"progress_bar": False},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split("__")
        recipe[section][key] = value
    if "training__warmup" not in overrides:  # warmup past max_steps is refused: a 1-step run warms up for 1
        recipe["training"]["warmup"] = min(2, recipe["training"]["max_steps"])
    return recipe


def llama_chat_recipe(tmp_path: Path, **overrides) -> dict:
    """``llama_text_recipe`` on instruction data with answers of different lengths and response-only labels
    (``varied_instruction_rows``; unpacked: each micro-batch padded to its longest example)."""
    recipe = llama_text_recipe(tmp_path, **overrides)
    recipe["data"].update(
        train=write_jsonl(tmp_path / "data" / "chat_train.jsonl", varied_instruction_rows(64, seed=1)),
        eval=write_jsonl(tmp_path / "data" / "chat_eval.jsonl", varied_instruction_rows(16, seed=2)),
        format="instruction", max_length=64, **{k.split("__")[1]: v for k, v in overrides.items()
                                                 if k.startswith("data__")})
    return recipe


def preference_rows(n: int, seed: int = 0) -> list[dict]:
    """Prompt / chosen / rejected rows whose completions differ in length within and across pairs (1 to 6 words:
    about 3 to 40 completion tokens with the byte tokenizer): pairs and micro-batches hold different numbers of
    tokens, so a padded and a padding-free batch lay them out differently."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        word = rng.choice(WORDS)
        chosen = " ".join([word] * rng.randint(1, 4))
        rejected = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 6)))
        rows.append({"prompt": f"echo {word}:", "chosen": chosen, "rejected": rejected})
    return rows


def llama_preference_recipe(tmp_path: Path, objective: str = "dpo", **overrides) -> dict:
    """``llama_text_recipe`` on preference pairs (``preference_rows``) with ``training.objective``."""
    recipe = llama_text_recipe(tmp_path, **overrides)
    recipe["data"].update(
        train=write_jsonl(tmp_path / "data" / "pref_train.jsonl", preference_rows(32, seed=1)),
        eval=write_jsonl(tmp_path / "data" / "pref_eval.jsonl", preference_rows(8, seed=2)),
        format="preference", max_length=64)
    recipe["data"].update({k.split("__")[1]: v for k, v in overrides.items() if k.startswith("data__")})
    recipe["training"]["objective"] = objective
    return recipe


def adapter_tensors(run_dir: str | Path) -> dict[str, torch.Tensor]:
    return load_file(str(Path(run_dir) / "adapter" / "adapter_model.safetensors"))


def read_metrics(run_dir: str | Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line]
