"""LoRA (and LoRA-GA, per expert) on a tiny Qwen3-MoE trained by the CLI's loop under ddp, fsdp2 and zero3, in ONE
launch (a launch costs more than a run):

    torchrun --nproc-per-node 2 tests/moe_sharded.py ENGINE[,ENGINE...] BATCH ROOT

Each (engine, config) writes ``ROOT/<engine>/<config>/run``. tests/test_moe_sharded.py runs the same configs in one
process at batch 2·BATCH as the reference. (A file of its own: tests/sharded_grid.py is the dense models' grid.)
"""

from __future__ import annotations

import sys
from pathlib import Path

STEPS = 3
MOE_CONFIG = {"model_type": "qwen3_moe", "hidden_size": 16, "intermediate_size": 32, "moe_intermediate_size": 8,
              "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 8,
              "num_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": 64, "tie_word_embeddings": False,
              # fp64 needs the eager experts loop (grouped_mm takes fp32/bf16/fp16 only)
              "experts_implementation": "eager"}
CONFIGS = {"lora": {"method": "lora"}, "lora-ga": {"method": "lora-ga"}}
# Gradient-based inits read each expert stack's own gradient, which fsdp2/zero3 shard: refused there (ddp exact).
REFUSED_SHARDED = {"lora-ga"}


def recipe(root: Path, config: str, engine: str, batch: int) -> dict:
    from train_fixtures import BYTE_VOCAB, llama_text_recipe

    out = llama_text_recipe(root / config, training__batch_size=batch, training__max_steps=STEPS,
                            training__distributed=engine, training__warmup=0, training__eval_every=STEPS,
                            training__eval_batch_size=3)
    out["model"]["config"] = {**MOE_CONFIG, "vocab_size": BYTE_VOCAB}
    out["model"]["dtype"] = "float64"  # see tests/sharded_grid.py: fp32 all-reduce rounding reaches Adam's update
    out["adapter"] = {"r": 2, "alpha": 4, "targets": "all-linear", **CONFIGS[config]}
    out["optimizer"] = {"lr": 1e-2}
    out["training"]["output_dir"] = str(root / config / "run")
    return out


def expert_elements(model) -> list[int]:
    """[elements this process holds, elements in full] of the fused expert stacks after training
    (:func:`multiproc.held_and_full`)."""
    from multiproc import held_and_full

    if hasattr(model, "reshard"):  # FSDP2 keeps the root's weights gathered after a forward (the final eval)
        model.reshard()
    return held_and_full(param for name, param in model.named_parameters()
                         if ".experts." in name and not param.requires_grad)


def main(engines: str, batch: int, root: Path) -> None:
    import json

    from multiproc import runs_in_one_launch

    from peftkit import distributed
    from peftkit.errors import ConfigError
    from peftkit.train import from_dict, train

    with runs_in_one_launch() as last:  # keeps the prepared model, to measure what this process holds
        for engine in engines.split(","):
            for config in CONFIGS:
                if config in REFUSED_SHARDED and engine != "ddp" and distributed.world_size() > 1:
                    try:
                        train(from_dict(recipe(root / engine, config, engine, batch)))
                    except ConfigError as exc:  # refused before step 1: the message for the test to read
                        (root / engine / config).mkdir(parents=True, exist_ok=True)
                        (root / engine / config / "refused.txt").write_text(str(exc))
                        continue
                    raise AssertionError(f"{config} under {engine} was not refused")
                result = train(from_dict(recipe(root / engine, config, engine, batch)))
                assert result.status == "done", (engine, config, result)
                (root / engine / config / f"experts_rank{distributed.rank()}.json").write_text(
                    json.dumps(expert_elements(last["model"])))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]))
