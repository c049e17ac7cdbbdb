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
def test_quick_mode_sweeps_every_contender_picks_its_best_cell_and_resumes(tmp_path):
    """The whole pipeline on tiny models: every contender at the sweep's three lrs, the best cells in the
    report, the docs page's block and plot, and a resumed run that reruns only what is missing or stale.
    (About 35 s of CPU on one thread: tiny config-built BERT and Llama, 4 steps a cell.)"""
    data, cache, out, docs = tmp_path / "data", tmp_path / "cache", tmp_path / "out", tmp_path / "docs" / "guide.md"
    write_fixture(data)
    # Every contender's whole sweep on a classification and an instruction task; the perplexity task (its metric's
    # ratio spread, the general-text loss) for LoRA alone below: a third full sweep adds minutes and no code path.
    tasks = ["minilm-trec", "smollm2-trec-instruct"]
    arguments = ["--quick", "--tasks", ",".join(tasks), "--data-dir", str(data), "--cache", str(cache), "--out",
                 str(out),
                 "--docs", str(docs)]
    quality.main(arguments)

    results = json.loads((out / "results.json").read_text())
    assert set(results) == set(tasks)
    tags = {"x0.333", "x1", "x3"}
    for task in tasks:
        spec = quality.TASKS[task]
        expected = {c.name for c in quality.contenders_for(spec)}
        assert set(results[task]) == expected
        # Every registered method, full fine-tuning, LoRA, and at least two cross-axis compositions.
        assert set(__import__("peftkit").methods()) | {"full"} <= expected
        assert sum("+" in name for name in expected) >= 2
        for name, summary in results[task].items():
            cells = summary["cells"]
            assert set(cells) == tags, (task, name)
            for tag, record in cells.items():
                assert record["status"] == "done", (task, name, tag)
                assert all(math.isfinite(x) for x in record["train_loss"]) and len(record["train_loss"]) == 4
                assert [p["step"] for p in record["curve"]] == [0, 2, 4]
                assert record["trainable"] > 0 and record["peak_rss_mib"] > 0 and record["step_seconds"] > 0
                # The sweep's lr is the multiplier times the contender's conventional lr.
                assert record["lr"] == pytest.approx(record["lr_factor"] * record["lr_conventional"], rel=1e-12)
            # The best cell is the best final metric of the three (recomputed here), and the spread best − worst.
            finals = {tag: r["curve"][-1][spec.metric] for tag, r in cells.items()}
            pick = max if spec.higher_is_better else min
            assert summary["best_metric"] == pick(finals.values())
            assert finals[summary["best"]] == summary["best_metric"]
            assert summary["best_lr"] == cells[summary["best"]]["lr"]
            spread = max(finals.values()) / min(finals.values()) if spec.metric == "perplexity" else \
                max(finals.values()) - min(finals.values())
            assert summary["spread"] == pytest.approx(spread)
        # Each contender around its own convention (the task's base rate is plain LoRA's).
        base = quality.task_recipe(spec, cache, True).optimizer.lr
        conventional = {n: s["cells"]["x1"]["lr_conventional"] for n, s in results[task].items()}
        assert conventional["lora"] == conventional["hydra"] == base
        assert conventional["hra"] == conventional["elalora"] == conventional["coto"] == pytest.approx(3 * base)
        assert conventional["lora-pro"] == conventional["lora-ga"] == pytest.approx(0.1 * base)
        assert conventional["loft"] == pytest.approx(0.3 * base)
        assert conventional["full"] == pytest.approx(0.1 * base)
        assert conventional["lora-plus"] == pytest.approx(0.5 * base)
        # LoRA-GA's scaled factors with LoRA+'s ratio: at most LoRA-GA's rate (the first-step cap may lower it).
        assert conventional["lora-ga+lora-plus"] <= 0.1 * base * (1 + 1e-12)
        if spec.kind == "classification":
            assert conventional["peft-lora"] == base
    # Each method ran with its own axes (not plain LoRA under another name).
    cells = {n: s["cells"]["x1"] for n, s in results["minilm-trec"].items()}
    assert cells["hra"]["axes"]["architecture"] == "hra"
    assert cells["lora-pro"]["axes"]["optimizer"] == "lora-pro"
    assert cells["eva+coto+lora-pro"]["axes"] == {"architecture": "lora", "init": "eva", "optimizer": "lora-pro",
                                                  "schedule": "coto"}
    assert cells["full"]["trainable"] == cells["full"]["total"]
    assert cells["hydra"]["trainable"] > cells["lora"]["trainable"] * 0.9  # r_p + r_s = LoRA's r
    assert "ranks" in cells["eva"]["analysis"] and "ranks" in cells["elalora"]["analysis"]

    report = (out / "results.md").read_text()
    for method in __import__("peftkit").methods():
        assert f"| {method} |" in report  # a row in the tables and a headline-claim verdict
    assert "### Headline claims at this scale (best cells)" in report and "Cells not run yet" not in report
    page = docs.read_text()
    begin, end = quality.MARKERS
    assert page.count(begin) == page.count(end) == 1 and "(assets/quality.png)" in page
    assert page.split(begin)[1].split(end)[0].strip() in report  # the same tables, plus the plot's link
    assert (docs.parent / "assets" / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # Resume: finished cells are not run again; a deleted cell and a stale one (another recipe) are.
    folder = out / "cells" / "minilm-trec"
    kept, deleted, stale = folder / "lora@x1.json", folder / "lora@x3.json", folder / "lora@x0.333.json"
    before = kept.read_text()
    deleted.unlink()
    record = json.loads(stale.read_text())
    stale.write_text(json.dumps({**record, "recipe_fingerprint": "another recipe", "lr": -1.0}))
    quality.main(arguments + ["--contenders", "lora"])
    assert kept.read_text() == before
    assert json.loads(deleted.read_text())["lr_factor"] == 3.0
    base = quality.task_recipe(quality.TASKS["minilm-trec"], cache, True).optimizer.lr
    assert json.loads(stale.read_text())["lr"] == pytest.approx(base / 3)

    # The perplexity task: lower is better, the spread is worst / best, and the general-text loss is measured.
    quality.main(["--quick", "--tasks", "smollm2-shakespeare", "--contenders", "lora", "--data-dir", str(data),
                  "--cache", str(cache), "--out", str(out)])
    summary = json.loads((out / "results.json").read_text())["smollm2-shakespeare"]["lora"]
    finals = {tag: r["curve"][-1]["perplexity"] for tag, r in summary["cells"].items()}
    assert set(finals) == tags and summary["best_metric"] == min(finals.values())
    assert summary["spread"] == pytest.approx(max(finals.values()) / min(finals.values()))
    assert "general_loss_after" in summary["cells"]["x1"]["analysis"]


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
    from transformers import LlamaConfig, LlamaForCausalLM

    import peftkit

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


def test_the_committed_cells_are_of_the_current_recipes():
    # A recipe field added later changes every task's fingerprint unless it is listed as neutral at its default
    # (FINGERPRINT_NEUTRAL): then every committed cell would silently drop out of the report and be run again.
    for task in quality.TASKS.values():
        fingerprint = quality.recipe_fingerprint(task, False)
        folder = REPO / "benchmarks" / "results" / "quality" / "cells" / task.name
        stale = [path.name for path in sorted(folder.glob("*.json"))
                 if json.loads(path.read_text()).get("recipe_fingerprint") != fingerprint]
        assert not stale, f"{task.name}: cells of another recipe: {stale}"


def test_claim_rules_of_dora_and_the_svd_inits():
    # DoRA: two rows (metric, late loss), each may hold alone; PiSSA needs both a lower early loss and at least
    # LoRA's metric; MiLoRA at least LoRA's and PiSSA's metric; OLoRA a lower early loss.
    accuracy, perplexity = quality.TASKS["minilm-trec"], quality.TASKS["smollm2-shakespeare"]

    def cell(metric: str, final: float, early: float, late: float) -> dict:
        return {**_swept(metric, final, 1.0), "train_loss": [early, 1.5, 1.5, late]}

    cells = {accuracy.name: {
        "lora": cell("accuracy", 0.80, early=2.0, late=1.0),
        "dora": cell("accuracy", 0.80, early=2.0, late=0.9),  # a tie in accuracy is "at least"
        "pissa": cell("accuracy", 0.79, early=1.5, late=1.0),  # converges faster, ends lower: not reproduced
        "milora": cell("accuracy", 0.80, early=2.0, late=1.0),
        "olora": cell("accuracy", 0.90, early=2.5, late=1.0),  # a better metric does not make it converge faster
    }, perplexity.name: {
        "lora": cell("perplexity", 9.0, early=2.0, late=1.0),
        "dora": cell("perplexity", 10.0, early=2.0, late=0.9),  # lower loss, higher perplexity
        "pissa": cell("perplexity", 9.0, early=1.9, late=1.0),
        "milora": cell("perplexity", 8.5, early=2.0, late=1.0),
        "olora": cell("perplexity", 9.5, early=1.9, late=1.0),
    }}
    verdicts = quality.claims([accuracy, perplexity], cells)
    dora = [v for v in verdicts if v.method == "dora"]
    assert [v.claim.split()[0] for v in dora] == ["at", "lower"]
    assert dora[0].passed == [True, False] and dora[1].passed == [True, True]
    assert "accuracy 80.0 vs LoRA 80.0" in dora[0].evidence[0]
    by_method = {v.method: v for v in verdicts if v.method != "dora"}
    assert by_method["pissa"].passed == [False, True]
    assert by_method["milora"].passed == [True, True]
    assert "accuracy 80.0 vs LoRA 80.0, PiSSA 79.0" in by_method["milora"].evidence[0]
    assert by_method["olora"].passed == [False, True]
    # The claims table lists the methods in publication order: DoRA, PiSSA, MiLoRA, OLoRA.
    order = [v.method for v in verdicts if v.method in ("dora", "pissa", "milora", "olora")]
    assert order == ["dora", "dora", "pissa", "milora", "olora"]


def test_a_missing_peft_stops_the_grid_before_any_cell(tmp_path, monkeypatch):
    real = quality.importlib.util.find_spec
    monkeypatch.setattr(quality.importlib.util, "find_spec", lambda name,
                        *a: None if name == "peft" else real(name, *a))
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

    from helpers import make_batches, tiny_llama

    import peftkit

    model = tiny_llama()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftkit.wrap(model, "eva", data=make_batches(model, n=2), max_batches=1, tau=0.999999)
        warnings.warn_explicit("from a library", UserWarning, str(Path(torch.__file__)), 1)
    kept = quality.own_warnings(caught)
    assert len(kept) == 1 and kept[0].startswith("eva: max_batches=1 reached before convergence")


def _swept(metric: str, final: float, factor: float, late: float = 1.0, status: str = "done", **extra) -> dict:
    """A synthetic sweep cell: final eval ``metric`` value, ``late`` train loss, at ``factor`` × 1e-3."""
    return {"status": status, "curve": [{"step": 0, metric: 0.5}, {"step": 8, metric: final}], "train_loss": [late] * 8,
            "lr_factor": factor, "lr": factor * 1e-3, "lr_conventional": 1e-3, "label": "x", "kind": "adapter",
            "axes": {"architecture": "lora", "init": "default", "optimizer": "adamw", "schedule": "none"},
            "trainable": 10, "total": 100, "init_seconds": 0.0, "step_seconds": 0.1, "peak_rss_mib": 1.0, **extra}


def test_best_cell_is_the_best_final_metric_then_the_lower_loss_then_the_nearer_convention():
    third, one, three = quality.SWEEP
    accuracy, perplexity = quality.TASKS["minilm-trec"], quality.TASKS["smollm2-shakespeare"]
    sweep = {third: _swept("accuracy", 0.6, third), one: _swept("accuracy", 0.8, one),
             three: _swept("accuracy", 0.7, three)}
    assert quality.best_cell(accuracy, sweep)["lr_factor"] == one
    assert quality.sensitivity(accuracy, sweep) == (pytest.approx(0.2), [])
    # Perplexity: lower is better, and the spread is worst / best.
    sweep = {third: _swept("perplexity", 20.0, third), one: _swept("perplexity", 15.0, one),
             three: _swept("perplexity", 10.0, three)}
    assert quality.best_cell(perplexity, sweep)["lr_factor"] == three
    assert quality.sensitivity(perplexity, sweep) == (pytest.approx(2.0), [])
    # A tie on the metric goes to the lower late train loss, then to the multiplier nearer 1×.
    sweep = {third: _swept("accuracy", 0.8, third, late=0.5), one: _swept("accuracy", 0.8, one, late=0.6),
             three: _swept("accuracy", 0.8, three, late=0.5)}
    assert quality.best_cell(accuracy, sweep)["lr_factor"] == third
    sweep[third] = _swept("accuracy", 0.8, third, late=0.6)
    assert quality.best_cell(accuracy, sweep)["lr_factor"] == three  # lower loss beats nearer convention
    sweep[three] = _swept("accuracy", 0.8, three, late=0.6)
    assert quality.best_cell(accuracy, sweep)["lr_factor"] == one
    # A diverged cell is never best; it is listed apart from the spread of the finished ones.
    sweep = {third: _swept("accuracy", 0.9, third, status="diverged at step 3"), one: _swept("accuracy", 0.5, one),
             three: _swept("accuracy", 0.75, three)}
    assert quality.best_cell(accuracy, sweep)["lr_factor"] == three
    assert quality.sensitivity(accuracy, sweep) == (pytest.approx(0.25), [third])
    assert quality._fmt_spread(accuracy, sweep) == "25.0 pts; diverged at 1/3×"
    # One finished cell: a best but no spread; none: no best.
    only = {one: _swept("accuracy", 0.5, one)}
    assert quality.best_cell(accuracy, only)["lr_factor"] == one and math.isnan(quality.sensitivity(accuracy, only)[0])
    assert quality.best_cell(accuracy, {one: _swept("accuracy", 0.5, one, status="diverged at step 1")}) is None


def test_the_claims_compare_the_best_cells():
    # LoRA-GA's claim (faster early convergence than LoRA): false at LoRA-GA's 3× cell, true at its best (1×).
    task = quality.TASKS["minilm-trec"]
    third, one, three = quality.SWEEP

    def cell(final: float, factor: float, early: float) -> dict:
        return {**_swept("accuracy", final, factor), "train_loss": [early, early, 1.0, 1.0]}

    cells = {task.name: {
        "lora-ga": {one: cell(0.9, one, early=0.5), three: cell(0.2, three, early=3.0)},
        "lora": {third: cell(0.4, third, early=2.0), one: cell(0.7, one, early=1.0),
                 three: cell(0.6, three, early=0.1)},
        "full": {one: cell(0.8, one, early=0.7)},
    }}
    best = quality.best_cells([task], cells)
    assert {n: r["lr_factor"] for n, r in best[task.name].items()} == {"lora-ga": one, "lora": one, "full": one}
    verdict = next(v for v in quality.claims([task], best) if v.method == "lora-ga")
    assert verdict.passed == [True] and "0.5000 vs LoRA 1.0000" in verdict.evidence[0]


def test_partial_grids_report_their_missing_cells_and_an_estimate(tmp_path):
    task = quality.TASKS["minilm-trec"]
    third, one, three = quality.SWEEP
    fingerprint = quality.recipe_fingerprint(task, False)
    for name, factor, wall in (("lora", one, 100.0), ("lora", three, 300.0), ("hra", one, 200.0)):
        record = {**_swept("accuracy", 0.5 + factor / 10, factor), "task": task.name, "contender": name,
                  "recipe_fingerprint": fingerprint, "wall_seconds": wall, "threads": 1}
        quality.write_cell(tmp_path, record)
    # A stale cell (another recipe) and a stray file are not read.
    quality.write_cell(tmp_path, {**_swept("accuracy", 0.99, third), "task": task.name, "contender": "lora",
                                  "recipe_fingerprint": "old budget"})
    (tmp_path / "cells" / task.name / "lora.json").write_text("{}")
    cells = quality.read_cells(tmp_path, [task])
    assert {n: sorted(s) for n, s in cells[task.name].items()} == {"hra": [one], "lora": [one, three]}
    missing = quality.missing_cells([task], cells)
    total = len(quality.contenders_for(task)) * len(quality.SWEEP)
    assert len(missing) == total - 3 and (task, next(c for c in quality.contenders_for(task) if c.name == "lora"),
                                          third) in missing
    text = quality.grid_time([task], cells)
    assert "took 10.0 min" in text and "1 thread per cell" in text
    # Each missing cell at the task's mean finished-cell time (200 s).
    assert f"{total - 3} of {total} cells are not run yet" in text
    assert f"about {(total - 3) * 200 / 3600:.1f} h more" in text
    table = quality.task_table(task, quality.contenders_for(task), cells[task.name])
    lora_row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert "| missing |" in lora_row and "0.003 (3×) |" in lora_row and "(edge" not in lora_row  # 2 of 3: no edge yet
    assert "| lora-pro | not run yet |" in table
    assert {line.count("|") for line in table.splitlines()} == {len(table.splitlines()[0].split("|"))  - 1}
    summary = quality.summary_table([task], cells)
    assert "| lora | 80.0 (0.003; 20.0 pts; 2/3 lrs) |" in summary and "| hra | 60.0 (0.001; —; 1/3 lrs) |" in summary
    listed = quality.missing_table([task], cells)
    assert "| minilm-trec | lora | 1/3× |" in listed and "| minilm-trec | hra | 1/3×, 3× |" in listed


def test_the_grid_runs_the_questioned_contenders_first_and_the_minilm_tasks_before_smollm2():
    tasks = [quality.TASKS[t] for t in ("smollm2-shakespeare", "minilm-subj", "minilm-trec")]
    order = [(t.name, c.name, f) for t, c, f in quality.grid_order(tasks, None)]
    assert len(order) == len(set(order)) == sum(len(quality.contenders_for(t)) for t in tasks) * len(quality.SWEEP)
    assert order[:6] == [("minilm-subj", "lora-pro", f) for f in quality.SWEEP] + \
        [("minilm-subj", "lora-ga", f) for f in quality.SWEEP]
    # Task by task, the MiniLM ones first (in the order given), and in each task the PRIORITY contenders first.
    assert list(dict.fromkeys(task for task, _, _ in order)) == ["minilm-subj", "minilm-trec", "smollm2-shakespeare"]
    for task in tasks:
        names = list(dict.fromkeys(name for t, name, _ in order if t == task.name))
        assert names[:len(quality.PRIORITY)] == list(quality.PRIORITY)[:len(names)] or task.kind != "classification"
        assert sorted(names) == sorted(c.name for c in quality.contenders_for(task))
    lm = [name for t, name, _ in order if t == "smollm2-shakespeare"]
    assert list(dict.fromkeys(lm))[:6] == [n for n in quality.PRIORITY if n != "peft-lora"]
    # Contenders named on the command line run in that order.
    named = quality.grid_order(tasks[1:2], ["hra", "lora"])
    assert [(c.name, f) for _, c,
            f in named] == [("hra", f) for f in quality.SWEEP] + [("lora", f) for f in quality.SWEEP]


def test_the_docs_block_goes_between_the_markers_and_nowhere_else(tmp_path):
    begin, end = quality.MARKERS
    page = tmp_path / "docs" / "method-guide.md"
    quality.write_docs(page, "first tables\n")  # no page yet: created with the markers
    assert page.read_text().count(begin) == 1 and f"{begin}\nfirst tables\n{end}" in page.read_text()
    page.write_text(f"# Guide\n\nprose before\n\n{begin}\nold\n{end}\n\nprose after\n")
    quality.write_docs(page, "new tables")
    quality.write_docs(page, "new tables")  # idempotent
    assert page.read_text() == f"# Guide\n\nprose before\n\n{begin}\nnew tables\n{end}\n\nprose after\n"
    page.write_text("no markers here\n")
    with pytest.raises(SystemExit, match="--docs: .* lacks the markers"):
        quality.write_docs(page, "tables")
    assert page.read_text() == "no markers here\n"


def test_cell_arguments_are_checked(tmp_path):
    with pytest.raises(SystemExit, match="--cell: lr multiplier 2 is not one of the sweep's"):
        quality.main(["--cell", "minilm-trec", "lora", "2", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--stop-at: expected a UTC time HH:MM"):
        quality.main(["--stop-at", "soon", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match="--threads: expected a positive thread count"):
        quality.main(["--threads", "0", "--out", str(tmp_path)])


def test_the_sweep_extends_past_its_edge_until_the_best_cell_is_inside():
    task = quality.TASKS["minilm-trec"]
    third, one, three = quality.SWEEP
    sweep = {third: _swept("accuracy", 0.5, third), one: _swept("accuracy", 0.7, one)}
    assert quality.next_factor(task, sweep) is None  # the sweep itself is not finished yet
    sweep[three] = _swept("accuracy", 0.9, three)
    assert quality.next_factor(task, sweep) == 9.0
    sweep[9.0] = _swept("accuracy", 0.95, 9.0)
    assert quality.next_factor(task, sweep) == 27.0
    sweep[27.0] = _swept("accuracy", 0.97, 27.0)
    assert quality.next_factor(task, sweep) is None  # EXTEND_LIMIT points past the edge: no further
    sweep[27.0] = _swept("accuracy", 0.6, 27.0)
    assert quality.next_factor(task, sweep) is None  # the best (9×) is inside
    low = {third: _swept("accuracy", 0.9, third), one: _swept("accuracy", 0.7, one),
           three: _swept("accuracy", 0.5, three)}
    assert quality.next_factor(task, low) == pytest.approx(1 / 9)
    table = quality.task_table(task, quality.contenders_for(task), {"lora": sweep})
    row = next(line for line in table.splitlines() if line.startswith("| lora |"))
    assert "| 9×: 95.0 (lr 0.009); 27×: 60.0 (lr 0.027) |" in row and "0.009 (9×) |" in row and "(edge" not in row
    sweep[27.0] = _swept("accuracy", 0.97, 27.0)
    row = next(line for line in quality.task_table(task, quality.contenders_for(task), {"lora": sweep}).splitlines()
               if line.startswith("| lora |"))
    assert "0.027 (27×) (edge of the extended sweep)" in row
    assert {line.count("|") for line in table.splitlines()} == {len(table.splitlines()[0].split("|")) - 1}
    # The spread stays over the SWEEP points (the same 9× span for every contender).
    assert "| lora | 97.0 (0.027; 40.0 pts; +9×; +27×) |" in quality.summary_table([task], {task.name: {"lora": sweep}})


def test_cells_of_a_changed_convention_are_rekeyed_by_their_lr(tmp_path):
    """A cell run at 3× HRA's old ratio-1 rate is the 1× cell of its ratio-3 convention: same lr, not rerun."""
    task = quality.TASKS["minilm-trec"]
    base = quality.task_recipe(task, quality.CACHE, False).optimizer.lr
    ratio = quality.registry.get_method("hra").lr_convention.ratio
    assert ratio == 3.0
    fingerprint = quality.recipe_fingerprint(task, False)
    for name, factor, lr in (("hra", 1 / 3, base / 3), ("hra", 1.0, base), ("hra", 3.0, 3 * base),
                             ("hra", 9.0, 2 * base), ("lora", 1.0, base)):
        quality.write_cell(tmp_path, {**_swept("accuracy", 0.5, factor), "task": task.name, "contender": name,
                                      "lr": lr, "lr_conventional": base, "recipe_fingerprint": fingerprint})
    moved = quality.rekey_cells(tmp_path, [task])
    assert len(moved) == 4 and quality.rekey_cells(tmp_path, [task]) == []  # idempotent
    folder = tmp_path / "cells" / task.name
    assert sorted(p.name for p in folder.glob("hra@*.json")) == ["hra@x0.111.json", "hra@x0.333.json", "hra@x1.json"]
    for tag, lr in (("x0.111", base / 3), ("x0.333", base), ("x1", 3 * base)):
        record = json.loads((folder / f"hra@{tag}.json").read_text())
        assert record["lr"] == pytest.approx(lr) and record["lr_conventional"] == pytest.approx(ratio * base)
        assert "an earlier convention" in record["rekeyed"] and f"· {ratio:g} ('hra'" in record["lr_convention"]
    assert (folder / "stale" / "hra@x9.json").is_file()  # 2× the base is no point of the sweep: set aside
    assert json.loads((folder / "lora@x1.json").read_text()).get("rekeyed") is None
    cells = quality.read_cells(tmp_path, [task])
    assert sorted(cells[task.name]["hra"]) == pytest.approx([1 / 9, 1 / 3, 1.0])


def test_the_auto_rate_table_marks_each_method_against_loras_best():
    trec, text = quality.TASKS["minilm-trec"], quality.TASKS["smollm2-shakespeare"]
    cells = {trec.name: {"lora": {1.0: _swept("accuracy", 0.90, 1.0), 3.0: _swept("accuracy", 0.93, 3.0)},
                         "hra": {1.0: _swept("accuracy", 0.915, 1.0)}, "coto": {1.0: _swept("accuracy", 0.905, 1.0)}},
             text.name: {"lora": {1.0: _swept("perplexity", 60.0, 1.0)}, "hra": {1.0: _swept("perplexity", 61.5, 1.0)},
                         "coto": {1.0: _swept("perplexity", 62.5, 1.0)}}}
    rows = {line.split(" | ")[0][2:]: line for line in quality.auto_rate_table([trec, text], cells).splitlines()}
    assert "✓ 91.5 vs 93.0 (lr 0.001)" in rows["hra"] and "✓ 61.50 vs 60.00" in rows["hra"]  # 1.5 points off
    assert "✗ 90.5 vs 93.0" in rows["coto"] and "✗ 62.50 vs 60.00" in rows["coto"]  # 2.5 points off
    assert "✓ 90.0 vs 93.0" not in rows["lora"] and "✗ 90.0 vs 93.0" in rows["lora"]  # LoRA's own 1× is not its best
    assert rows["eva"].count("—") == 2  # not run
