"""GPTConfig: the recursive GPT's shape, recursion and objective, with presets and derived figures.

Everything here is plain Python (no tensors), so a config can be validated, described and costed
(parameters, depths, FLOPs per token) on any machine before a model is built or a node provisioned.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, Literal

# Model shapes of SPEC section 3. B and C use 16 heads: 1024 is not divisible by the seeds' 12.
PRESETS: dict[str, dict[str, Any]] = {
    # tiny: CPU and tests. Sequence 256 and the vocabulary of the shipped Shakespeare tokenizer.
    "tiny": dict(n_layer=2, n_embd=128, n_head=4, n_kv_head=2, n_loops=2, T_recursion=2,
                 N_sup=4, N_sup_inference=4, sequence_len=256, vocab_size=4096),
    "A": dict(n_layer=12, n_embd=768, n_head=12, n_kv_head=4, n_loops=3, T_recursion=2,
              N_sup=8, N_sup_inference=8),
    "B": dict(n_layer=16, n_embd=1024, n_head=16, n_kv_head=4, n_loops=4, T_recursion=2,
              N_sup=8, N_sup_inference=8),
    "C": dict(n_layer=20, n_embd=1024, n_head=16, n_kv_head=4, n_loops=4, T_recursion=2,
              N_sup=12, N_sup_inference=12),
    "D": dict(n_layer=24, n_embd=1536, n_head=16, n_kv_head=4, n_loops=4, T_recursion=2,
              N_sup=12, N_sup_inference=12, sequence_len=2048),
}


MAX_DEPTH_FACTOR = 4
"""depth_sampling: a drawn depth above MAX_DEPTH_FACTOR·T_recursion is cut to it (bounds the
worst batch's time; the mass cut off is ~1e-4 or less for T >= 2)."""
LOGNORMAL_SIGMA = 0.5
"""σ of log λ for depth_sampling 'poisson-lognormal' (Huginn's value)."""


@dataclass
class GPTConfig:
    """Shape, recursion and training objective of a RecursiveGPT."""

    vocab_size: int = 50304
    """Rows of the embedding and lm_head. Padded up to a multiple of 64 (the tokenizer's own
    vocabulary may be smaller; the extra rows are never targets)."""
    sequence_len: int = 1024
    """Longest input the model accepts (RoPE tables are built for it)."""
    n_layer: int = 12
    """Blocks in the shared stack; one application of the stack runs all of them."""
    n_embd: int = 768
    """Width of x, y, z and the residual stream."""
    n_head: int = 12
    """Query heads; must divide n_embd."""
    n_kv_head: int = 4
    """Key/value heads (GQA); must divide n_head. n_kv_head == n_head is plain multi-head."""
    mlp_multiple_of: int = 64
    """SwiGLU hidden width is 8/3 * n_embd rounded up to a multiple of this."""
    n_loops: int = 3
    """z-updates per latent recursion (TRM's n): z <- stack(z + x + y), n_loops times."""
    T_recursion: int = 2
    """Latent recursions per supervision step; the first T-1 run without gradients."""
    N_sup: int = 8
    """Supervision steps per training batch (deep supervision); states are detached between."""
    N_sup_inference: int = 8
    """Supervision steps at inference (upper bound when halting is on)."""
    norm_style: Literal["post", "pre"] = "pre"
    """'pre' (default): h = h + f(RMSNorm(h)) with an RMSNorm on the stack's output. 'post': TRM's
    blocks h = RMSNorm(h + f(h)). Both keep the state's magnitude bounded over thousands of
    applications; post-norm collapses to the unigram solution at the learning rates a small LM
    needs (tiny at lr 3e-3: every step's loss equal at the unigram level), pre-norm does not."""
    state_init: Literal["fixed", "input", "zero"] = "fixed"
    """'fixed': y0, z0 are fixed random vectors broadcast over batch and sequence (TRM's H_init,
    L_init buffers; with T_recursion >= 2 they only feed no-grad recursions, so a learned
    version would never receive a gradient). 'input': y0 = x (token embeddings), z0 fixed.
    'zero': y0 = z0 = 0, so step 1 starts from x alone (no constant vector in the stream that
    dilutes the token signal every position shares). None is a parameter."""
    recursion: bool = True
    """False: the plain GPT of the same parameters (one pass of the stack on x, one supervision
    step, no no-grad passes) - the baseline every recursion claim is measured against. It sets
    n_loops, T_recursion, N_sup and N_sup_inference to 1."""
    input_norm: bool = True
    """RMSNorm (no weights) on the token embeddings, so the injected x keeps the unit RMS of the
    states it is added to in z + x + y. Without it the embedding grows in training (tiny: RMS 1
    -> 9.7 in 150 steps) and drowns y and z: each step then barely depends on its state."""
    qk_norm: bool = True
    """RMSNorm (no weights) on each head's queries and keys before RoPE: bounded attention
    logits at high learning rates (nanochat, OLMo 2)."""
    zero_init_out: bool = True
    """Start the attention and MLP output projections at zero: each block starts as the
    identity on its residual stream (nanochat)."""
    logit_softcap: float = 15.0
    """logits = cap·tanh(logits/cap) when > 0 (nanochat uses 15); 0 disables it."""
    rope_theta: float = 10000.0
    """RoPE base."""
    norm_eps: float = 1e-6
    """RMSNorm epsilon."""
    supervision_weight_base: float = 5.0
    """Hierarchical step weights w_s ∝ base ** ((s-1)/(N_sup-1)), normalised to sum to 1."""
    improvement_reward_scale: float = 0.1
    """Scale of R = Σ_{s≥2} relu(L_s − stopgrad(L_{s−1})); 0 disables it."""
    step_conditioning: bool = False
    """Per-step conditioning of the injection (MoR's recursion encoding, UT's timestep signal):
    supervision step s injects x·(1 + a_s) + b_s instead of x, with learned a_s, b_s (zero at
    init, so the model starts as without it; steps past the table use its last row). It breaks
    the 'same map every step' symmetry. Off until measured to help (bench/ABLATIONS.md)."""
    depth_sampling: Literal["fixed", "poisson", "poisson-lognormal"] = "fixed"
    """Recursions per supervision step in training (Huginn, Parcae). 'fixed': T_recursion.
    'poisson': 1 + Poisson(T_recursion - 1), drawn per training batch and supervision step.
    'poisson-lognormal': 1 + Poisson(λ) with log λ ~ N(log(T-1) - σ²/2, σ), σ = 0.5 (Huginn's
    heavier tail). Both have mean T_recursion, at least 1, and are capped at
    4·T_recursion. The draw is a function of a batch counter kept in the model's state dict
    (the buffer depth_draws) and the step index, never of global RNG state, so every
    data-parallel rank and every resume draws the same depths. Evaluation, inference and
    generation use T_recursion. Needs T_recursion >= 2. Off until measured to help."""
    backprop_recursions: int = 1
    """Recursions per supervision step that carry gradients: the last k of the step (Huginn's
    truncated backprop; 1 is TRM's). With depth_sampling, min(k, drawn depth). 1 <= k <=
    T_recursion."""
    exit_gate: bool = False
    """Ouro's learned exit distribution instead of the hand-set step weights and the improvement
    reward (both then unused): a gate λ_s = σ(w·sg(y_s) + b + o_s) per token and step, p(exit
    at s) = λ_s·Π_{j<s}(1-λ_j), the last step takes the remaining mass; the objective is
    Σ_s p_s·L_s − β·H(p) per scored token. o_s makes p uniform at init (w = b = 0). Each
    step's backward still runs right after its forward (the gate's gradient is split per step,
    model.gpt.exit_objective); exact in update_mode accumulate, while per_step applies the
    earlier steps' share with the gate as updated since. Evaluation runs every step (the gate
    does not stop inference early). Needs N_sup >= 2. Off until measured to help."""
    exit_entropy_beta: float = 0.05
    """β of the exit distribution's entropy bonus (exit_gate): keeps the gate from collapsing
    onto one step (Ouro's uniform prior)."""
    halting: bool = False
    """Adaptive computation: a halting head on y predicts whether the step's argmax is right."""
    halt_loss_weight: float = 0.5
    """Weight of the halting head's BCE loss (averaged over supervision steps)."""
    halt_threshold: float = 0.5
    """At inference, stop once the mean halting probability passes this."""

    def __post_init__(self) -> None:
        if self.recursion is False:  # the plain GPT: one pass, one step
            self.n_loops = self.T_recursion = self.N_sup = self.N_sup_inference = 1
            self.backprop_recursions = 1
            self.depth_sampling, self.exit_gate = "fixed", False
        self.validate()

    # ----------------------------------------------------------------- construction
    @classmethod
    def preset(cls, name: str, **overrides: Any) -> GPTConfig:
        """A named preset (tiny, A, B, C, D) with keyword overrides; unknown keys are refused."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return cls.from_dict({**PRESETS[name], **overrides})

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> GPTConfig:
        known = cls.field_names()
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown GPTConfig key(s) {unknown}; known keys: {sorted(known)}")
        return cls(**{k: coerce(cls, k, v) for k, v in d.items()})

    @classmethod
    def field_names(cls) -> set[str]:
        return {f.name for f in dataclasses.fields(cls) if f.init}

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init}

    def replace(self, **changes: Any) -> GPTConfig:
        return GPTConfig.from_dict({**self.to_dict(), **changes})

    # ----------------------------------------------------------------- validation
    def validate(self) -> None:
        """Refuse a broken config with a message that names the key and the rule."""
        positive = ["vocab_size", "sequence_len", "n_layer", "n_embd", "n_head", "n_kv_head",
                    "mlp_multiple_of", "n_loops", "T_recursion", "N_sup", "N_sup_inference",
                    "backprop_recursions"]
        for k in positive:
            v = getattr(self, k)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{k} must be an integer >= 1, got {v!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be divisible by n_head ({self.n_head})")
        if self.n_head % self.n_kv_head:
            raise ValueError(
                f"n_head ({self.n_head}) must be divisible by n_kv_head ({self.n_kv_head})")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"head dim n_embd/n_head ({self.n_embd // self.n_head}) must be even"
                             " for RoPE")
        if self.norm_style not in ("post", "pre"):
            raise ValueError(f"norm_style must be 'post' or 'pre', got {self.norm_style!r}")
        if self.state_init not in ("fixed", "input", "zero"):
            raise ValueError(f"state_init must be 'fixed', 'input' or 'zero', got "
                             f"{self.state_init!r}")
        if self.depth_sampling not in ("fixed", "poisson", "poisson-lognormal"):
            raise ValueError(f"depth_sampling must be 'fixed', 'poisson' or 'poisson-lognormal', "
                             f"got {self.depth_sampling!r}")
        if self.depth_sampling != "fixed" and self.T_recursion < 2:
            raise ValueError(f"depth_sampling {self.depth_sampling!r} draws around T_recursion "
                             f"and needs T_recursion >= 2, got {self.T_recursion}")
        if self.backprop_recursions > self.T_recursion:
            raise ValueError(f"backprop_recursions ({self.backprop_recursions}) must be <= "
                             f"T_recursion ({self.T_recursion})")
        if self.exit_gate and self.N_sup < 2:
            raise ValueError("exit_gate spreads the loss over supervision steps and needs "
                             f"N_sup >= 2, got {self.N_sup}")
        if not self.exit_entropy_beta >= 0:
            raise ValueError(f"exit_entropy_beta must be >= 0, got {self.exit_entropy_beta!r}")
        if self.logit_softcap < 0:
            raise ValueError(f"logit_softcap must be >= 0 (0 disables it), got "
                             f"{self.logit_softcap!r}")
        for k in ("supervision_weight_base", "rope_theta", "norm_eps"):
            if not getattr(self, k) > 0:
                raise ValueError(f"{k} must be > 0, got {getattr(self, k)!r}")
        for k in ("improvement_reward_scale", "halt_loss_weight"):
            if not getattr(self, k) >= 0:
                raise ValueError(f"{k} must be >= 0 (a negative weight rewards a worse loss), "
                                 f"got {getattr(self, k)!r}")
        if not 0.0 < self.halt_threshold < 1.0:
            raise ValueError(f"halt_threshold must be in (0, 1), got {self.halt_threshold!r}")

    # ----------------------------------------------------------------- derived figures
    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def mlp_hidden(self) -> int:
        m = self.mlp_multiple_of
        return m * math.ceil(8 * self.n_embd / 3 / m)

    @property
    def applications_per_recursion(self) -> int:
        """Block applications in one latent recursion: n_loops z-updates + one y-update (one
        pass of the stack with the recursion off)."""
        return self.n_layer * (self.n_loops + 1) if self.recursion else self.n_layer

    @property
    def conditioned_steps(self) -> int:
        """Rows of the per-step conditioning table (step_conditioning)."""
        return max(self.N_sup, self.N_sup_inference)

    def recursion_depths(self) -> dict[int, float]:
        """Recursions per training supervision step -> probability (depth_sampling). 'fixed':
        {T_recursion: 1}. The sampled laws are computed exactly here (the lognormal mixture by
        quadrature over log λ), with the mass above the cap folded onto the cap, as drawn."""
        T = self.T_recursion
        if self.depth_sampling == "fixed":
            return {T: 1.0}
        cap = MAX_DEPTH_FACTOR * T
        if self.depth_sampling == "poisson":
            rates = [(T - 1.0, 1.0)]
        else:  # log λ ~ N(mu, σ) on a grid of ±8σ, normal weights
            mu, sig, n = math.log(T - 1) - LOGNORMAL_SIGMA ** 2 / 2, LOGNORMAL_SIGMA, 801
            grid = [mu + sig * (-8 + 16 * i / (n - 1)) for i in range(n)]
            w = [math.exp(-0.5 * ((g - mu) / sig) ** 2) for g in grid]
            rates = [(math.exp(g), wi / sum(w)) for g, wi in zip(grid, w, strict=True)]
        pmf = dict.fromkeys(range(1, cap + 1), 0.0)
        for lam, weight in rates:  # r = 1 + Poisson(lam), r > cap drawn as cap
            for r in range(1, cap):
                k = r - 1
                pmf[r] += weight * math.exp(-lam + k * math.log(lam) - math.lgamma(k + 1))
        pmf[cap] = 1.0 - sum(pmf[r] for r in range(1, cap))
        return pmf

    def mean_recursions(self) -> tuple[float, float]:
        """Expected recursions per training step, and expected graded ones (min(k, r))."""
        pmf = self.recursion_depths()
        k = self.backprop_recursions
        return (sum(r * p for r, p in pmf.items()), sum(min(k, r) * p for r, p in pmf.items()))

    @property
    def effective_depth(self) -> int:
        """All block applications per training forward: n_layer·(n_loops+1)·T·N_sup (with
        depth_sampling, the expected T)."""
        return round(self.applications_per_recursion * self.mean_recursions()[0] * self.N_sup)

    @property
    def gradient_depth(self) -> int:
        """Block applications that carry gradients: n_layer·(n_loops+1)·k·N_sup, k =
        backprop_recursions (1 by default; with depth_sampling, the expected min(k, r))."""
        return round(self.applications_per_recursion * self.mean_recursions()[1] * self.N_sup)

    def block_params(self) -> int:
        """Parameters of one block: GQA attention, SwiGLU MLP, two RMSNorm weights."""
        e, kv = self.n_embd, self.n_kv_head * self.head_dim
        attn = e * e + 2 * e * kv + e * e          # q, k, v, o
        mlp = 3 * e * self.mlp_hidden              # gate, up, down
        return attn + mlp + 2 * e

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count without building the model. non_embedding leaves out the token
        embedding and lm_head (the convention of the preset table)."""
        e = self.n_embd
        n = self.n_layer * self.block_params()
        n += e                                     # final norm
        n += e if self.norm_style == "pre" else 0  # norm on the stack's output
        n += (e + 1) if self.halting else 0        # halting head
        n += 2 * e * self.conditioned_steps if self.step_conditioning and self.recursion else 0
        n += (e + 1) if self.exit_gate else 0     # exit gate
        if not non_embedding:
            n += 2 * self.vocab_size * e           # embedding + untied lm_head
        return n

    def flops_per_token(self, training: bool = True) -> int:
        """Matmul FLOPs per token (multiply-add = 2), counted exactly from the recursion.

        Per block application per token: 2·(linear weights) + 4·sequence_len·n_embd for the two
        attention matmuls (full sequence, as FlopCounterMode counts SDPA and as MFU conventions do).
        Training: the graded recursions (backprop_recursions) cost forward + backward (3x), the
        others forward only (1x); lm_head and halting head run once per supervision step (3x).
        With depth_sampling the count is the expectation over the drawn depth (one batch costs
        what its draw costs). The exit gate's two E-vectors per token and step (gate and its
        running-sum term, forward + weight gradient) are 8·n_embd.
        Inference: N_sup_inference steps of T recursions, forward only.
        """
        e, kv = self.n_embd, self.n_kv_head * self.head_dim
        linear = e * e + 2 * e * kv + e * e + 3 * e * self.mlp_hidden
        per_app = 2 * linear + 4 * self.sequence_len * e
        head = 2 * e * self.vocab_size + (2 * e if self.halting else 0)
        apps = self.applications_per_recursion
        if training:
            mean_r, mean_graded = self.mean_recursions()
            gate = 8 * e if self.exit_gate else 0
            per_step = apps * per_app * (mean_r + 2 * mean_graded) + 3 * head + gate
            return round(self.N_sup * per_step)
        return self.N_sup_inference * (apps * per_app * self.T_recursion + head)

    def summary(self) -> dict[str, Any]:
        """The derived figures printed at start and stored with the run."""
        return {
            "params_non_embedding": self.num_params(non_embedding=True),
            "params_total": self.num_params(non_embedding=False),
            "effective_depth": self.effective_depth,
            "gradient_depth": self.gradient_depth,
            "flops_per_token_train": self.flops_per_token(training=True),
            "flops_per_token_inference": self.flops_per_token(training=False),
            "head_dim": self.head_dim,
            "mlp_hidden": self.mlp_hidden,
        }


def coerce(cls: type, key: str, value: Any) -> Any:
    """Turn a command-line string into the field's type (int, float, bool, str)."""
    if not isinstance(value, str):
        return value
    ftype = {f.name: f.type for f in dataclasses.fields(cls)}[key]
    ftype = str(ftype)
    try:
        if ftype == "int":
            return int(value)
        if ftype == "float":
            return float(value)
        if ftype == "bool":
            if value.lower() in ("1", "true", "yes", "on"):
                return True
            if value.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(value)
    except ValueError:
        raise ValueError(f"{key} expects {ftype}, got {value!r}") from None
    return value
