"""CoTo (Zhuang et al., ICML 2025): progressive activation of adapters by blocks (coto.md).

At every optimizer step each block's adapters are on with probability
    p(t) = min(p₀ + (1 − p₀) · t / ⌈ρ₁ T⌉, 1)      (t = completed optimizer steps, T = total steps)
with at least one block on (all gates are redrawn until one is), no rescaling, and every adapter on in eval
mode and after training. A gated-off adapter's branch is skipped (``AdapterLayer.gated_off``), so its parameters
get grad None and a torch optimizer leaves them and their moments untouched that step. Blocks are grouped by
the module path up to the layer index (``encoder.block.0`` and ``decoder.block.0`` are two blocks; modules
without an index form a group each). The gates come from a
generator seeded by (seed, step): every process draws the same mask without communicating, and the global RNG
is never consumed. Under DDP the skipped parameters need ``find_unused_parameters=True``.

Works on any architecture whose off state is the base function (LoRA, HRA, Hydra, ...):
``peftkit.wrap(model, "hydra", schedule="coto")``.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from peftkit import registry
from peftkit.errors import ConfigError, StateError
from peftkit.inject import adapter_layers, state_of
from peftkit.schedule import Schedule
from peftkit.validation import option

_BLOCK_INDEX = re.compile(r"(?:^|\.)(\d+)(?:\.|$)")
# The schedule currently gating each model: a new one replaces (and switches every adapter back on for) the
# previous one.
_LIVE: "weakref.WeakKeyDictionary[nn.Module, CotoSchedule]" = weakref.WeakKeyDictionary()


@dataclass
class CotoOptions:
    # p₀, the activation probability at step 0 (the reference README's 0.1; the paper's summaries say 0).
    initial_p: float = option(0.1, ge=0, le=1)
    # ρ₁: p reaches 1 after ⌈ρ₁ T⌉ steps; the rest of training is plain training.
    stage1_ratio: float = option(0.75, ge=0, le=1)


def activation_probability(t: int, total_steps: int, initial_p: float, stage1_ratio: float) -> float:
    """p(t) = min(p₀ + (1 − p₀)·t/⌈ρ₁T⌉, 1)."""
    stage1 = math.ceil(stage1_ratio * total_steps)
    if stage1 <= 0:
        return 1.0
    return min(initial_p + (1.0 - initial_p) * t / stage1, 1.0)


def block_groups(names: list[str]) -> list[list[str]]:
    """Module names grouped by block: the path up to and including the first integer segment, so that
    ``encoder.block.0`` and ``decoder.block.0`` (T5, BART, Whisper, CLIP's two towers) are two blocks. Groups
    come stack by stack in the order the stacks first appear in ``names`` (``named_modules()`` order), blocks in
    index order within a stack, then every module without an index as a group of its own: the consecutive
    modules of one block form one group, as in the reference callback."""
    stacks: dict[str, int] = {}
    groups: dict[Any, list[str]] = {}
    for name in names:
        match = _BLOCK_INDEX.search(name)
        if match:
            stack = stacks.setdefault(name[:match.start(1)], len(stacks))
            key = (0, stack, int(match.group(1)), "")
        else:
            key = (1, 0, 0, name)
        groups.setdefault(key, []).append(name)
    return [groups[key] for key in sorted(groups)]


def draw_gates(gen: torch.Generator, groups: int, p: float) -> list[bool]:
    """δ_g = 1[u_g ≤ p], all u redrawn until at least one δ is 1.

    When a rejection is likely, rows are drawn 16 at a time and the first row with an active group is kept:
    the same law as redrawing one row at a time, with fewer generator calls."""
    if p >= 1.0:
        return [True] * groups
    n_rows = 1 if (1.0 - p) ** groups < 0.25 else 16
    while True:
        rows = torch.rand(n_rows, groups, generator=gen, dtype=torch.float64) <= p
        accepted = rows.any(dim=1)
        if bool(accepted.any()):
            return rows[int(accepted.to(torch.uint8).argmax())].tolist()


class CotoSchedule(Schedule):
    """The per-step block gates. ``on_train_begin_(T)`` draws the first mask, ``on_step(step, T)`` the next one
    (after the optimizer step: one mask per optimizer step, shared by its micro-batches), ``on_train_end_``
    switches every adapter on for good. The gate applies only while the layer is in training mode."""

    def __init__(self, model: nn.Module, config: Any) -> None:
        super().__init__(model, config)
        options = config.axis_options("schedule")
        for key in ("initial_p", "stage1_ratio"):
            value = getattr(options, key)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
                raise ConfigError(f"{key}: expected a number in [0, 1] (CoTo schedule), got {value!r}")
        self.initial_p = float(options.initial_p)
        self.stage1_ratio = float(options.stage1_ratio)
        state = state_of(model)
        self.adapter_name = next(n for n, c in state.configs.items() if c is config)
        layers = {n: l for n, l in adapter_layers(model).items() if self.adapter_name in l.adapters}
        self.groups = [[layers[n] for n in group] for group in block_groups(list(layers))]
        self.group_names = [[l.module_name for l in group] for group in self.groups]
        self.gates: list[bool] = [True] * len(self.groups)
        self.step = 0
        self.total_steps = 0
        self.p = 1.0
        previous = _LIVE.get(model)
        if previous is not None:
            previous.remove()
        _LIVE[model] = self

    def set_gates(self, gates: list[bool]) -> None:
        # Written here, between steps, and read by the layers' forward only in training mode (``AdapterLayer.gated``:
        # in eval mode every adapter runs; the reference layer forgets this). No forward hook: a hook would be traced
        # by torch.compile and specialise each block's graph on its layers' identity.
        self.gates = list(gates)
        for group, gate in zip(self.groups, self.gates):
            for layer in group:
                if gate:
                    layer.gated_off.discard(self.adapter_name)
                else:
                    layer.gated_off.add(self.adapter_name)

    def draw(self, step: int) -> list[bool]:
        """The mask for optimizer step ``step + 1``, from a generator seeded by (seed, step)."""
        self.p = activation_probability(step, self.total_steps, self.initial_p, self.stage1_ratio)
        gen = torch.Generator().manual_seed((int(self.config.seed) * 1_000_003 + int(step)) % (2 ** 63))
        return draw_gates(gen, len(self.groups), self.p)

    def on_train_begin_(self, total_steps: int) -> None:
        self.total_steps = int(total_steps)
        self.step = 0
        self.set_gates(self.draw(0))

    def on_step(self, step: int, total_steps: int) -> None:
        self.total_steps = int(total_steps)
        self.step = int(step)
        self.set_gates(self.draw(step) if step < total_steps else [True] * len(self.groups))

    def on_train_end_(self) -> None:
        self.set_gates([True] * len(self.groups))

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step, "total_steps": self.total_steps, "p": self.p, "gates": list(self.gates),
                "seed": int(self.config.seed)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state.get("gates", [])) != len(self.groups):
            raise StateError(f"CoTo schedule state: {len(state.get('gates', []))} block gates saved, this model has "
                             f"{len(self.groups)} blocks; the checkpoint belongs to another model or targets")
        self.step = int(state["step"])
        self.total_steps = int(state["total_steps"])
        self.p = float(state["p"])
        self.set_gates([bool(g) for g in state["gates"]])

    def remove(self) -> None:
        """Detach from the model: every adapter on."""
        self.on_train_end_()


@registry.schedule("coto", options=CotoOptions,
                   description="CoTo: per-block adapter gates, on with probability rising linearly to 1")
def build_coto_schedule(model: nn.Module, config: Any) -> CotoSchedule:
    return CotoSchedule(model, config)


registry.register_method(
    "coto", architecture="lora", schedule="coto",
    lr_convention=registry.LRConvention(
        "lora", 3.0,
        "the authors give no rate (README only). Each block's adapter is on with probability p(t) rising from 0.1 "
        "to 1 over 75 % of the run, so it gets 0.49-0.53 of LoRA's lr-weighted Adam steps under a linear decay "
        "(0.66 at a constant lr): at least 2x; method guide: within 2 points of LoRA's best at 3x on MiniLM and the "
        "instruction task; 9x falls"),
    description="LoRA with CoTo (Zhuang et al. 2025): adapters switched on by blocks with probability rising to 1",
)
