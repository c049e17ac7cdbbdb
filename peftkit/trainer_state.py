"""The training state beneath the Trainer hooks: what a ``checkpoint-N`` needs for an exact resume, the check
that a method's own optimizer trains it, and the regulariser's gradient.

Used by the schedule's Trainer hooks (``peftkit.schedule``) and by ``peftkit.attach`` (``peftkit.integrations``);
it knows neither.
"""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from .errors import CheckpointError, ConfigError

# The training state peftkit adds to every Trainer checkpoint-N: every live adapter tensor by state-dict key
# (offset pairs, masks and buffers included, which the PEFT-format adapter beside it does not hold) and the
# schedule's state.
TRAINING_STATE_NAME = "peftkit_training_state.safetensors"
SCHEDULE_STATE_NAME = "peftkit_schedule.pt"


# ---------------------------------------------------------------------------------------------- trainer optimizer
def check_trainer_optimizer(config: Any, optimizer: Any) -> None:
    """Refuse, at the Trainer's ``on_train_begin``, a method whose optimizer *is* part of the method (LoRA+'s
    ratio, LoRA-Pro's and LoFT's projections, ElaLoRA's per-slot steps, the LoRA-One preconditioner) trained by
    an optimizer peftkit did not build: the Trainer's default AdamW would silently train another method."""
    from .registry import PLAIN_OPTIMIZER

    if config is None or config.optimizer == PLAIN_OPTIMIZER:
        return
    inner = optimizer
    while not hasattr(inner, "peftkit_lr") and hasattr(inner, "optimizer"):  # Accelerate's AcceleratedOptimizer
        inner = inner.optimizer
    if not hasattr(inner, "peftkit_lr"):
        raise ConfigError(
            f"Trainer: the method trains with its optimizer '{config.optimizer}', and this Trainer runs "
            f"{type(inner).__name__}, which peftkit did not build (the Trainer's default when optimizers= is not "
            f"given): it would silently train another method. Pass optimizers=(peftkit.optimizer(model), None) "
            "to the Trainer (TRL's trainers take the same argument)")


# ------------------------------------------------------------------------------------ checkpoint-N state
def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every adapter tensor and trainable parameter by state-dict key (cloned, contiguous)."""
    from .inject import adapter_layers

    keys = {name for name, p in model.named_parameters() if p.requires_grad}
    for layer_name, layer in adapter_layers(model).items():
        keys |= {f"{layer_name}.adapters.{k}" for k in layer.adapters.state_dict()}
    return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items() if k in keys}


def save_training_state(model: nn.Module, schedule: Any, folder: str | os.PathLike) -> None:
    """Write the live adapter tensors and the schedule state into a Trainer ``checkpoint-N`` folder."""
    from .fileio import atomic_write_bytes, serialize_tensors

    folder = Path(folder)
    if not folder.is_dir():
        return  # this process wrote no checkpoint (not the main process, or save_strategy="no")
    atomic_write_bytes(folder / TRAINING_STATE_NAME, serialize_tensors(trainable_state(model), {"format": "pt"}))
    buffer = io.BytesIO()
    torch.save(schedule.state_dict() if schedule is not None else {}, buffer)
    atomic_write_bytes(folder / SCHEDULE_STATE_NAME, buffer.getvalue())


def restore_training_state(model: nn.Module, folder: str | os.PathLike, schedule: Any = None) -> None:
    """Fill the model's adapters (in place, so the optimizer keeps its parameters) from a ``checkpoint-N``."""
    from .peft_format import CONFIG_NAME, read_tensors

    folder = Path(folder)
    path = folder / TRAINING_STATE_NAME
    if not path.is_file():
        hint = (" (it holds a PEFT adapter: it was saved without peftkit.callbacks(model) among the Trainer's "
                "callbacks)") if (folder / CONFIG_NAME).is_file() else ""
        raise CheckpointError(f"{path}: file not found; peftkit resumes a Trainer run from this file{hint}. "
                              "Resume from a checkpoint saved with callbacks=[peftkit.callbacks(model)], or start "
                              "the run again")
    tensors = read_tensors(path)
    expected = trainable_state(model)
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        raise CheckpointError(
            f"{path}: does not fit this model's adapters (missing {missing[:3]}, unexpected {unexpected[:3]}, "
            f"wrong shapes {wrong[:3]}); resume with the same model and peftkit.wrap options as the saved run")
    model.load_state_dict(tensors, strict=False)
    schedule_path = folder / SCHEDULE_STATE_NAME
    if schedule is not None and schedule_path.is_file():
        schedule.load_state_dict(torch.load(schedule_path, map_location="cpu", weights_only=True))


# ------------------------------------------------------------------------------ the regulariser's gradient
def add_regularization_gradient(model: nn.Module, optimizer: Any = None) -> bool:
    """Add ∇ of ``peftkit.regularization_loss(model)`` to the adapters' ``.grad`` (once per optimizer step).

    Under the Trainer this runs just before ``optimizer.step()``: the gradients are then final (accumulated over
    the micro-batches, all-reduced, clipped), so the step minimises loss + regulariser exactly as a loop that
    adds the term to its loss, except that the term's gradient is not clipped. Returns whether a term existed.
    """
    from .regularization import regularization_loss

    with torch.enable_grad():
        term = regularization_loss(model)
    if not term.requires_grad:
        return False
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(term, params, allow_unused=True)
    scale = _loss_scale(optimizer)
    with torch.no_grad():
        for param, grad in zip(params, grads):
            if grad is None:
                continue
            grad = grad * scale if scale != 1.0 else grad
            if param.grad is None:
                param.grad = grad.to(param.dtype)
            else:
                param.grad.add_(grad.to(param.grad.dtype))
    return True


def _loss_scale(optimizer: Any) -> float:
    """The fp16 GradScaler's scale when the gradients are still scaled at this point (1.0 otherwise)."""
    scaler = getattr(optimizer, "scaler", None)
    if scaler is None or not getattr(scaler, "is_enabled", lambda: False)():
        return 1.0
    inner = getattr(optimizer, "optimizer", optimizer)
    stage = getattr(scaler, "_per_optimizer_states", {}).get(id(inner), {}).get("stage")
    if stage is not None and getattr(stage, "name", "") == "UNSCALED":
        return 1.0
    return float(scaler.get_scale())
