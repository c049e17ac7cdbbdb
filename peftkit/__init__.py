"""peftkit: parameter-efficient fine-tuning for Hugging Face models.

```python
import peftkit
model = peftkit.wrap(model, "lora", r=16)
opt = peftkit.optimizer(model, lr=2e-4)
```
"""

from __future__ import annotations

from .api import (
    AdapterConfig,
    callbacks,
    delete_adapter,
    disabled,
    export,
    load,
    load_model,
    merge,
    methods,
    optimizer,
    save,
    set_adapter,
    summary,
    trainable_parameters,
    unmerge,
    unwrap,
    wrap,
)
from .combine import add_weighted_adapter
from .errors import CheckpointError, ConfigError, MergeError, PeftkitError, StateError
from .integrations import attach, reference_free_trainer, reference_model
from .regularization import regularization_loss

__version__ = "0.1.0"

__all__ = [
    "AdapterConfig", "CheckpointError", "ConfigError", "MergeError", "PeftkitError", "StateError", "callbacks",
    "disabled",
    "export", "load", "load_model", "merge", "methods", "optimizer", "save", "set_adapter", "summary",
    "trainable_parameters", "unmerge",
    "unwrap", "wrap", "regularization_loss", "delete_adapter", "add_weighted_adapter", "attach", "reference_model",
    "reference_free_trainer",
]
