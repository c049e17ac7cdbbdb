"""Metrics beyond the loss: ``training.eval_metrics`` (built-ins and ``module:function`` hooks), exact match on
generated answers, and the streaming generation ``peftkit chat`` uses.

A hook is any importable function ``fn(predictions, references) -> float | dict[str, float]``: for
classification the predicted and true class ids, for chat/instruction data the generated and reference
answers (strings, stripped). Its values are logged as ``eval_<name>``.
"""

from __future__ import annotations

import importlib
import inspect
import re
import sys
from typing import Any, Callable

import torch

from ..errors import ConfigError
from .chat import CHAT_FORMATS, stop_strings

GENERATION_METRICS = ("exact_match",)
CLASSIFICATION_METRICS = ("accuracy", "f1")
# training.answer_extraction: what exact match compares of a generated and a reference answer
EXTRACTIONS = ("last_number", "gsm8k", "choice", "regex")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?|-?\.\d+")
_GSM8K = re.compile(r"####\s*(-?\$?[\d,]*\.?\d+)")
_CHOICE_AFTER_ANSWER = re.compile(r"(?i:answer)\s*(?:is)?\s*[:\-]?\s*\(?([A-J])\b")
_CHOICE_ALONE = re.compile(r"^\s*\(?([A-J])(?:[\).:\s]|$)")


def _number(text: str) -> str:
    """A number as exact match compares it: no thousands commas or dollar sign, no trailing zeros after the point."""
    text = text.replace(",", "").replace("$", "")
    if "." in text:
        text = text.rstrip("0").rstrip(".")
    return "0" if text in ("-0", "", "-") else text


def extract_answer(text: str, how: str | None, pattern=None) -> str | None:
    """The part of ``text`` exact match compares (None: nothing found, which never matches).

    - ``last_number``: the last number in the text (``-1,234.50`` -> ``-1234.5``);
    - ``gsm8k``: the number after ``####`` (GSM8K's answer line);
    - ``choice``: a choice letter A-J after "answer (is)", else one that starts the text ("B", "(B)", "B.");
    - ``regex``: the first match of ``pattern`` (its first group if it has groups), stripped;
    - None: the whole text, stripped."""
    if how is None:
        return text.strip()
    if how == "last_number":
        found = _NUMBER.findall(text)
        return _number(found[-1]) if found else None
    if how == "gsm8k":
        found = _GSM8K.search(text)
        return _number(found.group(1)) if found else None
    if how == "choice":
        found = _CHOICE_AFTER_ANSWER.search(text) or _CHOICE_ALONE.search(text)
        return found.group(1).upper() if found else None
    found = pattern.search(text)
    if found is None:
        return None
    return (found.group(1) if found.re.groups else found.group(0) or "").strip()


def check_hooks(metrics: list[str]) -> None:
    """Import every ``module:function`` hook of ``training.eval_metrics`` and check that it takes
    (predictions, references): called before the run loads its model, not after minutes of generation."""
    for metric in metrics:
        if ":" not in metric:
            continue
        function = load_hook(metric)
        try:
            inspect.signature(function).bind([], [])
        except TypeError as exc:
            raise ConfigError(f"training.eval_metrics: '{metric}' cannot be called as fn(predictions, references) "
                              f"({exc}); give it two parameters") from None
        except ValueError:  # a builtin without a signature: called as it is
            pass


def needs_generation(metrics: list[str], data_format: str) -> bool:
    """Whether ``metrics`` on data of ``data_format`` need generated answers."""
    if data_format not in CHAT_FORMATS:
        return False
    return any(m in GENERATION_METRICS or ":" in m for m in metrics)


def load_hook(spec: str) -> Callable[[list, list], Any]:
    """``module:function`` -> the function (a ConfigError names the entry when it does not import)."""
    module_name, _, name = spec.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), name)
    except (ImportError, AttributeError) as exc:
        raise ConfigError(f"training.eval_metrics: cannot import '{spec}' ({exc}); give module:function of an "
                          "importable module") from None
    if not callable(function):
        raise ConfigError(f"training.eval_metrics: '{spec}' is not a function")
    return function


