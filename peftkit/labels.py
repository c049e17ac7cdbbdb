"""Class-label metadata of classification adapters: the head's class count and names recorded at save, checked
against the base on load, and the ``from_pretrained`` arguments that rebuild a base with that head.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch.nn as nn

from .errors import CheckpointError
from .peft_format import CONFIG_NAME, read_config, read_metadata


def label_fields(model: nn.Module) -> dict[str, Any]:
    """``num_labels``, ``id2label`` and ``label2id`` of a classification model (its head's shape and class
    names), so the base can be rebuilt with a head of the same shape for load / merge / export."""
    config = getattr(model, "config", None)
    if task_type(model) not in ("SEQ_CLS", "TOKEN_CLS") or config is None or not getattr(config, "num_labels", None):
        return {}
    id2label = {str(int(k)): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    label2id = {str(k): int(v) for k, v in (getattr(config, "label2id", None) or {}).items()}
    return {"num_labels": int(config.num_labels), "id2label": id2label, "label2id": label2id}


def task_type(model: nn.Module) -> str | None:
    name = type(model).__name__
    if name.endswith("ForCausalLM"):
        return "CAUSAL_LM"
    if name.endswith("ForSequenceClassification"):
        return "SEQ_CLS"
    if name.endswith("ForTokenClassification"):
        return "TOKEN_CLS"
    return None


def check_labels(model: nn.Module, section: dict[str, Any], directory: Path) -> None:
    """A classification adapter fits only a base whose head has as many classes as the one it trained."""
    saved = section.get("num_labels")
    have = getattr(getattr(model, "config", None), "num_labels", None)
    if saved is None or have is None or task_type(model) not in ("SEQ_CLS", "TOKEN_CLS") or int(saved) == int(have):
        return
    names = [name for _, name in sorted((section.get("id2label") or {}).items(), key=lambda kv: int(kv[0]))]
    raise CheckpointError(
        f"{directory / CONFIG_NAME}: the adapter was trained with num_labels={saved}"
        f"{f' (classes {names})' if names else ''}, but this {type(model).__name__} has num_labels={have}; build "
        f"the base with from_pretrained(..., num_labels={saved}, id2label=..., label2id=...) (peftkit merge and "
        "export do this from the adapter's config)"
    )


def apply_class_names(model: nn.Module, section: dict[str, Any]) -> None:
    """Give the model the adapter's class names when it has transformers' placeholders (LABEL_0, ...)."""
    config = getattr(model, "config", None)
    id2label = section.get("id2label")
    if not id2label or config is None or task_type(model) not in ("SEQ_CLS", "TOKEN_CLS"):
        return
    current = {int(k): str(v) for k, v in (getattr(config, "id2label", None) or {}).items()}
    if all(v == f"LABEL_{k}" for k, v in current.items()):
        config.id2label = {int(k): v for k, v in id2label.items()}
        label2id = section.get("label2id") or {v: int(k) for k, v in id2label.items()}
        config.label2id = {k: int(v) for k, v in label2id.items()}


def model_labels(directory: str | os.PathLike) -> dict[str, Any]:
    """``from_pretrained`` keyword arguments (num_labels, id2label, label2id, and ignore_mismatched_sizes when the
    adapter saves its own head) that give a base model the head shape and class names the adapter in
    ``directory`` was trained with; {} when it records none."""
    data = read_config(directory)
    section = read_metadata(directory, data)
    if not isinstance(section, dict) or not section.get("num_labels"):
        return {}
    out: dict[str, Any] = {"num_labels": int(section["num_labels"])}
    if data.get("modules_to_save"):
        # The adapter brings its head: a base whose saved head has another class count gets a placeholder.
        out["ignore_mismatched_sizes"] = True
    if section.get("id2label"):
        out["id2label"] = {int(k): v for k, v in section["id2label"].items()}
        out["label2id"] = {k: int(v) for k, v in (section.get("label2id") or {}).items()} or {
            v: int(k) for k, v in section["id2label"].items()}
    return out
