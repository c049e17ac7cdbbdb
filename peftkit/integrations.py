"""peftkit inside the tools users already train with: transformers' ``Trainer`` and adapter API, TRL, the Hub.

transformers and TRL recognise a PEFT model by ``isinstance(model, peft.PeftModel)`` and otherwise treat it as
a full model; a peftkit model keeps its own class, so nothing global is patched. Instead ``wrap`` / ``load``
install a few methods on the wrapped *instance* (removed again when the last adapter goes):

- ``save_pretrained`` / ``push_to_hub`` write the adapter (what ``peftkit.save`` writes, plus a model card),
  which is also what every ``Trainer.save_model`` and ``checkpoint-N`` write (the Trainer calls
  ``model.save_pretrained``);
- every method of transformers' ``PeftAdapterMixin`` acts on peftkit's adapters with PEFT's semantics, or raises
  one error naming the peftkit call to use; ``disable_adapter()`` is PeftModel's context manager;
- ``_hf_peft_config_loaded`` is True, transformers' own flag for "adapters are attached" (the Trainer then
  accepts a quantized base, and gradient checkpointing keeps the inputs' gradients).

What needs the Trainer object itself (restoring the adapters on ``resume_from_checkpoint``) is ``attach(trainer)``;
the per-step work (regulariser gradient, schedule, training state in each checkpoint) is the callback
``peftkit.callbacks(model)``. TRL's DPO reference is ``reference_model(model)``: the same model with its
adapters off, no copy.
"""

from __future__ import annotations

import contextlib
import os
import types
from pathlib import Path
from typing import Any, Iterator

import torch.nn as nn

from .errors import CheckpointError, ConfigError, StateError
from .inject import on_adapters_attached, on_adapters_detached
from .schedule import Schedule
from .trainer_state import restore_training_state

HF_FLAG = "_hf_peft_config_loaded"


# ---------------------------------------------------------------------------------------------- install
def install(model: nn.Module) -> None:
    """Put peftkit's save / adapter-API methods on ``model`` (an instance attribute each; the class is untouched)."""
    for name, function in INSTANCE_METHODS.items():
        model.__dict__[name] = types.MethodType(function, model)
    if hasattr(type(model), HF_FLAG):
        model.__dict__[HF_FLAG] = True


def uninstall(model: nn.Module) -> None:
    """Give ``model`` its class's methods back (it has no peftkit adapters any more)."""
    for name in list(INSTANCE_METHODS) + [HF_FLAG]:
        model.__dict__.pop(name, None)


on_adapters_attached(install)
on_adapters_detached(uninstall)


def _state(model: nn.Module, call: str):
    from .inject import state_of

    state = state_of(model, required=False)
    if state is None:  # pragma: no cover - the methods are removed together with the state
        raise StateError(f"{call}: {type(model).__name__} has no peftkit adapters; call peftkit.wrap or "
                         "peftkit.load first")
    return state


# ------------------------------------------------------------------------------------ saving and the Hub
def save_pretrained(self: nn.Module, save_directory: str | os.PathLike, is_main_process: bool = True,
                    state_dict: dict | None = None, push_to_hub: bool = False,
                    selected_adapters: list[str] | None = None, **kwargs: Any) -> None:
    """Write the adapters (``peftkit.save``'s PEFT-format files and a model card), as PEFT's ``save_pretrained``.

    ``state_dict`` (which the Trainer passes under DeepSpeed / FSDP) is not used: the adapter is read from the
    live layers. ``push_to_hub=True`` then uploads the folder (``repo_id=`` or the folder's name).
    """
    from . import hub

    _state(self, "save_pretrained")
    if not is_main_process:
        return
    if Path(save_directory).is_file():
        raise CheckpointError(f"{save_directory}: exists and is a file; save_pretrained writes a folder")
    from .api import save

    save(self, save_directory, selected_adapters)
    if push_to_hub:
        repo_id = kwargs.get("repo_id") or Path(save_directory).resolve().name
        hub.push_folder(save_directory, repo_id, token=kwargs.get("token"),
                        commit_message=kwargs.get("commit_message"), private=kwargs.get("private"))


