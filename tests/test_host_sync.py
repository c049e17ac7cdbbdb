"""The training step reads nothing back to the host between logging steps, for every registered method.

A host sync is a call that needs a device tensor's value on the host: ``item``, ``tolist``, ``bool``/``int``/
``float``/``index`` of a tensor, ``cpu``/``numpy``/``.to("cpu")``, ``nonzero`` and friends, and boolean-mask
indexing (its output shape depends on the data). On a CPU machine every tensor lives on the host, so the counter
tracks which tensors *would* live on the accelerator: the model's parameters and buffers, the optimizer's state,
tensors placed with an explicit ``torch.device`` (``x.to(device)``, ``torch.zeros(..., device=device)``), and
everything computed from them (a TorchFunctionMode propagates the mark). Host-side values by design (torch's and
peftkit's step counters, CoTo's gates from a CPU generator) stay unmarked, as they would stay on the CPU of a GPU
machine. A sync is charged to the innermost caller outside torch; only those from peftkit's own code
(``peftkit/``, ``adapters/``) are asserted, third-party ones (transformers' attention-mask checks) are listed.
"""

from __future__ import annotations

import sys
import weakref
from collections import Counter
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode
from train_fixtures import TINY_CONFIGS, llama_text_recipe

import peftkit
import peftkit.adapters
from peftkit.train import loop
from peftkit.train.recipe import from_dict

SYNCS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__int__, torch.Tensor.__float__,
         torch.Tensor.__index__, torch.Tensor.cpu, torch.Tensor.numpy, torch.Tensor.nonzero, torch.nonzero,
         torch.Tensor.masked_select, torch.masked_select, torch.argwhere, torch.Tensor.argwhere, torch.unique,
         torch.Tensor.unique}
OWN = (str(Path(peftkit.__file__).resolve().parent), str(Path(peftkit.adapters.__file__).resolve().parent))
TORCH = str(Path(torch.__file__).resolve().parent)


def _tensors(value, out):
    if isinstance(value, torch.Tensor):
        out.append(value)
    elif isinstance(value, (list, tuple)):
        for item in value:
            _tensors(item, out)
    elif isinstance(value, dict):
        for item in value.values():
            _tensors(item, out)
    return out


class HostSyncCounter(TorchFunctionMode):
    """Counts host syncs on marked ("device") tensors, per phase (set by the caller), with their call sites."""

    def __init__(self) -> None:
        super().__init__()
        self._marked: dict[int, weakref.ref] = {}
        self.phase = "setup"
        self.syncs: dict[str, Counter] = {}

    def mark(self, *values) -> None:
        for tensor in _tensors(list(values), []):
            self._marked[id(tensor)] = weakref.ref(tensor)

    def marked(self, tensor: torch.Tensor) -> bool:
        ref = self._marked.get(id(tensor))
        return ref is not None and ref() is tensor

    def _site(self) -> str:
        frame = sys._getframe(2)
        while frame is not None and (frame.f_code.co_filename.startswith(TORCH)
                                     or frame.f_code.co_filename == __file__):
            frame = frame.f_back
        return f"{frame.f_code.co_filename}:{frame.f_lineno}" if frame is not None else "?"

    def _is_sync(self, func, args, kwargs) -> bool:
        if func in SYNCS:
            return True
        if func is torch.Tensor.__getitem__ and len(args) > 1:
            index = _tensors([args[1]], [])
            return any(t.dtype == torch.bool for t in index)
        if func is torch.Tensor.to:
            target = [a for a in list(args[1:]) + [kwargs.get("device")] if isinstance(a, (str, torch.device))]
            return any(torch.device(t).type == "cpu" and isinstance(t, str) for t in target)
        return False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = _tensors([list(args), kwargs], [])
        marked_in = any(self.marked(t) for t in inputs)
        if marked_in and self._is_sync(func, args, kwargs):
            self.syncs.setdefault(self.phase, Counter())[f"{getattr(func, '__name__', func)} at {self._site()}"] += 1
        out = func(*args, **kwargs)
        placed = isinstance(kwargs.get("device"), torch.device) or (
            func is torch.Tensor.to and any(isinstance(a, torch.device) for a in args[1:]))
        if marked_in or placed:
            self.mark(out)
        return out


def test_counter_sees_item_bool_and_mask_indexing_on_device_tensors_only():
    counter = HostSyncCounter()
    with counter:
        x = torch.ones(3).to(torch.device("cpu"))  # "placed on the device"
        host = torch.ones(3)
        counter.phase = "check"
        y = (x * 2).sum()
        y.item()
        bool(y > 0)
        x[x > 0]
        x.tolist()
        host.sum().item()  # host data: not a sync
        float(host[0])
        x.cpu()
        torch.where(x > 0, x, 0.0)  # no sync: shape does not depend on the data
    counted = sum(counter.syncs["check"].values())
    assert counted == 5, counter.syncs


# Options that keep each method's own periodic events (ElaLoRA's reallocation) out of the measured steps.
METHOD_OPTIONS = {"elalora": {"t_init": 100, "t_final": 0}}


def _recipe(tmp_path: Path, method: str) -> dict:
    recipe = llama_text_recipe(tmp_path, adapter__method=method, training__max_steps=4, training__log_every=100,
                               training__save_every=None, training__eval_every=None, training__max_grad_norm=1.0)
    recipe["model"]["config"] = dict(TINY_CONFIGS["qwen2"])  # wide enough for every method's default ranks
    recipe["adapter"] = {"method": method, "r": 4, "alpha": 8, **METHOD_OPTIONS.get(method, {})}
    recipe["data"]["eval"] = None
    return recipe


@pytest.mark.slow  # one short run per method: about 10 s each on 2 busy cores
@pytest.mark.parametrize("method", peftkit.methods())
def test_no_host_sync_on_non_logging_steps(tmp_path, method):
    counter = HostSyncCounter()
    held = {}
    original = loop.prepare

    def capture(recipe, accelerator=None):
        run = original(recipe, accelerator)
        held["run"] = run
        return run

    def hook(step, record):
        if step == 1:  # from here on, everything the steps touch is marked as living on the device
            run = held["run"]
            counter.mark(list(run.model.parameters()), list(run.model.buffers()),
                         [p.grad for p in run.model.parameters() if p.grad is not None],
                         # step counters stay on the host (as torch's own optimizers keep them)
                         [{k: v for k, v in state.items() if k != "step"} for state in run.optimizer.state.values()])
        counter.phase = {1: "steps 2-3", 2: "steps 2-3", 3: "step 4 (reads)"}.get(step, "after")

    loop.prepare = capture
    try:
        with counter:
            result = loop.train(from_dict(_recipe(tmp_path, method)), hooks=[hook])
    finally:
        loop.prepare = original
    assert result.status == "done"
    third_party = {site: n for site, n in counter.syncs.get("steps 2-3", {}).items() if not any(p in site for p in OWN)}
    print(f"{method}: third-party host syncs in steps 2-3: {third_party}")
    own = {site: n for site, n in counter.syncs.get("steps 2-3", {}).items() if any(p in site for p in OWN)}
    assert not own, f"{method}: host syncs from peftkit in steps without logging: {own}"
    # The reading step does read: the counter is not blind.
    reads = counter.syncs.get("step 4 (reads)", {})
    assert any("loop.py" in site for site in reads), reads
