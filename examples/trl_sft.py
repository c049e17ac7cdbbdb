"""peftkit with TRL's SFTTrainer: any peftkit method, its optimizer and callbacks; checkpoints are PEFT adapters.

A tiny Llama built from a config (no download) and peftkit's byte-level tokenizer, so it runs offline in seconds:
    python examples/trl_sft.py [method]        # lora (default), lora-pro, hra, coto, ...
"""

import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from trl import SFTConfig, SFTTrainer

import peftkit
from peftkit.train.data import byte_tokenizer

method = sys.argv[1] if len(sys.argv) > 1 else "lora"
tokenizer = byte_tokenizer()
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
                 ).save_pretrained("runs/trl-sft/base")  # a real base folder, so the adapter records its path
model = peftkit.wrap(AutoModelForCausalLM.from_pretrained("runs/trl-sft/base"), method, r=8)

texts = [f"{a} plus {b} is {a + b}." for a in range(12) for b in range(4)]
args = SFTConfig(output_dir="runs/trl-sft", max_steps=12, per_device_train_batch_size=8, learning_rate=3e-3,
                 lr_scheduler_type="constant", logging_steps=3, save_steps=6, max_length=32, report_to=[],
                 use_cpu=True, disable_tqdm=True)
trainer = SFTTrainer(model=model, args=args, train_dataset=Dataset.from_dict({"text": texts}),
                     processing_class=tokenizer,
                     optimizers=(peftkit.optimizer(model, args.learning_rate), None),
                     callbacks=[peftkit.callbacks(model)])  # schedule, regulariser, resumable checkpoints
peftkit.attach(trainer)  # trainer.train(resume_from_checkpoint=True) then restores the adapter exactly
trainer.train()
trainer.save_model("runs/trl-sft/adapter")  # adapter_config.json + adapter_model.safetensors + README.md

reloaded = peftkit.load(AutoModelForCausalLM.from_pretrained("runs/trl-sft/base"), "runs/trl-sft/adapter")
same = all(torch.equal(a, b) for a, b in zip(reloaded.get_adapter_state_dict().values(),
                                              model.get_adapter_state_dict().values()))
losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
print(f"{method}: loss {losses[0]:.3f} -> {losses[-1]:.3f}; the reloaded adapter equals the trained one: {same}")
