"""LoRA-GA (lora-ga.md, tests 1-7): function kept, first-step alignment with −[G]_2r, gd magnitude, export to
PEFT on the original base, parity with PEFT 0.21.2's LoRA-GA, errors. Test 5 (two processes) is in
test_inits_distributed.py."""

from __future__ import annotations

import functools

import bnb_paths
import pytest
import torch
from helpers import make_batches, output, tiny_gpt2, tiny_llama, tiny_llama_4bit, train_steps, wrap_with_data
from inits_fixtures import LinearToy, full_gradient, linear_batches, sgd_step

import peftkit
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers

_wrap = functools.partial(wrap_with_data, method="lora-ga")


@pytest.mark.parametrize("kind", ["fp64", "fp32", "bf16", "gpt2", "4bit"])
def test_function_preserved_after_init(kind):
    factories = {"fp64": lambda: tiny_llama(dtype=torch.float64), "fp32": tiny_llama,
                 "bf16": lambda: tiny_llama(dtype=torch.bfloat16), "gpt2": tiny_gpt2, "4bit": tiny_llama_4bit}
    model = factories[kind]()
    batches = make_batches(model, n=2)
    ref = output(model, batches[0]).double()
    _wrap(model, batches, r=4)
    assert all(l.adapters["default"].lora_B.weight.abs().max() > 0 for l in adapter_layers(model).values())
    if kind == "4bit" and bnb_paths.takes_packed_path(model):
        # bitsandbytes' packed kernel computes in bf16: a bf16-level gap (bnb_paths.PACKED_GAP), not fp32's.
        bnb_paths.assert_close(output(model, batches[0]).double(), ref, model)
        return
    diff = (output(model, batches[0]).double() - ref).abs().max()
    bound = {"fp64": 1e-12, "fp32": 1e-5 * float(ref.abs().max()), "bf16": 1e-2, "gpt2": 1e-5 * float(ref.abs().max()),
             "4bit": 1e-5 * float(ref.abs().max())}[kind]
    assert diff <= bound, (kind, float(diff))


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr", "random"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit", "weightS"])
def test_every_direction_and_scale_keeps_the_function_fp64(direction, scale):
    model = LinearToy()
    batches = linear_batches()
    x = batches[0]["x"]
    ref = model(**batches[0])["logits"]
    _wrap(model, batches, r=3, direction=direction, scale=scale, norm_clip=scale == "unit")
    assert (model(**batches[0])["logits"] - ref).abs().max() <= 1e-12 * float(ref.abs().max())
    layer = adapter_layers(model)["lin"]
    assert layer.adapters["default"].offset_A.shape == (3, x.shape[1])


def _first_step(direction: str, scale: str, lr: float, peft_compat: bool = False):
    """(ΔW after one SGD step, s²·c_A·c_B·[G]_2r-direction reference pieces)."""
    model = LinearToy()
    batches = linear_batches()
    g = full_gradient(model, batches)
    _wrap(model, batches, r=2, alpha=2.0, rslora=False, direction=direction, scale=scale, peft_compat=peft_compat)
    layer = adapter_layers(model)["lin"]
    before = layer.delta_weight("default").clone()
    sgd_step(model, batches, lr)
    delta = layer.delta_weight("default") - before
    u, s, vh = torch.linalg.svd(g)
    g2r = u[:, :4] @ torch.diag(s[:4]) @ vh[:4]
    return delta, g2r, layer.scaling["default"]


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
def test_first_step_is_along_the_rank_2r_gradient(direction):
    lr = 1e-4
    delta, g2r, s = _first_step(direction, "stable", lr)
    cos = torch.nn.functional.cosine_similarity(delta.flatten(), -g2r.flatten(), dim=0)
    assert cos >= 1 - 1e-6
    c2 = 10 ** 0.5 / 16  # c_A·c_B = √m/γ, m = 10
    expected = -lr * s * s * c2 * g2r
    err = (delta - expected).norm() / expected.norm()
    delta_half, _, _ = _first_step(direction, "stable", lr / 2)
    err_half = (delta_half - expected / 2).norm() / (expected / 2).norm()
    assert err <= 1e-3 and 0.4 <= err_half / err <= 0.6, (float(err), float(err_half))


def test_gd_scale_first_step_is_the_full_finetuning_step():
    lr = 1e-4
    delta, g2r, _ = _first_step("ArB2r", "gd", lr)
    err = (delta + lr * g2r).norm() / (lr * g2r).norm()
    delta_half, _, _ = _first_step("ArB2r", "gd", lr / 2)
    err_half = (delta_half + lr / 2 * g2r).norm() / (lr / 2 * g2r).norm()
    assert err <= 1e-3 and 0.4 <= err_half / err <= 0.6


def test_peft_compat_mode_is_not_aligned_negative_control():
    delta, g2r, _ = _first_step("ArB2r", "stable", 1e-4, peft_compat=True)
    cos = torch.nn.functional.cosine_similarity(delta.flatten(), -g2r.flatten(), dim=0)
    assert cos < 0.95


