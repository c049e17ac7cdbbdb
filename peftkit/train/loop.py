"""The training loop, on Accelerate. Read ``train`` top to bottom: set up, (resume), step, evaluate, save.

One step = ``grad_accum`` micro-batches of ``batch_size`` examples on each process, one backward each, then
gradient clipping, ``optimizer.step()``, the LR scheduler step, the method's ``schedule.on_step`` and
``zero_grad`` (the order ../shared/methods/README.md §4.1 fixes). Only the main process writes files.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import signal
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

import peftkit

from .. import registry
from ..fileio import atomic_write_bytes
from ..config import resolve_config
from ..errors import ConfigError
from ..inject import adapter_layers, state_of
from ..chunked_loss import target_positions
from ..loss import loss_mode, share_of_global_mean
from ..preference import PAIR_OBJECTIVES, REWARD_METRICS, pair_loss_share, pair_losses, reward_sums
from ..unpad import unpad_linears_if_exact
from . import checkpointing, engines, evaluation
from . import threads as cpu_threads
from .build import Examples, load_examples, load_model, load_tokenizer, num_labels
from .data import (BatchPlan, Tokenized, check_lengths, check_packed_attention, collate_pairs, example_lengths,
                   loss_units)
from .vision import VISION_TASK, adapter_options
from .vision import collate  # data.collate, plus the pixel values of conversations with images
from .guard import DivergenceGuard, GuardSettings
from .metrics import MetricsLog, plot
from .best import restore_best, write_best
from .monitor import Monitors
from .recipe import DEFAULT_MAX_STEPS, Recipe, check_warmup, objective_settings, total_steps, warmup_steps

ADAPTER_DIR = "adapter"

# A hook is called on every process after each optimizer step with (step, record of that step).
StepHook = Callable[[int, dict[str, Any]], None]


@dataclass
class RunResult:
    """How a run ended: ``status`` is "done", "interrupted" (SIGINT/SIGTERM: a checkpoint was written),
    "nan" (a non-finite loss: nothing was written for the bad step) or "diverged" (training.divergence_guard)."""

    status: str
    step: int
    output_dir: Path
    eval_metrics: dict[str, float] = field(default_factory=dict)
    signal_number: int | None = None
    checkpoint: Path | None = None
    seconds: float = 0.0
    best: Path | None = None  # <output_dir>/best/ (training.best): the adapter at the best evaluation
    best_step: int | None = None
    stopped_early: bool = False  # training.early_stopping ended the run before max_steps


@dataclass
class Run:
    """Everything ``prepare`` builds: the pieces the loop works with, before Accelerate wraps them."""

    recipe: Recipe
    accelerator: Any
    tokenizer: Any
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
    # Before anything is built: the model's first kernels and the data workers run with the chosen threads.
    threads, why, hint = cpu_threads.apply(training.threads)
    threads_note = f"{threads} CPU thread(s) per process ({why}){'; ' + hint if hint else ''}"
    # A schedule its options do not fit fails here, before anything is loaded or written (the run's length from
    # training.epochs is known once the data is: a provisional one stands in for it).
    lr_lambda(with_steps(recipe, recipe.training.max_steps or DEFAULT_MAX_STEPS))
    evaluation.check_hooks(training.eval_metrics)  # a hook that does not import fails now, not after generation
    tokenizer = load_tokenizer(recipe)
    examples = load_examples(recipe, tokenizer)
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
    if training.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach the adapters though the frozen base's inputs need none.
        model.config.use_cache = False
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x; the old name is deprecated
            model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
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
            raise ConfigError(f"{key}: labels must lie in [0, {labels}) (model.num_labels); found {sorted(set(split.labels))[:8]}")


# Where training.min_lr goes: the keyword each of transformers' schedules takes its floor as (a rate: min_lr / lr).
MIN_LR_KEYWORDS = {"cosine_with_min_lr": "min_lr_rate", "cosine_warmup_with_min_lr": "min_lr_rate",
                   "warmup_stable_decay": "min_lr_ratio", "polynomial": "lr_end"}


def make_scheduler(recipe: Recipe, optimizer: torch.optim.Optimizer):
    """``training.lr_schedule`` through ``transformers.get_scheduler``: warmup (``training.warmup``), the
    schedule over ``max_steps``, the floor ``training.min_lr`` where the schedule has one, and
    ``training.lr_schedule_options`` (num_cycles, power, num_decay_steps ...) as its other arguments."""
    from transformers import get_scheduler

    training = recipe.training
    name = training.lr_schedule
    if name == "constant" and warmup_steps(training):
        name = "constant_with_warmup"  # training.warmup applies to every schedule (transformers' constant has none)
    options = dict(training.lr_schedule_options)
    if training.min_lr is not None:
        keyword = MIN_LR_KEYWORDS.get(name)
        if keyword is None:
            raise ConfigError(f"training.min_lr: the '{name}' schedule has no floor; use one of {sorted(MIN_LR_KEYWORDS)} "
                              "or set training.min_lr=null")
        # optimizer.lr: auto resolves per method: the floor is relative to the rate the optimizer was built with
        choice = getattr(optimizer, "peftkit_lr", None)
        peak = recipe.optimizer.lr if recipe.optimizer.lr is not None else (
            choice.lr if choice is not None else optimizer.param_groups[0]["lr"])
        if training.min_lr > peak:
            # A floor above the peak would make the schedule rise as it "decays" (a rate ratio above 1).
            raise ConfigError(f"training.min_lr: the floor {training.min_lr:g} is above the peak learning rate "
                              f"{peak:g} (optimizer.lr); expected min_lr <= lr: lower training.min_lr (e.g. "
                              f"{peak / 10:g}) or raise optimizer.lr")
        options[keyword] = training.min_lr if keyword == "lr_end" else training.min_lr / peak
    elif name in ("cosine_with_min_lr", "cosine_warmup_with_min_lr"):
        raise ConfigError(f"training.min_lr: the '{name}' schedule needs its floor; set training.min_lr (e.g. 1e-5)")
    if name == "warmup_stable_decay":
        options.setdefault("num_decay_steps", max(1, round(0.1 * training.max_steps)))  # the last 10 %
    try:
        return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps(training),
                             num_training_steps=training.max_steps, scheduler_specific_kwargs=options)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"training.lr_schedule_options: the '{name}' schedule rejects {options} ({exc}); see "
                          "transformers.get_scheduler's schedules for their arguments") from None


def lr_lambda(recipe: Recipe) -> Callable[[int], float]:
    """The LR multiplier after ``step`` optimizer steps, as ``make_scheduler`` applies it."""
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=recipe.optimizer.lr or recipe.optimizer.base_lr)
    return make_scheduler(recipe, probe).lr_lambdas[0]


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then it checkpoints and exits).

    Installed when the first step starts; with ``keep=True`` leaving the ``with`` block keeps it installed (the
    final evaluation and saves run under it too) until ``restore()``.
    """

    def __init__(self, keep: bool = False) -> None:
        self.received: int | None = None
        self.keep = keep
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for number in (signal.SIGINT, signal.SIGTERM):
            if number in self._previous:
                continue
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals stay with the host program
                pass
        return self

    def _handle(self, number, frame) -> None:
        self.received = number

    def __exit__(self, *exc) -> None:
        if not self.keep:
            self.restore()

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()


