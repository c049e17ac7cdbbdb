"""The helpers shared by the test files: tiny models built from configs (no downloads) and batches for them,
adapter randomisation, quiet wrapping, recipe files and the CLI's one-error check.

Import as ``from helpers import tiny_llama, ...`` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import torch
import yaml
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

VOCAB = 97


def llama_config(**overrides) -> LlamaConfig:
    cfg = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, tie_word_embeddings=False)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def tiny_llama(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides)).to(dtype)
    return model.eval()


def tiny_gpt2(seed: int = 0, dtype: torch.dtype = torch.float32) -> GPT2LMHeadModel:
    """GPT-2 uses transformers' Conv1D (weight stored as (in, out))."""
    torch.manual_seed(seed)
    cfg = GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).to(dtype).eval()


def tiny_bert(seed: int = 0, num_labels: int = 3, dtype: torch.dtype = torch.float32) -> BertForSequenceClassification:
    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                     vocab_size=VOCAB, max_position_embeddings=64, num_labels=num_labels,
                     hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    return BertForSequenceClassification(cfg).to(dtype).eval()


# Widths of the quantized tiny Llama. bitsandbytes' AVX512-BF16 CPU path (tests/bnb_paths.py) repacks a 4-bit weight
# in tiles of 32 output rows and one absmax per 64 inputs (its blocksize), so every in-width is a multiple of 64 and
# every out-width of 32 (q/o 64, k/v 32, gate/up 128, down 64): both CPU kernel paths take these layers.
QUANTIZED_LLAMA = (("hidden_size", 64), ("intermediate_size", 128))


@functools.lru_cache(maxsize=None)
def _saved_llama_dir(seed: int, overrides: tuple[tuple[str, int], ...] = ()) -> str:
    folder = tempfile.mkdtemp(prefix="peftkit-llama-")
    atexit.register(shutil.rmtree, folder, True)
    tiny_llama(seed, **dict(overrides)).save_pretrained(folder)
    return folder


def tiny_llama_4bit(seed: int = 0) -> LlamaForCausalLM:
    """The tiny Llama (``QUANTIZED_LLAMA`` widths) with every linear layer but the head as a bitsandbytes 4-bit NF4
    layer, on CPU. It takes whichever bitsandbytes CPU path the machine (or ``bnb_paths.force``) picks."""
    from transformers import BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(
            _saved_llama_dir(seed, QUANTIZED_LLAMA),
            quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                   bnb_4bit_compute_dtype=torch.float32),
        )
    return model.eval()


def tiny_llama_8bit(seed: int = 0) -> LlamaForCausalLM:
    from transformers import BitsAndBytesConfig

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = LlamaForCausalLM.from_pretrained(_saved_llama_dir(seed),
                                                 quantization_config=BitsAndBytesConfig(load_in_8bit=True))
    return model.eval()


MODEL_FACTORIES = {
    "llama": tiny_llama,
    "gpt2": tiny_gpt2,
    "bert": tiny_bert,
    "llama-4bit": tiny_llama_4bit,
}


def make_batch(model, batch_size: int = 2, seq_len: int = 8, seed: int = 0) -> dict[str, torch.Tensor]:
    """A batch the model's forward takes, with labels (LM labels or class ids)."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch_size, seq_len), generator=gen)
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    if type(model).__name__.endswith("ForSequenceClassification"):
        batch["labels"] = torch.randint(0, model.config.num_labels, (batch_size,), generator=gen)
    else:
        batch["labels"] = ids.clone()
    return batch


def make_batches(model, n: int = 4, batch_size: int = 2, seq_len: int = 8,
                 seed: int = 0) -> list[dict[str, torch.Tensor]]:
    return [make_batch(model, batch_size, seq_len, seed + i) for i in range(n)]


def train_steps(model, batches, lr: float = 1e-2) -> None:
    """One optimizer step per batch with ``peftkit.optimizer`` (the method's own), in train mode; eval after."""
    import peftkit

    opt = peftkit.optimizer(model, lr=lr)
    model.train()
    for batch in batches:
        model(**batch).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


def output(model, batch) -> torch.Tensor:
    """Logits of the model on a batch (labels removed), in eval mode, without grad."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    with torch.no_grad():
        return model(**inputs).logits


def base_state_dict(model) -> dict[str, torch.Tensor]:
    """A plain copy of a model's weights."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def randomize_adapters(model, std: float = 0.05, seed: int = 1) -> None:
    """Give every adapter tensor a non-trivial value (so the adapter changes the output)."""
    gen = torch.Generator().manual_seed(seed)
    from peftkit.inject import adapter_layers

    with torch.no_grad():
        for layer in adapter_layers(model).values():
            for p in layer.adapters.parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)