def test_export_rank_2r_loads_in_peft_and_peftkit_on_the_original_base(tmp_path):
    from peft import PeftModel

    model = tiny_llama()
    batches = make_batches(model, n=2)
    _wrap(model, batches, r=4)
    train_steps(model, batches)
    trained = output(model, batches[0])
    peftkit.save(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny_llama(), tmp_path / "a").eval()
    torch.testing.assert_close(output(peft_model, batches[0]), trained, rtol=1e-5, atol=1e-5)
    reloaded = peftkit.load(tiny_llama(), tmp_path / "a")
    torch.testing.assert_close(output(reloaded, batches[0]), trained, rtol=1e-5, atol=1e-5)
    assert adapter_layers(reloaded)["model.layers.0.self_attn.q_proj"].ranks["default"] == 8
    peftkit.merge(model)
    torch.testing.assert_close(output(model, batches[0]), trained, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("direction", ["ArB2r", "A2rBr", "ArBr"])
@pytest.mark.parametrize("scale", ["stable", "gd", "unit"])
def test_peft_compat_matches_peft_loraga(direction, scale):
    """q = min(4r, min(m, n)) = min(m, n) here, so PEFT's svd_lowrank is exact; factors agree up to sign."""
    from peft import LoraConfig, LoraGAConfig, get_peft_model
    from peft.tuners.lora.loraga import preprocess_loraga

    r, targets = 4, ["q_proj", "k_proj", "down_proj"]
    batches = make_batches(tiny_llama(), n=2)
    reference = tiny_llama()
    config = LoraConfig(r=r, lora_alpha=8, target_modules=targets, init_lora_weights="lora_ga",
                        lora_ga_config=LoraGAConfig(direction=direction, scale={"gd": "gd_scale"}.get(scale, scale)))

    def train_step():
        for batch in batches:
            reference(**batch).loss.backward()

    preprocess_loraga(reference, config, train_step)
    peft_model = get_peft_model(reference, config)
    ours = _wrap(tiny_llama(), batches, r=r, alpha=8.0, rslora=False, targets=targets, direction=direction,
                 scale=scale, peft_compat=True)
    base = tiny_llama()
    for name, layer in adapter_layers(ours).items():
        theirs = peft_model.base_model.model.get_submodule(name)
        a, b = layer.adapters["default"].lora_A.weight, layer.adapters["default"].lora_B.weight
        a_p, b_p = theirs.lora_A["default"].weight, theirs.lora_B["default"].weight
        sign_a = torch.sign((a * a_p).sum(1, keepdim=True))
        sign_b = torch.sign((b * b_p).sum(0, keepdim=True))
        # fp32 SVDs on both sides (LAPACK vs svd_lowrank): near-degenerate lower triplets differ at ~1e-5.
        torch.testing.assert_close(a * sign_a, a_p, rtol=0, atol=1e-4 * float(a_p.abs().max()))
        torch.testing.assert_close(b * sign_b, b_p, rtol=0, atol=1e-4 * float(b_p.abs().max()))
        # W_res = W0 − s·B0A0 of PEFT's mutated base, from our factors with PEFT's signs.
        w_res = base.get_submodule(name).weight - layer.scaling["default"] * (b * sign_b) @ (a * sign_a)
        torch.testing.assert_close(w_res, theirs.base_layer.weight, rtol=1e-5, atol=1e-5)


def test_rank_too_large_errors_before_any_forward_and_zero_gradient_warns():
    model = tiny_llama()
    calls = []
    model.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ConfigError, match="largest allowed r there is 8"):
        peftkit.wrap(model, "lora-ga", r=9, data=make_batches(model, n=1))
    assert not calls and not adapter_layers(model)

    class TwoHeads(LinearToy):
        def __init__(self):
            super().__init__()
            self.unused = torch.nn.Linear(12, 10, bias=False, dtype=torch.float64)

        def forward(self, x, target):
            self.unused(x)  # no effect on the loss: G = 0
            return super().forward(x, target)

    model = TwoHeads()
    with pytest.warns(UserWarning, match="unused got a zero gradient"):
        peftkit.wrap(model, "lora-ga", r=2, data=linear_batches())
    layers = adapter_layers(model)
    assert layers["unused"].adapters["default"].lora_B.weight.abs().max() == 0
    assert layers["unused"].adapters["default"].offset_A is None
    assert layers["lin"].adapters["default"].lora_B.weight.abs().max() > 0


def test_init_axis_composes_with_lora():
    batches = make_batches(tiny_llama(), n=2)
    a = _wrap(tiny_llama(), batches, r=4)
    b = peftkit.wrap(tiny_llama(), "lora", init="lora-ga", data=batches, r=4, rslora=True, alpha=16.0)
    for (name, la), lb in zip(adapter_layers(a).items(), adapter_layers(b).values()):
        for key, value in la.adapters["default"].state_dict().items():
            torch.testing.assert_close(lb.adapters["default"].state_dict()[key], value, rtol=0, atol=0)


def test_gradient_sketch_subspace_error_shrinks_and_vanishes_at_full_sketch():
    """The streamed rank-k truncated SVD: its top-2r subspace approaches the exact one as k grows and equals it
    once k = min(m, n); the init it gives keeps the function."""
    from peftkit.linalg import signed_svd, subspace_cosines
    from peftkit.stats import gradient_statistics

    model = peftkit.wrap(tiny_llama(), "lora", r=2, targets=["down_proj"])
    layers = adapter_layers(model)
    batches = make_batches(model, n=2)
    exact = gradient_statistics(model, layers, batches)
    worst = {}
    for k in (8, 16, 32):
        streams = gradient_statistics(model, layers, batches, streams={n: k for n in layers})
        worst[k] = min(float(subspace_cosines(streams[n].factors()[0][:, :4], signed_svd(exact[n])[0][:, :4]).min())
                       for n in layers)
    assert worst[32] > 1 - 1e-6 and worst[32] >= worst[16] >= worst[8] - 0.05, worst
    batches = make_batches(tiny_llama(), n=2)
    sketched = _wrap(tiny_llama(), batches, r=2, gradient_sketch=8)
    ref = output(tiny_llama(), batches[0])
    assert (output(sketched, batches[0]) - ref).abs().max() <= 1e-5 * ref.abs().max()