def train(recipe: Recipe, resume: bool = False, hooks: list[StepHook] | None = None) -> RunResult:
    """Run a recipe to ``training.max_steps`` (or to the first signal or non-finite loss).

    The main process holds the run folder's lock (``checkpointing.RunLock``) for the whole run; SIGINT/SIGTERM
    are handled from the first step until this function returns.
    """
    accelerator = make_accelerator(recipe)
    signals = StopSignals(keep=True)
    try:
        with checkpointing.RunLock(recipe.training.output_dir, accelerator):
            return _train(recipe, resume, hooks, accelerator, signals)
    finally:
        signals.restore()


def _train(recipe: Recipe, resume: bool, hooks: list[StepHook] | None, accelerator, signals: StopSignals) -> RunResult:
    started = time.perf_counter()
    training = recipe.training
    output_dir = Path(training.output_dir)
    last = checkpointing.check_run_folder(output_dir, resume)
    run = prepare(recipe, accelerator)
    given, recipe = recipe, run.recipe  # run.recipe: training.max_steps is the run's length (training.epochs)
    training = recipe.training
    main = accelerator.is_main_process
    monitors = Monitors.from_recipe(training)

    guard_settings = GuardSettings.from_recipe(training.divergence_guard)
    guard = DivergenceGuard(guard_settings) if guard_settings else None
    choice = getattr(run.optimizer, "peftkit_lr", None)
    if main:
        print(f"peftkit: {run.threads_note}", flush=True)
    if main and choice is not None:
        print(f"peftkit: {choice.describe()}", flush=True)
        print(f"peftkit: {recipe.adapter.method} on {recipe.model.name or recipe.model.config.get('model_type')} | "
              f"{peftkit.trainable_parameters(run.model)} | {accelerator.num_processes} process(es), "
              f"global batch {training.batch_size * training.grad_accum * accelerator.num_processes}"
              f"{'' if accelerator.num_processes == 1 else ', engine ' + run.engine.name} | {training.max_steps} steps "
              f"= {_epochs(run.plan, training.max_steps * training.grad_accum):g} epochs of {len(run.examples.train)} "
              "examples", flush=True)
    if main:
        checkpointing.claim_run_folder(output_dir)
        atomic_write_bytes(output_dir / "recipe.yaml", given.dump().encode())
    engine = run.engine
    model, optimizer = engine.prepare(run.model, run.optimizer)
    lr_scheduler = make_scheduler(recipe, optimizer)
    schedule = run.schedule
    schedule.on_train_begin_(training.max_steps)
    fingerprint = {"method": recipe.adapter.method, "seed": training.seed, "batch_size": training.batch_size,
                   "processes": accelerator.num_processes, "grad_accum": training.grad_accum,
                   "train_examples": len(run.examples.train)}
    if recipe.data.group_by_length:  # another batch order: a run without it cannot resume into one with it
        fingerprint["group_by_length"] = True
    state = checkpointing.TrainState(fingerprint=fingerprint)
    if resume:
        state = checkpointing.load(last, accelerator, model, optimizer, lr_scheduler, schedule, fingerprint)
        checkpointing.restore_rng(last, accelerator.process_index)  # last: nothing may draw random numbers after
        if main:
            restore_best(output_dir, last, state.monitors)
            print(f"peftkit: resumed from {last} (step {state.step})", flush=True)
    metrics = MetricsLog(output_dir, enabled=main)
    finished = state.step >= training.max_steps or monitors.stopped(state.monitors)
    metrics.truncate_after(state.step, evals_at_step=not finished or monitors.stopped(state.monitors))
    if recipe.logging.report_to:
        accelerator.init_trackers("peftkit", config=_flat(recipe.to_dict()))

    trainable = [p for p in model.parameters() if p.requires_grad]
    # Architectures with a loss term of their own (HRA's, ElaLoRA's orthogonality); looked up once.
    regularized = any(layer.regularization() is not None for layer in adapter_layers(run.model).values())
    # The loss of a step is the mean over the global batch's loss units (target tokens, or examples), whatever
    # its split into micro-batches and processes (peftkit.loss). Every host knows every example's units from the
    # batch plan, so the global count needs no collective. Engines average gradients over processes: each
    # process's share is scaled back up by their number.
    pairs = training.objective in PAIR_OBJECTIVES  # DPO / SimPO: the loss unit is the preference pair
    beta, gamma = objective_settings(training)
    # The reference of DPO: the same model with its adapters off, called outside an engine's wrapper (DDP's
    # forward would prepare a gradient synchronisation for a forward that has no backward).
    reference = engine.eval_model(model)
    units = loss_units(run.examples.train, run.classification, pairs=pairs)
    lengths = example_lengths(run.examples.train)
    # The chunked head (peftkit.chunked_loss) calls the model's base itself: not through a DDP wrapper, whose
    # forward is what synchronises gradients (head_of also refuses FSDP2 and ZeRO-3 heads, hooks, adapters).
    mode = loss_mode(run.model, causal_lm=not run.classification,
                     chunked=training.chunked_loss and model is run.model and recipe.model.task != VISION_TASK)
    process_scale = accelerator.num_processes if engine.averages_gradients else 1
    pad_id = run.tokenizer.pad_token_id
    progress = _progress_bar(main and recipe.logging.progress_bar, training.max_steps, state.step)
    window = {"loss": 0.0, "steps": 0, "time": time.perf_counter(), "tokens_at_start": state.tokens,
              "rewards": [0.0] * len(REWARD_METRICS), "reward_steps": 0}
    pending_losses: list[torch.Tensor] = []  # per-step losses on the device, not read yet
    pending_rewards: list[torch.Tensor] = []  # pair objectives: per-step reward means (REWARD_METRICS), not read yet
    result = None
    last_eval: tuple[int, dict[str, float]] | None = None  # (step, values) of the newest evaluation in this process

    def stop_nonfinite(what: str) -> RunResult:
        # The weights and every checkpoint on disk stay finite: checkpoints are checked before they are written.
        good = checkpointing.latest(output_dir)
        if main:
            progress.close()
            print(f"peftkit: {what}; training stopped. The last good checkpoint is "
                  f"{good or 'none (no checkpoint was saved yet)'}; lower optimizer.lr, set training.max_grad_norm, "
                  f"or check the data, then train again{' with --resume' if good else ''}.", flush=True)
        return RunResult("nan", state.step, output_dir, checkpoint=good)

    model.train()
    with signals:
        while state.step < training.max_steps and not monitors.stopped(state.monitors):
            # ---- one optimizer step: grad_accum micro-batches, each with its own backward
            step_loss = None  # in the loss's dtype (fp64 on an fp64 model)
            step_rewards = None  # pair objectives: this process's share of the step's mean rewards (REWARD_METRICS)
            step_units = int(sum(units[run.plan.global_indices(state.position + m)].sum()
                                 for m in range(training.grad_accum)))
            for micro in range(training.grad_accum):
                indices = run.plan.indices(state.position)
                if pairs:
                    batch = collate_pairs(run.examples.train, indices, pad_id, run.padding_free)
                else:
                    batch = collate(run.examples.train, indices, pad_id, run.classification, run.padding_free)
                # Every process's tokens, counted on the host from the batch plan: no read of a device tensor.
                state.tokens += int(lengths[run.plan.global_indices(state.position)].sum())
                positions = (target_positions(batch["labels"]) if (mode == "chunked" or pairs and training.chunked_loss)
                             else None)  # on the host
                batch = {k: v.to(accelerator.device, non_blocking=True) for k, v in batch.items()}
                state.position += 1
                # Gradients are all-reduced once per step, on the last micro-batch.
                with engine.no_sync(model, micro == training.grad_accum - 1):
                    with accelerator.autocast():
                        if pairs:
                            loss, stats = pair_loss_share(model, batch, step_units, training.objective, beta, gamma,
                                                          reference=reference, pairs=len(indices),
                                                          chunked=training.chunked_loss, positions=positions)
                            share = reward_sums(stats) * (accelerator.num_processes / max(step_units, 1))
                            step_rewards = share if step_rewards is None else step_rewards + share
                        else:
                            loss = share_of_global_mean(model, batch, int(units[indices].sum()), step_units, mode,
                                                        positions)
                        loss = loss * process_scale
                        if regularized:
                            # A per-step term, not a per-token one: once per step in the gradient average, as in
                            # the one-batch run (each micro-batch on each process adds 1/grad_accum of it).
                            loss = loss + peftkit.regularization_loss(run.model) / training.grad_accum
                    engine.backward(loss)
                step_loss = loss.detach() if step_loss is None else step_loss + loss.detach()
            engine.reduce_gradients(trainable)
            # The losses stay on the device until a step that needs them (logging, evaluation, saving, the last
            # step, a received signal, the divergence guard): one host sync (and one collective) there, none on the
            # steps between. The guard judges every step's loss, so a run with it on reads every step.
            pending_losses.append(step_loss)
            if step_rewards is not None:
                pending_rewards.append(step_rewards)
            losses = None
            if (guard is not None or _reads_losses(state.step + 1, training)
                    or (accelerator.num_processes == 1 and signals.received)):
                losses = _read_losses(pending_losses, accelerator)
                if pending_rewards:  # each process's share scaled by their number: the mean over processes is global
                    for values in _read_losses(pending_rewards, accelerator):
                        window["rewards"] = [a + b for a, b in zip(window["rewards"], values)]
                        window["reward_steps"] += 1
                bad = next((i for i, value in enumerate(losses) if not math.isfinite(value)), None)
                if guard is not None:  # halve: a non-finite loss restarts too (guard.check); else the stop below
                    verdict, state = guard.check(state, losses[-1] if bad is None else losses[bad], dict(
                        accelerator=accelerator, model=model, optimizer=optimizer, lr_scheduler=lr_scheduler,
                        schedule=schedule, fingerprint=fingerprint), output_dir)
                    if verdict == "restarted":
                        optimizer.zero_grad(set_to_none=True)
                        if main:
                            restore_best(output_dir, guard.restarted_from, state.monitors)
                        metrics.truncate_after(state.step)
                        # The abandoned steps leave the logging window and the progress bar.
                        window.update(loss=0.0, steps=0, time=time.perf_counter(), tokens_at_start=state.tokens,
                                      rewards=[0.0] * len(REWARD_METRICS), reward_steps=0)
                        pending_rewards.clear()
                        progress.n = state.step
                        continue
                    if verdict == "stop":
                        good = checkpointing.latest(output_dir)
                        if main:
                            progress.close()
                            print(guard.message(state.step + 1, good), flush=True)
                        result = RunResult("diverged", state.step, output_dir, checkpoint=good)
                        break
                if bad is not None:
                    # Stop before this optimizer step; an earlier bad step (since the last read) was applied, but
                    # nothing has been saved since: every checkpoint step reads first, and checkpoints are checked
                    # finite before they are written.
                    bad_step = state.step + 1 - len(losses) + 1 + bad
                    result = stop_nonfinite(f"the loss is {losses[bad]} at step {bad_step}")
                    result.step = bad_step - 1
                    break
            grad_norm = None
            if training.max_grad_norm is not None:
                grad_norm = engine.clip_grad_norm_(trainable, training.max_grad_norm)
            lr_used = optimizer.param_groups[0]["lr"] / optimizer.param_groups[0].get("lr_ratio", 1.0)
            optimizer.step()
            lr_scheduler.step()
            state.step += 1
            schedule.on_step(state.step, training.max_steps)
            optimizer.zero_grad(set_to_none=True)

            # ---- bookkeeping: log, evaluate, checkpoint, hooks, signals
            record: dict[str, Any] = {"step": state.step}  # "loss" only where it was read
            if losses is not None:
                window["loss"] += sum(losses)
                window["steps"] += len(losses)
                record["loss"] = losses[-1]
            if state.step % training.log_every == 0 or state.step == training.max_steps:
                rewards = _window_rewards(window) if pairs else {}
                record = {**_log_record(state, window, lr_used, grad_norm, run.plan), **rewards}
                metrics.write(record)
                if recipe.logging.report_to:
                    accelerator.log({k: v for k, v in record.items() if k != "step"}, step=state.step)
                progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                     tok_s=f"{record['tokens_per_s']:.0f}", refresh=False)
            progress.update(1)
            if training.eval_every and state.step % training.eval_every == 0 and state.step < training.max_steps:
                values = evaluate(run, model)
                _write_eval(values, state.step, _epochs(run.plan, state.position), metrics, accelerator, recipe,
                            progress)
                last_eval = (state.step, values)
                _judge(monitors, state, values, run, model, output_dir, progress)
            try:
                if training.save_every and state.step % training.save_every == 0:
                    checkpointing.save(accelerator, model, optimizer, lr_scheduler, schedule, _timed(state, started),
                                       output_dir, training.keep_checkpoints)
                for hook in hooks or []:
                    hook(state.step, record)
                stop = (_stop_requested(signals, accelerator, collective=losses is not None)
                        and state.step < training.max_steps and not monitors.stopped(state.monitors))
                if stop:
                    path = checkpointing.save(accelerator, model, optimizer, lr_scheduler, schedule,
                                              _timed(state, started), output_dir, training.keep_checkpoints)
            except checkpointing.NonFiniteStateError as exc:
                result = stop_nonfinite(f"the training state is not finite ({exc})")
                break
            if stop:
                if main:
                    progress.close()
                    print(f"peftkit: stopped by signal {signals.received} at step {state.step}; checkpoint {path}. "
                          "Continue with --resume.", flush=True)
                result = RunResult("interrupted", state.step, output_dir, signal_number=signals.received or
                                   signal.SIGTERM, checkpoint=path)
                break
    if result is not None:
        accelerator.end_training()
        result.seconds = time.perf_counter() - started
        return result

    # ---- the end: final evaluation, final checkpoint, the adapter in PEFT's format, the plot
    progress.close()
    stopped_early = monitors.stopped(state.monitors)
    if last_eval is not None and last_eval[0] == state.step:
        eval_metrics, evaluated_here = last_eval[1], True  # early stopping evaluated this step already
    else:
        eval_metrics = evaluate(run, model, signals) if run.examples.eval is not None else {}
        evaluated_here = stopped_early  # a resumed run that had stopped early: its record is in metrics.jsonl
    final_checkpoint = None
    saved_here = bool(training.save_every and state.step % training.save_every == 0)
    try:
        if _stop_requested(signals, accelerator):
            # Stopped during the final evaluation: the checkpoint of the last step lets --resume evaluate and finish.
            path = checkpointing.latest(output_dir) if saved_here else checkpointing.save(
                accelerator, model, optimizer, lr_scheduler, schedule, _timed(state, started), output_dir,
                training.keep_checkpoints)
            if main:
                print(f"peftkit: stopped by signal {signals.received} during the final evaluation (step {state.step}); "
                      f"checkpoint {path}. Finish with --resume.", flush=True)
            accelerator.end_training()
            return RunResult("interrupted", state.step, output_dir, signal_number=signals.received or signal.SIGTERM,
                             checkpoint=path, seconds=time.perf_counter() - started)
        if eval_metrics and not evaluated_here:
            _write_eval(eval_metrics, state.step, _epochs(run.plan, state.position), metrics, accelerator, recipe, None)
        if eval_metrics:
            _judge(monitors, state, eval_metrics, run, model, output_dir, None)
        schedule.on_train_end_()
        if not saved_here:
            final_checkpoint = checkpointing.save(accelerator, model, optimizer, lr_scheduler, schedule,
                                                  _timed(state, started), output_dir, training.keep_checkpoints)
    except checkpointing.NonFiniteStateError as exc:
        result = stop_nonfinite(f"the training state is not finite ({exc})")
        accelerator.end_training()
        result.seconds = time.perf_counter() - started
        return result
    if main:
        # What the adapter folder's model card reports about the run.
        state_of(accelerator.unwrap_model(model)).training.update(
            data=recipe.data.train, recipe=recipe.dump(), metrics=dict(eval_metrics))
        peftkit.save(accelerator.unwrap_model(model), output_dir / ADAPTER_DIR)
        run.tokenizer.save_pretrained(output_dir / ADAPTER_DIR)
        plot(output_dir)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    seconds = time.perf_counter() - started
    best = state.monitors.get("best") if monitors.best else None
    best_path = output_dir / "best" if best and best.get("step") is not None else None
    if main:
        summary = ", ".join(f"{k} {v:.4f}" for k, v in eval_metrics.items())
        how = (f"stopped early at step {state.step} (training.early_stopping: {monitors.early_stopping.metric} did "
               f"not improve in {monitors.early_stopping.patience} evaluations)" if stopped_early
               else f"{state.step} steps")
        best_text = (f" Best: {best_path} ({monitors.best.metric} {best['value']:.4f} at step {best['step']})."
                     if best_path else "")
        print(f"peftkit: done: {how} in {seconds:.1f} s. {('Final eval: ' + summary + '. ') if summary else ''}"
              f"Adapter: {output_dir / ADAPTER_DIR}.{best_text}", flush=True)
    return RunResult("done", state.step, output_dir, eval_metrics, checkpoint=final_checkpoint or
                     checkpointing.latest(output_dir), seconds=seconds, best=best_path,
                     best_step=best.get("step") if best_path else None, stopped_early=stopped_early)


