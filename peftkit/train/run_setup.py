"""A run's setup, before the first step: the Accelerator, then tokenizer, data, model, adapter (and its
data-driven init), optimizer and schedule, each checked short of training (``prepare``)."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import warnings
from dataclasses import dataclass
from typing import Any

import torch

import peftkit

from .. import registry
from ..config import resolve_config
from ..errors import ConfigError
from ..unpad import unpad_linears_if_exact
from . import engines, evaluation
from . import threads as cpu_threads
from .build import Examples, load_examples, load_model, load_tokenizer, num_labels
from .data import BatchPlan, check_lengths, check_packed_attention, example_lengths
from .lr_schedule import lr_lambda
from .parked_tokenizer import ParkedTokenizer
from .recipe import DEFAULT_MAX_STEPS, Recipe, check_warmup, total_steps
from .vision import VISION_TASK, adapter_options, collate  # collate: data.collate, plus images' pixel values


@dataclass
class Run:
    """Everything ``prepare`` builds: the pieces the loop works with, before Accelerate wraps them."""

    recipe: Recipe
    accelerator: Any
    tokenizer: Any  # a ParkedTokenizer (text runs: parked_tokenizer.live gives the real one), or vision's processor
    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    schedule: Any
    examples: Examples
    plan: BatchPlan
    classification: bool
    engine: engines.Engine | None = None
    threads_note: str = ""  # how many CPU threads and why (train/threads.py), printed when training starts
    padding_free: bool = False  # training batches share rows (data.collate): data.padding_free and a model whose
    # attention keeps restarting position ids apart


# The packages each of Accelerate's trackers imports (any one of them will do)
TRACKER_MODULES = {"tensorboard": ("tensorboard", "tensorboardX"), "comet_ml": ("comet_ml",)}


def make_accelerator(recipe: Recipe):
    """The Accelerator: mixed precision, trackers, and DDP told about schedules that skip adapters."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs

    # First: Accelerate builds its plugins from the launcher's config in the constructor, and an engine peftkit
    # refuses (FSDP1 on a CPU machine: "no available devices found") would fail there, before peftkit's message.
    engines.select(recipe)
    adapter = resolve_config(recipe.adapter.method, **recipe.adapter.options)  # also checks the options early
    # A schedule may switch adapters off for a step (their parameters get no gradient); DDP must allow that.
    ddp = DistributedDataParallelKwargs(find_unused_parameters=adapter.schedule != "none")
    trackers = list(recipe.logging.report_to)
    for tracker in trackers:
        modules = TRACKER_MODULES.get(tracker, (tracker,))
        if not any(importlib.util.find_spec(module) for module in modules):
            raise ConfigError(f"logging.report_to: '{tracker}' needs the {modules[0]} package; pip install "
                              f"{'peftkit[tensorboard]' if tracker == 'tensorboard' else modules[0]} or remove it from "
                              "logging.report_to")
    # Under torchrun on a machine without GPUs, Accelerate only forms the gloo process group when told cpu=True.
    cpu_processes = int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()
    _forget_earlier_accelerator_settings(recipe.training.mixed_precision)
    return Accelerator(mixed_precision=recipe.training.mixed_precision, log_with=trackers or None,
                       project_dir=recipe.training.output_dir, kwargs_handlers=[ddp], cpu=cpu_processes or None)


def _forget_earlier_accelerator_settings(mixed_precision: str) -> None:
    """Accelerate keeps one process-wide ``AcceleratorState`` and refuses a second ``Accelerator`` with another
    mixed precision ("restart your runtime completely"). A run is one ``train()``, so a notebook that trains in
    bf16 and then in fp32 gets a fresh state; the ``PartialState`` (the process group) is kept."""
    from accelerate.state import AcceleratorState

    state = AcceleratorState._shared_state
    if state and state.get("_mixed_precision", mixed_precision) != mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)


