"""Tiny configs of every mixture-of-experts family transformers 5.x ships that builds offline as a causal LM, in
fp64 with the eager experts loop (``grouped_mm`` takes no fp64). Import as ``from moe_models import ...``."""

from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM

VOCAB = 64
HIDDEN = 16

# Fields a family's config takes (unknown ones are dropped per family): 4 experts, top-2, 2 layers.
COMMON = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=32, moe_intermediate_size=8, num_hidden_layers=2,
              num_attention_heads=2, num_key_value_heads=1, head_dim=8, num_experts=4, num_local_experts=4,
              n_routed_experts=4, moe_num_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
              pad_token_id=0, tie_word_embeddings=False)

# model_type -> overrides. DeepSeek-style MLA needs as many kv heads as heads and head_dim = qk_rope_head_dim; its
# first layer dense (first_k_dense_replace=1) puts a dense MLP and an MoE block in one model.
FAMILIES: dict[str, dict] = {
    "qwen3_moe": {},
    "qwen2_moe": {"shared_expert_intermediate_size": 8},
    "mixtral": {},
    "olmoe": {},
    "gpt_oss": {"layer_types": ["sliding_attention", "full_attention"]},
    "deepseek_v3": dict(num_key_value_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1),
    "deepseek_v2": dict(num_key_value_heads=2, q_lora_rank=8, kv_lora_rank=8, qk_rope_head_dim=8, qk_nope_head_dim=8,
                        v_head_dim=8, n_group=1, topk_group=1, first_k_dense_replace=1, n_shared_experts=1),
    "llama4_text": {"interleave_moe_layer_step": 1},
    "phimoe": {"router_jitter_noise": 0.0, "input_jitter_noise": 0.0},  # no random routing in train mode
    "granitemoe": {},
    "jetmoe": {},
    "glm4_moe": {"first_k_dense_replace": 0},
    "minimax": {},
    "hunyuan_v1_moe": {},
    "ernie4_5_moe": {"moe_k": 2, "moe_layer_start_index": 0, "moe_num_shared_experts": 1},
    "dots1": {"first_k_dense_replace": 0, "n_shared_experts": 1},
    "flex_olmo": {},
}


# Wrap options a family needs under all-linear: Qwen2-MoE's shared-expert gate is a (1 x hidden) linear layer, too
# small for r = 2.
WRAP_OPTIONS: dict[str, dict] = {"qwen2_moe": {"exclude": ["shared_expert_gate"]}}


def moe_config(model_type: str):
    cls = type(AutoConfig.for_model(model_type))
    fields = cls().to_dict()
    values = {k: v for k, v in {**COMMON, **FAMILIES[model_type]}.items() if k in fields}
    return cls(experts_implementation="eager", **values)


def tiny_moe(model_type: str = "qwen3_moe", seed: int = 0) -> torch.nn.Module:
    """A 2-layer, 4-expert, top-2 causal LM of ``model_type`` in fp64, eval mode, routed by its own router."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(moe_config(model_type)).to(torch.float64)
    with torch.no_grad():  # some families initialise expert stacks or routers to zero: give every weight values
        for name, param in model.named_parameters():
            if param.ndim >= 2 and "bias" not in name and not param.abs().sum() > 0:
                param.normal_(0, 0.2)
    return model.eval()


def moe_batch(seed: int = 1, batch: int = 4, length: int = 12, answers: bool = False) -> dict:
    """Random token rows; with ``answers``, each row's labels cover a response of its own length (the prompt's
    labels are -100), so batches differ in target tokens as chat data does."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, VOCAB, (batch, length), generator=gen)
    labels = ids.clone()
    if answers:
        starts = torch.randint(1, length - 1, (batch,), generator=gen)
        labels[torch.arange(length) < starts[:, None]] = -100
    return {"input_ids": ids, "labels": labels}
