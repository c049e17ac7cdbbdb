"""Two processes (torchrun, gloo on CPU) at batch B each train the same adapter as one process at batch 2B
with the same data order; only the main process writes metrics, checkpoints and the adapter."""

from __future__ import annotations

from pathlib import Path

import torch
import yaml
from multiproc import HANG_GUARD_S, REPO, run_distributed
from train_fixtures import adapter_tensors, llama_text_recipe, read_metrics

from peftkit.train import from_dict, train


def test_two_processes_at_batch_b_equal_one_process_at_2b(tmp_path):
    settings = dict(training__max_steps=4, training__eval_every=2, training__save_every=2,
                    adapter__targets=["q_proj", "v_proj", "down_proj"])
    one = llama_text_recipe(tmp_path / "one", training__batch_size=4, **settings)
    reference = train(from_dict(one))
    assert reference.status == "done"

    two = llama_text_recipe(tmp_path / "two", training__batch_size=2, **settings)
    recipe_file = tmp_path / "two.yaml"
    recipe_file.write_text(yaml.safe_dump(two))
    # `torchrun ... peftkit/__main__.py` runs exactly what `torchrun -m peftkit` runs.
    proc = run_distributed(REPO / "peftkit" / "__main__.py", 2, tmp_path / "out", "train", str(recipe_file),
                           "logging.progress_bar=false", timeout=HANG_GUARD_S)
    assert "2 process(es), global batch 4" in proc.stdout

    expected, got = adapter_tensors(tmp_path / "one" / "run"), adapter_tensors(tmp_path / "two" / "run")
    assert expected.keys() == got.keys() and expected
    for key in expected:
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6)
    ref_metrics, metrics = read_metrics(tmp_path / "one" / "run"), read_metrics(tmp_path / "two" / "run")
    assert [r["step"] for r in metrics] == [r["step"] for r in ref_metrics]  # rank 0 alone wrote, once per step
    for ref, got_record in zip(ref_metrics, metrics):
        for key in ("loss", "eval_loss", "tokens"):
            if key in ref:
                assert abs(ref[key] - got_record[key]) <= 1e-5 * max(1.0, abs(ref[key])), (key, ref, got_record)
    checkpoint = Path(tmp_path / "two" / "run" / "checkpoints" / "step-000004")
    assert (checkpoint / "rng-0.safetensors").is_file() and (checkpoint / "rng-1.safetensors").is_file()