def prepare(recipe: Recipe, accelerator=None) -> Run:
    """Build tokenizer, data, model, adapter, optimizer and schedule; checks everything short of training."""
    engine_name = engines.select(recipe)  # an unsupported engine stops here, before anything is built
    accelerator = accelerator or make_accelerator(recipe)
    training = recipe.training
    if recipe.model.task == VISION_TASK and accelerator.num_processes > 1:
        # Untested on several processes (the image batches' split and the global token mean): refused rather than
        # risk a run that trains on other batches than one process would.
        raise ConfigError(f"model.task: {VISION_TASK} runs on one process for now; this launch has "
                          f"{accelerator.num_processes}. Launch it without torchrun/accelerate (one process)")
    # Before anything is built: the model's first kernels and the data workers run with the chosen threads.
    threads, why, hint = cpu_threads.apply(training.threads)
    threads_note = f"{threads} CPU thread(s) per process ({why}){'; ' + hint if hint else ''}"
    # A schedule its options do not fit fails here, before anything is loaded or written (the run's length from
    # training.epochs is known once the data is: a provisional one stands in for it).
    lr_lambda(with_steps(recipe, recipe.training.max_steps or DEFAULT_MAX_STEPS))
    evaluation.check_hooks(training.eval_metrics)  # a hook that does not import fails now, not after generation
    tokenizer = load_tokenizer(recipe)
    examples = load_examples(recipe, tokenizer)
    if recipe.model.task != VISION_TASK:
        # From here on the run needs of its tokenizer only the pad id, its saved files and, for generation-based
        # evaluation, a copy loaded for the moment: the object itself is freed (parked_tokenizer). A vision
        # processor is kept whole (its image processor is saved and loaded with it; not measured).
        tokenizer = ParkedTokenizer(tokenizer)
    classification = recipe.model.task == "sequence-classification"
    engine = engines.make(engine_name, accelerator)
    shard_for = engines.load_sharded(engine_name, accelerator.num_processes)
    model = load_model(recipe.model, tokenizer, labels=num_labels(recipe, examples) if classification else None,
                       label_names=examples.train.label_names, seed=training.seed, shard_for=shard_for,
                       engine=engine_name)
    if engine.pins_quantized_layouts:
        engines.keep_quantized_layouts(model)  # before the first forward (the padding-free check below runs one)
    if classification:
        _check_labels(examples, model.config.num_labels)
    check_lengths(examples, model.config.get_text_config(), recipe.data)
    if examples.train.position_ids is not None:
        _check_packing(model)
    # The exactness checks of padding-free rows and unpadded linears run a forward of their own: a base loaded
    # as shards (fsdp2/zero3 on several processes) has no whole weights to run it on, so both stay off there.
    padding_free = (recipe.data.padding_free and not classification and examples.train.position_ids is None
                    and shard_for is None and recipe.model.task != VISION_TASK and _keeps_rows_apart(model))
    if checkpoints_activations(recipe, model, engine_name):
        model.config.use_cache = False
        options = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=options)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=options)
        if reentrant_checkpointing(recipe, engine_name, accelerator.num_processes):
            # The reentrant recompute differentiates w.r.t. each layer's inputs: they must require grad for the
            # gradients to reach the adapters inside (the frozen embeddings' output is made to; checkpoint_layer
            # falls back to the non-reentrant variant for a call where they do not).
            model.enable_input_require_grads()
            for module in model.modules():
                if getattr(module, "_gradient_checkpointing_func", None) is not None:  # transformers' layers
                    module._gradient_checkpointing_func = checkpoint_layer
    plan = BatchPlan(len(examples.train), training.batch_size, accelerator.num_processes,
                     accelerator.process_index, training.seed,
                     lengths=example_lengths(examples.train) if recipe.data.group_by_length else None)
    # training.epochs becomes a step count here; the Run's recipe (a copy) holds the run's max_steps.
    steps = total_steps(training, plan.batches_per_epoch)
    check_warmup(training, steps)
    recipe = with_steps(recipe, steps)
    training = recipe.training

    adapter = recipe.adapter
    config = resolve_config(adapter.method, **adapter.options)
    init_data = None
    init_component = registry.get_component("init", config.init)
    if init_component.needs_data:
        # Each process reads its shard of the first init_batches global batches; the init reduces its
        # statistics across processes, so every process starts from the same adapter.
        pad = tokenizer.pad_token_id
        # init_batches optimizer steps' worth of micro-batches: the examples (and, through the init's token
        # weighting, the statistics) of the one-batch run, whatever grad_accum splits them into. An init whose
        # statistic depends on the grouping (EVA's incremental PCA) gets each step's micro-batches as one batch.
        micro = training.grad_accum
        if init_component.per_step_batches:
            init_data = [collate(examples.train, [i for m in range(micro) for i in plan.indices(step * micro + m)],
                                 pad, classification) for step in range(adapter.init_batches)]
        else:
            init_data = [collate(examples.train, plan.indices(i), pad, classification)
                         for i in range(adapter.init_batches * micro)]
    wrap_options = adapter.options
    if recipe.model.task == VISION_TASK:  # the language model only, unless adapter.vision_tower
        wrap_options = adapter_options(model, wrap_options, adapter.vision_tower)
    pending = peftkit.api.inject_adapters(model, adapter.method, data_given=init_data is not None, **wrap_options)
    if engine.shards_before_init:
        # The init's forwards then run on the sharded model, on the training device, and its statistics are
        # reduced there (NCCL takes no CPU tensor); the optimizer is built on the tensors that train.
        model = engine.shard(model)
    model = pending.run(init_data)
    if classification and training.unpad and shard_for is None:
        # Linear layers and adapters on the real tokens only, where that is exact for this model (peftkit.unpad).
        unpad_linears_if_exact(model)

    options = dict(recipe.optimizer.options)
    name = recipe.optimizer.name or config.optimizer
    if "weight_decay" in registry.get_component("optimizer", name).option_names():
        options["weight_decay"] = recipe.optimizer.weight_decay
    elif recipe.optimizer.weight_decay:
        raise ConfigError(f"optimizer.weight_decay: the '{name}' optimizer has no weight decay; set it to 0")
    if recipe.optimizer.name:
        options["name"] = recipe.optimizer.name
    optimizer = peftkit.optimizer(model, recipe.optimizer.lr, base_lr=recipe.optimizer.base_lr, **options)
    schedule = peftkit.callbacks(model, optimizer=optimizer)
    return Run(recipe, accelerator, tokenizer, model, optimizer, schedule, examples, plan, classification, engine,
               threads_note, padding_free)


