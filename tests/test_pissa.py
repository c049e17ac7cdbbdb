"""PiSSA, MiLoRA, OLoRA (adapters/pissa.py): the papers' definitions in fp64, PEFT 0.21.2's inits on the same
weights, the function kept at init, and the rank-2r export PEFT loads on the original base."""

from __future__ import annotations

import pytest
import torch
from helpers import make_batches, output, tiny_gpt2, tiny_llama, train_steps

import peftkit
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers, state_of

METHODS = ("pissa", "milora", "olora")


def _factors(layer):
    branch = layer.adapters["default"]
    return branch.lora_A.weight.detach(), branch.lora_B.weight.detach(), layer.scaling["default"]


def _definition(method: str, w: torch.Tensor, r: int, s: float) -> torch.Tensor:
    """s·B·A as the paper defines it, from an independent fp64 factorization of W (out, in)."""
    if method == "olora":
        q, rr = torch.linalg.qr(w)
        return s * q[:, :r] @ rr[:r]
    u, sv, vh = torch.linalg.svd(w, full_matrices=False)
    keep = slice(0, r) if method == "pissa" else slice(len(sv) - r, len(sv))
    return u[:, keep] @ torch.diag(sv[keep]) @ vh[keep]


@pytest.mark.parametrize("factory", [tiny_llama, tiny_gpt2], ids=["linear", "conv1d"])
@pytest.mark.parametrize("method", METHODS)
def test_factors_are_the_papers_and_the_function_is_kept_fp64(method, factory):
    model = factory(dtype=torch.float64)
    base = factory(dtype=torch.float64)
    batch = make_batches(model, n=1)[0]
    ref = output(model, batch)
    peftkit.wrap(model, method, r=3, alpha=5.0)
    assert (output(model, batch) - ref).abs().max() <= 1e-12
    for name, layer in adapter_layers(model).items():
        a, b, s = _factors(layer)
        w = base.get_submodule(name).weight.detach()
        w = w.T if layer.kind == "conv1d" else w
        expected = _definition(method, w, 3, s)
        torch.testing.assert_close(s * b @ a, expected, rtol=0, atol=1e-10 * float(w.abs().max()))
        if method == "pissa":  # the residual is W minus the best rank-r approximation (Eckart–Young)
            sv = torch.linalg.svdvals(w)
            assert abs(torch.linalg.matrix_norm(w - s * b @ a, 2) - sv[3]) <= 1e-10 * float(sv[0])
        if method == "milora":  # the trainable part spans the minor singular subspaces only
            sv = torch.linalg.svdvals(s * b @ a)
            assert abs(float(sv[0]) - float(torch.linalg.svdvals(w)[-3])) <= 1e-10 * float(w.abs().max())
        if method == "olora":  # B orthonormal columns, A upper-triangular rows of R
            torch.testing.assert_close(b.T @ b, torch.eye(3, dtype=b.dtype), rtol=0, atol=1e-12)
            assert torch.equal(a.tril(-1)[:, :3], torch.zeros(3, 3, dtype=a.dtype))


def test_training_moves_the_residual_model_not_the_base_fp64():
    """After a step the layer's weight is (W − s·B₀A₀) + s·B·A: the papers' residual model."""
    model = tiny_llama(dtype=torch.float64)
    base = tiny_llama(dtype=torch.float64)
    batches = make_batches(model, n=1)
    peftkit.wrap(model, "pissa", r=2, alpha=4.0)
    opt = peftkit.optimizer(model, lr=2e-4)
    model.train()
    model(**batches[0]).loss.backward()
    opt.step()
    for name, layer in adapter_layers(model).items():
        branch, s = layer.adapters["default"], layer.scaling["default"]
        w = base.get_submodule(name).weight
        residual = w - s * branch.offset_B @ branch.offset_A
        merged = residual + s * branch.lora_B.weight @ branch.lora_A.weight
        torch.testing.assert_close(w + layer.delta_weight("default"), merged.detach(), rtol=0, atol=1e-12)
        assert torch.equal(layer.base_layer.weight, w)


@pytest.mark.parametrize("init,method", [("pissa", "pissa"), ("olora", "olora")])
def test_equal_to_peft_init_on_the_same_weights(init, method):
    """PEFT 0.21.2 refuses fp64 (TypeError) and works in fp32: both sides in fp32 on the same weights. Compared:
    s·B·A and the residual base (sign-free), and the factors themselves with singular-vector signs fixed."""
    from peft import LoraConfig, get_peft_model

    targets = ["q_proj", "k_proj", "down_proj"]
    peft_model = get_peft_model(tiny_llama(), LoraConfig(r=4, lora_alpha=8, target_modules=targets,
                                                         init_lora_weights=init))
    ours = peftkit.wrap(tiny_llama(), method, r=4, alpha=8.0, targets=targets)
    base = tiny_llama()
    for name, layer in adapter_layers(ours).items():
        a, b, s = _factors(layer)
        theirs = peft_model.base_model.model.get_submodule(name)
        a_p, b_p = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
        w = base.get_submodule(name).weight.detach()
        tol = 1e-6 * float(w.abs().max())
        torch.testing.assert_close(s * b @ a, s * b_p @ a_p, rtol=0, atol=tol)
        torch.testing.assert_close(w - s * b @ a, theirs.base_layer.weight.detach(), rtol=0, atol=tol)
        sign = torch.sign((a * a_p).sum(1))  # QR's and the SVD's sign conventions per row of A / column of B
        torch.testing.assert_close(a * sign[:, None], a_p, rtol=0, atol=1e-5 * float(a_p.abs().max()))
        torch.testing.assert_close(b * sign[None, :], b_p, rtol=0, atol=1e-5 * float(b_p.abs().max()))