def _timed(state: checkpointing.TrainState, started: float) -> checkpointing.TrainState:
    state.elapsed_s = time.perf_counter() - started
    return state


def _reads_losses(step: int, training) -> bool:
    """Whether optimizer step ``step`` (1-based) reads the losses to the host: it logs, evaluates, saves, or is last."""
    return (step % training.log_every == 0 or step == training.max_steps
            or bool(training.eval_every and step % training.eval_every == 0)
            or bool(training.save_every and step % training.save_every == 0))


def _read_losses(pending: list[torch.Tensor], accelerator) -> list[float]:
    """The per-step losses since the last read, in one host sync; ``pending`` is emptied. Each process holds
    its backward losses (its share of the global token mean, times the number of processes, plus the
    regularization term): their mean over processes is the step's loss."""
    values = torch.stack(pending)
    pending.clear()
    if accelerator.num_processes > 1:
        values = accelerator.reduce(values, reduction="mean")
    return values.tolist()


def _stop_requested(signals: StopSignals, accelerator, collective: bool = True) -> bool:
    """Every process must stop at the same step: under several processes the flag is all-reduced, on the steps
    that read the losses (``collective``) only, so that no other step waits on a collective; one process checks
    its flag every step."""
    if accelerator.num_processes == 1:
        return signals.received is not None
    if not collective:
        return False
    flag = torch.tensor(float(signals.received or 0), device=accelerator.device)
    flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() and signals.received is None:
        signals.received = signal.SIGTERM
    return bool(flag.item())


