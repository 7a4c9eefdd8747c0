"""The deep-supervision objective: hierarchical step weights and the improvement reward.

    total = Σ_s w_s·L_s + R (+ halting loss),  w_s ∝ base ** ((s-1)/(N_sup-1)),  Σ w_s = 1
    R     = scale · Σ_{s≥2} relu(L_s − stopgrad(L_{s−1}))

Both split into per-step terms, so each supervision step can be backpropagated as soon as it
finishes: step s contributes w_s·L_s + scale·relu(L_s − stopgrad(L_{s−1})).
"""

from __future__ import annotations

from itertools import pairwise

import torch


def step_weights(n_sup: int, base: float) -> list[float]:
    """Hierarchical weights of the N_sup step losses; they sum to 1. N_sup = 1 gives [1.0]."""
    if n_sup < 1:
        raise ValueError(f"N_sup must be >= 1, got {n_sup}")
    if base <= 0:
        raise ValueError(f"supervision_weight_base must be > 0, got {base}")
    if n_sup == 1:
        return [1.0]
    raw = [base ** (s / (n_sup - 1)) for s in range(n_sup)]
    total = sum(raw)
    return [r / total for r in raw]


def improvement_penalty(loss: torch.Tensor, prev_loss: torch.Tensor | None,
                        scale: float) -> torch.Tensor:
    """This step's share of R: scale·relu(L_s − stopgrad(L_{s−1})); zero on the first step."""
    if prev_loss is None or scale == 0:
        return loss.new_zeros(())
    return scale * torch.relu(loss - prev_loss.detach())


def improvement_reward(step_losses: list[torch.Tensor], scale: float) -> torch.Tensor:
    """R over all steps (the sum of the per-step shares)."""
    r = step_losses[0].new_zeros(())
    for prev, cur in pairwise(step_losses):
        r = r + improvement_penalty(cur, prev, scale)
    return r
