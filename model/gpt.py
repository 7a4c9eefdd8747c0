"""RecursiveGPT: one shared stack of transformer blocks applied many times per token.

Features
- TRM-style latent recursion: z <- stack(z + x + y) n_loops times, then y <- stack(y + z);
  T_recursion recursions per supervision step, the first T-1 without gradients.
- Deep supervision: N_sup steps, each with its own loss on lm_head(final_norm(y)); y and z are
  detached between steps, so each step can be backpropagated as soon as it finishes
  (`supervision_step`), and peak activation memory does not grow with N_sup or T.
- Hierarchical step weights, improvement reward, optional ACT halting head (TRM's Q-head).
- GQA + RoPE attention through scaled_dot_product_attention, SwiGLU MLP, RMSNorm, no biases,
  untied embedding / lm_head, fixed initial states (TRM's buffers) or y0 = x.
- Exact FLOP count (`flops_per_token`), KV-cached generation across the recursion.
No device or distributed logic lives here: the launcher wraps this module with DeepSpeed.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from model.config import GPTConfig
from model.layers import KVCache, RMSNorm, Stack, rope_tables
from model.losses import improvement_penalty, step_weights

StackFn = Callable[..., torch.Tensor]


@dataclass
class StepOutput:
    """One supervision step. y and z are already detached: feed them to the next step."""

    y: torch.Tensor                       # (B, T, n_embd)
    z: torch.Tensor                       # (B, T, n_embd)
    logits: torch.Tensor | None = None    # (B, T, vocab)
    loss: torch.Tensor | None = None      # cross entropy L_s
    objective: torch.Tensor | None = None  # this step's share of the total: w_s·L_s + R_s + H_s
    halt_logits: torch.Tensor | None = None  # (B, T), when halting is on


@dataclass
class ModelOutput:
    logits: torch.Tensor                                   # (B, T, vocab): the last step
    step_logits: list[torch.Tensor] = field(default_factory=list)
    step_losses: list[torch.Tensor] = field(default_factory=list)
    loss: torch.Tensor | None = None                       # the total objective
    halt_steps: int = 0                                    # supervision steps actually run


class InitialState(nn.Module):
    """y0, z0 broadcast over (B, T): fixed random vectors (TRM's H_init, L_init buffers), or
    y0 = x with state_init 'input'. They are not parameters: with T_recursion >= 2 they only
    feed no-grad recursions, so they could never learn. Drawn from their own seeded generator
    (not the global RNG) and kept out of the state dict, so every rank, every resume and every
    export rebuilds exactly the same vectors from the config alone."""

    def __init__(self, cfg: GPTConfig) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        y, z = (nn.init.trunc_normal_(torch.empty(cfg.n_embd), std=1.0, a=-2.0, b=2.0,
                                      generator=g) for _ in range(2))
        if cfg.state_init == "zero":
            y, z = torch.zeros_like(y), torch.zeros_like(z)
        self.register_buffer("z", z, persistent=False)
        self.register_buffer("y", y if cfg.state_init == "fixed" else None, persistent=False)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.z.to(x.dtype).expand_as(x)
        y = x if self.y is None else self.y.to(x.dtype).expand_as(x)
        return y, z


class RecursiveGPT(nn.Module):
    def __init__(self, config: GPTConfig) -> None:
        super().__init__()
        self.config = config
        c = config
        self.tok_emb = nn.Embedding(c.vocab_size, c.n_embd)
        self.stack = Stack(c)
        self.final_norm = RMSNorm(c.n_embd, c.norm_eps)
        self.lm_head = nn.Linear(c.n_embd, c.vocab_size, bias=False)
        self.init_state = InitialState(c) if c.recursion else None
        self.halt_head = nn.Linear(c.n_embd, 1, bias=True) if c.halting else None
        # per-step scale (row 0) and bias (row 1) of the injection; zero: the unconditioned model
        self.step_cond = (nn.Parameter(torch.zeros(2, c.conditioned_steps, c.n_embd))
                          if c.step_conditioning and c.recursion else None)
        cos, sin = rope_tables(c.sequence_len, c.head_dim, c.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)  # (T, head_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.weights = step_weights(c.N_sup, c.supervision_weight_base)
        self.stack_checkpoint: StackFn | None = None
        self.init_weights()

    # ------------------------------------------------------------------ init
    @torch.no_grad()
    def init_weights(self) -> None:
        """
        | parameter                 | init                                       |
        |---------------------------|--------------------------------------------|
        | tok_emb                   | N(0, 1): same scale as the normed states   |
        | q, k, v, gate, up         | N(0, 1/sqrt(n_embd))                       |
        | o, down                   | N(0, 1/sqrt(fan_in)) / sqrt(2·n_layer)     |
        | lm_head                   | N(0, 0.5/sqrt(n_embd))                     |
        | RMSNorm weights           | 1                                          |
        | init_state.y, .z (buffers) | N(0, 1) truncated at ±2, own seed (TRM)   |
        | halt_head                 | weight 0, bias −5 (TRM: start by not halting) |
        """
        c = self.config
        nn.init.normal_(self.tok_emb.weight, std=1.0)
        for block in self.stack.blocks:
            for lin in (block.attn.q, block.attn.k, block.attn.v, block.mlp.gate, block.mlp.up):
                nn.init.normal_(lin.weight, std=c.n_embd ** -0.5)
            for lin in (block.attn.o, block.mlp.down):
                std = lin.in_features ** -0.5 / math.sqrt(2 * c.n_layer)
                if c.zero_init_out:
                    nn.init.zeros_(lin.weight)
                else:
                    nn.init.normal_(lin.weight, std=std)
        nn.init.normal_(self.lm_head.weight, std=0.5 * c.n_embd ** -0.5)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
        if self.step_cond is not None:
            nn.init.zeros_(self.step_cond)
        if self.halt_head is not None:
            nn.init.zeros_(self.halt_head.weight)
            nn.init.constant_(self.halt_head.bias, -5.0)

    def set_activation_checkpointing(self, fn: StackFn | None) -> None:
        """Wrap every graded application of the stack in fn(stack, h, cos, sin), e.g.
        torch.utils.checkpoint or deepspeed.checkpointing.checkpoint. None turns it off."""
        self.stack_checkpoint = fn

    def parameter_groups(self) -> dict[str, list[tuple[str, nn.Parameter]]]:
        """Parameters by kind, for per-group learning rates: matrices of the stack, the
        embedding, the lm_head, and scalars (norms, halting head)."""
        groups: dict[str, list[tuple[str, nn.Parameter]]] = {
            "matrix": [], "embedding": [], "lm_head": [], "scalar": []}
        for name, p in self.named_parameters():
            if name.startswith("tok_emb."):
                groups["embedding"].append((name, p))
            elif name.startswith("lm_head."):
                groups["lm_head"].append((name, p))
            elif name.startswith("stack.") and p.ndim == 2:
                groups["matrix"].append((name, p))
            else:
                groups["scalar"].append((name, p))
        return groups

    # ------------------------------------------------------------------ recursion
    def check_input(self, idx: torch.Tensor, targets: torch.Tensor | None = None) -> None:
        """Refuse a batch the model cannot run, with a message that says what is wrong."""
        c = self.config
        if not isinstance(idx, torch.Tensor) or idx.dtype != torch.long:
            raise ValueError(f"idx must be an int64 tensor, got "
                             f"{getattr(idx, 'dtype', type(idx).__name__)}")
        if idx.dim() != 2 or idx.size(0) == 0 or idx.size(1) == 0:
            raise ValueError(f"idx must have shape (batch, seq) with batch, seq >= 1, "
                             f"got {tuple(idx.shape)}")
        if idx.size(1) > c.sequence_len:
            raise ValueError(f"sequence of {idx.size(1)} tokens is longer than sequence_len "
                             f"({c.sequence_len})")
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= c.vocab_size:
            raise ValueError(f"token ids must be in [0, {c.vocab_size}), got range [{lo}, {hi}]")
        if targets is None:
            return
        if not isinstance(targets, torch.Tensor) or targets.dtype != torch.long:
            raise ValueError(f"targets must be an int64 tensor, got "
                             f"{getattr(targets, 'dtype', type(targets).__name__)}")
        if targets.shape != idx.shape:
            raise ValueError(f"targets shape {tuple(targets.shape)} != idx shape "
                             f"{tuple(idx.shape)}")
        lo, hi = int(targets.min()), int(targets.max())
        if lo < -1 or hi >= c.vocab_size:
            raise ValueError(f"targets must be in [0, {c.vocab_size}) or -1 (ignored), got range "
                             f"[{lo}, {hi}]")

    def apply_stack(self, h: torch.Tensor, pos: int, cache: KVCache | None = None) -> torch.Tensor:
        """One application of the shared stack (n_layer blocks) to h: (B, T, n_embd)."""
        T = h.size(1)
        cos, sin = self.rope_cos[pos:pos + T], self.rope_sin[pos:pos + T]
        if self.stack_checkpoint is not None and torch.is_grad_enabled() and cache is None:
            return self.stack_checkpoint(self.stack, h, cos, sin)
        return self.stack(h, cos, sin, cache)

    def latent_recursion(self, x: torch.Tensor, y: torch.Tensor, z: torch.Tensor, pos: int = 0,
                         cache: KVCache | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """n_loops updates of z from (x, y), then one update of y from z. The stack's own
        residual stream carries the state: update(s, inj) = stack(s + inj), no outer residual."""
        for _ in range(self.config.n_loops):
            z = self.apply_stack(z + x + y, pos, cache)
        y = self.apply_stack(y + z, pos, cache)
        return y, z

    def supervision_step(self, idx: torch.Tensor, y: torch.Tensor | None = None,
                         z: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                         step: int = 0, prev_loss: torch.Tensor | None = None,
                         keep_logits: bool = True, pos: int = 0,
                         cache: KVCache | None = None, detach: bool = True) -> StepOutput:
        """One supervision step: T-1 recursions without gradients, one with, then the head.

        y, z None means the initial state (step 0). With targets, the step's loss and its share
        of the total objective are returned; call objective.backward() before the next step to
        keep peak memory flat. prev_loss is L_{s-1} for the improvement reward.
        detach=False returns y, z still in the graph, so a later step's loss reaches back into
        this one (with T_recursion 1; a no-grad recursion cuts the graph anyway). That breaks
        SPEC section 2 (no gradient crosses supervision steps; memory flat in N_sup): it exists
        for bench/recursion_study.py's --backprop-across-steps only, the trainer never sets it.
        """
        c = self.config
        if step == 0 or cache is not None:
            self.check_input(idx, targets)
        x = self.tok_emb(idx)                                   # (B, T, n_embd)
        if c.input_norm:
            x = F.rms_norm(x, (c.n_embd,), eps=c.norm_eps)
        if not c.recursion:  # the plain GPT: one pass of the stack
            y = z = self.apply_stack(x, pos, cache)
        else:
            if y is None or z is None:
                y, z = self.init_state(x)
            if self.step_cond is not None:
                a, b = self.step_cond[:, min(step, self.step_cond.size(1) - 1)].to(x.dtype)
                x = x * (1 + a) + b
            with torch.no_grad():
                for _ in range(c.T_recursion - 1):
                    y, z = self.latent_recursion(x, y, z, pos, cache)
            y, z = self.latent_recursion(x, y, z, pos, cache)
        logits = at_least_fp32(self.lm_head(self.final_norm(y)))          # (B, T, vocab)
        if c.logit_softcap > 0:
            logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
        halt = at_least_fp32(self.halt_head(y).squeeze(-1)) if self.halt_head is not None else None
        out = StepOutput(y=y.detach() if detach else y, z=z.detach() if detach else z,
                         halt_logits=halt)
        if targets is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
            w = self.weights[step] if step < len(self.weights) else self.weights[-1]
            objective = w * loss + improvement_penalty(loss, prev_loss,
                                                       c.improvement_reward_scale)
            if halt is not None:
                objective = objective + c.halt_loss_weight / c.N_sup * halting_loss(
                    halt, logits, targets)
            out.loss, out.objective = loss, objective
        if keep_logits:
            out.logits = logits
        return out

    # ------------------------------------------------------------------ forward
    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None,
                n_sup: int | None = None) -> ModelOutput:
        """All supervision steps in one graph (for evaluation and reference; the trainer uses
        supervision_step and backpropagates each step as it finishes).

        With targets: N_sup steps and the total objective. Without: N_sup_inference steps,
        stopping early when halting is on and the mean halting probability passes the threshold.
        """
        c = self.config
        n = n_sup or (c.N_sup if targets is not None else c.N_sup_inference)
        out = ModelOutput(logits=torch.empty(0))
        y = z = prev = None
        total = None
        for s in range(n):
            st = self.supervision_step(idx, y, z, targets, step=s, prev_loss=prev)
            y, z = st.y, st.z
            out.step_logits.append(st.logits)
            out.halt_steps = s + 1
            if st.loss is not None:
                out.step_losses.append(st.loss)
                total = st.objective if total is None else total + st.objective
                prev = st.loss
            if targets is None and should_halt(st.halt_logits, c.halt_threshold):
                break
        out.logits = out.step_logits[-1]
        out.loss = total
        return out

    def flops_per_token(self, training: bool = True) -> int:
        """Exact matmul FLOPs per token (see GPTConfig.flops_per_token), used for MFU."""
        return self.config.flops_per_token(training=training)

    # ------------------------------------------------------------------ generation
    @torch.no_grad()
    def generate(self, idx: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, use_cache: bool = True,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Sample max_new_tokens after idx (B, T). temperature 0 is greedy.

        With use_cache (and halting off) every block application of the recursion keeps its
        keys/values, so a new token runs the recursion on one position (see KVCache). With
        halting on, the number of steps differs per token, so earlier positions would lack the
        keys of later steps: generation then recomputes the prefix for each token.
        """
        c = self.config
        self.check_input(idx)
        if max_new_tokens < 0 or temperature < 0 or (top_k is not None and top_k < 1):
            raise ValueError(f"need max_new_tokens >= 0, temperature >= 0 and top_k >= 1 or None,"
                             f" got {max_new_tokens}, {temperature}, {top_k}")
        cache_ok = use_cache and self.halt_head is None
        cache, fed = None, 0  # fed: tokens of idx already in the cache
        self.last_halt_steps: list[int] = []
        for _ in range(max_new_tokens):
            if not cache_ok:  # the whole window (the newest sequence_len tokens) every time
                logits, steps = self.last_position_logits(idx[:, -c.sequence_len:])
                self.last_halt_steps.append(steps)
            else:
                if cache is None or cache.pos + (idx.size(1) - fed) > cache.max_len:
                    # (re)start: prefill on the newest half window so decoding can go on
                    keep = idx.size(1) if cache is None else max(1, c.sequence_len // 2)
                    n_apps = c.applications_per_recursion * c.T_recursion * c.N_sup_inference
                    cache = KVCache(n_apps, idx.size(0), c.n_kv_head, c.sequence_len,
                                    c.head_dim, idx.device, self.tok_emb.weight.dtype)
                    fed = idx.size(1) - keep
                new = idx[:, fed:]
                logits = self.cached_step(new, cache)[:, -1]
                fed = idx.size(1)
            logits = logits / max(temperature, 1e-8)
            if top_k is not None:
                kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
                logits = logits.masked_fill(logits < kth, float("-inf"))
            if temperature == 0:
                nxt = logits.argmax(-1, keepdim=True)
            else:
                nxt = torch.multinomial(F.softmax(logits, -1), 1, generator=generator)
            idx = torch.cat([idx, nxt], dim=1)
        return idx

    def last_position_logits(self, idx: torch.Tensor) -> tuple[torch.Tensor, int]:
        """The inference recursion of forward() (halting included), keeping only the last
        position's logits rather than every step's (B, T, vocab). Returns them and the steps run."""
        c = self.config
        y = z = None
        for s in range(c.N_sup_inference):
            st = self.supervision_step(idx, y, z, step=s)
            y, z = st.y, st.z
            if should_halt(st.halt_logits, c.halt_threshold):
                break
        return st.logits[:, -1], s + 1

    def cached_step(self, new: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the whole inference recursion on the new positions only; returns their logits."""
        y = z = None
        pos = cache.pos
        for s in range(self.config.N_sup_inference):
            st = self.supervision_step(new, y, z, step=s, pos=pos, cache=cache)
            y, z = st.y, st.z
        cache.advance(new.size(1))
        return st.logits


def halting_loss(halt_logits: torch.Tensor, logits: torch.Tensor,
                 targets: torch.Tensor) -> torch.Tensor:
    """BCE of the halting head against 'this step's argmax is right' (TRM's Q-head target)."""
    valid = targets != -1
    correct = (logits.argmax(-1) == targets).to(halt_logits.dtype)
    bce = F.binary_cross_entropy_with_logits(halt_logits, correct, reduction="none")
    return (bce * valid).sum() / valid.sum().clamp(min=1)


def at_least_fp32(t: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 -> fp32 for the losses; fp32 and fp64 stay as they are."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def should_halt(halt_logits: torch.Tensor | None, threshold: float) -> bool:
    return halt_logits is not None and torch.sigmoid(halt_logits).mean().item() > threshold