def _log_record(state, window, lr: float, grad_norm, plan: BatchPlan) -> dict[str, Any]:
    """The mean loss of the steps since the last record, the base LR of this step, throughput."""
    now = time.perf_counter()
    seconds = max(now - window["time"], 1e-9)
    record = {
        "step": state.step,
        "loss": window["loss"] / window["steps"],
        "lr": lr,
        "epoch": _epochs(plan, state.position),
        "tokens": state.tokens,
        "tokens_per_s": (state.tokens - window["tokens_at_start"]) / seconds,
    }
    if grad_norm is not None:
        record["grad_norm"] = float(grad_norm)
    window.update(loss=0.0, steps=0, time=now, tokens_at_start=state.tokens)
    return record


def _window_rewards(window: dict[str, Any]) -> dict[str, float]:
    """The mean over the steps since the last record of each step's mean rewards (TRL's names); resets them."""
    steps = max(window["reward_steps"], 1)
    values = {name: total / steps for name, total in zip(REWARD_METRICS, window["rewards"])}
    window.update(rewards=[0.0] * len(REWARD_METRICS), reward_steps=0)
    return values


def _epochs(plan: BatchPlan, position: int) -> float:
    """Passes over data.train after ``position`` global micro-batches (4 decimals, as logged)."""
    return round(plan.epoch(position), 4)


