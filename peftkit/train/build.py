"""Turn a recipe's ``model`` and ``data`` sections into a tokenizer, a model and tokenized examples."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError
from ..resolve import resolve_model_ref
from .chat import CHAT_FORMATS, resolve_template
from .demo_data import byte_tokenizer
from .examples import Examples, Tokenized
from .pack import finish, packs
from .recipe import DataSection, ModelSection, Recipe
from .rows import check_columns, check_rows, head, read_rows
from .tokenize import encode, tokenize
from .vision import VISION_TASK, load_processor
from .vision import load_examples as load_vision_examples

BYTE_TOKENIZER = "bytes"


def _from_config(auto, config, model_type: str, dtype: torch.dtype) -> torch.nn.Module:
    """``auto.from_config``, sized on the meta device first: a config whose values transformers cannot build
    (a negative size) or whose weights would not fit in this machine's memory is one ConfigError."""
    try:
        with torch.device("meta"):
            probe = auto.from_config(config)
        size = sum(p.numel() for p in probe.parameters()) * dtype.itemsize
    except Exception as exc:
        raise ConfigError(f"model.config: cannot build a '{model_type}' model from these values "
                          f"({_first_line(exc)[:300]}); fix the config fields") from None
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") if hasattr(os, "sysconf") else None
    if memory and size > memory:
        raise ConfigError(f"model.config: the model would hold {size / 2**30:.1f} GiB of weights, more than this "
                          f"machine's {memory / 2**30:.1f} GiB of memory; use smaller sizes")
    try:
        return auto.from_config(config).to(dtype)
    except Exception as exc:  # noqa: BLE001 - what the meta build could not catch
        raise ConfigError(f"model.config: cannot build a '{model_type}' model from these values "
                          f"({_first_line(exc)[:300]}); fix the config fields") from None


def load_tokenizer(recipe: Recipe):
    if recipe.model.task == VISION_TASK:
        return load_processor(recipe.model.name)  # the processor's tokenizer; saving it saves the processor
    ref = recipe.model.tokenizer or recipe.model.name
    if ref is None:
        raise ConfigError("model.tokenizer: a model built from model.config needs a tokenizer: a hub id, a folder, "
                          f"pkg:... or '{BYTE_TOKENIZER}' (a built-in byte-level tokenizer)")
    if ref == BYTE_TOKENIZER:
        tokenizer = byte_tokenizer()
    else:
        from transformers import AutoTokenizer

        if recipe.model.gguf_file and not recipe.model.tokenizer:
            ref = gguf_reference(recipe.model)  # the tokenizer the GGUF file holds, saved beside the rebuilt model
        path = resolve_model_ref(ref, "model.tokenizer" if recipe.model.tokenizer else "model.name")
        try:
            tokenizer = AutoTokenizer.from_pretrained(path)
        except Exception as exc:
            raise ConfigError(f"model.tokenizer: could not load a tokenizer from '{ref}' "
                              f"({_first_line(exc)})") from None
    if recipe.data.format in CHAT_FORMATS or recipe.data.format == "preference":
        # The template the data is rendered with travels with the tokenizer (saved next to the adapter), so
        # `peftkit chat` and `peftkit eval` prompt the model the way it was trained.
        template = resolve_template(tokenizer, recipe.data)
        if template is not None:
            tokenizer.chat_template = template
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often have no pad token; padded positions are masked and never in the loss.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def gguf_reference(model_section: ModelSection) -> str:
    """``model.name``/``model.gguf_file``: how a model loaded from a GGUF file is named (resolve_model_ref reads it)."""
    if not model_section.name:
        raise ConfigError("model.gguf_file: needs model.name, the folder (hub id or pkg:...) that holds the file")
    return f"{model_section.name.rstrip('/')}/{model_section.gguf_file}"


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def load_examples(recipe: Recipe, tokenizer) -> Examples:
    """The data pipeline. Each dataset's rows pass once through the stages, top to bottom: read and check
    (:mod:`.rows`), render and tokenize (:mod:`.chat`, :mod:`.tokenize`), pack (:mod:`.pack`); the loop then plans
    and collates the batches (:mod:`.batches`). data.train (or data.mix) first, then data.eval, checked against
    the training labels; capped by max_train_samples / max_eval_samples. The main process runs it first, so the
    others read datasets' cache."""
    from accelerate import PartialState

    data = recipe.data
    state = PartialState()
    if recipe.model.task == VISION_TASK:
        with state.main_process_first():
            return load_vision_examples(recipe, tokenizer)
    with state.main_process_first():
        if data.mix is None:
            train_rows = _checked_rows(data.train, data.train_split, data, "data.train", data.max_train_samples)
            train = tokenize(train_rows, tokenizer, data, key=f"data.train {data.train}",
                             batch_size=recipe.training.batch_size)
        else:
            train, train_rows = _mixed_examples(recipe, tokenizer)
        evaluation = None
        if data.eval:
            eval_rows = _checked_rows(data.eval, data.eval_split, data, "data.eval", data.max_eval_samples,
                                      train_rows=train_rows)
            # Text is evaluated in the blocks it trains on; chat/instruction eval rows stay whole (no packing)
            evaluation = tokenize(eval_rows, tokenizer, data, train.label_names, key=f"data.eval {data.eval}",
                                  pack=packs(data) if data.format == "text" else False)
    if train.stats and state.is_main_process:
        s = train.stats
        print(f"peftkit: packed {s['examples']} examples ({s['tokens']} tokens) into {s['rows']} rows of <= "
              f"{data.max_length} tokens; padding {s['padding_unpacked']} -> {s['padding_packed']} positions at batch "
              f"size {recipe.training.batch_size} ({100 * s['padding_saved']:.0f} % saved)", flush=True)
    return Examples(train, evaluation)


