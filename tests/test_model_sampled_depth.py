"""Sampled recursion depth with truncated backprop (depth_sampling, backprop_recursions): the
depth varies per batch, is the same on every rank that has seen as many batches (and after a
resume), follows the configured law, evaluation runs T_recursion, exactly the last k
recursions carry gradients, FLOPs are the expectation, and causality holds."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from bench.depth_study import VOCAB, causal_leak_check
from model import GPTConfig, RecursiveGPT
from model.gpt import sample_recursions


def drawn(model: RecursiveGPT, batches: int, seed: int) -> list[list[int]]:
    """Recursions per supervision step of `batches` training batches (per-step backward)."""
    cfg = model.config
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(batches):
        idx = torch.randint(0, cfg.vocab_size, (2, 8), generator=g)
        y = z = prev = None
        steps = []
        for s in range(cfg.N_sup):
            st = model.supervision_step(idx, y, z, idx, step=s, prev_loss=prev)
            st.objective.backward()
            y, z, prev = st.y, st.z, st.carry
            steps.append(st.recursions)
        out.append(steps)
    return out


def test_depth_varies_per_batch_and_is_the_same_on_every_rank(tiny_config):
    cfg = tiny_config(n_layer=1, n_embd=32, n_head=2, n_kv_head=1, N_sup=2, T_recursion=3,
                      depth_sampling="poisson")
    torch.manual_seed(0)
    rank0 = RecursiveGPT(cfg)
    torch.manual_seed(1)  # another rank: other global RNG state, other data
    rank1 = RecursiveGPT(cfg)
    a, b = drawn(rank0, 6, seed=0), drawn(rank1, 6, seed=1)
    assert a == b
    flat = [r for steps in a for r in steps]
    assert len(set(flat)) >= 3 and min(flat) >= 1
    # a resume (state dict into a fresh model) draws on where the run stopped
    fresh = RecursiveGPT(cfg)
    fresh.load_state_dict(rank0.state_dict())
    assert drawn(fresh, 3, seed=2) == drawn(rank1, 3, seed=3)
    # evaluation and no-grad inference run the fixed mean depth and draw nothing
    before = int(rank0.depth_draws)
    rank0.eval()
    idx = torch.randint(0, cfg.vocab_size, (2, 8))
    assert rank0.supervision_step(idx, targets=idx).recursions == cfg.T_recursion
    rank0.train()
    with torch.no_grad():
        assert rank0.supervision_step(idx).recursions == cfg.T_recursion
    assert int(rank0.depth_draws) == before


@pytest.mark.parametrize("law", ["poisson", "poisson-lognormal"])
def test_draws_follow_the_configured_law_with_mean_T(law):
    cfg = GPTConfig.preset("tiny", T_recursion=3, depth_sampling=law)
    pmf = cfg.recursion_depths()
    assert sum(pmf.values()) == pytest.approx(1.0, abs=1e-12)
    assert cfg.mean_recursions()[0] == pytest.approx(3.0, abs=0.01)
    n = 4000
    draws = [sample_recursions(cfg, d, s) for d in range(n // 2) for s in range(2)]
    assert min(draws) >= 1 and max(draws) <= 4 * 3
    for r in (1, 2, 3, 4):
        assert draws.count(r) / n == pytest.approx(pmf[r], abs=0.03), r
    # the lognormal law has the heavier tail (Huginn's reason for it)
    if law == "poisson-lognormal":
        poisson = cfg.replace(depth_sampling="poisson").recursion_depths()
        assert sum(pmf[r] for r in range(7, 13)) > sum(poisson[r] for r in range(7, 13))


def graded_pattern(model: RecursiveGPT, idx, tgt) -> tuple[int, list[bool], int]:
    """(recursions, whether each stack application's input needs grad, backward calls)."""
    seen: list[bool] = []
    calls: list[int] = []

    def hook(module, args):
        seen.append(args[0].requires_grad)
        if args[0].requires_grad:
            args[0].register_hook(lambda g: calls.append(1))

    handle = model.stack.register_forward_pre_hook(hook)
    st = model.supervision_step(idx, targets=tgt)
    st.objective.backward()
    handle.remove()
    return st.recursions, seen, len(calls)


@pytest.mark.parametrize("sampling", ["fixed", "poisson"])
def test_exactly_the_last_k_recursions_carry_gradients(tiny_config, sampling):
    cfg = tiny_config(n_layer=1, T_recursion=3, backprop_recursions=2, depth_sampling=sampling)
    model = RecursiveGPT(cfg)
    per = cfg.n_loops + 1
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    depths = set()
    for _ in range(8 if sampling != "fixed" else 1):
        r, seen, calls = graded_pattern(model, idx, idx)
        k = min(2, r)
        assert seen == [False] * ((r - k) * per) + [True] * (k * per)
        assert calls == k * per
        depths.add(r)
    assert len(depths) >= (3 if sampling != "fixed" else 1)


def test_truncated_backprop_gradients_equal_a_reference_by_hand(tiny_config):
    """k = 2 of T = 3: the gradient of a step is that of the recursion written out with the
    first recursion under no_grad and the last two graded; grading one or all three differs."""
    cfg = tiny_config(T_recursion=3, N_sup=1, backprop_recursions=2, zero_init_out=False)
    model = RecursiveGPT(cfg).double()
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    model.supervision_step(idx, targets=tgt).objective.backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}

    def reference(graded: int) -> dict[str, torch.Tensor]:
        model.zero_grad(set_to_none=True)
        x = F.rms_norm(model.tok_emb(idx), (cfg.n_embd,), eps=cfg.norm_eps)
        y, z = model.init_state(x)
        with torch.no_grad():
            for _ in range(cfg.T_recursion - graded):
                y, z = model.latent_recursion(x, y, z)
        for _ in range(graded):
            y, z = model.latent_recursion(x, y, z)
        logits = model.lm_head(model.final_norm(y))
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        F.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
        return {n: p.grad.clone() for n, p in model.named_parameters()}

    ref = reference(2)
    for n in got:
        torch.testing.assert_close(got[n], ref[n], rtol=1e-9, atol=1e-12, msg=n)
    w = "stack.blocks.0.attn.q.weight"
    for other in (1, 3):
        assert not torch.allclose(got[w], reference(other)[w], rtol=1e-3)