# Engines under which training.gradient_checkpointing: auto turns checkpointing on (fsdp2 and zero3 gather each
# unit's weights again for the recompute, and that combination is not measured: there it stays off unless asked).
AUTO_CHECKPOINTING_ENGINES = ("ddp", "zero2")


def checkpoints_activations(recipe: Recipe, model: torch.nn.Module, engine_name: str) -> bool:
    """Whether the run recomputes each layer's activations in the backward (training.gradient_checkpointing).

    ``auto`` (the default) turns it on for causal-LM text training (sft, dpo, simpo) under ddp or zero2 on a model
    that supports it: there the activations of every layer, kept until the backward, are what a step's memory
    grows with (measured on SmolLM2-135M and Gemma-3-270M SFT: peak RSS about 0.6-0.8x of the run without it, for
    about 1.3x the step's CPU time), and TRL's SFTTrainer checkpoints by default. Classification (short
    sequences, the unpadded linears) and vision runs keep their activations. Checkpointing is exact: the
    recompute replays the same RNG state (dropout), so losses and gradients are those of the run without it."""
    wanted = recipe.training.gradient_checkpointing
    if wanted != "auto":
        return bool(wanted)
    return (recipe.model.task == "causal-lm" and engine_name in AUTO_CHECKPOINTING_ENGINES
            and bool(getattr(model, "supports_gradient_checkpointing", False)))