def _judge(monitors: Monitors, state, values: dict[str, float], run: Run, model, output_dir: Path, progress) -> None:
    """Feed one evaluation to training.best / training.early_stopping; a new best writes best/ (main process)."""
    if not monitors.active:
        return
    new_best, _ = monitors.observe(state.monitors, state.step, values)
    if new_best and run.accelerator.is_main_process:
        record = state.monitors["best"]
        path = write_best(output_dir, run.accelerator.unwrap_model(model), run.tokenizer, monitors.best.metric,
                          record["value"], state.step)
        (progress.write if progress is not None else print)(
            f"step {state.step}: best {monitors.best.metric} {record['value']:.4f}: {path}")


def _write_eval(values: dict[str, float], step: int, epoch: float, metrics: MetricsLog, accelerator, recipe,
                progress) -> None:
    metrics.write({"step": step, "epoch": epoch, **values})
    if recipe.logging.report_to:
        accelerator.log(values, step=step)
    if accelerator.is_main_process:
        text = " ".join(f"{k}={v:.4f}" for k, v in values.items())
        (progress.write if progress is not None else print)(f"step {step}: {text}")


@torch.no_grad()
def evaluate(run: Run, model, signals: StopSignals | None = None, metrics: list[str] | None = None) -> dict[str, float]:
    """Loss (mean over examples for classification, over target tokens for LM), accuracy for classification,
    perplexity for LM; each process reads every num_processes-th example and the sums are all-reduced.
    ``metrics`` (default ``training.eval_metrics``) adds F1, exact match on generated answers and hooks.
    On one process a received stop signal ends it early ({} is returned: the caller checkpoints and exits)."""
    examples: Tokenized | None = run.examples.eval
    if examples is None:
        return {}
    accelerator = run.accelerator
    engine = run.engine or engines.make("ddp", accelerator)
    unwrapped = engine.eval_model(model)  # under a sharded engine: the prepared model, which gathers the base
    if run.recipe.training.objective in PAIR_OBJECTIVES:
        return _evaluate_pairs(run, unwrapped, engine, signals)
    was_training = unwrapped.training
    unwrapped.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    size = run.recipe.training.eval_batch_size or run.recipe.training.batch_size
    starts = list(range(0, len(mine), size))
    if engine.collective_forward:
        # Every forward all-gathers shards: every process runs as many batches as the busiest one; the
        # extra batches repeat example 0 and count for nothing.
        busiest = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / size)
        starts += [None] * (busiest - len(starts))
    totals = torch.zeros(3, dtype=torch.float64, device=accelerator.device)  # loss sum, count, correct
    metrics = list(run.recipe.training.eval_metrics if metrics is None else metrics)
    predictions: list = []
    for start in starts:
        if signals is not None and signals.received is not None and accelerator.num_processes == 1:
            unwrapped.train(was_training)
            return {}
        indices = [0] if start is None else mine[start:start + size]
        batch = collate(examples, indices, run.tokenizer.pad_token_id, run.classification)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        labels = batch.pop("labels")
        with accelerator.autocast():
            logits = unwrapped(**batch).logits
            logits = logits if logits.dtype == torch.float64 else logits.float()
        if start is None:
            continue
        if run.classification:
            totals[0] += F.cross_entropy(logits, labels, reduction="sum")
            totals[1] += labels.numel()
            totals[2] += (logits.argmax(-1) == labels).sum()
            predictions.extend(zip(logits.argmax(-1).tolist(), labels.tolist()))
        else:
            shifted = labels[:, 1:]
            totals[0] += F.cross_entropy(logits[:, :-1].flatten(0, 1), shifted.flatten(), ignore_index=-100, reduction="sum")
            totals[1] += (shifted != -100).sum()
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    if was_training:
        unwrapped.train()
    loss = (totals[0] / totals[1].clamp(min=1)).item()
    if run.classification:
        values = {"eval_loss": loss, "eval_accuracy": (totals[2] / totals[1].clamp(min=1)).item()}
    else:
        values = {"eval_loss": loss, "eval_perplexity": math.exp(min(loss, 700.0))}
    extra = [m for m in metrics if m != "accuracy"]
    if run.classification and extra:
        pairs = _gathered(accelerator, predictions)
        values.update(evaluation.compute(extra, [p for p, _ in pairs], [r for _, r in pairs]))
    elif evaluation.needs_generation(extra, run.recipe.data.format):
        answers = evaluation.generate_answers(unwrapped, run.tokenizer, examples, mine,
                                              max_new_tokens=run.recipe.training.eval_max_new_tokens,
                                              batch_size=size, autocast=accelerator.autocast)
        pairs = _gathered(accelerator, list(zip(*answers)))
        values.update(evaluation.compute(extra, [p for p, _ in pairs], [r for _, r in pairs],
                                         run.recipe.training.answer_extraction, run.recipe.training.answer_pattern))
        unwrapped.train(was_training)
    return values


