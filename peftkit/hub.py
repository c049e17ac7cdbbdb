"""Publishing to the Hugging Face Hub: uploads (``push``) and the adapter folder's model card.

Everything goes through ``huggingface_hub``. Resolving a Hub id to a local folder is :mod:`peftkit.resolve`
(re-exported here), which the checkpoint reader builds on; this module builds on the reader.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from .errors import ConfigError
from .resolve import ADAPTER_FILES, hub_offline, is_hub_id, resolve_folder  # noqa: F401 - also peftkit.hub names

CARD_NAME = "README.md"
CARD_TAG = "peftkit"


# ---------------------------------------------------------------------------------------------- uploads
def HfApi(*args: Any, **kwargs: Any):  # noqa: N802 - looked up at call time, so tests can replace it
    from huggingface_hub import HfApi as _HfApi

    return _HfApi(*args, **kwargs)


def require_token(token: bool | str | None, what: str = "push") -> None:
    """Fail before anything is uploaded when there are no credentials (or the Hub is switched off)."""
    if hub_offline():
        raise ConfigError(f"{what}: HF_HUB_OFFLINE=1 is set, and an upload needs the network; unset it to push")
    if isinstance(token, str) and token:
        return
    from huggingface_hub import get_token

    if token is False or get_token() is None:
        raise ConfigError(f"{what}: no Hugging Face token; log in with `hf auth login`, set HF_TOKEN, or pass "
                          "token=...")


def push_folder(folder: str | os.PathLike, repo_id: str, *, token: bool | str | None = None,
                commit_message: str | None = None, private: bool | None = None, revision: str | None = None,
                create_pr: bool = False) -> str:
    """Upload an adapter folder to ``repo_id`` as one commit (created if missing); returns the commit's URL."""
    from . import checkpoint

    check_repo_id(repo_id, "push")
    require_token(token, "push")
    folder = Path(folder)
    checkpoint.describe(folder)  # a complete, verified adapter, or nothing is uploaded
    token_arg = token if isinstance(token, str) else None
    if token_arg is not None and (token_arg != token_arg.strip() or not token_arg.isprintable()):
        raise ConfigError("push: the token holds spaces or control characters; copy it again from "
                          "https://huggingface.co/settings/tokens")
    try:
        api = HfApi(token=token_arg)
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.upload_folder(folder_path=str(folder), repo_id=getattr(repo, "repo_id", repo_id), repo_type="model",
                                 commit_message=commit_message or "Upload peftkit adapter", revision=revision,
                                 allow_patterns=ADAPTER_FILES, create_pr=create_pr)
    except Exception as exc:  # a refused token, a repo of someone else's, the network: one message
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        status = getattr(getattr(exc, "response", None), "status_code", None)
        hint = ("the token was refused or may not write there: check it (`hf auth whoami`) and its write access"
                if status in (401, 403) else "check the repo id, the token and the network")
        raise ConfigError(f"push: uploading to '{repo_id}' failed ({first[:300]}); {hint}") from None
    return str(getattr(info, "commit_url", info))


def check_repo_id(repo_id: Any, what: str) -> str:
    """A Hub repo id (``name`` or ``namespace/name``, huggingface_hub's rules); else one ConfigError."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    if not isinstance(repo_id, str):
        raise ConfigError(f"{what}: expected a Hub repo id such as me/my-adapter, got {type(repo_id).__name__}")
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        first = str(exc).strip().splitlines()[0]
        raise ConfigError(f"{what}: '{repo_id[:100]}' is not a valid Hub repo id ({first[:200]}); use "
                          "namespace/name, e.g. me/my-adapter") from None
    return repo_id


# ------------------------------------------------------------------------------------------ model card
def write_model_card(model: nn.Module, directory: str | os.PathLike) -> Path | None:
    """Write ``README.md`` (huggingface_hub's ModelCard) beside the default adapter: base model, method, ranks,
    targets, and what the run recorded (data, recipe, final metrics). A README.md that peftkit did not write
    is the user's and stays as it is (returns None then)."""
    from huggingface_hub import ModelCard, ModelCardData

    from .fileio import atomic_write_bytes
    from .inject import adapter_layers, state_of

    path = Path(directory) / CARD_NAME
    if path.is_file():
        try:
            existing = ModelCard.load(path)
            ours = CARD_TAG in (existing.data.tags or [])
        except Exception:
            ours = False
        if not ours:
            return None
    state = state_of(model)
    name = "default" if "default" in state.configs else next(iter(state.configs))
    config = state.configs[name]
    layers = {n: layer for n, layer in adapter_layers(model).items() if name in layer.adapters}
    ranks = sorted({layer.ranks.get(name) for layer in layers.values() if layer.ranks.get(name) is not None})
    from .provenance import base_reference

    base = base_reference(model)  # what adapter_config.json records (a hub id, a folder or pkg:...)
    loadable = base if base and is_hub_id(base) else None  # only a hub id means the same thing elsewhere
    training = dict(state.training)
    data = ModelCardData(
        base_model=loadable, library_name="peft",
        tags=[CARD_TAG, config.method, config.architecture, "peft"],
        datasets=[training["data"]] if isinstance(training.get("data"), str) and is_hub_id(training["data"]) else None,
    )
    leaves = sorted({n.rsplit(".", 1)[-1] for n in layers})
    lines = [
        f"# {config.method} adapter for {base or 'its base model'}", "",
        f"Trained with peftkit (method `{config.method}`: architecture `{config.architecture}`, "
        f"init `{config.init}`, optimizer `{config.optimizer}`, schedule `{config.schedule}`).", "",
        "| | |", "|---|---|",
        f"| base model | `{base or 'not recorded'}` |",
        f"| method | `{config.method}` |",
        f"| rank r | {', '.join(map(str, ranks)) or config.r} "
        f"(alpha {config.alpha}{', rsLoRA' if config.rslora else ''}) |",
        f"| targets | {', '.join(f'`{leaf}`' for leaf in leaves)} ({len(layers)} modules) |",
        f"| data | {training.get('data') or 'not recorded'} |",
        "",
    ]
    metrics = training.get("metrics") or {}
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {key} | {value:.6g} |" if isinstance(value, float) else f"| {key} | {value} |"
                  for key, value in sorted(metrics.items())]
        lines.append("")
    if training.get("recipe"):
        lines += ["## Recipe", "", "```yaml", str(training["recipe"]).rstrip(), "```", ""]
    lines += ["## Use", "", "```python", "import peftkit", "from transformers import AutoModelForCausalLM", "",
              f"model = AutoModelForCausalLM.from_pretrained({loadable!r})" if loadable
              else f"model = ...  # the base model ({base or 'not recorded'})",
              "model = peftkit.load(model, '<this folder or repo id>')"
              "  # PEFT's PeftModel.from_pretrained reads it too",
              "```", ""]
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines))
    atomic_write_bytes(path, str(card).encode())
    return path