def reentrant_checkpointing(recipe: Recipe, engine_name: str, processes: int) -> bool:
    """Whether checkpointing runs each layer's forward under no_grad and replays it with autograd in the backward
    (torch's reentrant variant) rather than recording the layer's graph with its saved tensors dropped
    (non-reentrant). Both replay the RNG state and give the same gradients; the reentrant forward records no
    graph inside the layers, whose many small, long-lived allocations otherwise split the freed activation memory
    of every layer in glibc's heap (measured on SmolLM2-135M SFT on CPU: the checkpointed forward left ~19 MiB of
    unusable heap per layer, ~570 MiB in all, against ~80 MiB reentrant). Used for text causal LMs on one process
    under ddp: DDP's gradient hooks with unused parameters (schedule methods) and the sharded engines are
    documented for the non-reentrant variant only, and vision runs may adapt layers whose inputs do not require
    grad (the reentrant backward would give them none)."""
    return recipe.model.task == "causal-lm" and engine_name == "ddp" and processes == 1


def checkpoint_layer(function, *args):
    """One checkpointed layer call as transformers makes it (``function``: the layer with its keyword arguments
    bound, ``args``: its positional ones), in torch's reentrant variant where that gives the gradients the
    non-reentrant one gives: with autograd on, a positional tensor must require grad (else the reentrant backward
    never reaches the layer and its adapters get no gradient) and no bound keyword tensor may (the reentrant
    variant differentiates only w.r.t. the positional inputs). Otherwise the call is non-reentrant."""
    from torch.utils._pytree import tree_leaves
    from torch.utils.checkpoint import checkpoint

    reentrant = True
    if torch.is_grad_enabled():
        bound = tree_leaves(dict(getattr(function, "keywords", None) or {}))
        reentrant = (any(isinstance(a, torch.Tensor) and a.requires_grad for a in args)
                     and not any(isinstance(t, torch.Tensor) and t.requires_grad for t in bound))
    return checkpoint(function, *args, use_reentrant=reentrant)


def with_steps(recipe: Recipe, steps: int) -> Recipe:
    """A copy of ``recipe`` whose ``training.max_steps`` is ``steps`` (the caller's recipe is left as given)."""
    if recipe.training.max_steps == steps:
        return recipe
    return dataclasses.replace(recipe, training=dataclasses.replace(recipe.training, max_steps=steps))


def _check_packing(model) -> None:
    """Packed rows are kept apart by transformers' masks built from position ids, which it skips when a KV
    cache exists: training needs none. A model that ignores them is warned about, once."""
    model.config.use_cache = False
    if not check_packed_attention(model):
        warnings.warn(f"data.packing: {type(model).__name__} lets packed conversations attend to each other (its "
                      "attention ignores per-conversation position ids); losses differ from unpacked training. Set "
                      "data.packing=false for exact losses", stacklevel=2)


def _keeps_rows_apart(model) -> bool:
    """Whether padding-free batches are exact for ``model``: its attention keeps examples that share a row apart
    by their restarting position ids (the check runs with no KV cache, as training does). A model whose attention
    does not (its own masking code) trains on padded batches instead: the same loss, more padded tokens."""
    use_cache = model.config.use_cache
    model.config.use_cache = False
    if check_packed_attention(model):
        return True
    model.config.use_cache = use_cache
    return False


def _check_labels(examples: Examples, labels: int) -> None:
    for key, split in (("data.train", examples.train), ("data.eval", examples.eval)):
        if split is not None and any(not 0 <= y < labels for y in split.labels):
            raise ConfigError(f"{key}: labels must lie in [0, {labels}) (model.num_labels); found "
                              f"{sorted(set(split.labels))[:8]}")

