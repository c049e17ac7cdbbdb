"""SIGINT/SIGTERM during a run: a flag the loop checks after each step (then it checkpoints and exits), agreed
on by every process."""

from __future__ import annotations

import signal
from typing import Any

import torch


class StopSignals:
    """Turns SIGINT/SIGTERM into a flag the loop checks after each step (then it checkpoints and exits).

    Installed when the first step starts; with ``keep=True`` leaving the ``with`` block keeps it installed (the
    final evaluation and saves run under it too) until ``restore()``.
    """

    def __init__(self, keep: bool = False) -> None:
        self.received: int | None = None
        self.keep = keep
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        for number in (signal.SIGINT, signal.SIGTERM):
            if number in self._previous:
                continue
            try:
                self._previous[number] = signal.signal(number, self._handle)
            except ValueError:  # not the main thread: signals stay with the host program
                pass
        return self

    def _handle(self, number, frame) -> None:
        self.received = number

    def __exit__(self, *exc) -> None:
        if not self.keep:
            self.restore()

    def restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()



def stop_requested(signals: StopSignals, accelerator, collective: bool = True) -> bool:
    """Every process must stop at the same step: under several processes the flag is all-reduced, on the steps
    that read the losses (``collective``) only, so that no other step waits on a collective; one process checks
    its flag every step."""
    if accelerator.num_processes == 1:
        return signals.received is not None
    if not collective:
        return False
    flag = torch.tensor(float(signals.received or 0), device=accelerator.device)
    flag = accelerator.reduce(flag, reduction="sum")
    if flag.item() and signals.received is None:
        signals.received = signal.SIGTERM
    return bool(flag.item())