def _checked_rows(spec: str, split: str, data: DataSection, key: str, cap: int | None, train_rows=None):
    """Read and check one dataset: its rows (the first ``cap`` of them), checked against the training rows'
    label kind (``train_rows``, for data.eval and the later datasets of data.mix)."""
    rows = read_rows(spec, split, data, key)
    check_columns(rows, data, key, spec)
    rows = head(rows, cap)
    check_rows(rows, data, key, spec, train_rows=train_rows)
    return rows


def _mixed_examples(recipe: Recipe, tokenizer) -> tuple[Tokenized, object]:
    """data.mix: each dataset read, checked and tokenized on its own (errors name its file), then interleaved by
    weight (seeded; it ends when the first dataset runs out), capped and packed. Returns the Tokenized examples
    and the first dataset's rows, against which data.eval's label kind is checked."""
    import datasets

    data = recipe.data
    sources = {spec: weight for spec, weight in data.mix.items() if weight > 0}
    tables = {}
    for spec in sources:
        rows = _checked_rows(str(spec), data.train_split, data, "data.mix", None,
                             train_rows=next(iter(tables.values()), None))
        tables[spec] = datasets.Dataset.from_list(rows) if isinstance(rows, list) else rows  # interleaved by datasets
    label_names = _mixed_label_names(tables.values(), data) if data.format == "classification" else None
    encoded = [encode(table, tokenizer, data, label_names, key=f"data.mix {spec}") for spec, table in tables.items()]
    total = sum(sources.values())
    mixed = datasets.interleave_datasets(encoded, probabilities=[w / total for w in sources.values()],
                                         seed=recipe.training.seed, stopping_strategy="first_exhausted")
    mixed = mixed.select(range(min(data.max_train_samples, len(mixed)))) if data.max_train_samples else mixed
    return (finish(mixed, data, key="data.mix", pack=packs(data), batch_size=recipe.training.batch_size,
                   label_names=label_names), next(iter(tables.values())))


def _mixed_label_names(tables, data) -> list[str] | None:
    raw = [v for table in tables for v in table[data.label_column]]
    if all(isinstance(v, int) and not isinstance(v, bool) for v in raw):
        return None
    return sorted({str(v) for v in raw})


def num_labels(recipe: Recipe, examples: Examples) -> int:
    if recipe.model.num_labels:
        return recipe.model.num_labels
    if examples.train.label_names:
        return len(examples.train.label_names)
    return max(examples.train.labels) + 1


