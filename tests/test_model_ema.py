"""EMA of weights: the update formula, state_dict round trip, copy_to."""

from __future__ import annotations

import pytest
import torch

from model import EMA, RecursiveGPT


def named(**tensors: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    return list(tensors.items())


def test_update_formula():
    a, b = torch.tensor([1.0, 2.0]), torch.tensor([[0.5]])
    ema = EMA(named(a=a, b=b), decay=0.9)
    a2, b2 = torch.tensor([3.0, -2.0]), torch.tensor([[1.5]])
    ema.update(named(a=a2, b=b2))
    torch.testing.assert_close(ema.shadow["a"], 0.9 * a + 0.1 * a2)
    a3 = torch.tensor([0.0, 10.0])
    ema.update(named(a=a3, b=b2))
    torch.testing.assert_close(ema.shadow["a"], 0.9 * (0.9 * a + 0.1 * a2) + 0.1 * a3)
    torch.testing.assert_close(ema.shadow["b"], 0.9 * (0.9 * b + 0.1 * b2) + 0.1 * b2)
    assert ema.num_updates == 2
    # the shadow is a copy, not a view of the live weights
    a.add_(100.0)
    assert ema.shadow["a"].max() < 50


def test_shadow_is_fp32_for_low_precision_weights():
    w = torch.randn(4, dtype=torch.bfloat16)
    ema = EMA(named(w=w), decay=0.5)
    assert ema.shadow["w"].dtype == torch.float32
    ema.update(named(w=torch.ones(4, dtype=torch.bfloat16)))
    torch.testing.assert_close(ema.shadow["w"], 0.5 * w.float() + 0.5)


def test_decay_zero_tracks_the_weights_and_bad_decay_is_refused():
    ema = EMA(named(w=torch.zeros(3)), decay=0.0)
    ema.update(named(w=torch.arange(3.0)))
    torch.testing.assert_close(ema.shadow["w"], torch.arange(3.0))
    for bad in (1.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="decay"):
            EMA(named(w=torch.zeros(1)), decay=bad)


def test_state_dict_round_trip(tmp_path):
    ema = EMA(named(a=torch.randn(3), b=torch.randn(2, 2)), decay=0.99)
    for _ in range(3):
        ema.update(named(a=torch.randn(3), b=torch.randn(2, 2)))
    path = tmp_path / "ema.pt"
    torch.save(ema.state_dict(), path)
    fresh = EMA(named(a=torch.zeros(3), b=torch.zeros(2, 2)), decay=0.5)
    fresh.load_state_dict(torch.load(path, weights_only=True))
    assert fresh.decay == 0.99 and fresh.num_updates == 3
    for n in ("a", "b"):
        torch.testing.assert_close(fresh.shadow[n], ema.shadow[n], rtol=0, atol=0)
    # loading copies: later updates of one do not leak into the other
    ema.update(named(a=torch.ones(3), b=torch.ones(2, 2)))
    assert not torch.equal(fresh.shadow["a"], ema.shadow["a"])
    with pytest.raises(ValueError, match="lacks"):
        fresh.load_state_dict({"decay": 0.9, "num_updates": 0, "shadow": {"a": torch.zeros(3)}})


def test_copy_to_a_model(tiny_config):
    model = RecursiveGPT(tiny_config())
    ema = EMA(model.named_parameters(), decay=0.5)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    ema.update(model.named_parameters())
    ema.copy_to(model.named_parameters())
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), before[n] + 0.5)
    # into bf16 copies too (an export in low precision)
    half = {n: torch.empty_like(p, dtype=torch.bfloat16) for n, p in model.named_parameters()}
    ema.copy_to(half.items())
    torch.testing.assert_close(half["lm_head.weight"].float(), (before["lm_head.weight"] + 0.5),
                               rtol=1e-2, atol=1e-2)
