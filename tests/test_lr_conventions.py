"""Learning-rate conventions (peftkit/lr.py), the out-of-convention warning and the divergence guard."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from helpers import make_batch, make_batches, tiny_llama
from train_fixtures import llama_text_recipe

import peftkit
from peftkit import registry
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers
from peftkit.lr import DEFAULT_BASE_LR, STEP_BOUND, LRConventionWarning
from peftkit.train.guard import DivergenceGuard, GuardSettings
from peftkit.train.recipe import from_dict

FULL_FT = {"lora-ga", "lora-pro", "loft"}


def _declared(convention: registry.LRConvention) -> bool:
    """Whether a preset gave its own convention: ``register_method`` without one gets ``LRConvention()``, whose
    ``source`` is the non-empty placeholder (so a non-empty check cannot tell them apart)."""
    return bool(convention.source.strip()) and convention.source != registry.LRConvention().source


def test_every_preset_declares_its_convention():
    # Registered and removed at once (monkeypatch.delitem would put it back at teardown, into later tests' registry).
    undeclared = registry.register_method("a-preset-without-convention", architecture="lora")
    del registry._methods["a-preset-without-convention"]
    assert not _declared(undeclared.lr_convention)  # the check below can fail
    for name in peftkit.methods():
        conv = registry.get_method(name).lr_convention
        assert _declared(conv), f"{name}: no lr_convention given to register_method (source {conv.source!r})"
        assert conv.kind == ("full-ft" if name in FULL_FT else "lora"), name
        assert conv.ratio == pytest.approx({"lora-ga": 0.1, "lora-pro": 0.1, "loft": 0.3, "lora-plus": 0.5, "hra": 3.0,
                                            "elalora": 3.0,
                                              "coto": 3.0}.get(name, 1.0))


def _wrapped(method: str, **options):
    model = tiny_llama(hidden_size=64, intermediate_size=96)
    init = registry.get_component("init", options.get("init", registry.get_method(method).init))
    data = make_batches(model, n=2, batch_size=4, seq_len=16) if init.needs_data else None
    return peftkit.wrap(model, method, data=data, r=4, **options)


def _first_step_norm(model, optimizer) -> float:
    """‖ΔW₁‖_F over all adapted layers after one step on a fixed batch (effective weights, any architecture)."""
    before = {n: layer._merged(["default"])[0].detach().clone() for n, layer in adapter_layers(model).items()}
    model.train()
    model(**make_batch(model, batch_size=4, seq_len=16, seed=3)).loss.backward()
    optimizer.step()
    after = {n: layer._merged(["default"])[0] for n, layer in adapter_layers(model).items()}
    return math.sqrt(sum(float((after[n] - before[n]).square().sum()) for n in before))


def test_auto_lr_is_the_convention_times_base_lr():
    for method, ratio in (("lora", 1.0), ("lora-ga", 0.1), ("lora-pro", 0.1), ("lora-plus", 0.5)):
        model = _wrapped(method)
        opt = peftkit.optimizer(model)  # no lr: auto, default base
        assert opt.peftkit_lr.lr == pytest.approx(DEFAULT_BASE_LR * ratio)
        a_group = next(g for g in opt.param_groups if g.get("role") == "A")
        assert a_group["lr"] == pytest.approx(DEFAULT_BASE_LR * ratio)
        opt = peftkit.optimizer(model, "auto", base_lr=1e-3)
        assert opt.peftkit_lr.lr == pytest.approx(1e-3 * ratio)


@pytest.mark.slow
def test_first_step_at_auto_lr_is_bounded_relative_to_lora():
    """The measured ‖ΔW₁‖ at the auto lr, as a ratio to plain LoRA's at the base rate: every preset within
    LoRA+'s own 8× (λ·0.5), every composition within 2·STEP_BOUND; without the cap the LoRA-GA + LoRA+
    composition at LoRA's rate moves far more."""
    reference = _first_step_norm(*(lambda m: (m, peftkit.optimizer(m)))(_wrapped("lora")))
    ratios = {}
    for name in ("lora-ga", "lora-pro", "loft", "lora-plus", "lora-one", "hra", "hydra"):
        model = _wrapped(name)
        ratios[name] = _first_step_norm(model, peftkit.optimizer(model)) / reference
    assert ratios["lora-plus"] == pytest.approx(8.0, rel=0.05)  # B₀ = 0: ΔW₁ = s·ΔB·A₀, ΔB = λ·η sign(g)
    for name, value in ratios.items():
        assert 1e-2 < value <= 8.0 * 1.05, (name, value)
    for options in ({"optimizer": "lora-plus"}, {"optimizer": "lora-plus", "loraplus_lr_ratio": 80.0}):
        model = _wrapped("lora-ga", **options)
        opt = peftkit.optimizer(model)
        assert opt.peftkit_lr.step_cap < 1.0
        value = _first_step_norm(model, opt) / reference
        assert 0.1 < value <= 2 * STEP_BOUND, (options, value)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = _wrapped("lora-ga", optimizer="lora-plus")
        uncapped = _first_step_norm(model, peftkit.optimizer(model, DEFAULT_BASE_LR)) / reference
    assert uncapped > 50.0


