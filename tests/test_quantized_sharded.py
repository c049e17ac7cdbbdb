"""A 4-bit base under DeepSpeed ZeRO-3 (issue 24 item 3).

bitsandbytes' CPU kernel (on CPUs with AVX512-BF16) repacks a 4-bit weight in place on its first eval forward
without grad: new codes in ``param.data``, a packed ``quant_state``. ZeRO-3 owns ``param.data`` (a copy of its
partition, freed after use and gathered again from the partition), so a release after the repack brought the
standard-layout codes back under a quant_state that still said packed: from the first evaluation after a CoTo
step with a block gated off (ZeRO then releases even its persistent weights), every forward used garbled codes.
Measured before the fix on the packed path (2 processes at batch 2 vs 1 at batch 4, fp32): eval loss after step 2
5.5665 vs 5.5430, step-3 loss off by 4.3e-2, adapters by 4.2e-3; the unpacked path was exact. Now the ZeRO-3
engine pins every 4-bit layer to the standard layout, and a layer that could repack an engine-owned weight
refuses to run (a StateError).
"""

from __future__ import annotations

import pytest
import torch
from multiproc import REPO, run_distributed_beside
from quantized_sharded import CASES, PATHS, STEPS, save_base
from quantized_sharded import main as run_cases
from train_fixtures import adapter_tensors, read_metrics

ENGINES = ["zero3", "fsdp2"]


@pytest.fixture(scope="module")
def quantized_zero3(tmp_path_factory):
    """(one-process root, two-process root); the one-process side runs here while the launch runs."""
    one, two = tmp_path_factory.mktemp("q-one"), tmp_path_factory.mktemp("q-two")
    base = save_base(tmp_path_factory.mktemp("q-base"))
    run_distributed_beside(lambda: run_cases("zero3", 4, one, base),
                           REPO / "tests" / "quantized_sharded.py", 2, two / "out", ",".join(ENGINES), "2", str(two),
                           base)
    return one, two


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("bnb_path", PATHS)
@pytest.mark.parametrize("case", list(CASES))
def test_two_processes_equal_one_with_an_eval_after_a_gated_step(quantized_zero3, case, bnb_path, engine):
    """Against one process under zero3 (standard layout, bitsandbytes' uint8 code storage): under fsdp2 the codes
    are stored as fp32 (quant_storage) and sharded, the same bytes."""
    one, two = quantized_zero3
    reference, sharded = one / bnb_path / case / "run", two / engine / bnb_path / case / "run"
    expected, got = adapter_tensors(reference), adapter_tensors(sharded)
    assert expected.keys() == got.keys() and expected
    for key in expected:  # fp32 (a 4-bit base computes in its compute dtype): all-reduce rounding only
        torch.testing.assert_close(got[key], expected[key], rtol=1e-4, atol=1e-6, msg=key)
    ref_metrics, metrics = read_metrics(reference), read_metrics(sharded)
    assert [(r["step"], "eval_loss" in r) for r in metrics] == [(r["step"], "eval_loss" in r) for r in ref_metrics]
    assert [r["step"] for r in metrics if "eval_loss" in r] == [2, STEPS]
    for ref, mine in zip(ref_metrics, metrics):
        for key in ("loss", "eval_loss"):
            if key in ref:  # 1e-6 relative: the defect moved the step-2 eval loss by 4e-3 relative
                assert abs(ref[key] - mine[key]) <= 1e-6 * abs(ref[key]), (bnb_path, ref, mine)


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINES)
def test_the_4bit_codes_are_sharded(quantized_zero3, engine):
    """FSDP-QLoRA: each of 2 processes stores half of the 4-bit code storage (issue 26: fsdp2 held all of it)."""
    import json

    _, two = quantized_zero3
    for rank in (0, 1):
        case = two / engine / PATHS[0] / next(iter(CASES))
        held, full = json.loads((case / f"quantized_rank{rank}.json").read_text())
        assert full > 0 and full // 2 <= held <= full // 2 + 16, (engine, rank, held, full)  # partitions round up


# ---------------------------------------------------------------------------------------- no launch
def _layer():
    import bitsandbytes as bnb

    from peftkit import quantized

    layer = bnb.nn.Linear4bit(128, 64, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    layer.weight = bnb.nn.Params4bit(torch.randn(64, 128), requires_grad=False, quant_type="nf4")
    layer.weight._quantize("cpu")
    quantized.track_layouts(layer)
    return layer.eval()


def test_a_4bit_layer_that_could_repack_an_engine_owned_weight_refuses_to_run(monkeypatch):
    """The class, not the instance: whatever wraps the model, a 4-bit layer whose weight a sharding engine owns
    (ZeRO-3 marks it with ``ds_id``) and whose bitsandbytes kernel may repack it in place stops with an error
    instead of computing with a weight the engine will garble; ``keep_standard_layout`` makes it run, never
    packed, with the output of the standard layout."""
    import bnb_paths

    from peftkit import quantized
    from peftkit.errors import StateError

    bnb_paths.force("packed", monkeypatch)
    layer = _layer()
    x = torch.randn(3, 128)
    expected = torch.nn.functional.linear(x, quantized.dense_weight(layer))
    layer.weight.ds_id = 7  # what deepspeed.zero.Init leaves on every parameter it partitions
    with pytest.raises(StateError, match="DeepSpeed ZeRO-3.*keep_standard_layouts"), torch.no_grad():
        layer(x)
    assert not bnb_paths.is_packed(layer)
    quantized.keep_standard_layout(layer)
    with torch.no_grad():
        out = layer(x)
        layer(x)
    assert not bnb_paths.is_packed(layer)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


def test_keep_standard_layout_unpacks_a_packed_layer_exactly(monkeypatch):
    import bnb_paths

    from peftkit import quantized

    bnb_paths.force("packed", monkeypatch)
    layer = _layer()
    before = quantized.dense_weight(layer).clone()
    with torch.no_grad():
        layer(torch.randn(2, 128))
    assert bnb_paths.is_packed(layer)
    quantized.keep_standard_layout(layer)
    assert not bnb_paths.is_packed(layer) and torch.equal(quantized.dense_weight(layer), before)


def test_the_zero3_engine_pins_4bit_layers_at_any_process_count(monkeypatch):
    """One process under zero3 computes what two do: the 4-bit layers are pinned there too (DeepSpeed is not
    started at one process)."""
    import bnb_paths

    from peftkit.train import engines

    bnb_paths.force("packed", monkeypatch)
    model = torch.nn.Sequential(_layer(), torch.nn.Linear(64, 2))
    optimizer = torch.optim.SGD(model[1].parameters(), lr=0.1)

    class OneProcess:
        device = torch.device("cpu")

        def prepare_optimizer(self, opt):
            return opt

    engine = engines.make("zero2", OneProcess())
    engine.prepare(model, optimizer)
    assert model[0].support_avx512bf16_for_cpu  # ZeRO-2 does not own the base weights: the fast path stays
    engine = engines.make("zero3", OneProcess())
    engine.prepare(model, optimizer)
    with torch.no_grad():
        model(torch.randn(2, 128))
    assert not model[0].support_avx512bf16_for_cpu and not bnb_paths.is_packed(model[0])
