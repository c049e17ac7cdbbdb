"""A reusable harness for training-step benchmarks: interleaved rounds, medians, ratios, peak memory.

The machine these benchmarks run on is shared and noisy, so absolute times drift by tens of percent within a
minute. What we quote are ratios of neighbouring measurements: every round runs one step of every contender
(in a rotated order, so no contender always runs first or right after the same neighbour), the ratio of two
contenders is taken per round, and its median over the rounds is the figure; the spread (min..max of the
per-round ratios, and their interquartile range) says how far to trust it.

A benchmark script defines its contenders as a dict ``name -> builder``; a builder takes no argument, builds
its model and optimizer, and returns the step function (no argument, one full training step). Then:

    contenders = {"floor": build_floor, "peft": build_peft, "peftkit": build_ours}
    if args.memory_of:                       # the child process of peak_memory_in_subprocesses
        report_step_memory(contenders[args.memory_of]())
        return
    times = interleaved_rounds({n: b() for n, b in contenders.items()}, rounds=args.rounds)
    memory = peak_memory_in_subprocesses(__file__, list(contenders), threads=args.threads)
    print(markdown_table(summarize(times, ["floor", "peft"]), memory))

Peak memory is measured in one fresh subprocess per contender (the same script with ``--memory-of NAME``),
each under the same thread count and with glibc's malloc told to serve every block of 64 KiB or more by
``mmap`` (``MALLOC_MMAP_THRESHOLD_``), so that a freed tensor goes back to the OS at once and the resident
set size follows the live tensors rather than allocator caches or the fragmentation left by another
contender. After warm-up steps (optimizer state allocated), the child resets the kernel's high-water mark
(``/proc/self/clear_refs``), runs one step and reports VmHWM: the peak resident memory during a step, and that
peak minus the resident memory before the step (what the step itself adds: activations, gradients,
temporaries). Linux only.
"""

from __future__ import annotations

import gc
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from typing import Callable

import torch
from transformers import LlamaConfig, LlamaForCausalLM

Step = Callable[[], None]

# The issue-2 benchmark model: a Llama-style config, random weights (no download).
LLAMA_BENCH = dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                   num_key_value_heads=8, vocab_size=8000, max_position_embeddings=512,
                   tie_word_embeddings=False)


def llama_model(seed: int = 0, dtype: torch.dtype = torch.float32, **overrides) -> LlamaForCausalLM:
    """The benchmark Llama (``LLAMA_BENCH`` plus ``overrides``) with weights drawn from ``seed``, in train mode.

    The same seed gives the same base weights, so every contender starts from the same model."""
    torch.manual_seed(seed)
    config = LlamaConfig(**{**LLAMA_BENCH, **overrides})
    return LlamaForCausalLM(config).to(dtype).train()