def test_predicted_step_matches_the_measured_lora_plus_ratio():
    """σ predicts LoRA+'s first step on a LoRA init exactly (B₀ = 0: only ΔB·A₀, scaled by λ)."""
    from peftkit.lr import first_step_scale

    model = _wrapped("lora")
    plain = first_step_scale(model, peftkit.optimizer(model, 1e-3), 1e-3)
    plus = first_step_scale(model, peftkit.optimizer(model, 1e-3, name="lora-plus"), 1e-3)
    assert plus / plain == pytest.approx(16.0, rel=1e-9)


def test_an_lr_far_outside_the_convention_warns_with_the_factor_and_the_fix():
    model = _wrapped("lora-ga")
    with pytest.warns(LRConventionWarning) as record:
        peftkit.optimizer(model, 2e-3)
    text = str(record[0].message)
    assert "100× above" in text and "lr=2e-05" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftkit.optimizer(model, 4e-5)  # 2× the convention: no warning
        peftkit.optimizer(_wrapped("lora"), 1e-3)  # 5× LoRA's default base: no warning
    with pytest.warns(LRConventionWarning, match="10× below"):
        peftkit.optimizer(model, 2e-6)


def test_recipe_lr_auto_and_its_errors(tmp_path):
    recipe = from_dict(llama_text_recipe(tmp_path, optimizer__lr="auto"))
    assert recipe.optimizer.lr is None and recipe.optimizer.base_lr == pytest.approx(2e-4)
    with pytest.raises(ConfigError, match=r"optimizer.lr: expected a positive learning rate .*or auto"):
        from_dict(llama_text_recipe(tmp_path, optimizer__lr="fast"))
    with pytest.raises(ConfigError, match="optimizer.base_lr"):
        from_dict(llama_text_recipe(tmp_path, optimizer__base_lr=-1))
    with pytest.raises(ConfigError, match="divergence_guard.action"):
        from_dict(llama_text_recipe(tmp_path, training__divergence_guard={"action": "panic"}))
    with pytest.raises(ConfigError, match="divergence_guard.factor"):
        from_dict(llama_text_recipe(tmp_path, training__divergence_guard={"factor": 0.5}))


def test_guard_trips_when_the_window_mean_exceeds_factor_times_the_best():
    guard = DivergenceGuard(GuardSettings(action="stop", factor=2.0, window=2))
    losses = [4.0, 3.0, 2.0, 2.0, 3.0, 4.0, 5.0]  # window means: 3.5, 2.5, 2.0, 2.5, 3.5, 4.5
    verdicts = [guard.observe(step, loss) for step, loss in enumerate(losses, 1)]
    assert verdicts == [False] * 6 + [True]  # 4.5 > 2 × 2.0 at step 7 (3.5 is not)
    assert guard.best_mean == pytest.approx(2.0) and guard.best_step == 4
    assert guard.last_rise == pytest.approx(2.25)


def test_guard_halving_sets_the_rates_from_the_start_rates():
    class Scheduler:
        base_lrs = [1.0, 16.0]

    opt = torch.optim.SGD([{"params": [torch.zeros(1, requires_grad=True)], "lr": 0.5, "initial_lr": 1.0},
                           {"params": [torch.zeros(1, requires_grad=True)], "lr": 8.0, "initial_lr": 16.0}])
    guard = DivergenceGuard(GuardSettings(action="halve", window=1))
    for step, loss in enumerate([3.0, 2.0, 9.0], 1):
        guard.observe(step, loss)
    scheduler = Scheduler()
    guard.halve(opt, scheduler, restored_step=2)
    assert scheduler.base_lrs == [0.5, 8.0] and [g["lr"] for g in opt.param_groups] == [0.25, 4.0]
    assert guard.losses == [(1, 3.0), (2, 2.0)] and guard.best_mean == 2.0
    scheduler.base_lrs = [1.0, 16.0]  # a checkpoint from before the first halving: rates are not halved once only
    guard.halve(opt, scheduler, restored_step=2)
    assert scheduler.base_lrs == [0.25, 4.0]


