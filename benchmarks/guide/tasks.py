"""The guide's tasks (one recipe of ``recipes/quality/`` each) and its fixed settings: the learning-rate sweep,
the paths, the tiny stand-in models of ``--quick``."""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import peftkit
import peftkit.adapters
from peftkit.train.recipe import Recipe, load_recipe

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "benchmarks" / "quality.py"  # the CLI: each isolated cell runs it again with --cell
# Where the warnings worth reporting come from (methods, machinery, this script), wherever they are installed.
OWN_CODE = [Path(peftkit.__file__).resolve().parent, Path(peftkit.adapters.__file__).resolve().parent,
            REPO / "benchmarks"]
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


# ------------------------------------------------------------------------------------------ fingerprints
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
    # Added after the cells were made (preference training, vision, threads): unused by the guide's tasks at these.
    ("data", "chosen_column"): "chosen", ("data", "rejected_column"): "rejected", ("adapter", "vision_tower"): False,
    ("training", "threads"): None, ("training", "objective"): "sft", ("training", "beta"): None,
    ("training", "simpo_gamma"): None,
}
# Defaults that changed after cells were made, to values that leave a cell's numbers as they were: fingerprinted as
# the earlier value. Issue 29's "auto" recomputes activations in the backward of causal-LM runs (exact to round-off,
# tested in test_gradient_checkpointing): a cell's memory and step time move, its losses and metrics do not.
FINGERPRINT_AS_BEFORE = {("training", "gradient_checkpointing"): ("auto", False)}


@functools.lru_cache(maxsize=None)
def _fingerprint(text: str, path: Path, quick: bool) -> str:
    # Keyed by the file's text, so an edited recipe is parsed again; parsing it is the costly part.
    recipe = dataclasses.asdict(load_recipe(path))
    for (section, key), neutral in FINGERPRINT_NEUTRAL.items():
        if key in recipe.get(section, {}) and recipe[section][key] == neutral:
            del recipe[section][key]
    for (section, key), (now, before) in FINGERPRINT_AS_BEFORE.items():
        if recipe.get(section, {}).get(key) == now:
            recipe[section][key] = before
    return hashlib.sha256(json.dumps([recipe, quick], sort_keys=True, default=str).encode()).hexdigest()[:16]