def push_to_hub(self: nn.Module, repo_id: str, *, commit_message: str | None = None, private: bool | None = None,
                token: bool | str | None = None, revision: str | None = None, create_pr: bool = False,
                **kwargs: Any) -> str:
    """Upload the adapter folder (as ``save_pretrained`` writes it, model card included) to ``repo_id``."""
    import tempfile

    from . import hub

    _state(self, "push_to_hub")
    hub.require_token(token, "push_to_hub")
    with tempfile.TemporaryDirectory(prefix="peftkit-push-") as folder:
        save_pretrained(self, folder)
        return hub.push_folder(folder, repo_id, token=token, commit_message=commit_message, private=private,
                               revision=revision, create_pr=create_pr)


# ------------------------------------------------------------------------ transformers' PeftAdapterMixin
def load_adapter(self: nn.Module, peft_model_id: str | os.PathLike | None = None, adapter_name: str | None = None,
                 peft_config: dict | None = None, adapter_state_dict: dict | None = None,
                 low_cpu_mem_usage: bool = False, is_trainable: bool = False, hotswap: bool | str = "auto",
                 local_files_only: bool = False, adapter_kwargs: dict | None = None, load_config: Any = None,
                 **kwargs: Any) -> None:
    """Load a saved adapter (a folder or a Hub id, peftkit's or PEFT's LoRA/HRA) next to the ones there.

    transformers' signature: ``revision`` and ``token`` come as keywords, in ``adapter_kwargs`` or in
    ``load_config.download_kwargs``; any other loading keyword (``device_map``, ``subfolder``, ``cache_dir`` ...)
    is refused rather than ignored."""
    from . import checkpoint

    _state(self, "load_adapter")
    if peft_model_id is None or peft_config is not None or adapter_state_dict is not None:
        raise ConfigError(
            "load_adapter: a peftkit model loads adapters from a folder or Hub id only (peft_model_id=...); to build "
            "one from a config call peftkit.wrap(model, config, adapter_name=...)")
    if hotswap is True:
        raise ConfigError(
            "load_adapter: hotswap=True is not supported on a peftkit model; delete the adapter "
            "(model.delete_adapter(name)) and load the new one with peftkit.load(model, dir, adapter_name=name)")
    given = {**(getattr(load_config, "download_kwargs", None) or {}), **(adapter_kwargs or {}), **kwargs}
    given = {k: v for k, v in given.items() if v is not None}
    revision, token = given.pop("revision", None), given.pop("token", None)
    ignored = sorted(given)
    if ignored:  # taken silently, these would load something other than what was asked for
        raise ConfigError(f"load_adapter: {ignored} are not supported on a peftkit model (the adapter loads onto "
                          "the device and dtype of the layers it wraps); drop them, or move the model first")
    checkpoint.load(self, peft_model_id, adapter_name=adapter_name or "default", trainable=is_trainable,
                    revision=revision, token=token, local_files_only=local_files_only)


def add_adapter(self: nn.Module, adapter_config: Any, adapter_name: str | None = None) -> None:
    """Add a new adapter (a PEFT ``LoraConfig`` / ``HraConfig`` or a peftkit ``AdapterConfig``) and make it the
    active one, as transformers' ``add_adapter`` does."""
    from .api import set_adapter as activate
    from .api import wrap
    from .config import AdapterConfig
    from .peft_config import from_peft_config

    name = adapter_name or "default"
    if not isinstance(adapter_config, AdapterConfig):
        adapter_config = from_peft_config(adapter_config)
    wrap(self, adapter_config, adapter_name=name)
    activate(self, name)


def set_adapter(self: nn.Module, adapter_name: str | list[str]) -> None:
    """Make ``adapter_name`` (or several) the active, trainable adapters."""
    from .api import set_adapter as activate

    _state(self, "set_adapter")
    activate(self, adapter_name)


def disable_adapters(self: nn.Module) -> None:
    """Run the base model (every adapter off) until ``enable_adapters()``."""
    from .inject import set_enabled

    _state(self, "disable_adapters")
    set_enabled(self, False)