def test_training_flops_are_the_expectation_over_the_drawn_depth(tiny_config, per_step_train):
    """FlopCounterMode on real training batches equals the fixed-depth formula at each drawn
    depth, and the config's figure is that formula averaged over the law."""
    base = dict(n_layer=1, n_loops=1, vocab_size=512, sequence_len=64, N_sup=2,
                N_sup_inference=2, backprop_recursions=2)
    cfg = tiny_config(T_recursion=3, depth_sampling="poisson", **base)
    model = RecursiveGPT(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, cfg.sequence_len))

    def at(r: int) -> float:  # one supervision step of r recursions, k graded
        fixed = tiny_config(**{**base, "N_sup": 1, "N_sup_inference": 1, "T_recursion": r,
                               "backprop_recursions": min(2, r)})
        return fixed.flops_per_token(training=True)

    for _ in range(3):
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            y = z = prev = None
            rs = []
            for s in range(cfg.N_sup):
                st = model.supervision_step(idx, y, z, idx, step=s, prev_loss=prev)
                st.objective.backward()
                y, z, prev = st.y, st.z, st.carry
                rs.append(st.recursions)
        measured = counter.get_total_flops() / cfg.sequence_len
        assert measured == pytest.approx(sum(at(r) for r in rs), rel=0.05), rs
    expected = cfg.N_sup * sum(p * at(r) for r, p in cfg.recursion_depths().items())
    assert cfg.flops_per_token(training=True) == pytest.approx(expected, abs=1)  # rounded
    # inference runs the mean depth
    assert cfg.flops_per_token(training=False) == cfg.replace(
        depth_sampling="fixed").flops_per_token(training=False)


def test_causal_with_sampled_depth(tiny_config):
    cfg = tiny_config(vocab_size=len(VOCAB) + (-len(VOCAB)) % 64, sequence_len=24,
                      T_recursion=3, backprop_recursions=2, depth_sampling="poisson-lognormal",
                      zero_init_out=False)
    model = RecursiveGPT(cfg).double()
    assert causal_leak_check(model, 24) < 1e-9
    # the training path (drawn depth): same draw for both inputs, logits <= t unchanged
    idx = torch.randint(1, len(VOCAB), (2, 24))
    other = idx.clone()
    other[:, 13:] = torch.randint(1, len(VOCAB), (2, 11))
    draws = int(model.depth_draws)
    a = model.supervision_step(idx, targets=idx)
    model.depth_draws.fill_(draws)
    b = model.supervision_step(other, targets=other)
    assert a.recursions == b.recursions
    torch.testing.assert_close(a.logits[:, :13], b.logits[:, :13], rtol=0, atol=1e-9)
    assert (a.logits[:, 13:] - b.logits[:, 13:]).abs().max() > 1e-6
