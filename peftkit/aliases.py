"""PEFT's names for peftkit's options, and PEFT config objects as peftkit configs: moving from PEFT takes no rewrite.

``apply_aliases`` runs before option resolution and validation (``wrap`` and recipes' ``adapter`` section go
through it), so ``target_modules=[...]`` is ``targets=[...]``. PEFT options with the same name in peftkit
(``r``, ``modules_to_save``, ``rank_pattern``, ``alpha_pattern``, LoRA's ``init_lora_weights``, HRA's
``apply_GS`` / ``init_weights``) need no alias.
"""

from __future__ import annotations

from typing import Any

from .errors import ConfigError

# PEFT's option name -> peftkit's.
ALIASES = {
    "target_modules": "targets",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "use_rslora": "rslora",
    "exclude_modules": "exclude",
}
# Names people reach for that are neither ours nor PEFT's: the option they mean (for the unknown-option error).
SUGGESTIONS = {"rank": "r", "lora_r": "r", "lora_rank": "r", "target": "targets", "target_layers": "targets",
               "scaling": "alpha"}


def apply_aliases(options: dict[str, Any], where: str = "wrap") -> dict[str, Any]:
    """``options`` with PEFT's names replaced by peftkit's; both names for one option is an error."""
    out = dict(options)
    for peft_name, ours in ALIASES.items():
        if peft_name in out:
            if ours in out:
                raise ConfigError(f"{where}: '{peft_name}' is PEFT's name for '{ours}', and both were given; pass one")
            out[ours] = out.pop(peft_name)
    return out


def suggestion(key: str) -> str | None:
    """The option an unknown ``key`` most likely means (``rank`` -> ``r``), or None."""
    return SUGGESTIONS.get(key)


def from_peft_config(peft_config: Any):
    """A peftkit ``AdapterConfig`` equal to a PEFT ``LoraConfig`` or ``HRAConfig`` (what ``get_peft_model`` would
    build on the same model); a PEFT option peftkit does not implement is one ConfigError naming it."""
    from .config import resolve_config

    kind = type(peft_config).__name__
    peft_type = str(getattr(getattr(peft_config, "peft_type", None), "value", getattr(peft_config, "peft_type", "")))
    if peft_type == "LORA":
        unsupported = {
            "use_dora": False, "bias": "none", "layers_to_transform": None, "layers_pattern": None,
            "lora_bias": False, "megatron_config": None,
        }
        for field_name, neutral in unsupported.items():
            value = getattr(peft_config, field_name, neutral)
            if value not in (neutral, [], ()):
                raise ConfigError(f"{kind}.{field_name}={value!r} is not supported by peftkit's LoRA; leave it at "
                                  f"{neutral!r} (or merge such an adapter with PEFT and use the merged model)")
        init = peft_config.init_lora_weights
        if init not in (True, False, "gaussian"):
            raise ConfigError(f"{kind}.init_lora_weights={init!r}: peftkit reads True, False and 'gaussian'; its data-"
                              "driven inits are methods of their own (peftkit.wrap(model, 'lora-ga' / 'eva' ...))")
        options: dict[str, Any] = dict(r=peft_config.r, alpha=float(peft_config.lora_alpha),
                                       dropout=float(peft_config.lora_dropout), rslora=bool(peft_config.use_rslora),
                                       init_lora_weights=init)
        method = "lora"
    elif peft_type == "HRA":
        if getattr(peft_config, "layers_to_transform", None) is not None or getattr(peft_config, "bias", "none") != "none":
            raise ConfigError(f"{kind}: layers_to_transform and bias are not supported by peftkit's HRA; leave them unset")
        options = dict(r=peft_config.r, apply_GS=bool(peft_config.apply_GS), init_weights=bool(peft_config.init_weights))
        method = "hra"
    else:
        raise ConfigError(f"{kind}: peftkit reads PEFT's LoraConfig and HRAConfig; for other PEFT methods use PEFT, or "
                          "pick a peftkit method by name (peftkit.methods())")
    targets = peft_config.target_modules
    parameters = getattr(peft_config, "target_parameters", None)
    if parameters:  # fused expert stacks (or other parameters), adapted per expert as PEFT does
        options["target_parameters"] = sorted(parameters)
        targets = [] if targets is None else targets
    if targets is None:
        raise ConfigError(f"{kind}.target_modules: None (PEFT fills it from its model-type table); pass the module names "
                          "or 'all-linear'")
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
    return hasattr(value, "peft_type") and hasattr(value, "target_modules") and type(value).__module__.startswith("peft")