def enable_adapters(self: nn.Module) -> None:
    """Switch the active adapters back on after ``disable_adapters()``."""
    from .inject import set_enabled

    _state(self, "enable_adapters")
    set_enabled(self, True)


def active_adapters(self: nn.Module) -> list[str]:
    """The names of the active adapters."""
    return list(_state(self, "active_adapters").active)


def get_adapter_state_dict(self: nn.Module, adapter_name: str | None = None, state_dict: dict | None = None) -> dict:
    """The adapter's tensors with PEFT's keys as transformers returns them (``model.layers.0…lora_A.weight``)."""
    from .checkpoint import PREFIX, adapter_state

    state = _state(self, "get_adapter_state_dict")
    if state_dict is not None:
        raise ConfigError("get_adapter_state_dict: state_dict= is not supported on a peftkit model; the adapter is "
                          "read from its layers (omit state_dict)")
    tensors, _ = adapter_state(self, adapter_name or state.active[0])
    return {key[len(PREFIX):] if key.startswith(PREFIX) else key: value for key, value in tensors.items()}


def delete_adapter(self: nn.Module, adapter_names: str | list[str]) -> None:
    """Remove adapters by name (``peftkit.delete_adapter``)."""
    from .api import delete_adapter as delete

    _state(self, "delete_adapter")
    delete(self, adapter_names)


def enable_peft_hotswap(self: nn.Module, *args: Any, **kwargs: Any) -> None:
    raise ConfigError(
        "enable_peft_hotswap: a peftkit model does not hotswap adapters; load each adapter under its own name "
        "(peftkit.load(model, dir, adapter_name=...)) and switch with peftkit.set_adapter(model, name)")


@contextlib.contextmanager
def disable_adapter(self: nn.Module) -> Iterator[None]:
    """PeftModel's ``with model.disable_adapter():`` (the base model inside the block)."""
    from .api import disabled

    _state(self, "disable_adapter")
    with disabled(self):
        yield


INSTANCE_METHODS = {
    "save_pretrained": save_pretrained, "push_to_hub": push_to_hub, "load_adapter": load_adapter,
    "add_adapter": add_adapter, "set_adapter": set_adapter, "disable_adapters": disable_adapters,
    "enable_adapters": enable_adapters, "active_adapters": active_adapters,
    "get_adapter_state_dict": get_adapter_state_dict, "delete_adapter": delete_adapter,
    "enable_peft_hotswap": enable_peft_hotswap, "disable_adapter": disable_adapter,
}


