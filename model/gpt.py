"""RecursiveGPT: one shared stack of transformer blocks applied many times per token.

Features
- TRM-style latent recursion: z <- stack(z + x + y) n_loops times, then y <- stack(y + z);
  T_recursion recursions per supervision step, all but the last backprop_recursions (1) without
  gradients.
- Deep supervision: N_sup steps, each with its own loss on lm_head(final_norm(y)); y and z are
  detached between steps, so each step can be backpropagated as soon as it finishes
  (`supervision_step`), and peak activation memory does not grow with N_sup or T.
- Hierarchical step weights, improvement reward, optional ACT halting head (TRM's Q-head).
- Optional sampled recursion depth per training batch with backprop through the last k
  recursions (Huginn, Parcae), and optional learned exit distribution over supervision steps
  (Ouro) in place of the step weights; both keep each step's backward right after its forward.
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

from model.config import LOGNORMAL_SIGMA, MAX_DEPTH_FACTOR, GPTConfig
from model.layers import KVCache, RMSNorm, Stack, rope_tables
from model.losses import improvement_penalty, step_weights

StackFn = Callable[..., torch.Tensor]


@dataclass
class StepCarry:
    """What a supervision step hands the next one besides y and z, all detached: its loss (the
    improvement reward's L_{s-1}) and, with exit_gate, the running exit state per token. Flat in
    N_sup: two (B, T) tensors and one (B, T, n_embd), whatever the number of steps."""

    loss: torch.Tensor | None = None          # L_s, detached
    log_stay: torch.Tensor | None = None      # (B, T) log Π_{j<=s}(1 − λ_j): mass not yet exited
    gate_sum: torch.Tensor | None = None      # (B, T, n_embd) Σ_{j<=s} λ_j·sg(y_j)
    gate_count: torch.Tensor | None = None    # (B, T) Σ_{j<=s} λ_j (the bias's share)


@dataclass
class StepOutput:
    """One supervision step. y and z are already detached: feed them to the next step, and
    carry as the next step's prev_loss."""

    y: torch.Tensor                       # (B, T, n_embd)
    z: torch.Tensor                       # (B, T, n_embd)
    logits: torch.Tensor | None = None    # (B, T, vocab)
    loss: torch.Tensor | None = None      # cross entropy L_s
    objective: torch.Tensor | None = None  # this step's share of the total: w_s·L_s + R_s + H_s
    halt_logits: torch.Tensor | None = None  # (B, T), when halting is on
    carry: StepCarry | None = None        # the next step's prev_loss (with targets)
    recursions: int = 0                   # latent recursions this step ran
    exit_prob: torch.Tensor | None = None  # (B, T) p(exit at this step), with exit_gate


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
        # Ouro's exit gate on sg(y); w = b = 0 plus the fixed offsets: uniform exit at init
        self.exit_gate = nn.Linear(c.n_embd, 1, bias=True) if c.exit_gate else None
        self.exit_offsets = [-math.log(c.N_sup - 1 - s) for s in range(c.N_sup - 1)]
        # training batches drawn so far (depth_sampling): in the state dict, so a resume draws on
        self.register_buffer("depth_draws", torch.zeros((), dtype=torch.long)
                             if c.depth_sampling != "fixed" else None)
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
        | exit_gate                 | weight 0, bias 0 (uniform exit, by the offsets) |
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
        if self.exit_gate is not None:
            nn.init.zeros_(self.exit_gate.weight)
            nn.init.zeros_(self.exit_gate.bias)

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

    def recursions(self, step: int, cache: KVCache | None = None) -> tuple[int, int]:
        """(recursions, graded ones) for this supervision step. Training (train mode, gradients
        on) with depth_sampling draws the depth from (batch counter, step), the counter moving
        on at step 0; everything else runs T_recursion. The last backprop_recursions of them
        carry gradients."""
        c = self.config
        n = c.T_recursion
        if (self.depth_draws is not None and cache is None and self.training
                and torch.is_grad_enabled()):
            if step == 0:
                self.depth_draws += 1
            n = sample_recursions(c, int(self.depth_draws), step)
        return n, min(c.backprop_recursions, n)

    def supervision_step(self, idx: torch.Tensor, y: torch.Tensor | None = None,
                         z: torch.Tensor | None = None, targets: torch.Tensor | None = None,
                         step: int = 0, prev_loss: torch.Tensor | StepCarry | None = None,
                         keep_logits: bool = True, pos: int = 0,
                         cache: KVCache | None = None, detach: bool = True) -> StepOutput:
        """One supervision step: T-k recursions without gradients, k with (k =
        backprop_recursions, 1 by default; T drawn per batch with depth_sampling), then the head.

        y, z None means the initial state (step 0). With targets, the step's loss and its share
        of the total objective are returned; call objective.backward() before the next step to
        keep peak memory flat. prev_loss is the previous step's carry (StepOutput.carry), or
        just L_{s-1} for the improvement reward; with exit_gate the carry is required.
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
            n_rec, n_graded = self.recursions(step, cache)
            with torch.no_grad():
                for _ in range(n_rec - n_graded):
                    y, z = self.latent_recursion(x, y, z, pos, cache)
            for _ in range(n_graded):
                y, z = self.latent_recursion(x, y, z, pos, cache)
        logits = at_least_fp32(self.lm_head(self.final_norm(y)))          # (B, T, vocab)
        if c.logit_softcap > 0:
            logits = c.logit_softcap * torch.tanh(logits / c.logit_softcap)
        halt = at_least_fp32(self.halt_head(y).squeeze(-1)) if self.halt_head is not None else None
        out = StepOutput(y=y.detach() if detach else y, z=z.detach() if detach else z,
                         halt_logits=halt, recursions=n_rec if c.recursion else 1)
        carry = prev_loss if isinstance(prev_loss, StepCarry) else StepCarry(loss=prev_loss)
        known = step == 0 or step >= c.N_sup or carry.log_stay is not None
        if self.exit_gate is not None and not known and targets is not None:
            raise ValueError("exit_gate: pass the previous step's StepOutput.carry as "
                             "prev_loss (it holds the running exit state)")
        if self.exit_gate is not None and known:
            out.exit_prob, out.carry, gate = self.exit_state(y.detach(), step, carry)
        if targets is not None:
            if self.exit_gate is None:
                loss = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1)
                w = self.weights[step] if step < len(self.weights) else self.weights[-1]
                objective = w * loss + improvement_penalty(loss, carry.loss,
                                                           c.improvement_reward_scale)
                out.carry = StepCarry(loss=loss.detach())
            else:
                loss, objective = exit_objective(logits, targets, out.exit_prob, gate,
                                                 c.exit_entropy_beta)
                out.carry.loss = loss.detach()
            if halt is not None:
                objective = objective + c.halt_loss_weight / c.N_sup * halting_loss(
                    halt, logits, targets)
            out.loss, out.objective = loss, objective
        if keep_logits:
            out.logits = logits
        return out

    def exit_state(self, y: torch.Tensor, step: int, carry: StepCarry):
        """The exit gate at this step, on y (detached). Returns p_s (B, T, detached), the carry
        for the next step, and (log λ_s, the earlier gates' share) with gradients into the gate
        for exit_objective. Steps past N_sup (evaluation beyond the trained steps) exit nothing.

        Why a running sum, not the earlier gates' graphs: d log p_s / dθ = (1 − λ_s)·[y_s, 1] −
        Σ_{j<s} λ_j·[y_j, 1] for the affine gate θ = (w, b), and the sum is known by step s. So
        w·Σ λ_j y_j + b·Σ λ_j (sums detached) carries the earlier gates' gradient into this
        step's own backward, and the carry stays the same size whatever N_sup is."""
        c = self.config
        B, T = y.shape[:2]
        f = torch.promote_types(y.dtype, torch.float32)  # gate arithmetic in fp32 or better
        zero = y.new_zeros(B, T, dtype=f)
        log_stay = zero if step == 0 else carry.log_stay
        if step >= c.N_sup:
            return zero, StepCarry(log_stay=log_stay, gate_sum=carry.gate_sum,
                                   gate_count=carry.gate_count), None
        w, b = self.exit_gate.weight[0].to(f), self.exit_gate.bias[0].to(f)
        yf = y.to(f)
        earlier = zero if step == 0 else carry.gate_sum @ w + carry.gate_count * b   # (B, T)
        if step == c.N_sup - 1:  # the last step takes the mass that has not exited
            log_lam, nxt = torch.zeros_like(zero), StepCarry()
        else:
            a = yf @ w + b + self.exit_offsets[step]                                  # (B, T)
            log_lam = F.logsigmoid(a)
            lam = torch.sigmoid(a).detach()
            nxt = StepCarry(
                log_stay=log_stay + F.logsigmoid(-a).detach(),
                gate_sum=lam.unsqueeze(-1) * yf + (0 if step == 0 else carry.gate_sum),
                gate_count=lam + (0 if step == 0 else carry.gate_count))
        log_p = (log_stay + log_lam).detach()
        return log_p.exp(), nxt, (log_lam, earlier, log_p)

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
            prev = st.carry
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
        y = z = prev = None
        for s in range(c.N_sup_inference):
            st = self.supervision_step(idx, y, z, step=s, prev_loss=prev)
            y, z, prev = st.y, st.z, st.carry
            if should_halt(st.halt_logits, c.halt_threshold):
                break
        return st.logits[:, -1], s + 1

    def cached_step(self, new: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """Run the whole inference recursion on the new positions only; returns their logits."""
        y = z = prev = None
        pos = cache.pos
        for s in range(self.config.N_sup_inference):
            st = self.supervision_step(new, y, z, step=s, prev_loss=prev, pos=pos, cache=cache)
            y, z, prev = st.y, st.z, st.carry
        cache.advance(new.size(1))
        return st.logits


def sample_recursions(cfg: GPTConfig, draw: int, step: int) -> int:
    """Recursions of supervision step `step` in training batch `draw` (depth_sampling): a pure
    function of its arguments (its own seeded generator, not the global RNG), so every rank
    that has seen the same number of batches draws the same depth. Mean T_recursion, >= 1."""
    g = torch.Generator().manual_seed(1_000_003 * draw + step)
    lam = torch.tensor([cfg.T_recursion - 1.0], dtype=torch.float64)
    if cfg.depth_sampling == "poisson-lognormal":
        sig = LOGNORMAL_SIGMA
        tau = torch.normal(math.log(cfg.T_recursion - 1) - sig ** 2 / 2, sig, (1,), generator=g,
                           dtype=torch.float64)
        lam = tau.exp()
    r = 1 + int(torch.poisson(lam, generator=g).item())
    return min(r, MAX_DEPTH_FACTOR * cfg.T_recursion)


def exit_objective(logits: torch.Tensor, targets: torch.Tensor, p: torch.Tensor,
                   gate: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None,
                   beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(L_s, this step's share of Σ_s p_s·L_s − β·H(p)), averaged over scored tokens.

    The value is mean(p_s·ℓ_s + β·p_s·log p_s). Gradients: the LM gets sg(p_s)·∇ℓ_s; the gate
    gets c_s·p_s·∇log p_s with c_s = sg(ℓ_s + β(log p_s + 1)) (d(pℓ + βp log p) = c·dp), where
    ∇log p_s = ∇log λ_s − ∇(w·Σλ_j y_j + b·Σλ_j) (exit_state). Summed over the steps, this is the
    gradient of one backward of the whole objective (tests/test_model_exit.py)."""
    valid = targets != -1
    n = valid.sum().clamp(min=1)
    ce = F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-1,
                         reduction="none").view_as(targets)                          # (B, T)
    loss = (ce * valid).sum() / n
    if gate is None:  # past the trained steps: no exit mass, no objective
        return loss, loss * 0.0
    log_lam, earlier, log_p = gate
    c = (ce + beta * (log_p + 1)).detach()
    surrogate = (c * p) * (log_lam - earlier)          # gradient only, into the gate
    per_token = p * ce + beta * p * log_p + surrogate - surrogate.detach()
    return loss, (per_token * valid).sum() / n


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
