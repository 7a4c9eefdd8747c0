"""Ouro's learned exit distribution (exit_gate): probabilities that sum to one (uniform at init),
the carry that keeps it flat in N_sup, the objective's value, and causality. The per-step
backward against one backward of the whole objective is in test_model_recursion.py."""

from __future__ import annotations

import math

import pytest
import torch

from bench.depth_study import VOCAB, causal_leak_check
from model import RecursiveGPT


def gated(tiny_config, **overrides) -> RecursiveGPT:
    cfg = tiny_config(**{"exit_gate": True, "N_sup": 4, "zero_init_out": False, **overrides})
    model = RecursiveGPT(cfg).double()
    torch.nn.init.normal_(model.exit_gate.weight, std=1.0)  # a gate that differs per token
    torch.nn.init.constant_(model.exit_gate.bias, 0.3)
    return model


def run_steps(model, idx, tgt=None, n=None):
    y = z = prev = None
    out = []
    for s in range(n or model.config.N_sup):
        st = model.supervision_step(idx, y, z, tgt, step=s, prev_loss=prev)
        y, z, prev = st.y, st.z, st.carry
        out.append(st)
    return out


def test_exit_probabilities_sum_to_one_and_start_uniform(tiny_config):
    model = gated(tiny_config)
    idx = torch.randint(0, 64, (2, 16))
    with torch.no_grad():
        steps = run_steps(model, idx)
    p = torch.stack([st.exit_prob for st in steps])                      # (N_sup, B, T)
    torch.testing.assert_close(p.sum(0), torch.ones_like(p[0]), rtol=0, atol=1e-12)
    assert (p > 0).all() and p.std(dim=(1, 2)).min() > 1e-3  # per token, not one number
    # at init (w = b = 0) every step gets 1/N_sup: no geometric prior on early exit
    fresh = RecursiveGPT(tiny_config(exit_gate=True, N_sup=4)).double()
    with torch.no_grad():
        p0 = torch.stack([st.exit_prob for st in run_steps(fresh, idx)])
    torch.testing.assert_close(p0, torch.full_like(p0, 0.25), rtol=0, atol=1e-12)
    # evaluation past the trained steps: no exit mass there, and nothing breaks
    with torch.no_grad():
        longer = run_steps(model, idx, n=6)
    assert all(float(st.exit_prob.abs().max()) == 0.0 for st in longer[4:])


def test_objective_value_is_expected_loss_minus_entropy_bonus(tiny_config):
    model = gated(tiny_config, exit_entropy_beta=0.2)
    idx, tgt = torch.randint(0, 64, (2, 16)), torch.randint(0, 64, (2, 16))
    tgt[1, :4] = -1
    with torch.no_grad():
        steps = run_steps(model, idx, tgt)
    p = torch.stack([st.exit_prob for st in steps])
    ce = torch.stack([torch.nn.functional.cross_entropy(
        st.logits.flatten(0, 1), tgt.flatten(), ignore_index=-1, reduction="none").view_as(tgt)
        for st in steps])
    valid = tgt != -1
    want = ((p * ce).sum(0) + 0.2 * (p * p.log()).sum(0))[valid].mean()
    got = sum(st.objective for st in steps)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    for st, c in zip(steps, ce, strict=True):  # the step's loss is still its plain mean CE
        torch.testing.assert_close(st.loss, c[valid].mean(), rtol=1e-12, atol=0)


def test_carry_is_flat_in_n_sup_and_required_in_training(tiny_config):
    model = gated(tiny_config, N_sup=6)
    idx = torch.randint(0, 64, (2, 16))
    sizes = [sum(t.numel() for t in (st.carry.log_stay, st.carry.gate_sum,
                                     st.carry.gate_count) if t is not None)
             for st in run_steps(model, idx, idx)[:-1]]
    assert len(set(sizes)) == 1  # the same size after step 1 as after step 5
    assert all(t.grad_fn is None for st in run_steps(model, idx, idx)[:-1]
               for t in (st.carry.log_stay, st.carry.gate_sum, st.carry.gate_count))
    st0 = model.supervision_step(idx, targets=idx)
    with pytest.raises(ValueError, match="carry"):
        model.supervision_step(idx, st0.y, st0.z, idx, step=1, prev_loss=st0.loss)


def test_causal_with_the_exit_gate(tiny_config):
    cfg = dict(vocab_size=len(VOCAB) + (-len(VOCAB)) % 64, sequence_len=24)
    model = gated(tiny_config, **cfg)
    assert causal_leak_check(model, 24) < 1e-9
    # and the exit probabilities at positions <= t do not see later tokens either
    idx = torch.randint(1, len(VOCAB), (2, 24))
    other = idx.clone()
    other[:, 13:] = torch.randint(1, len(VOCAB), (2, 11))
    with torch.no_grad():
        a, b = run_steps(model, idx), run_steps(model, other)
    for sa, sb in zip(a, b, strict=True):
        torch.testing.assert_close(sa.exit_prob[:, :13], sb.exit_prob[:, :13], rtol=0,
                                   atol=1e-12)


def test_exit_gate_offsets_make_uniform_for_any_n_sup(tiny_config):
    for n in (2, 3, 5):
        model = RecursiveGPT(tiny_config(exit_gate=True, N_sup=n))
        lam = [1 / (1 + math.exp(-o)) for o in model.exit_offsets]
        stay, p = 1.0, []
        for x in lam:
            p.append(stay * x)
            stay *= 1 - x
        p.append(stay)
        assert p == pytest.approx([1 / n] * n)