def load_model(model_section: ModelSection, tokenizer, *, labels: int | None = None,
               label_names: list[str] | None = None, seed: int = 0, shard_for: str | None = None,
               engine: str = "ddp") -> torch.nn.Module:
    """The base model: ``from_pretrained`` for a name (optionally 4/8-bit), ``from_config`` for a config.
    ``shard_for`` (``fsdp2`` / ``zero3``, several processes): a pretrained causal LM in safetensors is built
    sharded and each process reads only its shard (:mod:`peftkit.sharded`); a config-built model (random weights
    that must be the same on every process), a quantized or a classification model (its new head is not in the
    checkpoint) is loaded whole and sharded by the engine. ``engine``: the run's engine (under ``fsdp2`` a 4-bit
    base stores its codes in ``dtype``, so FSDP2 shards them)."""
    from transformers import (
        AutoConfig,
        AutoModelForCausalLM,
        AutoModelForImageTextToText,
        AutoModelForSequenceClassification,
    )

    classification = model_section.task == "sequence-classification"
    auto = (AutoModelForSequenceClassification if classification else
            AutoModelForImageTextToText if model_section.task == VISION_TASK else AutoModelForCausalLM)
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
            raise ConfigError(f"model.config: cannot build a '{model_type}' config "
                              f"({_first_line(exc)[:300]})") from None
        model = _from_config(auto, config, model_type, dtype)
    else:
        name = gguf_reference(model_section) if model_section.gguf_file else model_section.name
        path = resolve_model_ref(name, "model.gguf_file" if model_section.gguf_file else "model.name")
        if model_section.quantize:
            from transformers import BitsAndBytesConfig

            # Under fsdp2 the 4-bit codes are stored in the model's dtype (bitsandbytes' quant_storage; the codes
            # are the same bytes), so FSDP2 can shard them (FSDP-QLoRA): integer storage cannot be a DTensor.
            storage = {"bnb_4bit_quant_storage": dtype} if engine == "fsdp2" else {}
            extra["quantization_config"] = (
                BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype,
                                   **storage)
                if model_section.quantize == "nf4" else BitsAndBytesConfig(load_in_8bit=True)
            )
        files = None
        if shard_for and not model_section.quantize and not classification:
            from ..sharded import checkpoint_files

            files = checkpoint_files(path)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if files:
                    from .. import sharded

                    model = sharded.from_pretrained(path, engine=shard_for, dtype=dtype, auto_class=auto, files=files)
                else:
                    model = auto.from_pretrained(path, dtype=dtype, **extra)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"model.name: could not load '{model_section.name}' as a {model_section.task} model "
                              f"({_first_line(exc)}); check the hub id or folder") from None
    if tokenizer is not None and getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    if model_section.name:
        from ..provenance import record_base_reference

        record_base_reference(model, gguf_reference(model_section) if model_section.gguf_file
                              else model_section.name)  # adapters record "pkg:..." / the hub id, not a local path
    return model


def adapter_base_model(adapter_dir: Path, base: str | None, **load_options):
    """(model, resolved path): the base model an adapter belongs to (``base``, else the one the adapter records),
    with the head class its recorded task type implies (``--base`` names the field in errors)."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoModelForTokenClassification,
    )

    from .. import checkpoint

    config = checkpoint.read_config(adapter_dir)
    ref = base or config.get("base_model_name_or_path")
    if not ref:
        raise ConfigError(f"--base: {adapter_dir} records no base model; pass --base MODEL")
    auto = {"CAUSAL_LM": AutoModelForCausalLM, "SEQ_CLS": AutoModelForSequenceClassification,
            "TOKEN_CLS": AutoModelForTokenClassification}.get(config.get("task_type"), AutoModel)
    path = resolve_model_ref(ref, "--base")
    # A classification adapter's head has its own number of classes and class names: the base gets that head.
    labels = checkpoint.model_labels(adapter_dir) if auto is not AutoModel else {}
    try:
        model = auto.from_pretrained(path, **labels, **load_options)
    except Exception as exc:
        raise ConfigError(f"--base: could not load '{ref}' ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    checkpoint.record_base_reference(model, ref)
    return model, path
