"""DPO's reference model: TRL's own copy vs peftkit.reference_model (the policy with adapters off).

Each contender runs in its own process (so peak RSS is its own): a tiny-but-not-trivial Llama (hidden 512,
4 layers, ~9.7 M parameters, fp32) wrapped with peftkit LoRA r=8, 2 DPOTrainer steps on CPU.
- "trl copy": ref_model=None; TRL loads a second copy of the base from the model's path (what it does for any
  model that is not a peft.PeftModel).
- "peftkit": ref_model=peftkit.reference_model(model).
Reported: the reference's own parameter bytes and the process's peak RSS, contenders interleaved, repeated.

    python benchmarks/dpo_reference_memory.py [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile


def child(contender: str, base_dir: str) -> None:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import DPOConfig, DPOTrainer

    import peftkit
    from peftkit.train.data import byte_tokenizer

    torch.manual_seed(0)
    model = peftkit.wrap(AutoModelForCausalLM.from_pretrained(base_dir), "lora", r=8)
    reference = peftkit.reference_model(model) if contender == "peftkit" else None
    pairs = Dataset.from_dict({"prompt": [f"is {n} even?" for n in range(8)],
                               "chosen": [" yes" if n % 2 == 0 else " no" for n in range(8)],
                               "rejected": [" no" if n % 2 == 0 else " yes" for n in range(8)]})
    with tempfile.TemporaryDirectory() as out:
        args = DPOConfig(output_dir=out, max_steps=2, per_device_train_batch_size=4, learning_rate=1e-3, report_to=[],
                         save_strategy="no", use_cpu=True, disable_tqdm=True, logging_steps=1)
        trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=pairs,
                             processing_class=byte_tokenizer(), optimizers=(peftkit.optimizer(model, 1e-3), None),
                             callbacks=[peftkit.callbacks(model)])
        trainer.train()
        ref = trainer.ref_model
        ref_bytes = 0 if ref is None else sum(p.numel() * p.element_size() for p in ref.parameters())
    policy_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    print(json.dumps({"contender": contender, "ref_param_bytes": ref_bytes, "policy_param_bytes": policy_bytes,
                      "peak_rss_mib": peak_kib / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("CONTENDER", "BASE_DIR"))
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    with tempfile.TemporaryDirectory() as base_dir:
        torch.manual_seed(0)
        LlamaForCausalLM(LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                                     num_attention_heads=8,
                                     num_key_value_heads=4, vocab_size=259, max_position_embeddings=128)
                         ).save_pretrained(base_dir)
        rows = []
        for _ in range(args.repeats):
            for contender in ("trl copy", "peftkit"):  # interleaved: the machine is shared
                done = subprocess.run([sys.executable, __file__, "--child", contender, base_dir], env=env,
                                      capture_output=True, text=True, check=True)
                rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print("| contender | reference's own parameter bytes | policy parameter bytes | peak RSS (MiB) |")
    print("|---|---|---|---|")
    for row in rows:
        print(f"| {row['contender']} | {row['ref_param_bytes']:,} | {row['policy_param_bytes']:,} "
              f"| {row['peak_rss_mib']:.0f} |")
    copy = [r["peak_rss_mib"] for r in rows if r["contender"] == "trl copy"]
    ours = [r["peak_rss_mib"] for r in rows if r["contender"] == "peftkit"]
    print(f"peak RSS, peftkit / trl copy: {min(ours) / min(copy):.3f} (best of {args.repeats} each); "
          f"difference {min(copy) - min(ours):.0f} MiB")


if __name__ == "__main__":
    main()