def test_peft_lora_config_init_values_are_aliases():
    from peft import LoraConfig

    for init, method, niter in [("pissa", "pissa", None), ("pissa_niter_4", "pissa", 4), ("olora", "olora", None),
                                ("milora", "milora", None)]:
        model = peftkit.wrap(tiny_llama(), LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"],
                                                      init_lora_weights=init))
        state = state_of(model)
        cfg = state.configs["default"]
        assert cfg.method == method and cfg.init == method
        if niter is not None:
            assert cfg.options["init"]["niter"] == niter
    with pytest.raises(ConfigError, match="pissa_niter_K"):
        peftkit.wrap(tiny_llama(), LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="pissa_niter_x"))
    # The option itself (not a PEFT config object) is not an alias: one error pointing at the methods.
    with pytest.raises(ConfigError, match=r"init_lora_weights: .*peftkit.wrap\(model, 'pissa', niter=K\)"):
        peftkit.wrap(tiny_llama(), "lora", r=2, init_lora_weights="pissa")


def test_pissa_niter_is_the_truncation_on_a_decaying_spectrum():
    """``niter`` (PEFT's pissa_niter_K, randomized) equals the exact truncation where the spectrum decays fast."""
    model = tiny_llama(dtype=torch.float64)
    for layer in model.model.layers:
        w = layer.self_attn.q_proj.weight
        u, _, vh = torch.linalg.svd(w.detach(), full_matrices=False)
        with torch.no_grad():
            w.copy_(u @ torch.diag(0.1 ** torch.arange(len(vh), dtype=w.dtype)) @ vh)
    weights = {f"model.layers.{i}.self_attn.q_proj": layer.self_attn.q_proj.weight.detach().clone()
               for i, layer in enumerate(model.model.layers)}
    peftkit.wrap(model, "pissa", r=2, alpha=4.0, niter=8, targets=["q_proj"])
    for name, layer in adapter_layers(model).items():
        a, b, s = _factors(layer)
        torch.testing.assert_close(s * b @ a, _definition("pissa", weights[name], 2, s), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", METHODS)
def test_export_rank_2r_loads_in_peft_on_the_original_base_fp64(method, tmp_path):
    from peft import PeftModel

    model = tiny_llama(dtype=torch.float64)
    batches = make_batches(model, n=2)
    peftkit.wrap(model, method, r=3, alpha=6.0)
    train_steps(model, batches)
    trained = output(model, batches[0])
    assert (trained - output(tiny_llama(dtype=torch.float64), batches[0])).abs().max() > 1e-4
    peftkit.save(model, tmp_path / "a")
    peft_model = PeftModel.from_pretrained(tiny_llama(dtype=torch.float64), tmp_path / "a").eval()
    torch.testing.assert_close(output(peft_model, batches[0]), trained, rtol=0, atol=1e-10)
    reloaded = peftkit.load(tiny_llama(dtype=torch.float64), tmp_path / "a")
    torch.testing.assert_close(output(reloaded, batches[0]), trained, rtol=0, atol=1e-10)
    assert adapter_layers(reloaded)["model.layers.0.self_attn.q_proj"].ranks["default"] == 6


def test_non_linear_target_is_refused():
    with pytest.raises(ConfigError, match="embed_tokens"):
        peftkit.wrap(tiny_llama(), "pissa", r=2, targets=["embed_tokens"])


@pytest.mark.parametrize("method", METHODS)
def test_4bit_base_keeps_the_function_and_factorizes_the_dequantized_weight(method):
    """The residual stays an offset pair (a 4-bit weight cannot hold W − s·B₀A₀ without a second rounding): the
    output at init is the 4-bit base's, and s·B·A is the definition applied to the dequantized weight."""
    import bnb_paths
    from helpers import tiny_llama_4bit

    model = tiny_llama_4bit()
    batch = make_batches(model, n=1)[0]
    ref = output(model, batch).double()
    peftkit.wrap(model, method, r=2, alpha=4.0)
    if bnb_paths.takes_packed_path(model):
        bnb_paths.assert_close(output(model, batch).double(), ref, model)
    else:
        assert (output(model, batch).double() - ref).abs().max() <= 1e-5 * float(ref.abs().max())
    for layer in adapter_layers(model).values():
        a, b, s = _factors(layer)
        w = layer.base_weight(torch.float64)
        expected = _definition(method, w, 2, s)
        torch.testing.assert_close((s * b @ a).double(), expected, rtol=0, atol=1e-4 * float(w.abs().max()))


def test_pissa_equal_to_peft_on_conv1d():
    """GPT-2's Conv1D (PEFT transposes with fan_in_fan_out): s·B·A and the residual equal PEFT's (fp32). PEFT's OLoRA
    factorizes Conv1D's stored (in, out) weight instead (its A gets shape (r, out)), so OLoRA is compared on
    nn.Linear only."""
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(tiny_gpt2(), LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"],
                                                        init_lora_weights="pissa", fan_in_fan_out=True))
    ours = peftkit.wrap(tiny_gpt2(), "pissa", r=4, alpha=8.0, targets=["c_attn", "c_proj"])
    base = tiny_gpt2()
    for name, layer in adapter_layers(ours).items():
        a, b, s = _factors(layer)
        theirs = peft_model.base_model.model.get_submodule(name)
        a_p, b_p = theirs.lora_A["default"].weight.detach(), theirs.lora_B["default"].weight.detach()
        w = base.get_submodule(name).weight.detach().T
        tol = 1e-6 * float(w.abs().max())
        torch.testing.assert_close(s * b @ a, s * b_p @ a_p, rtol=0, atol=tol)
        torch.testing.assert_close((w - s * b @ a).T, theirs.base_layer.weight.detach(), rtol=0, atol=tol)