def cpu_threads() -> int:
    return int(os.environ.get("OMP_NUM_THREADS", "1"))


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    """‖x − y‖ / ‖y‖ (Frobenius), as a float."""
    return ((x - y).norm() / y.norm()).item()


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """PEFT and transformers warn about the tiny configs; none of it is under test."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def wrap_with_data(model: torch.nn.Module, batches: list, method: str, **options) -> torch.nn.Module:
    """``peftkit.wrap(model, method, data=batches, **options)`` with the tiny configs' warnings silenced."""
    import peftkit

    with quiet():
        return peftkit.wrap(model, method, data=batches, **options)


def fill_random(tensors: Iterable[torch.Tensor], seed: int = 1, std: float = 1.0) -> None:
    """Overwrite each tensor, in order, with N(0, std²) draws from one generator seeded ``seed`` (drawn in fp64,
    then cast to the tensor's dtype)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in tensors:
            tensor.copy_(torch.randn(tensor.shape, generator=gen, dtype=torch.float64).to(tensor.dtype) * std)


def randomize_adapter(layer: torch.nn.Module, name: str = "default", seed: int = 1, std: float = 1.0) -> None:
    """:func:`fill_random` on every parameter of one adapter layer's adapter ``name``."""
    fill_random(layer.adapters[name].parameters(), seed, std)


def write_recipe(path: Path, recipe: dict) -> str:
    """``recipe`` as YAML at ``path``; returns the path as a string (for ``main([..., path])``)."""
    path.write_text(yaml.safe_dump(recipe))
    return str(path)


def write_llama_recipe(folder: Path, recipe: dict | None = None, **overrides) -> str:
    """:func:`write_recipe` to ``folder/recipe.yaml``: ``recipe``, or the tiny Llama text recipe with overrides."""
    from train_fixtures import llama_text_recipe

    return write_recipe(folder / "recipe.yaml", recipe or llama_text_recipe(folder, **overrides))


def one_error(capsys, argv: list[str], *needles: str, code: int = 2, alone: bool = True,
              max_chars: int | None = None, reset_accelerate: bool = False) -> str:
    """Run the CLI in-process on ``argv`` and check that it failed as a user error: exit ``code``, exactly one
    ``peftkit: error:`` line that contains every needle, no traceback. ``alone``: that line is all of stderr (else
    other lines, warnings, may come with it). ``max_chars``: the line is shorter (no input echoed in full).
    ``reset_accelerate``: reset Accelerate's process state after the run. Returns the error line."""
    from peftkit.train.cli import main

    capsys.readouterr()  # what the test itself printed before
    try:
        got = main(argv)
    finally:
        if reset_accelerate:
            from accelerate.state import AcceleratorState

            AcceleratorState._reset_state()
    err = capsys.readouterr().err.strip()
    assert got == code, err[-3000:]
    if alone:
        assert err.startswith("peftkit: error: ") and "\n" not in err and "Traceback" not in err, err
        lines = [err]
    else:
        lines = [line for line in err.splitlines() if line.startswith("peftkit: error:")]
        assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    if max_chars is not None:
        assert len(lines[0]) < max_chars, lines[0][:3000]
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]
