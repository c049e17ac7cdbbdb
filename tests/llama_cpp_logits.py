"""Last-token logits from the real llama.cpp (llama-cpp-python), with and without GGUF LoRA adapters.

Used by tests/test_gguf.py. Needs only llama-cpp-python and numpy (no peftkit, no torch), so the test can hand it
to the Python of another virtual environment (``PEFTKIT_LLAMA_CPP_PYTHON``) and a crash inside llama.cpp stays out
of pytest's process.

    python llama_cpp_logits.py [--f32-cache] MODEL.gguf OUT.npy TOKEN_IDS_JSON [ADAPTER.gguf ...]

writes OUT.npy, float32 of shape (1 + number of adapters, vocabulary): row 0 the base model's logits of the last
token, row i those with adapter i applied alone at scale 1 (llama.cpp's own alpha / rank scaling inside it).
``--f32-cache``: an fp32 key/value cache instead of llama.cpp's default fp16 one, so that an F32 model is computed in
fp32 throughout.
"""

from __future__ import annotations

import json
import sys

import numpy as np


def last_token_logits(model_path: str, token_ids: list[int], adapters: list[str], f32_cache: bool = False
                      ) -> np.ndarray:
    import llama_cpp

    cache = {"type_k": llama_cpp.GGML_TYPE_F32, "type_v": llama_cpp.GGML_TYPE_F32} if f32_cache else {}
    rows = []
    for adapter_path in [None, *adapters]:
        options = {"lora_path": adapter_path, "lora_scale": 1.0} if adapter_path is not None else {}
        llm = llama_cpp.Llama(model_path=model_path, n_ctx=max(64, len(token_ids)), logits_all=True,
                              n_threads=1, n_threads_batch=1, verbose=False, **cache, **options)
        llm.eval(token_ids)
        rows.append(np.array(llm.scores[len(token_ids) - 1], dtype=np.float32))
        llm.close()
    return np.stack(rows)


def main(argv: list[str]) -> None:
    f32_cache = argv[:1] == ["--f32-cache"]
    model_path, out, token_json, *adapters = argv[f32_cache:]
    np.save(out, last_token_logits(model_path, json.loads(token_json), adapters, f32_cache))


if __name__ == "__main__":
    main(sys.argv[1:])
