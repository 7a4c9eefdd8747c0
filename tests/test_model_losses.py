"""Hierarchical step weights and the improvement reward against their formulas (SPEC section 2)."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch

from model import RecursiveGPT, improvement_reward, step_weights
from model.losses import improvement_penalty


@pytest.mark.parametrize("n_sup", [2, 3, 4, 8, 12])
@pytest.mark.parametrize("base", [0.5, 1.0, 2.0, 5.0])
def test_step_weights_formula(n_sup: int, base: float) -> None:
    w = step_weights(n_sup, base)
    raw = [base ** ((s - 1) / (n_sup - 1)) for s in range(1, n_sup + 1)]
    assert w == pytest.approx([r / sum(raw) for r in raw], rel=1e-12)
    assert sum(w) == pytest.approx(1.0, rel=1e-12)
    assert w[-1] / w[0] == pytest.approx(base, rel=1e-12)
    ratios = [b / a for a, b in pairwise(w)]
    assert ratios == pytest.approx([base ** (1 / (n_sup - 1))] * (n_sup - 1), rel=1e-12)


def test_step_weights_special_cases() -> None:
    assert step_weights(1, 5.0) == [1.0]
    assert step_weights(1, 1.0) == [1.0]
    assert step_weights(4, 1.0) == pytest.approx([0.25] * 4)
    w = step_weights(8, 5.0)
    assert w[-1] / w[0] == pytest.approx(5.0)
    assert all(b > a for a, b in pairwise(w))
    with pytest.raises(ValueError, match="N_sup"):
        step_weights(0, 5.0)
    with pytest.raises(ValueError, match="supervision_weight_base"):
        step_weights(4, -1.0)


def test_model_uses_the_configured_weights(tiny_config) -> None:
    assert RecursiveGPT(tiny_config(N_sup=1)).weights == [1.0]
    model = RecursiveGPT(tiny_config(N_sup=3, supervision_weight_base=4.0))
    assert model.weights == pytest.approx([1 / 7, 2 / 7, 4 / 7])


def test_improvement_reward_value_and_gradient() -> None:
    L = [torch.tensor(v, dtype=torch.float64, requires_grad=True)
         for v in (3.0, 2.0, 2.5, 2.4, 3.0)]
    R = improvement_reward(L, scale=0.1)
    # relu(2-3) + relu(2.5-2) + relu(2.4-2.5) + relu(3-2.4) = 0.5 + 0.6
    assert R.item() == pytest.approx(0.1 * 1.1)
    R.backward()
    # d/dL_s = scale where L_s got worse; nothing flows into L_{s-1} (stopgrad)
    assert [0.0 if t.grad is None else t.grad.item() for t in L] == pytest.approx(
        [0.0, 0.0, 0.1, 0.0, 0.1])
    assert L[0].grad is None  # L_1 enters only as stopgrad(L_1)


def test_improvement_reward_edge_cases() -> None:
    one = [torch.tensor(2.0)]
    assert improvement_reward(one, scale=1.0).item() == 0.0  # N_sup = 1: nothing to improve on
    rising = [torch.tensor(v) for v in (1.0, 2.0, 4.0)]
    assert improvement_reward(rising, scale=0.0).item() == 0.0
    assert improvement_reward(rising, scale=2.0).item() == pytest.approx(2.0 * (1.0 + 2.0))
    falling = [torch.tensor(v) for v in (4.0, 2.0, 1.0)]
    assert improvement_reward(falling, scale=2.0).item() == 0.0
    assert improvement_penalty(torch.tensor(3.0), None, 1.0).item() == 0.0


def test_per_step_shares_sum_to_the_reward() -> None:
    L = [torch.tensor(v) for v in (2.0, 2.2, 1.9, 2.3)]
    shares = [improvement_penalty(L[0], None, 0.3)]
    shares += [improvement_penalty(cur, prev, 0.3) for prev, cur in pairwise(L)]
    assert math.isclose(sum(s.item() for s in shares), improvement_reward(L, 0.3).item(),
                        rel_tol=1e-6)


@pytest.mark.parametrize("n_sup", [1, 3])
def test_model_loss_recomputed_from_step_losses(tiny_config, n_sup: int) -> None:
    cfg = tiny_config(N_sup=n_sup, improvement_reward_scale=0.5)
    model = RecursiveGPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        out = model(idx, tgt)
    L = out.step_losses
    assert len(L) == n_sup
    w = step_weights(n_sup, cfg.supervision_weight_base)
    expected = sum(ws * Ls for ws, Ls in zip(w, L, strict=True)) + improvement_reward(L, 0.5)
    torch.testing.assert_close(out.loss, expected)
    if n_sup == 1:
        torch.testing.assert_close(out.loss, L[0])
