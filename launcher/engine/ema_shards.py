"""The EMA of the weights under every ZeRO stage, beside model/ema.py's EMA.

model.EMA averages whatever named tensors it is given. Here is what each rank gives it: the full
parameters (ZeRO 0/1/2: rank 0's copy is the one saved) or only its own ZeRO-3 partition of each
parameter (every rank saves its piece). Also here: the checkpoint record that lets any world
size, and `launcher eval/sample/export` in one process, rebuild the full averaged weights from
those pieces, and the swap that evaluates with the averaged weights in place.
"""

from __future__ import annotations

import torch

from launcher.engine.checkpoint import Checkpointer, ResumePoint
from launcher.engine.dist import world_size
from model import EMA


def ema_tensors(model: torch.nn.Module, zero3: bool):
    """What this rank holds of each parameter: all of it, or its ZeRO-3 partition."""
    for name, p in model.named_parameters():
        yield name, (p.ds_tensor if zero3 else p.data)


def ema_record(ema: EMA, model: torch.nn.Module, zero3: bool) -> dict:
    """What the checkpoint's state.json says about the EMA shards: their layout, and each
    parameter's full size and shape, so that they can be stitched back together."""
    return {"layout": "zero3" if zero3 else "full", "num_updates": ema.num_updates,
            "numel": {n: p.ds_numel if zero3 else p.numel() for n, p in model.named_parameters()},
            "shape": {n: list(p.ds_shape if zero3 else p.shape)
                      for n, p in model.named_parameters()}}


def ema_full_from_shards(rp: ResumePoint) -> dict[str, torch.Tensor]:
    """Rebuild full EMA tensors from a checkpoint's per-rank shards (any ZeRO stage)."""
    numels = rp.state["ema"]["numel"]
    layout = rp.state["ema"]["layout"]
    ranks = range(rp.world_size) if layout == "zero3" else [0]
    parts: dict[str, list[torch.Tensor]] = {n: [] for n in numels}
    for r in ranks:
        tensors, _ = Checkpointer.rank_files(rp, r)
        for n in numels:
            parts[n].append(tensors["ema"][n].flatten())
    shapes = rp.state["ema"]["shape"]
    return {n: torch.cat(parts[n])[: numels[n]].view(shapes[n]) for n in numels}


def ema_load(ema: EMA, model, rp: ResumePoint, zero3: bool, rank: int) -> None:
    same = rp.world_size == world_size()
    if zero3 and same and rp.state["ema"]["layout"] == "zero3":
        tensors, _ = Checkpointer.rank_files(rp, rank)
        ema.load_state_dict({"decay": ema.decay, "num_updates": rp.state["ema"]["num_updates"],
                             "shadow": tensors["ema"]})
        return
    full = ema_full_from_shards(rp)
    shadow = {}
    for name, t in ema_tensors(model, zero3):
        flat = full[name].flatten()
        if zero3:  # this rank's contiguous slice of the flattened parameter, zero-padded
            n = t.numel()
            piece = flat[rank * n: rank * n + n]
            flat = torch.cat([piece, piece.new_zeros(n - piece.numel())])
        shadow[name] = flat.view(t.shape)
    ema.load_state_dict({"decay": ema.decay, "num_updates": rp.state["ema"]["num_updates"],
                         "shadow": shadow})


class swapped_in_ema:
    """Context: the model holds the EMA weights inside, its own weights again after."""

    def __init__(self, ema: EMA, model, zero3: bool) -> None:
        self.ema, self.model, self.zero3 = ema, model, zero3

    def __enter__(self):
        self.backup = {n: t.detach().clone() for n, t in ema_tensors(self.model, self.zero3)}
        self.ema.copy_to(ema_tensors(self.model, self.zero3))

    def __exit__(self, *exc):
        with torch.no_grad():
            for n, t in ema_tensors(self.model, self.zero3):
                t.copy_(self.backup[n])

