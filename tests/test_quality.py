"""The method guide (benchmarks/quality.py): its --quick smoke test over every contender, its data readers
and its metrics. The quick run reads a small fixture in the shared data's formats (written here), so it needs
neither ../shared/data nor SmolLM2 (the LM tasks use a tiny config-built Llama in --quick)."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import sys
from pathlib import Path

import pytest
import torch

from peftkit.train.data import Tokenized

REPO = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
quality = importlib.util.module_from_spec(spec)
sys.modules["quality"] = quality  # dataclasses look their module up there
spec.loader.exec_module(quality)

WORDS = ["the", "a", "king", "queen", "river", "question", "answer", "city", "number", "person", "thing", "why", "how",
         "when", "where", "who", "what"]


def write_fixture(folder: Path) -> None:
    """A few dozen rows in each raw format of ../shared/data (Latin-1 label lines, plain text, MRPC TSV)."""
    rng = random.Random(0)

    def sentence(n: int = 8) -> str:
        return " ".join(rng.choice(WORDS) for _ in range(n))

    (folder / "subj").mkdir(parents=True)
    # \x85 is a Latin-1 character that str.splitlines() would take for a line break.
    lines = [f"{i % 2} {sentence()} caf\xe9\x85 ." for i in range(60)]
    (folder / "subj" / "subj.all").write_bytes("\n".join(lines).encode("latin-1"))
    (folder / "trec").mkdir()
    for name, count in (("TREC.train.all", 60), ("TREC.test.all", 12)):
        rows = [f"{i % 6} {sentence(6)} ?" for i in range(count)]
        (folder / "trec" / name).write_bytes("\n".join(rows).encode("latin-1"))
    (folder / "tinyshakespeare").mkdir()
    speeches = [f"KING:\n{sentence(30)}\n{sentence(30)}" for _ in range(40)]
    (folder / "tinyshakespeare" / "input.txt").write_text("\n\n".join(speeches))
    (folder / "mrpc").mkdir()
    header = "\ufeffQuality\t#1 ID\t#2 ID\t#1 String\t#2 String"
    rows = [f"1\t{i}\t{i + 1}\t{sentence(20)}\t{sentence(20)}" for i in range(20)]
    (folder / "mrpc" / "dev.tsv").write_text("\n".join([header] + rows), encoding="utf-8")


@pytest.mark.slow
def test_quick_mode_runs_every_contender_and_writes_the_report(tmp_path):
    data, cache, out = tmp_path / "data", tmp_path / "cache", tmp_path / "out"
    write_fixture(data)
    tasks = ["minilm-trec", "smollm2-shakespeare", "smollm2-trec-instruct"]
    arguments = ["--quick", "--tasks", ",".join(tasks), "--data-dir", str(data), "--cache", str(cache), "--out", str(out)]
    quality.main(arguments)

    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(tasks)
    for task in tasks:
        expected = {c.name for c in quality.contenders_for(quality.TASKS[task])}
        assert set(results[task]) == expected
        # Every registered method, full fine-tuning, LoRA, and at least two cross-axis compositions.
        assert set(__import__("peftkit").methods()) | {"full"} <= expected
        assert sum("+" in name for name in expected) >= 2
        for name, record in results[task].items():
            assert record["status"] == "done", (task, name)
            assert all(math.isfinite(x) for x in record["train_loss"]) and len(record["train_loss"]) == 4
            assert [p["step"] for p in record["curve"]] == [0, 2, 4]
            assert record["trainable"] > 0 and record["peak_rss_mib"] > 0 and record["step_seconds"] > 0
    # Each method ran with its own axes (not plain LoRA under another name).
    cells = results["minilm-trec"]
    assert cells["hra"]["axes"]["architecture"] == "hra"
    assert cells["lora-pro"]["axes"]["optimizer"] == "lora-pro"
    assert cells["eva+coto+lora-pro"]["axes"] == {"architecture": "lora", "init": "eva", "optimizer": "lora-pro",
                                                  "schedule": "coto"}
    assert cells["full"]["trainable"] == cells["full"]["total"]
    assert cells["hydra"]["trainable"] > cells["lora"]["trainable"] * 0.9  # r_p + r_s = LoRA's r
    assert "ranks" in cells["eva"]["analysis"] and "ranks" in cells["elalora"]["analysis"]
    assert "general_loss_after" in results["smollm2-shakespeare"]["lora"]["analysis"]

    report = (out / "results.md").read_text()
    for method in __import__("peftkit").methods():
        assert f"| {method} |" in report  # a row in the tables and a headline-claim verdict
    assert "### Headline claims at this scale" in report
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # A finished cell is not run again (an interrupted grid resumes where it stopped).
    cell = out / "cells" / "minilm-trec" / "lora.json"
    before = cell.read_text()
    quality.main(arguments + ["--contenders", "lora"])
    assert cell.read_text() == before


def test_labelled_lines_split_on_newlines_only(tmp_path):
    path = tmp_path / "lines.all"
    path.write_bytes("0 one caf\xe9\x85 two\n1 three\n\n".encode("latin-1"))
    assert quality._labelled_lines(path) == [(0, "one caf\xe9\x85 two"), (1, "three")]


class FixedHidden(torch.nn.Module):
    """A causal LM whose decoder returns preset hidden states and whose head is the identity (so the hidden
    states are the logits), whatever the input: for the metric arithmetic."""

    def __init__(self, logits: torch.Tensor) -> None:
        super().__init__()
        self.logits = logits

    def get_decoder(self):
        return lambda input_ids, attention_mask=None, **kwargs: type(
            "Out", (), {"last_hidden_state": self.logits[: input_ids.shape[0]]})()

    def get_output_embeddings(self):
        return torch.nn.Identity()


def test_instruction_exact_match_needs_every_answer_token():
    # Two examples, 4 tokens: prompt positions are -100; answers are the last two tokens.
    examples = Tokenized([[5, 6, 1, 2], [5, 6, 3, 0]], [[-100, -100, 1, 2], [-100, -100, 3, 0]])
    logits = torch.full((2, 4, 8), -10.0)
    # Position t predicts token t + 1: example 0 gets both answer tokens right, example 1 only the first.
    logits[0, 1, 1] = logits[0, 2, 2] = 10.0
    logits[1, 1, 3] = logits[1, 2, 4] = 10.0
    result = quality.evaluate(FixedHidden(logits), examples, "instruction", pad_id=0, batch_size=2)
    assert result["exact_match"] == 0.5
    expected = torch.nn.functional.cross_entropy(logits[:, 1:3].reshape(-1, 8), torch.tensor([1, 2, 3, 0]))
    assert result["loss"] == pytest.approx(expected.item(), rel=1e-6)


def test_instruction_scores_equal_the_full_logits_on_an_adapted_llama():
    # The head runs only at answer positions: the same loss and exact match as the whole-logits forward.
    import peftkit
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in quality.TINY_LLAMA.items() if k != "model_type"}))
    model = peftkit.wrap(model, "lora", r=4)
    for layer in quality.adapter_layers(model).values():
        torch.nn.init.normal_(layer.adapters["default"].lora_B.weight, std=0.5)
    rows = [[int(t) for t in torch.randint(3, 259, (n,))] for n in (9, 12, 7, 12)]
    labels = [[-100] * (len(r) - k) + r[-k:] for r, k in zip(rows, (2, 3, 1, 4))]
    examples = Tokenized(rows, labels)
    # Make example 2's single answer token the model's argmax, so exact match is neither 0 nor trivially 1.
    model.eval()
    with torch.no_grad():
        labels[2][-1] = rows[2][-1] = int(model(torch.tensor([rows[2][:-1]])).logits[0, -1].argmax())
    result = quality.evaluate(model, examples, "instruction", pad_id=0, batch_size=2)

    loss_sum = tokens = hits = 0
    with torch.no_grad():
        for row, label in zip(rows, labels):
            logits = model(torch.tensor([row])).logits[0, :-1]
            target = torch.tensor(label[1:])
            mask = target != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[mask], target[mask], reduction="sum").item()
            tokens += int(mask.sum())
            hits += bool((logits[mask].argmax(-1) == target[mask]).all())
    assert 0 < hits < 4
    assert result["exact_match"] == hits / 4
    assert result["loss"] == pytest.approx(loss_sum / tokens, rel=1e-5)


def test_elalora_phases_scale_with_the_budget():
    contender = next(c for c in quality.contenders_for(quality.TASKS["minilm-subj"]) if c.name == "elalora")
    assert quality.schedule_options(contender, 1150) == {"t_init": 300, "t_final": 400, "delta_t": 50}
    assert quality.schedule_options(contender, 100) == {"t_init": 26, "t_final": 35, "delta_t": 4}
    lora = next(c for c in quality.contenders_for(quality.TASKS["minilm-subj"]) if c.name == "lora")
    assert quality.schedule_options(lora, 100) == {}


def test_switching_adapters_off_for_the_drop_checks_works_under_coto():
    """The drop checks must switch adapters off even under CoTo, whose hook reopens its gates in eval mode."""
    from helpers import make_batch, randomize_adapters, tiny_llama

    import peftkit

    model = tiny_llama()
    batch = make_batch(model)
    model.eval()
    with torch.no_grad():
        base = model(input_ids=batch["input_ids"]).logits
    peftkit.wrap(model, "coto")
    randomize_adapters(model)
    optimizer = peftkit.optimizer(model, 1e-3)
    peftkit.callbacks(model, optimizer=optimizer).on_train_begin_(10)
    model.eval()
    names = sorted(quality.adapter_layers(model))
    with torch.no_grad():
        adapted = model(input_ids=batch["input_ids"]).logits
        saved = quality._gate(model, names)
        switched_off = model(input_ids=batch["input_ids"]).logits
        quality._ungate(model, saved)
        restored = model(input_ids=batch["input_ids"]).logits
    assert not torch.allclose(adapted, base)
    torch.testing.assert_close(switched_off, base)
    torch.testing.assert_close(restored, adapted)


def _cell(metric: str, final: float, **analysis) -> dict:
    return {"status": "done", "curve": [{"step": 0, metric: final}, {"step": 4, metric: final}], "trainable": 100,
            "steps": 4, "step_seconds_all": [1.0] * 4, "train_loss": [1.0] * 4, "analysis": analysis}


def test_claim_rules_hra_may_learn_more_and_coto_skips_a_zero_metric():
    task = quality.TASKS["smollm2-trec-instruct"]  # exact match: higher is better
    general = {"general_loss_before": 2.0}
    cells = {task.name: {
        # HRA forgets less and is better at the task than LoRA r = 4: that supports the claim.
        "hra": _cell("exact_match", 0.30, general_loss_after=2.01, **general),
        "lora-r4": _cell("exact_match", 0.10, general_loss_after=2.05, **general),
        # CoTo ends at 0 exact match: nothing to keep, so no verdict either way.
        "coto": _cell("exact_match", 0.0, drop_check="active_adapters", metric_half_adapters_dropped=0.0),
        "lora": _cell("exact_match", 0.3, drop_check="active_adapters", metric_half_adapters_dropped=0.1),
    }}
    verdicts = {(v.method, v.claim.split()[0]): v for v in quality.claims([task], cells)}
    hra = verdicts[("hra", "less")]
    assert hra.passed == [True]
    cells[task.name]["hra"] = _cell("exact_match", 0.04, general_loss_after=2.01, **general)  # learned less
    hra = {v.method: v for v in quality.claims([task], cells)}["hra"]
    assert hra.passed == [False]
    coto = verdicts[("coto", "more")]
    assert coto.passed == [] and "nothing to keep" in coto.evidence[0]


def test_a_missing_peft_stops_the_grid_before_any_cell(tmp_path, monkeypatch):
    real = quality.importlib.util.find_spec
    monkeypatch.setattr(quality.importlib.util, "find_spec", lambda name, *a: None if name == "peft" else real(name, *a))
    with pytest.raises(SystemExit, match="pip install peft==0.21.2"):
        quality.main(["--tasks", "minilm-trec", "--contenders", "lora,peft-lora", "--out", str(tmp_path / "out"),
                      "--data-dir", str(tmp_path / "absent")])
    assert not (tmp_path / "out").exists()
    # Without the PEFT contender the grid goes on (here to the data check).
    with pytest.raises(SystemExit, match="--data-dir"):
        quality.main(["--tasks", "minilm-trec", "--contenders", "lora", "--out", str(tmp_path / "out"),
                      "--data-dir", str(tmp_path / "absent")])


def test_init_warnings_keep_the_methods_own_and_drop_the_libraries():
    import warnings

    import peftkit
    from helpers import make_batches, tiny_llama

    model = tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftkit.wrap(model, "eva", data=make_batches(model, n=2), max_batches=1, tau=0.999999)
        warnings.warn_explicit("from a library", UserWarning, str(Path(torch.__file__)), 1)
    kept = quality.own_warnings(caught)
    assert len(kept) == 1 and kept[0].startswith("eva: max_batches=1 reached before convergence")
