"""peftkit's own LR schedules (constant, constant_with_warmup, linear, cosine, cosine_with_restarts) equal
transformers' ``get_scheduler`` at every step, for the warmups and options a recipe can give; the other names
still go through ``get_scheduler``; a bad option is the same ConfigError either way."""

from __future__ import annotations

import pytest
import torch
from transformers import get_scheduler

from peftkit.errors import ConfigError
from peftkit.train import from_dict
from peftkit.train.lr_schedule import OWN_SCHEDULES, lr_lambda, make_scheduler

CASES = [  # (max_steps, warmup, options)
    (10, 0, {}), (10, 2, {}), (10, 0.25, {}), (7, 7, {}), (12, 3, {"num_cycles": 2}), (9, 1, {"num_cycles": 0.75}),
    (1, 0, {}), (3, 2, {"num_cycles": 3}),
]


def _recipe(name: str, max_steps: int, warmup: float, options: dict):
    return from_dict({"model": {"config": {"model_type": "llama"}, "tokenizer": "bytes"}, "data": {"train": "x.jsonl"},
                      "optimizer": {"lr": 1e-2},
                      "training": {"max_steps": max_steps, "warmup": warmup, "lr_schedule": name,
                                   "lr_schedule_options": options}})


def _rates(scheduler, optimizer, steps: int) -> list[float]:
    rates = [optimizer.param_groups[0]["lr"]]
    for _ in range(steps):
        optimizer.step()
        scheduler.step()
        rates.append(optimizer.param_groups[0]["lr"])
    return rates


@pytest.mark.parametrize("name", sorted(OWN_SCHEDULES))
@pytest.mark.parametrize("max_steps, warmup, options", CASES)
def test_own_schedules_equal_transformers_at_every_step(name, max_steps, warmup, options):
    if name in ("linear", "constant", "constant_with_warmup") and options:
        options = {}  # linear takes none; the constants ignore them (as get_scheduler does)
    if name == "cosine_with_restarts" and "num_cycles" in options:
        options = {"num_cycles": int(options["num_cycles"])}
    recipe = _recipe(name, max_steps, warmup, options)
    ours_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    theirs_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    ours = make_scheduler(recipe, ours_optimizer)
    assert type(ours) is torch.optim.lr_scheduler.LambdaLR
    warmup_steps = int(warmup) if warmup >= 1 else round(warmup * max_steps)
    schedule = "constant_with_warmup" if name == "constant" and warmup_steps else name
    theirs = get_scheduler(schedule, theirs_optimizer, num_warmup_steps=warmup_steps, num_training_steps=max_steps,
                           scheduler_specific_kwargs=dict(options))
    steps = max_steps + 3  # past the end too
    assert _rates(ours, ours_optimizer, steps) == _rates(theirs, theirs_optimizer, steps)  # bit for bit
    factor = lr_lambda(recipe)
    assert [factor(s) for s in range(steps)] == [theirs.lr_lambdas[0](s) for s in range(steps)]


def test_a_resumed_scheduler_continues_where_it_stopped():
    recipe = _recipe("cosine", 10, 2, {})
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    scheduler = make_scheduler(recipe, optimizer)
    _rates(scheduler, optimizer, 4)
    state = scheduler.state_dict()
    fresh_optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1e-2)
    fresh = make_scheduler(recipe, fresh_optimizer)
    fresh.load_state_dict(state)
    fresh_optimizer.param_groups[0]["lr"] = optimizer.param_groups[0]["lr"]
    assert _rates(fresh, fresh_optimizer, 6) == _rates(scheduler, optimizer, 6)


@pytest.mark.parametrize("name", ["cosine", "linear", "cosine_with_restarts", "polynomial"])
def test_an_option_the_schedule_lacks_is_one_config_error(name):
    with pytest.raises(ConfigError, match=f"training.lr_schedule_options: the '{name}' schedule rejects "
                                          r"\{'no_such_option': 1\}"):
        lr_lambda(_recipe(name, 10, 0, {"no_such_option": 1}))
