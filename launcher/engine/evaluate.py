"""Evaluation: val loss per supervision step, refinement and bits per byte, one step at a time.

The trainer (`evaluate`, through the engine) and `launcher eval` (`eval_run`, on the consolidated
weights) share it: each
supervision step's (B, T, vocab) logits are reduced to four sums as soon as the step is done, on
the model's device, so memory holds one step's logits, never N_sup of them.
`launcher sample` lives here too.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from launcher.engine.dist import all_reduce_sum

SUMS = 4  # per step: CE over scored targets, scored targets, CE over byte targets, their bytes

VAL_SEED = 0
"""The validation windows' seed, the same for every run whatever its training seed: bits per byte
of two runs of a preset are measured on the same tokens."""


def eval_sums(logits: torch.Tensor, targets: torch.Tensor,
              token_bytes: torch.Tensor) -> torch.Tensor:
    """One step's sums (float64, on the logits' device) for val loss and bits per byte.

    Targets -1 are ignored. A target that stands for no text (EOS and other special tokens,
    0 bytes) is left out of both bits-per-byte sums: its loss has no bytes to be paid for, and
    keeping it would bias the figure upward.
    """
    tgt = targets.flatten()
    ce = F.cross_entropy(logits.flatten(0, 1).float(), tgt, ignore_index=-1, reduction="none")
    scored = tgt != -1
    nbytes = torch.where(scored, token_bytes.to(tgt.device)[tgt.clamp(min=0)], 0)
    text = nbytes > 0
    return torch.stack([ce[scored].sum(), scored.sum(), ce[text].sum(), nbytes.sum()]).double()


def eval_batch(step_fn, idx: torch.Tensor, targets: torch.Tensor, n_sup: int,
               token_bytes: torch.Tensor) -> torch.Tensor:
    """(n_sup, SUMS) for one batch. step_fn(idx, y, z, targets, s, carry, token_bytes) ->
    (sums, carry, y, z), carry being what one supervision step hands the next (model.StepCarry:
    its detached loss, the exit gate's state): a SupervisionStepModule, or the engine that wraps
    one."""
    out = []
    y = z = prev = None
    for s in range(n_sup):
        sums, prev, y, z = step_fn(idx, y, z, targets, s, prev, token_bytes)
        out.append(sums)
    return torch.stack(out)


def summarize(totals: torch.Tensor) -> dict:
    """Metrics from summed (n_sup, SUMS) totals; {} when no target was scored."""
    totals = totals.tolist()
    if totals[-1][1] == 0:
        return {}
    losses = [row[0] / row[1] for row in totals]
    last = totals[-1]
    return {"val_loss": losses[-1], "val_step_losses": losses,
            "val_refinement": (losses[0] - losses[-1]) / losses[0],
            "val_bpb": last[2] / (math.log(2) * last[3]) if last[3] else float("nan")}


def token_bytes(tok) -> torch.Tensor:
    """Bytes of text each token id stands for (0 for special tokens), for bits per byte. In a
    byte-level BPE every character of a token's string is one byte; otherwise decode it."""
    import json as _json

    hf = tok.tok
    byte_level = (_json.loads(hf.to_str()).get("decoder") or {}).get("type") == "ByteLevel"
    special = {t.content for t in hf.get_added_tokens_decoder().values() if t.special}
    out = torch.zeros(tok.padded_vocab_size, dtype=torch.long)
    for text, i in hf.get_vocab(with_added_tokens=True).items():
        if text not in special:
            out[i] = len(text) if byte_level else len(hf.decode([i]).encode("utf-8"))
    return out


@torch.no_grad()
def evaluate(engine, loader, n_sup: int, n_batches: int, token_bytes: torch.Tensor) -> dict:
    """Val loss per supervision step, refinement (L_1 − L_N)/L_1 and bits per byte, summed over
    ranks (launcher.engine.evaluate). Runs through the engine so ZeRO-3 gathers the weights; each
    step's logits are reduced inside its engine call."""
    engine.eval()
    token_bytes = token_bytes.to(engine.device)
    totals = torch.zeros(n_sup, SUMS, dtype=torch.float64, device=engine.device)
    it = iter(loader)
    for _ in range(n_batches):
        try:
            idx, tgt = next(it)
        except StopIteration:
            break
        totals += eval_batch(engine, idx.to(engine.device), tgt.to(engine.device), n_sup,
                             token_bytes)
    engine.train()
    summed = all_reduce_sum(totals.flatten().tolist())
    return summarize(torch.tensor(summed, dtype=torch.float64).view(n_sup, SUMS))
