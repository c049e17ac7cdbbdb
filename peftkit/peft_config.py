"""PEFT config objects (``LoraConfig``, ``HRAConfig``) as peftkit configs: ``peftkit.wrap(model, LoraConfig(...))``.

Which architecture reads a PEFT type, and how its options map, is the architecture's own declaration
(``peft_type=`` on ``@registry.architecture`` and its ``options_from_peft_config``). This module builds on
:mod:`peftkit.config`; the option-name tables it shares with the config (:mod:`peftkit.aliases`) lie below.
"""

from __future__ import annotations

from typing import Any

from . import registry
from .errors import ConfigError


def from_peft_config(peft_config: Any):
    """A peftkit ``AdapterConfig`` equal to a PEFT config object (what ``get_peft_model`` would build on the same
    model), for every ``peft_type`` a registered architecture declares (``LoraConfig``, ``HRAConfig``): the
    architecture's ``options_from_peft_config`` reads its own options; a PEFT option peftkit does not implement is
    one ConfigError naming it."""
    from .config import resolve_config

    kind = type(peft_config).__name__
    peft_type = str(getattr(getattr(peft_config, "peft_type", None), "value", getattr(peft_config, "peft_type", "")))
    architecture = registry.architecture_for_peft_type(peft_type, peft_config)
    reader = getattr(registry.get_component("architecture", architecture).obj, "options_from_peft_config",
                     None) if architecture else None
    if reader is None:
        readable = " and ".join(sorted(registry.peft_architectures()))
        raise ConfigError(f"{kind}: peftkit reads PEFT's configs of type {readable}; for other PEFT methods use PEFT, "
                          "or pick a peftkit method by name (peftkit.methods())")
    options: dict[str, Any] = reader(peft_config)
    # The architecture's own preset (its name), as get_peft_model would build it, unless the reader names the
    # preset a PEFT option selects (LoRA's init_lora_weights="pissa" is the method 'pissa').
    method = options.pop("method", architecture)
    targets = peft_config.target_modules
    parameters = getattr(peft_config, "target_parameters", None)
    if parameters:  # fused expert stacks (or other parameters), adapted per expert as PEFT does
        options["target_parameters"] = sorted(parameters)
        targets = [] if targets is None else targets
    if targets is None:
        raise ConfigError(f"{kind}.target_modules: None (PEFT fills it from its model-type table); pass the module "
                          "names or 'all-linear'")
    options["targets"] = sorted(targets) if isinstance(targets, (set, frozenset, list, tuple)) else targets
    if getattr(peft_config, "exclude_modules", None):
        excluded = peft_config.exclude_modules
        options["exclude"] = sorted(excluded) if isinstance(excluded, (set, frozenset, list, tuple)) else excluded
    for field_name in ("rank_pattern", "alpha_pattern"):
        if getattr(peft_config, field_name, None):
            options[field_name] = dict(getattr(peft_config, field_name))
    if getattr(peft_config, "modules_to_save", None):
        options["modules_to_save"] = list(peft_config.modules_to_save)
    return resolve_config(method, **options)


def is_peft_config(value: Any) -> bool:
    """A PEFT config object (duck-typed: PEFT itself is not imported by peftkit)."""
    return (hasattr(value, "peft_type") and hasattr(value, "target_modules")
            and type(value).__module__.startswith("peft"))