def llama_batch(batch_size: int = 4, seq_len: int = 256, vocab_size: int = LLAMA_BENCH["vocab_size"],
                seed: int = 0) -> dict[str, torch.Tensor]:
    """A causal-LM batch: ``input_ids``, ``attention_mask`` and ``labels``, each (batch_size, seq_len)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, seq_len), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def freeze_all_but_input_embedding(model: torch.nn.Module) -> torch.nn.Module:
    """The frozen-model floor: only the input embedding trains, so the backward runs through every layer but
    computes activation gradients only (plus the embedding's own gradient)."""
    for param in model.parameters():
        param.requires_grad_(False)
    model.get_input_embeddings().weight.requires_grad_(True)
    return model


def trainable_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def training_step(model: torch.nn.Module, batch: dict[str, torch.Tensor],
                  optimizer: torch.optim.Optimizer | None) -> Step:
    """One step: forward, backward, ``optimizer.step()`` (when given) and ``zero_grad(set_to_none=True)``.

    Without an optimizer the gradients are dropped (set to None) after the backward, so that every step
    allocates them afresh exactly as a step with an optimizer does."""
    params = [p for p in model.parameters() if p.requires_grad]

    def step() -> None:
        model(**batch).loss.backward()
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            for param in params:
                param.grad = None

    return step


def interleaved_rounds(steps: dict[str, Step], rounds: int, warmup: int = 1,
                       sync: Callable[[], None] = lambda: None,
                       progress: Callable[[str], None] | None = None) -> dict[str, list[float]]:
    """Per-step wall times (seconds), ``rounds`` values per contender, one step of each contender per round.

    The order within a round rotates by one each round. ``warmup`` rounds run first and are not recorded.
    ``sync`` is called before and after each step (``torch.cuda.synchronize`` on a GPU)."""
    names = list(steps)
    times: dict[str, list[float]] = {name: [] for name in names}
    for index in range(warmup + rounds):
        shift = index % len(names)
        for name in names[shift:] + names[:shift]:
            sync()
            start = time.perf_counter()
            steps[name]()
            sync()
            if index >= warmup:
                times[name].append(time.perf_counter() - start)
        if progress is not None and index >= warmup:
            progress(f"round {index - warmup + 1}/{rounds}: " + ", ".join(
                f"{name} {1e3 * times[name][-1]:.0f} ms" for name in names))
    return times


@dataclass
class Ratio:
    """The per-round ratios ``contender / reference``: median, min, max, and the interquartile range."""
    median: float
    low: float
    high: float
    q1: float
    q3: float

    def __str__(self) -> str:
        return f"{self.median:.3f} ({self.low:.3f}..{self.high:.3f})"


def ratio(times: dict[str, list[float]], name: str, reference: str) -> Ratio:
    values = sorted(a / b for a, b in zip(times[name], times[reference]))
    quartiles = statistics.quantiles(values, n=4) if len(values) >= 2 else [values[0]] * 3
    return Ratio(statistics.median(values), values[0], values[-1], quartiles[0], quartiles[2])


@dataclass
class Summary:
    name: str
    median_ms: float
    ratios: dict[str, Ratio]  # reference name -> ratio of this contender to it


def summarize(times: dict[str, list[float]], references: list[str]) -> list[Summary]:
    """Median step time of every contender and its per-round ratios to each reference."""
    return [Summary(name, 1e3 * statistics.median(values),
                    {ref: ratio(times, name, ref) for ref in references if ref != name})
            for name, values in times.items()]


# ------------------------------------------------------------------------------------------------ memory
MEMORY_FLAG = "--memory-of"


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (peak memory needs Linux)")


def report_step_memory(step: Step, warmup: int = 2) -> None:
    """In the child process: run ``warmup`` steps, then one step under a reset high-water mark; print one JSON
    line with ``peak_mib`` (resident peak during the step) and ``step_mib`` (that peak minus the resident
    memory just before the step)."""
    for _ in range(warmup):
        step()
    gc.collect()
    before = _status_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as clear:
        clear.write("5")  # reset VmHWM to the current RSS
    step()
    peak = _status_kib("VmHWM")
    print(json.dumps({"peak_mib": peak / 1024, "step_mib": (peak - before) / 1024}))


def peak_memory_in_subprocesses(script: str, names: list[str], threads: int,
                                extra_args: list[str] | None = None) -> dict[str, dict[str, float]]:
    """Run ``script --memory-of NAME`` once per contender, each in a fresh process with the same thread count
    and malloc settings; returns ``name -> {"peak_mib", "step_mib"}``."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(threads)}
    results = {}
    for name in names:
        command = [sys.executable, script, MEMORY_FLAG, name, "--threads", str(threads), *(extra_args or [])]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
        if done.returncode != 0:
            raise RuntimeError(f"memory run of {name!r} failed:\n{done.stderr[-2000:]}")
        results[name] = json.loads(done.stdout.strip().splitlines()[-1])
    return results


# ------------------------------------------------------------------------------------------------ report
def markdown_table(summaries: list[Summary], memory: dict[str, dict[str, float]] | None = None,
                   params: dict[str, int] | None = None) -> str:
    """A markdown table: median step time, the median per-round ratio to every reference with its min..max,
    and (when given) trainable parameters and peak memory."""
    references = sorted({ref for s in summaries for ref in s.ratios}, key=[s.name for s in summaries].index)
    header = ["contender"] + (["trainable"] if params else []) + ["median step (ms)"]
    header += [f"x {ref} (min..max)" for ref in references]
    if memory:
        header += ["peak RSS (MiB)", "step adds (MiB)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" + "---:|" * (len(header) - 1)]
    for s in summaries:
        row = [s.name] + ([f"{params[s.name]:,}"] if params else []) + [f"{s.median_ms:.0f}"]
        row += [str(s.ratios[ref]) if ref in s.ratios else "1" for ref in references]
        if memory:
            row += [f"{memory[s.name]['peak_mib']:.0f}", f"{memory[s.name]['step_mib']:.0f}"]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def random_model_folder(name: str, config: dict, layers: int, dtype=None):
    """A model folder of random weights (seed 0) from ``config`` (with ``model_type``) at ``layers`` layers, in
    ``$TMPDIR/<name>_l<layers>``: written once, reused by later runs (never inside the repository)."""
    from pathlib import Path

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    folder = Path(os.environ.get("TMPDIR", "/tmp")) / f"{name}_l{layers}"
    if (folder / "config.json").exists():
        return folder
    fields = dict(config, num_hidden_layers=layers)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(fields.pop("model_type"), **fields),
                                             **({"dtype": dtype} if dtype is not None else {}))
    model.save_pretrained(folder)
    return folder
