"""Linear layers on the real tokens only: an encoder's padded positions skip every linear layer (and adapter).

In a padded batch of short sentences most positions are padding, and every linear layer of every block computes
them. Here each linear layer of the model's encoder stack (a plain ``nn.Linear``, or a peftkit adapter layer with
its base layer: both then see the same rows) gathers the attended positions of its ``(batch, seq, features)``
input, computes on those ``(tokens, features)`` rows, and scatters the result back to ``(batch, seq, out)`` with
zeros at the padded positions, which the attention then reads in its padded layout. The attention masks padded
keys (softmax weight exactly 0), layer norms and activations are per position, and classification heads read
real positions: every real position's value, the logits, the loss and every gradient are those of the padded
forward, to round-off. Whether a model is of that kind is checked once on a small batch
(:func:`keeps_padded_outputs`), not assumed from its name.

The positions come from the ``attention_mask`` the model is called with (a forward pre-hook records it); a call
without one, or whose mask has no padding, computes as usual. The last mask stays recorded until the next call,
so a non-reentrant gradient-checkpointing recompute sees the same rows as its forward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from .inject import adapter_layers

# Where the encoder stack lives in transformers' classification models (BERT, RoBERTa, DeBERTa-v2, ELECTRA ...:
# ``<base>.encoder``); the heads and poolers outside it run on (batch, features) anyway.
ENCODER_ATTRS = ("encoder",)


class _Rows:
    """The attended positions of the current batch: flat indices into (batch · seq), and the batch's shape.

    Two savings on top of gather → compute → scatter per linear layer, both the same values: the query, key and
    value projections read one hidden-states tensor, which is gathered once per model call (``_gathered``); and a
    feed-forward block's intermediate half (``<...>Intermediate``: a linear layer, then a per-position activation)
    hands its rows on unpadded to the linear layer that reads them (``_handed_on``), which scatters only its own,
    narrower output: the 4×-wide intermediate activation is never padded, and the activation skips the padding."""

    def __init__(self) -> None:
        self.index: torch.Tensor | None = None
        self.shape: tuple[int, int] | None = None
        self._gathered: tuple[torch.Tensor, torch.Tensor] | None = None  # (padded input, its rows)
        self._handed_on: torch.Tensor | None = None  # an intermediate block's unpadded output

    def record(self, module: nn.Module, args: tuple, kwargs: dict[str, Any]) -> None:
        mask = kwargs.get("attention_mask")
        self.index = self.shape = self._gathered = self._handed_on = None
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] > 1 and not bool(mask.all()):
            self.index = mask.reshape(-1).nonzero().squeeze(1)
            self.shape = (int(mask.shape[0]), int(mask.shape[1]))

    def forget(self, module: nn.Module, args: tuple, output: Any) -> None:
        # After the model's call: the last gathered input and handed-on rows are not held until the next batch.
        self._gathered = self._handed_on = None

    def _rows_of(self, x: torch.Tensor) -> torch.Tensor:
        if self._gathered is not None and self._gathered[0] is x:
            return self._gathered[1]
        rows = x.reshape(-1, x.shape[-1]).index_select(0, self.index.to(x.device))
        self._gathered = (x, rows)
        return rows

    def gather(self, module: nn.Module, args: tuple):
        x = args[0] if args else None
        if self.index is not None and x is not None and x is self._handed_on:
            module._peftkit_unpadded = True  # already the rows: compute, then scatter
            self._handed_on = None
            return None
        if self.index is None or not isinstance(x, torch.Tensor) or x.dim() != 3 or tuple(x.shape[:2]) != self.shape:
            module._peftkit_unpadded = False
            return None
        module._peftkit_unpadded = True
        return (self._rows_of(x), *args[1:])

    def scatter(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if not getattr(module, "_peftkit_unpadded", False):
            return None
        module._peftkit_unpadded = False
        batch, seq = self.shape
        full = output.new_zeros(batch * seq, output.shape[-1])
        return full.index_copy(0, self.index.to(output.device), output).view(batch, seq, output.shape[-1])

    def hand_on(self, module: nn.Module, args: tuple, output: torch.Tensor):
        if getattr(module, "_peftkit_unpadded", False):
            module._peftkit_unpadded = False
            self._handed_on = output  # (tokens, features): the next linear layer reads it as it is
        return None


class Unpadding:
    """The hooks of one model; ``remove()`` takes them off."""

    def __init__(self, handles: list) -> None:
        self.handles = handles

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def encoder_of(model: nn.Module) -> nn.Module | None:
    base = getattr(model, "base_model", model)
    for attr in ENCODER_ATTRS:
        encoder = getattr(base, attr, None)
        if isinstance(encoder, nn.Module):
            return encoder
    return None


def unpad_linears(model: nn.Module) -> Unpadding | None:
    """Install the hooks on the linear layers of ``model``'s encoder (call after the adapters are injected: an
    adapter layer is hooked as a whole, its base layer inside it is not). None where the model has no encoder
    stack (``<base>.encoder``)."""
    encoder = encoder_of(model)
    if encoder is None:
        return None
    rows = _Rows()
    adapted = {id(layer): layer for layer in adapter_layers(encoder).values()}
    targets: list[nn.Module] = list(adapted.values())
    inside = {id(m) for layer in adapted.values() for m in layer.modules() if m is not layer}
    targets += [m for m in encoder.modules() if type(m) is nn.Linear and id(m) not in inside]
    handles = [model.register_forward_pre_hook(rows.record, with_kwargs=True),
               model.register_forward_hook(rows.forget)]
    # A feed-forward block's first half (transformers' BERT-family ``<Model>Intermediate``: dense, then a
    # per-position activation) is hooked as a whole and keeps its output unpadded for the layer that reads it;
    # a model where another module reads that output fails the start check and keeps its padded forward.
    hooked = {id(m) for m in targets}
    intermediates = [m for m in encoder.modules() if type(m).__name__.endswith("Intermediate")
                     and sum(1 for c in m.modules() if id(c) in hooked) == 1]
    for module in intermediates:
        handles.append(module.register_forward_pre_hook(rows.gather))
        handles.append(module.register_forward_hook(rows.hand_on))
    for module in targets:
        handles.append(module.register_forward_pre_hook(rows.gather))
        handles.append(module.register_forward_hook(rows.scatter))
    return Unpadding(handles)


def unpad_linears_if_exact(model: nn.Module, rtol: float = 1e-4) -> Unpadding | None:
    """:func:`unpad_linears` where ``model``'s logits on a padded batch (two rows of different lengths, random
    ids, eval mode) are the same with the hooks as without; else no hooks and None."""
    vocab = model.get_input_embeddings().num_embeddings
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(min(5, vocab - 1), vocab, (2, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    device = next(model.parameters()).device
    ids, mask = ids.to(device), mask.to(device)
    was_training = model.training
    model.eval()
    unpadding = None
    try:
        with torch.no_grad():
            padded = model(input_ids=ids, attention_mask=mask).logits.float()
            unpadding = unpad_linears(model)
            if unpadding is None:
                return None
            try:
                unpadded = model(input_ids=ids, attention_mask=mask).logits.float()
            except RuntimeError:  # e.g. a module reading an intermediate block's unpadded rows as (batch, seq, ...)
                unpadding.remove()
                return None
    finally:
        model.train(was_training)
    if torch.allclose(unpadded, padded, rtol=rtol, atol=rtol * float(padded.abs().max())):
        return unpadding
    unpadding.remove()
    return None
