"""Building blocks of the shared stack: RMSNorm, RoPE, GQA attention, SwiGLU MLP, Block, KV cache.

No biases anywhere. Attention is torch's scaled_dot_product_attention (flash/efficient kernels
where the device has them) with native GQA.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GPTConfig


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rope_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (seq_len, head_dim // 2), in fp32."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate pairs (first half, second half) of the head dim.
    x: (B, H, T, D); cos, sin: (T, D/2)."""
    d = x.size(-1) // 2
    x1, x2 = x[..., :d], x[..., d:]
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class KVCache:
    """Keys/values of every block application of the recursion, for incremental decoding.

    Attention is causal and every other op is position-wise, so the keys and values a block
    application computed for positions < t never change when position t arrives: each application
    (step s, recursion r, loop l, layer i) gets its own slot, filled once per position. A new token
    then costs effective_depth block applications on one position instead of on the whole prefix.
    Memory: effective_depth · 2 · T · n_kv_head · head_dim values per sequence.
    """

    def __init__(self, n_apps: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device: torch.device, dtype: torch.dtype) -> None:
        shape = (n_apps, batch, n_kv_head, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)
        self.max_len = max_len
        self.pos = 0  # positions already cached (for every application)
        self.app = 0  # the application running now

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this application's new keys/values (B, H_kv, t, D); return the whole prefix."""
        i, t0, t1 = self.app, self.pos, self.pos + k.size(2)
        self.k[i, :, :, t0:t1] = k
        self.v[i, :, :, t0:t1] = v
        self.app += 1
        return self.k[i, :, :, :t1], self.v[i, :, :, :t1]

    def advance(self, t_new: int) -> None:
        """All applications ran for the new positions: move on."""
        self.pos += t_new
        self.app = 0


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        kv_dim = cfg.n_kv_head * cfg.head_dim
        self.q = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.k = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.v = nn.Linear(cfg.n_embd, kv_dim, bias=False)
        self.o = nn.Linear(cfg.n_embd, cfg.n_embd, bias=False)
        self.qk_norm = cfg.qk_norm
        self.eps = cfg.norm_eps

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        B, T, C = x.shape
        q = self.q(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)     # (B, H, T, D)
        k = self.k(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        v = self.v(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)  # (B, Hkv, T, D)
        if self.qk_norm:  # bounded attention logits whatever the state's scale
            q = F.rms_norm(q, (self.head_dim,), eps=self.eps)
            k = F.rms_norm(k, (self.head_dim,), eps=self.eps)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        gqa = self.n_kv_head != self.n_head
        if cache is None or cache.pos == 0:
            if cache is not None:
                cache.update(k, v)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
        else:
            t0 = cache.pos
            k, v = cache.update(k, v)  # (B, Hkv, t0 + T, D)
            if T == 1:  # the newest position sees the whole prefix: no mask needed
                y = F.scaled_dot_product_attention(q, k, v, enable_gqa=gqa)
            else:  # query i (absolute t0 + i) sees keys <= t0 + i
                mask = torch.ones(T, t0 + T, dtype=torch.bool, device=x.device).tril(t0)
                y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=gqa)
        return self.o(y.transpose(1, 2).reshape(B, T, C))


class SwiGLU(nn.Module):
    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.gate = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.up = nn.Linear(cfg.n_embd, cfg.mlp_hidden, bias=False)
        self.down = nn.Linear(cfg.mlp_hidden, cfg.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(F.silu(self.gate(x)) * self.up(x))


class Block(nn.Module):
    """post: h = norm(h + attn(h)); h = norm(h + mlp(h))   (TRM)
    pre:  h = h + attn(norm(h));  h = h + mlp(norm(h))   (GPT-2/Llama; the stack adds a final norm)
    """

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.post = cfg.norm_style == "post"
        self.attn_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = SwiGLU(cfg)

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        if self.post:
            h = self.attn_norm(h + self.attn(h, cos, sin, cache))
            return self.mlp_norm(h + self.mlp(h))
        h = h + self.attn(self.attn_norm(h), cos, sin, cache)
        return h + self.mlp(self.mlp_norm(h))


class Stack(nn.Module):
    """The n_layer shared blocks; one call is one application of the whole stack."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.out_norm = RMSNorm(cfg.n_embd, cfg.norm_eps) if cfg.norm_style == "pre" else None

    def forward(self, h: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: KVCache | None = None) -> torch.Tensor:
        for block in self.blocks:
            h = block(h, cos, sin, cache)
        return self.out_norm(h) if self.out_norm is not None else h
