"""The four axes' contracts (peftkit/contracts.py): every registered component satisfies its axis's Protocol,
a component with the wrong call shape is caught, and ``AdapterConfig.axis_options`` fills the options class."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn as nn
from helpers import tiny_llama

import peftkit
from peftkit import contracts, registry
from peftkit.config import AdapterConfig, resolve_config
from peftkit.errors import ConfigError
from peftkit.inject import adapter_layers
from peftkit.layer import AdapterLayer
from peftkit.schedule import Schedule


def _registered() -> list[tuple[str, registry.Component]]:
    return [(axis, c) for axis in registry.AXES for c in registry.components(axis).values()]


@pytest.mark.parametrize("axis,component", _registered(), ids=lambda v: v if isinstance(v, str) else v.name)
def test_every_registered_component_satisfies_its_axis_contract(axis, component):
    assert contracts.contract_problems(axis, component.obj, component.option_names(), base=AdapterLayer) == []
    if axis == "architecture":
        assert isinstance(component.obj, contracts.Architecture)  # runtime-checkable: members present
    else:
        assert isinstance(component.obj, contracts.CONTRACTS[axis])


def _init_missing_data(model, layers, config):
    return None


def _optimizer_without_options(model, lr, config):
    return torch.optim.SGD(model.parameters(), lr=lr)


def _schedule_wanting_an_optimizer(model, config, optimizer):
    return Schedule(model, config)


class _NoDelta(nn.Module):
    architecture_name = "x"
    merge_is_lossless = True
    expert_layer = None

    def make_branch(self, name, r, alpha, config):
        return nn.Module()


class _NoForward(AdapterLayer):
    def make_branch(self, name, r, alpha, config):
        return nn.Module()

    def delta_weight(self, name):
        return torch.zeros(1, 1)


class _MergeOnly(AdapterLayer):  # HRA's shape: a non-additive merge, no delta_weight
    def make_branch(self, name, r, alpha, config):
        return nn.Module()

    def adapted_forward(self, x, *args, **kwargs):
        return x

    def merge_weights(self, name, weight, bias):
        return weight, bias


@pytest.mark.parametrize("axis,obj,options,missing", [
    ("init", _init_missing_data, (), "does not accept the init call"),
    ("optimizer", _optimizer_without_options, ("weight_decay",), "does not accept the optimizer call"),
    ("schedule", _schedule_wanting_an_optimizer, (), "does not accept the schedule call"),
    ("architecture", _NoDelta, (), "missing adapted_forward"),
    ("architecture", _init_missing_data, (), "is a class"),
    ("architecture", _NoForward, (), "adapted_forward not overridden"),
    ("architecture", _MergeOnly, (), "delta_weight not overridden"),
    ("init", 3, (), "expected a callable"),
])
def test_a_component_with_the_wrong_shape_is_named(axis, obj, options, missing):
    problems = contracts.contract_problems(axis, obj, options, base=AdapterLayer)
    assert any(missing in p for p in problems), problems


def test_the_runtime_objects_of_the_data_free_methods_satisfy_the_protocols():
    for method in peftkit.methods():
        if registry.get_component("init", registry.get_method(method).init).needs_data:
            continue
        model = tiny_llama()
        peftkit.wrap(model, method, r=2)
        for layer in adapter_layers(model).values():
            assert isinstance(layer, contracts.Architecture), method
            name = next(iter(layer.adapters))
            if type(layer).delta_weight is not AdapterLayer.delta_weight:
                assert layer.delta_weight(name).shape == (layer.out_features, layer.in_features), method
        assert isinstance(peftkit.callbacks(model), contracts.Schedule), method
        assert isinstance(peftkit.optimizer(model), torch.optim.Optimizer), method


def _old_merge(options_class: type, stored: dict[str, Any], overrides: dict[str, Any]) -> dict[str, Any]:
    """The merge axis_options replaces: {**X().__dict__, **stored, **overrides}."""
    return {**options_class().__dict__, **stored, **overrides}


@pytest.mark.parametrize("method", ["lora-plus", "hra", "hydra", "elalora", "coto", "loft", "lora-pro"])
def test_axis_options_fills_defaults_then_stored_values_then_call_site_overrides(method):
    config = resolve_config(method)
    for axis in registry.AXES:
        component = registry.get_component(axis, getattr(config, axis))
        if component.options is None:
            continue
        filled = config.axis_options(axis)
        assert isinstance(filled, component.options)
        assert dataclasses.asdict(filled) == _old_merge(component.options, config.options.get(axis, {}), {})


def test_axis_options_precedence():
    config = resolve_config("lora-plus", loraplus_lr_ratio=4.0)
    opts = config.axis_options("optimizer")
    assert opts.loraplus_lr_ratio == 4.0  # stored value over the class default (16)
    assert opts.weight_decay == 0.0  # the class default
    opts = config.axis_options("optimizer", loraplus_lr_ratio=2.0, weight_decay=0.1)
    assert (opts.loraplus_lr_ratio, opts.weight_decay) == (2.0, 0.1)  # call site over both
    assert config.options["optimizer"]["loraplus_lr_ratio"] == 4.0  # the config is not changed
    bare = AdapterConfig(optimizer="lora-plus")  # nothing stored: every field its default
    assert bare.axis_options("optimizer").loraplus_lr_ratio == 16.0


def test_axis_options_of_a_component_without_options_and_an_unknown_axis():
    config = resolve_config("lora")
    assert vars(config.axis_options("schedule")) == {}
    with pytest.raises(ConfigError, match="unknown axis 'optimiser'"):
        config.axis_options("optimiser")


def test_no_component_merges_its_options_by_hand():
    root = Path(__file__).resolve().parents[1]
    merges = [str(p.relative_to(root)) for folder in ("peftkit", "adapters") for p in (root / folder).rglob("*.py")
              if re.search(r"\(\)\.__dict__, \*\*config\.axis_options", p.read_text())]
    assert merges == [], f"read options with config.axis_options(axis, **overrides) instead: {merges}"
