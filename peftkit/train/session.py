"""What ``peftkit chat`` and ``peftkit eval`` do: find a run's (or an adapter's) base model, tokenizer and
recipe, then talk to the model or evaluate it."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from .loop import ADAPTER_DIR

RECIPE_FILE = "recipe.yaml"
EXIT_COMMANDS = ("/exit", "/quit")
RESET_COMMAND = "/reset"


def locate(path: str | Path) -> tuple[Path, Path | None]:
    """(adapter folder, run folder or None) for a run folder or an adapter folder."""
    path = Path(path)
    if (path / ADAPTER_DIR / "adapter_config.json").is_file():
        return path / ADAPTER_DIR, path
    if (path / "adapter_config.json").is_file():
        run = path.parent if (path.parent / RECIPE_FILE).is_file() else None
        return path, run
    raise ConfigError(f"{path}: neither a run folder (with {ADAPTER_DIR}/adapter_config.json) nor an adapter folder "
                      "(with adapter_config.json); give training.output_dir of a finished run or an adapter")


def _tokenizer(adapter: Path, recipe, base_path: str | None):
    from transformers import AutoTokenizer

    for source in (adapter, base_path):
        if source is None:
            continue
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(source))
            break
        except Exception:  # no tokenizer saved there: the next source
            continue
    else:
        if recipe is None:
            raise ConfigError(f"{adapter}: no tokenizer next to the adapter; pass --base with a model that has one")
        from .build import load_tokenizer

        return load_tokenizer(recipe)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_chat_model(path: str | Path, base: str | None = None):
    """(model with the adapter loaded, tokenizer) for a run or adapter folder; the base is ``base``, else
    the run's recipe (a config-built model is rebuilt with its seed), else the one the adapter records."""
    import peftkit

    from .build import adapter_base_model, load_model
    from .recipe import load_recipe

    adapter, run = locate(path)
    recipe = load_recipe(run / RECIPE_FILE) if run is not None else None
    if base is not None or recipe is None:
        model, base_path = adapter_base_model(adapter, base)
        tokenizer = _tokenizer(adapter, recipe, base_path)
    else:
        tokenizer = _tokenizer(adapter, recipe, None)
        model = load_model(recipe.model, tokenizer, seed=recipe.training.seed)
    peftkit.load(model, adapter)
    model.eval()
    return model, tokenizer


def chat(path: str, *, base: str | None = None, prompt: str | None = None, system: str | None = None,
         max_new_tokens: int = 256, temperature: float = 0.0, stdin=None, stdout=None) -> int:
    """One answer to ``prompt``, or an interactive session (``/reset`` forgets the history, ``/exit`` or EOF
    ends). Tokens stream as they are generated; the reply stops at the template's end-of-turn marker."""
    import torch

    from .chat import stop_strings
    from .evaluation import StopStreamer

    stdin, stdout = stdin or sys.stdin, stdout or sys.stdout
    model, tokenizer = load_chat_model(path, base)
    template = getattr(tokenizer, "chat_template", None)
    stops = stop_strings(template, tokenizer)
    history: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    interactive = prompt is None
    if interactive:
        stdout.write("peftkit chat: /reset forgets the conversation, /exit (or Ctrl-D) ends it\n")
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
            line = stdin.readline()
            if not line or line.strip() in EXIT_COMMANDS:
                break
            message = line.rstrip("\n")
            if message.strip() == RESET_COMMAND:
                history = history[:1] if system else []
                continue
            if not message.strip():
                continue
        else:
            message = prompt
        history.append({"role": "user", "content": message})
        ids = prompt_ids(tokenizer, history)
        streamer = StopStreamer(tokenizer, stops, stream=stdout)
        sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
        with torch.no_grad():
            model.generate(input_ids=torch.tensor([ids], device=model.device), max_new_tokens=max_new_tokens,
                           streamer=streamer, pad_token_id=tokenizer.pad_token_id, use_cache=True,
                           stop_strings=stops or None, tokenizer=tokenizer if stops else None, **sampling)
        history.append({"role": "assistant", "content": streamer.reply.strip()})
        if not template:
            history = history[:1] if system else []  # the plain layout is single-turn, as in training
        if not interactive:
            break
    return 0


def prompt_ids(tokenizer, history: list[dict[str, str]]) -> list[int]:
    """The token ids that ask for the next assistant turn: the chat template with its generation prompt, or
    the plain single-turn layout (``prompt\\n``, with BOS) that instruction data without a template uses."""
    template = getattr(tokenizer, "chat_template", None)
    if template:
        text = tokenizer.apply_chat_template(history, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    text = "\n\n".join(turn["content"] for turn in history)
    return tokenizer(text + "\n", add_special_tokens=True)["input_ids"]


def evaluate_run(path: str, overrides: list[str] | None = None, *, adapter: str | None = None,
                 generate: bool = True) -> dict[str, Any]:
    """The recipe's eval metrics for a run (its recipe and adapter) or a recipe (its base model, or
    ``adapter``): loss, accuracy or perplexity, ``training.eval_metrics``, and exact match on generated
    answers for chat and instruction data (unless ``generate`` is false)."""
    import peftkit

    from .build import load_examples, load_model, load_tokenizer, num_labels
    from .chat import CHAT_FORMATS
    from .eval_loop import evaluate
    from .recipe import load_recipe
    from .run_setup import Run, make_accelerator

    source = Path(path)
    if source.is_dir():
        adapter_dir, run = locate(source)
        recipe = load_recipe(run / RECIPE_FILE if run else source / RECIPE_FILE, overrides)
        adapter_dir = Path(adapter) if adapter else adapter_dir
    else:
        recipe = load_recipe(source, overrides)
        adapter_dir = Path(adapter) if adapter else None
    if not recipe.data.eval:
        raise ConfigError("data.eval: the recipe has no eval set; pass data.eval=FILE (or a hub id)")
    recipe.logging.report_to = []
    accelerator = make_accelerator(recipe)
    tokenizer = load_tokenizer(recipe)
    examples = load_examples(recipe, tokenizer)
    classification = recipe.model.task == "sequence-classification"
    model = load_model(recipe.model, tokenizer, labels=num_labels(recipe, examples) if classification else None,
                       label_names=examples.train.label_names, seed=recipe.training.seed)
    if adapter_dir is not None:
        peftkit.load(model, adapter_dir)
    model.to(accelerator.device)
    metrics = list(recipe.training.eval_metrics)
    if generate and recipe.data.format in CHAT_FORMATS and "exact_match" not in metrics:
        metrics.append("exact_match")
    if not generate:
        metrics = [m for m in metrics if m != "exact_match" and (classification or ":" not in m)]
    run = Run(recipe, accelerator, tokenizer, model, None, None, examples, None, classification)
    return evaluate(run, model, metrics=metrics)
