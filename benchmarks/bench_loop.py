"""The training loop's own overhead: ``peftkit.train`` against a hand-written Accelerate loop, same model,
same adapter, same optimizer, same batches.

The two loops run interleaved step by step in one process: after each peftkit step, a hook runs one step of
the hand-written loop. peftkit's step time is the wall time from the end of that hook to the start of the
next one, so all of its bookkeeping (metrics.jsonl, NaN check, signal check, progress bar, LR bookkeeping)
is inside it. The overhead is the median over rounds of the median paired ratio (the machine is shared:
ratios of neighbouring steps are what we quote).

    OMP_NUM_THREADS=1 python benchmarks/bench_loop.py [--rounds 3] [--steps 60]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from train_fixtures import text_rows, write_jsonl  # noqa: E402

from peftkit.train import from_dict, loop  # noqa: E402
from peftkit.train.data import collate  # noqa: E402

MODEL = {"model_type": "llama", "hidden_size": 128, "intermediate_size": 344, "num_hidden_layers": 4,
         "num_attention_heads": 4, "num_key_value_heads": 4, "vocab_size": 259, "max_position_embeddings": 256,
         "tie_word_embeddings": False}


def recipe(folder: Path, steps: int) -> dict:
    data = write_jsonl(folder / "train.jsonl", text_rows(400, seed=0))
    return {
        "model": {"config": MODEL, "tokenizer": "bytes"},
        "data": {"train": data, "format": "text", "max_length": 128},
        "adapter": {"method": "lora", "r": 16, "alpha": 32},
        "optimizer": {"lr": 1e-4},
        "training": {"max_steps": steps, "batch_size": 8, "log_every": 10, "lr_schedule": "cosine", "warmup": 3,
                     "max_grad_norm": 1.0, "output_dir": str(folder / "run"),
                     "gradient_checkpointing": False},  # the hand-written loop keeps every activation
        "logging": {"progress_bar": False},
    }


class HandWrittenLoop:
    """The loop a user would write with Accelerate for the same run (built by the same ``prepare``), one step
    per call, so that it can run interleaved step by step with peftkit's loop."""

    def __init__(self, folder: Path, steps: int) -> None:
        self.run = loop.prepare(from_dict(recipe(folder, steps)))
        self.accelerator = self.run.accelerator
        self.model, self.optimizer = self.accelerator.prepare(self.run.model, self.run.optimizer)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, loop.lr_lambda(self.run.recipe))
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.steps = steps
        self.position = 0
        self.model.train()

    def step(self) -> float:
        run = self.run
        batch = collate(run.examples.train, run.plan.indices(self.position), run.tokenizer.pad_token_id, False)
        self.position += 1
        loss = self.model(**batch).loss
        self.accelerator.backward(loss)
        self.accelerator.clip_grad_norm_(self.params, 1.0)
        self.optimizer.step()
        self.scheduler.step()
        run.schedule.on_step(self.position, self.steps)
        self.optimizer.zero_grad(set_to_none=True)
        return loss.item()  # a user logs the loss too


def interleaved_round(folder: Path, steps: int) -> tuple[list[float], list[float]]:
    """Per-step times of peftkit.train and of the hand-written loop, alternating step by step: after each
    peftkit step, its hook runs one hand-written step (timed on its own, and excluded from peftkit's time)."""
    hand = HandWrittenLoop(folder / "hand", steps)
    ours: list[float] = []
    theirs: list[float] = []
    last_end = [None]

    def hook(step: int, record: dict) -> None:
        start = time.perf_counter()
        if last_end[0] is not None:
            ours.append(start - last_end[0])
        hand.step()
        end = time.perf_counter()
        theirs.append(end - start)
        last_end[0] = end

    result = loop.train(from_dict(recipe(folder / "peftkit", steps)), hooks=[hook])
    assert result.status == "done"
    return ours, theirs


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    torch.set_num_threads(1)
    warm = 3  # steps dropped from each run (allocator and autograd warm-up)
    ratios, ours, theirs = [], [], []
    for round_index in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            mine, hand = interleaved_round(Path(tmp), args.steps)
        # Pair step i of peftkit with the hand-written step right after it; the median of the ratios.
        pairs = list(zip(mine[warm:], hand[warm + 1:]))
        ratio = statistics.median(a / b for a, b in pairs)
        ours.append(statistics.median(mine[warm:]))
        theirs.append(statistics.median(hand[warm:]))
        ratios.append(ratio)
        print(f"round {round_index + 1}: peftkit {ours[-1] * 1e3:.1f} ms/step, hand-written "
              f"{theirs[-1] * 1e3:.1f} ms/step, median paired ratio {ratio:.4f}", flush=True)
    summary = {
        "peftkit_ms_per_step": round(statistics.median(ours) * 1e3, 2),
        "hand_written_ms_per_step": round(statistics.median(theirs) * 1e3, 2),
        "median_ratio": round(statistics.median(ratios), 4),
        "overhead_percent": round((statistics.median(ratios) - 1) * 100, 2),
        "rounds": args.rounds, "steps": args.steps,
        "model": "llama 4 x 128, LoRA r=16 on all linear layers, batch 8 x 128 tokens, AdamW, clip 1.0",
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
