"""PEFT's names for peftkit's options: moving from PEFT takes no rewrite. (PEFT config objects as peftkit configs:
:mod:`peftkit.peft_config`, which builds on :mod:`peftkit.config`; these name tables lie below it.)

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
