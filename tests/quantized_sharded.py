"""A quantized base under ZeRO-3 and FSDP2: small 4-bit runs by the CLI's loop, on both bitsandbytes CPU paths, in
one launch.

    torchrun --nproc-per-node N tests/quantized_sharded.py ENGINE[,ENGINE] BATCH ROOT BASE_DIR

BASE_DIR is a saved tiny Llama (:func:`save_base`). Every case of ``CASES`` runs on both bitsandbytes CPU kernel
paths (tests/bnb_paths.py) into ``ROOT/<path>/<case>/run`` (adapter, metrics, a checkpoint at every step). The
test (tests/test_quantized_sharded.py) runs the same at nproc 1 and batch 2·BATCH as the reference.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

STEPS = 3
TARGETS = ["q_proj", "v_proj", "down_proj"]
# name: adapter section (plus "optimizer": the optimizer section's keys). CoTo with p₀ = 0.6 and seed 2 gates block 0
# off at step 2 only, so the evaluation after step 2 follows a step in which block 0's adapters did not run: ZeRO-3's
# recorded gather order no longer holds, and it releases every weight after use, its small "persistent" ones too
# (issue 24's case). With every weight released after each use and no gate (stage3_param_persistence_threshold 0,
# measured), ZeRO-3 keeps the weights gathered through the evaluation and the run was exact: the gated step is what
# exposed the defect.
# DoRA reads each whole dequantized 4-bit weight for its norm, gathered from the engine's shards. Its eps: a 4-bit
# base computes in fp32, and AdamW's first step moves an entry by lr·g/(|g| + eps), which amplifies a change of g by
# lr·eps/(|g| + eps)², up to lr/eps = 1e6 at the default eps 1e-8. At the default, layer 0 down_proj's lora_B has
# one gradient entry of 4.18e-8 (max |g| of the tensor 7.7e-3): 1 vs 2 processes give it 9.5e-11 apart (fsdp2;
# 1.6e-10 zero3; every step-1 gradient agrees to 3.6e-7 of its tensor's max |g|), which moved that entry by
# 3.5e-6 (6.1e-6), over the tolerance. eps 1e-3 bounds the amplification by lr/eps = 10: adapters then agree to
# 4.9e-8 (fsdp2) and 3.1e-8 (zero3) after 3 steps, losses to 8.6e-8 relative, on both bitsandbytes paths (eps
# 1e-4: 3.5e-7). Still sensitive: the whole weight read 1e-4 too large where it is gathered fails fsdp2 (1.3e-5).
CASES: dict[str, dict] = {"coto-gated-before-eval": {"method": "coto", "initial_p": 0.6, "seed": 2},
                          "dora": {"method": "dora", "optimizer": {"eps": 1e-3}}}
PATHS = ("unpacked", "packed")


def save_base(folder: Path) -> str:
    """A tiny Llama wide enough for bitsandbytes' 4-bit blocks (every width a multiple of 64), saved."""
    from train_fixtures import TINY_CONFIGS
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = {**TINY_CONFIGS["llama"], "hidden_size": 64, "intermediate_size": 128}
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(folder)
    return str(folder)


def recipe(root: Path, base: str, engine: str, batch: int, case: dict, quantize: str = "nf4") -> dict:
    """``case``: a ``CASES`` entry."""
    from train_fixtures import llama_text_recipe

    out = llama_text_recipe(root, training__batch_size=batch, training__max_steps=STEPS, training__save_every=1,
                            training__keep_checkpoints=None, training__eval_every=2, training__eval_batch_size=3,
                            training__distributed=engine, training__warmup=0)
    out["model"] = {"name": base, "quantize": quantize, "dtype": "float32", "tokenizer": "bytes",
                    "task": "causal-lm"}
    adapter = dict(case)
    out["optimizer"].update(adapter.pop("optimizer", {}))
    out["adapter"] = {"r": 4, "alpha": 8, "targets": TARGETS, **adapter}
    out["training"]["output_dir"] = str(root / "run")
    return out


def quantized_elements(model) -> list[int]:
    """[elements this process stores, elements in full] of the 4-bit weights' code storage
    (:func:`multiproc.held_and_full`)."""
    from multiproc import held_and_full

    return held_and_full(module.weight for module in model.modules()
                         if "Linear4bit" in {cls.__name__ for cls in type(module).__mro__})  # FSDP2 subclasses it


def main(engine: str, batch: int, root: Path, base: str) -> None:
    """``engine``: one engine (runs under ROOT/<path>/<case>) or several, comma-separated (ROOT/<engine>/...)."""
    import json

    import bnb_paths
    import pytest
    from multiproc import runs_in_one_launch

    from peftkit import distributed
    from peftkit.train import from_dict, train

    engines = engine.split(",")
    with runs_in_one_launch() as built:
        for name in engines:
            where = root / name if len(engines) > 1 else root
            for path in PATHS:
                for case, options in CASES.items():
                    with pytest.MonkeyPatch.context() as patch:
                        bnb_paths.force(path, patch)
                        result = train(from_dict(recipe(where / path / case, base, name, batch, options)))
                    assert result.status == "done", (path, case, result)
                    model = built["model"]
                    if hasattr(model, "reshard"):  # FSDP2 keeps the root's weights gathered after a forward
                        model.reshard()
                    (where / path / case / f"quantized_rank{distributed.rank()}.json").write_text(
                        json.dumps(quantized_elements(model)))


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), Path(sys.argv[3]), sys.argv[4])
