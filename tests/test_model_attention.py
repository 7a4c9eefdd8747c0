"""Attention against a hand-written reference: plain multi-head, GQA, RoPE, KV-cached decoding."""

from __future__ import annotations

import pytest
import torch

from model.layers import Attention, KVCache, apply_rope, rope_tables


def make_attention(tiny_config, n_head: int, n_kv_head: int) -> Attention:
    cfg = tiny_config(n_embd=64, n_head=n_head, n_kv_head=n_kv_head)
    return Attention(cfg).double()


@pytest.mark.parametrize(("n_head", "n_kv_head"), [(4, 4), (4, 2), (4, 1), (8, 2)])
def test_attention_matches_reference(tiny_config, reference_attention, n_head, n_kv_head):
    attn = make_attention(tiny_config, n_head, n_kv_head)
    x = torch.randn(2, 12, 64, dtype=torch.float64)
    cos, sin = rope_tables(12, attn.head_dim, 10000.0)
    out = attn(x, cos, sin)
    torch.testing.assert_close(out, reference_attention(attn, x, cos, sin), rtol=1e-10,
                               atol=1e-10)
    if n_kv_head not in (1, n_head):
        # query head h reads kv head h // group (contiguous groups), not h % n_kv_head
        tiled = reference_attention(attn, x, cos, sin, kv_repeat="tile")
        assert (out - tiled).abs().max() > 1e-3


def test_attention_is_causal(tiny_config):
    attn = make_attention(tiny_config, 4, 2)
    x = torch.randn(1, 10, 64, dtype=torch.float64)
    cos, sin = rope_tables(10, attn.head_dim, 10000.0)
    x2 = x.clone()
    x2[:, 6:] = torch.randn(1, 4, 64, dtype=torch.float64)
    a, b = attn(x, cos, sin), attn(x2, cos, sin)
    torch.testing.assert_close(a[:, :6], b[:, :6], rtol=0, atol=1e-12)
    assert (a[:, 6:] - b[:, 6:]).abs().min() > 0


def test_rope_scores_depend_only_on_relative_position():
    D = 16
    cos, sin = rope_tables(64, D, 10000.0)
    q = torch.randn(1, 1, 1, D, dtype=torch.float64)
    k = torch.randn(1, 1, 1, D, dtype=torch.float64)
    c, s = cos.double(), sin.double()

    def score(i: int, j: int) -> torch.Tensor:
        return (apply_rope(q, c[i:i + 1], s[i:i + 1]) * apply_rope(k, c[j:j + 1], s[j:j + 1])).sum()

    torch.testing.assert_close(score(5, 2), score(40, 37))
    torch.testing.assert_close(score(9, 9), (q * k).sum())  # same position: no rotation left
    assert not torch.allclose(score(5, 2), score(5, 3))
    # a rotation keeps the norm
    torch.testing.assert_close(apply_rope(q, c[7:8], s[7:8]).norm(), q.norm())


@pytest.mark.parametrize("chunks", [[12], [5, 1, 1, 5], [1] * 12, [7, 5]])
def test_kv_cache_matches_full_attention(tiny_config, chunks):
    """Feeding the sequence in chunks through the cache gives the full causal attention."""
    attn = make_attention(tiny_config, 4, 2)
    T = sum(chunks)
    x = torch.randn(2, T, 64, dtype=torch.float64)
    cos, sin = rope_tables(16, attn.head_dim, 10000.0)
    full = attn(x, cos[:T], sin[:T])
    cache = KVCache(1, 2, 2, 16, attn.head_dim, x.device, x.dtype)
    outs, t0 = [], 0
    for n in chunks:
        outs.append(attn(x[:, t0:t0 + n], cos[t0:t0 + n], sin[t0:t0 + n], cache))
        cache.advance(n)
        t0 += n
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-10, atol=1e-10)