def compute(metrics: list[str], predictions: list, references: list, extraction: str | None = None,
            pattern: str | None = None) -> dict[str, float]:
    """The requested metrics on gathered predictions and references, as ``eval_<name>`` floats. Exact match
    compares ``extract_answer`` of both (``training.answer_extraction`` / ``answer_pattern``); an answer with
    nothing to extract never matches."""
    out: dict[str, float] = {}
    count = max(len(references), 1)
    for metric in metrics:
        if metric == "exact_match":
            compiled = None
            if extraction == "regex":
                from ..validation import compile_pattern

                compiled = compile_pattern(pattern, "training.answer_pattern")
            hits = 0
            for p, r in zip(predictions, references):
                expected = extract_answer(str(r), extraction, compiled)
                hits += expected is not None and extract_answer(str(p), extraction, compiled) == expected
            out["eval_exact_match"] = hits / count
        elif metric == "accuracy":
            out["eval_accuracy"] = sum(p == r for p, r in zip(predictions, references)) / count
        elif metric == "f1":
            out["eval_f1"] = macro_f1(predictions, references)
        else:
            value = load_hook(metric)(list(predictions), list(references))
            name = metric.partition(":")[2]
            if isinstance(value, dict):
                out.update({k if k.startswith("eval_") else f"eval_{k}": float(v) for k, v in value.items()})
            else:
                out[f"eval_{name}"] = float(value)
    return out


def macro_f1(predictions: list[int], references: list[int]) -> float:
    """The unweighted mean over the classes present in the references or predictions of 2PR/(P+R)."""
    classes = sorted(set(references) | set(predictions))
    scores = []
    for c in classes:
        tp = sum(p == c and r == c for p, r in zip(predictions, references))
        fp = sum(p == c and r != c for p, r in zip(predictions, references))
        fn = sum(p != c and r == c for p, r in zip(predictions, references))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0)
    return sum(scores) / len(scores) if scores else 0.0


def cut_at_stop(text: str, stops: list[str]) -> str:
    for stop in stops:
        at = text.find(stop)
        if at >= 0:
            text = text[:at]
    return text


@torch.no_grad()
def generate_answers(model, tokenizer, examples, indices: list[int], *, max_new_tokens: int, batch_size: int,
                     autocast=None) -> tuple[list[str], list[str]]:
    """Greedy answers to the prompts of ``examples`` (each example's tokens before its last answer), in
    left-padded batches; returns (generated, reference) texts, each cut at the template's end-of-turn marker
    and stripped."""
    import contextlib

    if examples.prompt_lengths is None:
        raise ConfigError("training.eval_metrics: generation-based metrics need unpacked chat or instruction eval data")
    stops = stop_strings(getattr(tokenizer, "chat_template", None), tokenizer)
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    generated: list[str] = []
    references: list[str] = []
    was_training = model.training
    model.eval()
    for start in range(0, len(indices), batch_size):
        chosen = indices[start:start + batch_size]
        prompts = [list(examples.input_ids[i][: examples.prompt_lengths[i]]) for i in chosen]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: every prompt ends where generation starts
            ids[row, width - len(prompt):] = torch.tensor(prompt, dtype=torch.long)
            mask[row, width - len(prompt):] = 1
        with (autocast or contextlib.nullcontext)():
            out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), do_sample=False,
                                 max_new_tokens=max_new_tokens, pad_token_id=pad, use_cache=True,
                                 stop_strings=stops or None, tokenizer=tokenizer if stops else None)
        for row, i in enumerate(chosen):
            text = tokenizer.decode(out[row, width:], skip_special_tokens=True)
            generated.append(cut_at_stop(text, stops).strip())
            references.append(str(examples.references[i]).strip())
    model.train(was_training)
    return generated, references


class StopStreamer:
    """A ``transformers.TextStreamer`` that stops printing at the template's end-of-turn marker (holding back
    text that may be the start of one), so a chat reply prints as the user sees it in the history."""

    def __new__(cls, tokenizer, stops: list[str], stream=None):
        from transformers import TextStreamer

        class _Streamer(TextStreamer):
            def __init__(self) -> None:
                super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
                self.stops, self.stream, self.text, self.shown, self.stopped = stops, stream or sys.stdout, "", 0, False

            def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
                if self.stopped:
                    return
                self.text += text
                visible = cut_at_stop(self.text, self.stops)
                if len(visible) < len(self.text):
                    self.stopped = True
                    safe = len(visible)
                elif stream_end:
                    safe = len(self.text)
                else:  # hold back a tail that could still become a stop marker
                    held = max((k for s in self.stops for k in range(1, len(s)) if self.text.endswith(s[:k])),
                               default=0)
                    safe = len(self.text) - held
                if safe > self.shown:
                    self.stream.write(self.text[self.shown:safe])
                    self.shown = safe
                if stream_end or self.stopped:
                    self.stream.write("\n")
                self.stream.flush()

            @property
            def reply(self) -> str:
                return cut_at_stop(self.text, self.stops)

        return _Streamer()