def _evaluate_pairs(run: Run, unwrapped, engine, signals: StopSignals | None) -> dict[str, float]:
    """A pair objective's evaluation: the mean over data.eval's pairs of the pair loss (``eval_loss``) and of
    TRL's rewards (``eval_rewards/accuracies`` ...); each process reads every num_processes-th pair, the sums are
    all-reduced."""
    examples, accelerator, training = run.examples.eval, run.accelerator, run.recipe.training
    beta, gamma = objective_settings(training)
    was_training = unwrapped.training
    unwrapped.eval()
    mine = list(range(accelerator.process_index, len(examples), accelerator.num_processes))
    size = training.eval_batch_size or training.batch_size
    starts: list = list(range(0, len(mine), size))
    if engine.collective_forward:  # every process runs as many forwards as the busiest one (see evaluate)
        busiest = math.ceil(math.ceil(len(examples) / accelerator.num_processes) / size)
        starts += [None] * (busiest - len(starts))
    totals = torch.zeros(2 + len(REWARD_METRICS), dtype=torch.float64, device=accelerator.device)  # loss, pairs, rewards
    for start in starts:
        if signals is not None and signals.received is not None and accelerator.num_processes == 1:
            unwrapped.train(was_training)
            return {}
        indices = [0] if start is None else mine[start:start + size]
        batch = collate_pairs(examples, indices, run.tokenizer.pad_token_id, run.padding_free)
        batch = {k: v.to(accelerator.device) for k, v in batch.items()}
        with accelerator.autocast():
            losses, stats = pair_losses(unwrapped, batch, training.objective, beta, gamma, pairs=len(indices))
        if start is None:
            continue
        totals[0] += losses.double().sum()
        totals[1] += len(indices)
        totals[2:] += reward_sums(stats).to(totals.device)
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    unwrapped.train(was_training)
    means = (totals / totals[1].clamp(min=1)).tolist()
    return {"eval_loss": means[0], **{f"eval_{name}": value for name, value in zip(REWARD_METRICS, means[2:])}}


def _gathered(accelerator, items: list) -> list:
    """Every process's items, concatenated (a no-op on one process)."""
    if accelerator.num_processes == 1:
        return items
    from accelerate.utils import gather_object

    return gather_object(items)


def _progress_bar(enabled: bool, total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, disable=not enabled, desc="train", unit="step", dynamic_ncols=True)


def _flat(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested recipe -> {"training.lr": ...} with values trackers accept (numbers, strings, booleans)."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "."))
        elif isinstance(value, (int, float, str, bool)):
            out[name] = value
        else:
            out[name] = str(value)
    return out
