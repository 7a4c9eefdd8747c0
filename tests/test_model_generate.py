"""Generation (KV-cached and not) and adaptive computation (the halting head)."""

from __future__ import annotations

import math

import pytest
import torch

from model import RecursiveGPT
from model.layers import KVCache

SEQ = 24


def build(tiny_config, **overrides) -> RecursiveGPT:
    # float64 so that greedy argmax never flips on a rounding-level tie between the two paths
    return RecursiveGPT(tiny_config(sequence_len=SEQ, **overrides)).double().eval()


def greedy_reference(model: RecursiveGPT, idx: torch.Tensor, n: int, window: str) -> torch.Tensor:
    """Greedy decoding with a full forward per token over the context each path is meant to use.

    'sliding': the newest sequence_len tokens (the uncached path).
    'restart': the KV cache holds at most sequence_len positions; when it is full it restarts
    from the newest sequence_len // 2 tokens and grows again (RoPE positions restart at 0).
    """
    start = 0
    with torch.no_grad():
        for _ in range(n):
            if window == "sliding":
                ctx = idx[:, -SEQ:]
            else:
                if idx.size(1) - start > SEQ:
                    start = idx.size(1) - SEQ // 2
                ctx = idx[:, start:]
            nxt = model(ctx).logits[:, -1].argmax(-1, keepdim=True)
            idx = torch.cat([idx, nxt], 1)
    return idx


@pytest.mark.parametrize("overrides", [{}, {"norm_style": "pre", "state_init": "input"}])
def test_cached_greedy_equals_uncached_within_sequence_len(tiny_config, overrides):
    model = build(tiny_config, **overrides)
    prompt = torch.randint(0, 64, (2, 5))
    n = SEQ - 5  # up to exactly sequence_len tokens
    cached = model.generate(prompt, n, temperature=0, use_cache=True)
    uncached = model.generate(prompt, n, temperature=0, use_cache=False)
    assert cached.shape == (2, SEQ)
    assert torch.equal(cached[:, :5], prompt)
    assert torch.equal(cached, uncached)
    assert torch.equal(cached, greedy_reference(model, prompt, n, "sliding"))
    assert len(set(cached[0, 5:].tolist())) > 1  # not a degenerate constant stream


def test_generation_past_sequence_len(tiny_config):
    """Past sequence_len the two paths use different windows (read generate()): uncached slides a
    full window each token; the cache re-prefills from the newest half window. Each path must
    equal a full forward over its own window."""
    model = build(tiny_config, N_sup_inference=2)  # fewer steps: ~150 full forwards follow
    prompt = torch.randint(0, 64, (1, 5))
    n = 2 * SEQ  # two cache restarts
    cached = model.generate(prompt, n, temperature=0, use_cache=True)
    uncached = model.generate(prompt, n, temperature=0, use_cache=False)
    assert cached.shape == uncached.shape == (1, 5 + n)
    assert torch.equal(cached[:, :SEQ], uncached[:, :SEQ])
    assert torch.equal(uncached, greedy_reference(model, prompt, n, "sliding"))
    assert torch.equal(cached, greedy_reference(model, prompt, n, "restart"))


def test_cached_logits_equal_full_forward(tiny_config):
    model = build(tiny_config, T_recursion=2, N_sup_inference=3)
    c = model.config
    idx = torch.randint(0, 64, (2, 20))
    n_apps = c.applications_per_recursion * c.T_recursion * c.N_sup_inference
    cache = KVCache(n_apps, 2, c.n_kv_head, SEQ, c.head_dim, idx.device, torch.float64)
    with torch.no_grad():
        full = model(idx).logits
        pieces = [model.cached_step(idx[:, a:b], cache) for a, b in [(0, 9), (9, 10), (10, 14),
                                                                      (14, 20)]]
    assert cache.pos == 20
    torch.testing.assert_close(torch.cat(pieces, 1), full, rtol=1e-9, atol=1e-9)


def test_top_k_one_equals_greedy_and_sampling_is_reproducible(tiny_config):
    model = build(tiny_config)
    prompt = torch.randint(0, 64, (2, 4))
    greedy = model.generate(prompt, 10, temperature=0)
    top1 = model.generate(prompt, 10, temperature=1.0, top_k=1,
                          generator=torch.Generator().manual_seed(3))
    assert torch.equal(top1, greedy)

    def sample(seed: int, use_cache: bool) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return model.generate(prompt, 10, temperature=1.5, top_k=20, use_cache=use_cache,
                              generator=g)

    assert torch.equal(sample(7, True), sample(7, True))
    assert torch.equal(sample(7, True), sample(7, False))
    assert not torch.equal(sample(7, True), sample(8, True))
    assert not torch.equal(sample(7, True), greedy)


def test_top_k_restricts_the_candidates(tiny_config):
    model = build(tiny_config)
    prompt = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        allowed = set(model(prompt).logits[0, -1].topk(3).indices.tolist())
    g = torch.Generator().manual_seed(0)
    firsts = {model.generate(prompt, 1, temperature=5.0, top_k=3, generator=g)[0, -1].item()
              for _ in range(30)}
    assert firsts <= allowed and len(firsts) > 1


# ------------------------------------------------------------------------------------- ACT
def test_halting_head_init(tiny_config):
    model = RecursiveGPT(tiny_config(halting=True))
    assert torch.all(model.halt_head.bias == -5.0)
    assert torch.all(model.halt_head.weight == 0.0)
    assert RecursiveGPT(tiny_config()).halt_head is None


def test_forward_without_targets_runs_all_steps_until_halting(tiny_config):
    model = RecursiveGPT(tiny_config(halting=True, N_sup=3, N_sup_inference=5))
    idx = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        out = model(idx)
        assert out.halt_steps == 5 and len(out.step_logits) == 5  # p = sigmoid(-5): never
        model.halt_head.bias.fill_(10.0)
        out = model(idx)
        assert out.halt_steps == 1 and len(out.step_logits) == 1
        assert out.logits is out.step_logits[0]
        # training never stops early: every supervision step has a loss
        trained = model(idx, torch.randint(0, 64, (2, 10)))
        assert trained.halt_steps == 3 and len(trained.step_losses) == 3


def test_halting_threshold(tiny_config):
    p = 0.6  # weight 0: the halting probability is sigmoid(bias) everywhere
    idx = torch.randint(0, 64, (1, 8))
    for threshold, steps in [(0.5, 1), (0.7, 4)]:
        model = RecursiveGPT(tiny_config(halting=True, halt_threshold=threshold))
        with torch.no_grad():
            model.halt_head.bias.fill_(math.log(p / (1 - p)))
            assert model(idx).halt_steps == steps


def test_halting_model_generates_and_reports_steps(tiny_config):
    model = build(tiny_config, halting=True)
    prompt = torch.randint(0, 64, (2, 4))
    out = model.generate(prompt, 6, temperature=0, use_cache=True)  # halting: no cache
    assert out.shape == (2, 10)
    assert model.last_halt_steps == [model.config.N_sup_inference] * 6
    assert torch.equal(out, greedy_reference(model, prompt, 6, "sliding"))
    with torch.no_grad():
        model.halt_head.bias.fill_(10.0)
    model.generate(prompt, 3, temperature=0)
    assert model.last_halt_steps == [1, 1, 1]