# ----------------------------------------------------------------------------------- TRL's DPO reference
class ReferenceModel(nn.Module):
    """The policy with every adapter off, as the separate object TRL's ``DPOTrainer(ref_model=...)`` wants.

    It holds no parameters of its own (the policy is not registered as a submodule, so preparing, moving or
    evaluating the reference leaves the policy alone): the reference costs no memory. Every call runs the policy
    inside ``peftkit.disabled``; attributes (``config``, ``base_model``, ``get_output_embeddings`` ...) are the
    policy's, so TRL can patch this object's ``forward`` the way it patches a model's.
    """

    def __init__(self, policy: nn.Module) -> None:
        super().__init__()
        self.__dict__["policy"] = policy

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        from .api import disabled

        with disabled(self.policy):
            return super().__call__(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.policy(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self.__dict__["policy"], name)


def reference_model(model: nn.Module) -> ReferenceModel:
    """``DPOTrainer(model=wrapped, ref_model=peftkit.reference_model(wrapped), ...)``: the base model as the
    reference, computed by the policy with its adapters off (PEFT's ``disable_adapter`` path in TRL), no copy."""
    from .inject import state_of

    state_of(model)
    return ReferenceModel(model)


def reference_free_trainer(trainer_class: type, model: nn.Module, args: Any = None, **kwargs: Any) -> Any:
    """A TRL trainer whose reference is ``reference_model(model)`` (the same model with its adapters off), never a
    copy of the base. TRL skips its reference copy for ``peft.PeftModel`` instances only; a peftkit model keeps
    its own class, so:

    - trainers with a ``ref_model`` argument (``DPOTrainer``) get ``ref_model=reference_model(model)``;
    - trainers that build the reference themselves from ``args.beta`` (``GRPOTrainer``, which otherwise loads
      ``model.config.name_or_path`` a second time) are built with ``beta = 0`` (TRL then creates no reference) and
      given ``reference_model(model)`` and the caller's ``beta`` right after: the KL term runs as configured, its
      reference log-probabilities computed by the policy with its adapters off.

    ``args.sync_ref_model`` (a reference that follows the policy) is refused: the adapters-off reference is the base.
    Returns the trainer."""
    import inspect

    from .inject import state_of

    state_of(model)
    reference = reference_model(model)
    if "ref_model" in inspect.signature(trainer_class.__init__).parameters:
        if kwargs.get("ref_model") is not None:
            raise ConfigError("reference_free_trainer: ref_model is given; leave it out (the reference is the model "
                              "with its adapters off)")
        kwargs["ref_model"] = reference
        return trainer_class(model=model, args=args, **kwargs)
    beta = getattr(args, "beta", None)
    if beta is None:
        raise ConfigError(f"reference_free_trainer: {trainer_class.__name__} takes no ref_model and its args have no "
                          "beta; it needs no reference: build it directly")
    if getattr(args, "sync_ref_model", False):
        raise ConfigError("reference_free_trainer: args.sync_ref_model=True asks for a reference that follows the "
                          "policy; the adapters-off reference is the base model. Set sync_ref_model=False")
    if beta == 0.0:
        return trainer_class(model=model, args=args, **kwargs)
    args.beta = 0.0  # TRL creates no reference model for beta 0
    try:
        trainer = trainer_class(model=model, args=args, **kwargs)
    finally:
        args.beta = beta
    if not hasattr(trainer, "ref_model") or not hasattr(trainer, "beta"):  # pragma: no cover - a TRL change
        raise ConfigError(f"reference_free_trainer: {trainer_class.__name__} has no ref_model/beta attributes")
    trainer.beta = beta
    trainer.ref_model = reference
    return trainer


# ------------------------------------------------------------------------------------ the Trainer object
def _find_schedule(trainer: Any):
    return next((cb for cb in trainer.callback_handler.callbacks if isinstance(cb, Schedule)), None)


def attach(trainer: Any) -> Any:
    """Make a transformers ``Trainer`` (or a TRL trainer) resume peftkit runs; returns the trainer.

    Adds ``peftkit.callbacks(model)`` if none is among its callbacks, and makes ``resume_from_checkpoint`` and
    ``load_best_model_at_end`` restore the adapters (in place: the optimizer, whose state the Trainer restores
    next, keeps its parameters) and the schedule state from the checkpoint. Only this trainer object changes.
    """
    from .api import callbacks as build_callbacks
    from .inject import state_of

    model = getattr(trainer, "model", None)
    if model is None or not hasattr(trainer, "_load_from_checkpoint") or not hasattr(trainer, "callback_handler"):
        raise ConfigError(f"attach: expected a transformers Trainer (or a TRL trainer), got {type(trainer).__name__}")
    state_of(model)
    if _find_schedule(trainer) is None:
        trainer.add_callback(build_callbacks(model))
    load_checkpoint = trainer._load_from_checkpoint
    load_best = getattr(trainer, "_load_best_model", None)

    def _load_from_checkpoint(resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        target = trainer.accelerator.unwrap_model(model if model is not None else trainer.model)
        if state_of(target, required=False) is None:
            return load_checkpoint(resume_from_checkpoint, model)
        restore_training_state(target, resume_from_checkpoint, _find_schedule(trainer))

    def _load_best_model() -> None:
        target = trainer.accelerator.unwrap_model(trainer.model)
        if state_of(target, required=False) is None or load_best is None:
            return load_best() if load_best is not None else None
        restore_training_state(target, trainer.state.best_model_checkpoint, _find_schedule(trainer))

    trainer._load_from_checkpoint = _load_from_checkpoint
    if load_best is not None:
        trainer._load_best_model = _load_best_model
    return trainer