def _diverging_recipe(tmp_path, name: str, **training) -> dict:
    """LoRA-GA init + LoRA+ (the composition of issue 19) at lr 1.0 on a tiny BERT classifier: the loss
    leaves chance (0.69) for 5-35 within three steps and stays there (measured over 16 steps)."""
    from train_fixtures import TINY_CONFIGS, classification_rows, write_jsonl

    data = write_jsonl(tmp_path / "train.jsonl", classification_rows(64, seed=1))
    return {"model": {"config": dict(TINY_CONFIGS["bert"]), "tokenizer": "bytes", "task": "sequence-classification"},
            "data": {"train": data, "format": "classification", "max_length": 24},
            "adapter": {"method": "lora-ga", "r": 4, "init_batches": 2},
            "optimizer": {"lr": 1.0, "name": "lora-plus"},
            "training": {"max_steps": 12, "batch_size": 8, "log_every": 1, "lr_schedule": "constant",
                         "max_grad_norm": None, "output_dir": str(tmp_path / name), "seed": 3, **training},
            "logging": {"progress_bar": False}}


@pytest.mark.slow
def test_divergence_guard_on_the_diverging_composition(tmp_path, capsys):
    from train_fixtures import read_metrics

    from peftkit.train.loop import train

    def losses(result):
        return [r["loss"] for r in read_metrics(result.output_dir) if "loss" in r]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        plain = train(from_dict(_diverging_recipe(tmp_path, "plain", max_steps=8)))
        assert plain.status == "done" and max(losses(plain)) > 10 * losses(plain)[0]  # it diverges, no NaN
        stopped = train(from_dict(_diverging_recipe(
            tmp_path, "stop", divergence_guard={"action": "stop", "factor": 3.0, "window": 2})))
        assert stopped.status == "diverged" and stopped.step <= 3
        assert "the loss diverged at step" in capsys.readouterr().out
        halved = train(from_dict(_diverging_recipe(
            tmp_path, "halve", save_every=1, keep_checkpoints=None,
            divergence_guard={"action": "halve", "factor": 3.0, "window": 2, "max_halvings": 8})))
    assert halved.status == "done" and halved.step == 12
    records = [r for r in read_metrics(halved.output_dir) if "loss" in r]
    assert [r["step"] for r in records] == list(range(1, 13))  # the rolled-back steps were rewritten
    final_lr = records[-1]["lr"]
    halvings = round(math.log2(1.0 / final_lr))
    assert 1 <= halvings <= 8 and final_lr == pytest.approx(0.5 ** halvings)
    tail = [r["loss"] for r in records[-4:]]
    plain_tail = losses(plain)[-4:]
    # Recovered: the last steps are below 3× chance (0.69), a third of the unguarded run (5-35).
    assert sum(tail) / 4 < 3 * 0.6931 and sum(tail) < sum(plain_tail) / 3, (tail, plain_tail)


@pytest.mark.slow
def test_cli_warns_before_step_1_and_exits_3_when_the_guard_stops(tmp_path, capsys):
    import yaml

    from peftkit.train.cli import EXIT_DIVERGED, main

    recipe = tmp_path / "diverging.yaml"
    recipe.write_text(yaml.safe_dump(_diverging_recipe(
        tmp_path, "cli", divergence_guard={"action": "stop", "factor": 3.0, "window": 2})))
    with pytest.warns(LRConventionWarning,
                      match=r"lr 1 is 8.45e\+04× above the convention of .lora-ga.*step cap 0.592\); use lr=1.2e-05"):
        code = main(["train", str(recipe)])
    assert code == EXIT_DIVERGED == 4
    out = capsys.readouterr().out
    assert "the loss diverged at step 3" in out and "13.7× the best (1.362, at step 2)" in out


def test_guard_settings_go_through_the_validation_layer(tmp_path):
    from train_fixtures import llama_text_recipe

    from peftkit.train.recipe import from_dict

    for bad, needle in (({"factor": float("inf")}, "divergence_guard.factor"),
                        ({"window": "10"}, "divergence_guard.window"),
                        ({"wndow": 10}, "Did you mean 'training.divergence_guard.window'"),
                        ({"action": "halve"}, "set training.save_every")):
        with pytest.raises(ConfigError, match=needle):
            from_dict(llama_text_recipe(tmp_path, training__divergence_guard=bad))
    ok = from_dict(llama_text_recipe(tmp_path, training__divergence_guard={"action": "halve"}, training__save_every=2))
    assert ok.training.divergence_guard == {"action": "halve"}


@pytest.mark.parametrize("engine", ["fsdp2", "zero3"])
def test_sharded_engines_refuse_generation_metrics_before_anything_runs(tmp_path, engine):
    """Both all-gather the base in every forward: processes generating different lengths would wait forever."""
    from train_fixtures import llama_text_recipe

    from peftkit.train.recipe import from_dict

    recipe = llama_text_recipe(tmp_path, training__distributed=engine, training__eval_metrics=["exact_match"])
    recipe["data"]["format"] = "instruction"
    with pytest.raises(ConfigError, match=f"{engine} does not support"):
        from_dict(recipe)
