"""Exponential moving average of weights, over whatever tensors the caller owns.

The EMA takes named tensors, not a module, so the trainer can hand it the full parameters (ZeRO
0/1/2) or only this rank's fp32 partition of each parameter (ZeRO-3): every rank keeps the EMA of
what it holds, and it is saved per rank with the rest of the checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch


class EMA:
    def __init__(self, named_tensors: Iterable[tuple[str, torch.Tensor]], decay: float = 0.999,
                 warmup: bool = False):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"ema decay must be in [0, 1), got {decay}")
        self.decay = decay
        self.warmup = warmup  # decay min(decay, (1+n)/(10+n)): early averages don't lag init
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            n: t.detach().to(torch.float32).clone() for n, t in named_tensors}

    @torch.no_grad()
    def update(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """shadow <- d·shadow + (1 − d)·current, d = decay (or its warm-up value)."""
        d = self.current_decay()
        for n, t in named_tensors:
            self.shadow[n].lerp_(t.detach().to(torch.float32), 1.0 - d)
        self.num_updates += 1

    def current_decay(self) -> float:
        if not self.warmup:
            return self.decay
        return min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))

    @torch.no_grad()
    def copy_to(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Write the averaged weights into the given tensors (e.g. a model for eval or export)."""
        for n, t in named_tensors:
            t.copy_(self.shadow[n].to(t.dtype))

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, sd: dict) -> None:
        missing = set(self.shadow) - set(sd["shadow"])
        if missing:
            raise ValueError(f"EMA state lacks {sorted(missing)[:5]}")
        self.decay = float(sd["decay"])
        self.num_updates = int(sd["num_updates"])
        for n in self.shadow:
            self.shadow[n].copy_(sd["shadow"][n])
