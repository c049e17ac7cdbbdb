"""peftkit with TRL's DPOTrainer: the reference model is the same model with its adapters off (no copy).

    python examples/trl_dpo.py [method]        # lora (default), lora-pro, hra, coto, ...
"""

import sys

import torch
from datasets import Dataset
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM
from trl import DPOConfig, DPOTrainer

import peftkit
from peftkit.train.data import byte_tokenizer

method = sys.argv[1] if len(sys.argv) > 1 else "lora"
tokenizer = byte_tokenizer()
torch.manual_seed(0)
LlamaForCausalLM(LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                             num_key_value_heads=2, vocab_size=len(tokenizer), max_position_embeddings=128)
                 ).save_pretrained("runs/trl-dpo/base")
model = peftkit.wrap(AutoModelForCausalLM.from_pretrained("runs/trl-dpo/base"), method, r=8)
reference = peftkit.reference_model(model)  # runs `model` with adapters disabled; holds no parameters

pairs = Dataset.from_dict({
    "prompt": [f"is {n} even?" for n in range(32)],
    "chosen": [" yes" if n % 2 == 0 else " no" for n in range(32)],
    "rejected": [" no" if n % 2 == 0 else " yes" for n in range(32)],
})
args = DPOConfig(output_dir="runs/trl-dpo", max_steps=12, per_device_train_batch_size=8, learning_rate=5e-3,
                 lr_scheduler_type="constant", logging_steps=3, save_strategy="no", report_to=[], use_cpu=True,
                 disable_tqdm=True)
trainer = DPOTrainer(model=model, ref_model=reference, args=args, train_dataset=pairs, processing_class=tokenizer,
                     optimizers=(peftkit.optimizer(model, args.learning_rate), None),
                     callbacks=[peftkit.callbacks(model)])
trainer.train()
trainer.save_model("runs/trl-dpo/adapter")

accuracies = [row["rewards/accuracies"] for row in trainer.state.log_history if "rewards/accuracies" in row]
own = sum(p.numel() * p.element_size() for p in reference.parameters())
print(f"{method}: reward accuracy {accuracies[0]:.2f} -> {accuracies[-1]:.2f}; reference model's own parameter "
      f"bytes: {own} (the policy has {sum(p.numel() * p.element_size() for p in model.parameters()):,})")
