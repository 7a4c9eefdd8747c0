"""The recursion of SPEC section 2: causality at every step, the looped stack against the same
blocks unrolled by hand, where gradients flow, and the per-step backward against one backward."""

from __future__ import annotations

import math
from itertools import pairwise

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from model import RecursiveGPT
from model.gpt import halting_loss
from model.losses import step_weights

VARIANTS = [("post", "fixed"), ("post", "input"), ("pre", "fixed"), ("pre", "input")]


def build(cfg) -> RecursiveGPT:
    return RecursiveGPT(cfg).double()  # float64: the references below are compared tightly


def grads(model: RecursiveGPT) -> dict[str, torch.Tensor | None]:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def assert_same_grads(a: dict, b: dict, rtol: float = 1e-9, atol: float = 1e-12) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if a[name] is None or b[name] is None:
            assert a[name] is None and b[name] is None, name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=rtol, atol=atol, msg=name)


# ---------------------------------------------------------------------------------- causality
@pytest.mark.parametrize(("norm_style", "state_init"), VARIANTS)
def test_causal_at_every_supervision_step(tiny_config, norm_style, state_init):
    cfg = tiny_config(norm_style=norm_style, state_init=state_init, sequence_len=16)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    with torch.no_grad():
        ref = model(idx).step_logits
        assert len(ref) == cfg.N_sup_inference
        for t in (0, 6, 14):
            changed = idx.clone()
            changed[:, t + 1:] = (idx[:, t + 1:] + 1 + torch.randint(0, cfg.vocab_size - 1,
                                                                     (2, 15 - t))) % cfg.vocab_size
            new = model(changed).step_logits
            for s, (a, b) in enumerate(zip(ref, new, strict=True)):
                torch.testing.assert_close(a[:, :t + 1], b[:, :t + 1], rtol=0, atol=1e-10,
                                           msg=f"step {s}, t={t}")
                # and the future did change what comes after t (the test can see a leak)
                assert (a[:, t + 1:] - b[:, t + 1:]).abs().amax(-1).min() > 1e-6


# --------------------------------------------------------------- looped == unrolled by hand
def rms(h: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps) * w


def reference_stack(model: RecursiveGPT, h: torch.Tensor, attend) -> torch.Tensor:
    """The n_layer blocks called one by one, each written out from its weights."""
    c = model.config
    T = h.size(1)
    cos, sin = model.rope_cos[:T], model.rope_sin[:T]
    for b in model.stack.blocks:
        def mlp(u, b=b):
            return (F.silu(u @ b.mlp.gate.weight.T) * (u @ b.mlp.up.weight.T)) @ b.mlp.down.weight.T
        if c.norm_style == "post":
            h = rms(h + attend(b.attn, h, cos, sin), b.attn_norm.weight, c.norm_eps)
            h = rms(h + mlp(h), b.mlp_norm.weight, c.norm_eps)
        else:
            h = h + attend(b.attn, rms(h, b.attn_norm.weight, c.norm_eps), cos, sin)
            h = h + mlp(rms(h, b.mlp_norm.weight, c.norm_eps))
    if c.norm_style == "pre":
        h = rms(h, model.stack.out_norm.weight, c.norm_eps)
    return h


@pytest.mark.parametrize(("norm_style", "state_init"), [("post", "fixed"), ("pre", "input")])
def test_recursion_equals_blocks_unrolled_by_hand(tiny_config, reference_attention, norm_style,
                                                  state_init):
    # random output projections (not the zero init), so that every block does something
    cfg = tiny_config(T_recursion=2, n_loops=2, N_sup=2, norm_style=norm_style,
                      state_init=state_init, sequence_len=12, zero_init_out=False)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 12))

    def S(h):
        return reference_stack(model, h, reference_attention)

    ones = torch.ones(cfg.n_embd, dtype=torch.float64)
    cap = cfg.logit_softcap
    with torch.no_grad():
        x = model.tok_emb.weight[idx]
        if cfg.input_norm:
            x = rms(x, ones, cfg.norm_eps)
        z = model.init_state.z.expand_as(x)
        y = x if state_init == "input" else model.init_state.y.expand_as(x)
        st = None
        for step in range(2):
            # recursion 1 (no grad in training), then recursion 2 (the graded one)
            z = S(z + x + y)
            z = S(z + x + y)
            y = S(y + z)
            z = S(z + x + y)
            z = S(z + x + y)
            y = S(y + z)
            logits = rms(y, model.final_norm.weight, cfg.norm_eps) @ model.lm_head.weight.T
            if cap:
                logits = cap * torch.tanh(logits / cap)
            st = model.supervision_step(idx, None if st is None else st.y,
                                        None if st is None else st.z, step=step)
            tight = dict(rtol=1e-9, atol=1e-9)
            torch.testing.assert_close(st.y, y, **tight, msg=f"y, step {step}")
            torch.testing.assert_close(st.z, z, **tight, msg=f"z, step {step}")
            torch.testing.assert_close(st.logits, logits, **tight, msg=f"logits, step {step}")


def test_one_extra_residual_would_be_caught(tiny_config, reference_attention):
    """The reference above is sensitive to the seeds' outer residual (z = z + stack(...))."""
    cfg = tiny_config(T_recursion=1, n_loops=1, N_sup=1, sequence_len=8, zero_init_out=False)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (1, 8))
    with torch.no_grad():
        st = model.supervision_step(idx)
        x = model.tok_emb.weight[idx]
        if cfg.input_norm:
            x = rms(x, torch.ones(cfg.n_embd, dtype=x.dtype), cfg.norm_eps)
        y, z = (p.expand_as(x) for p in (model.init_state.y, model.init_state.z))
        z_res = z + reference_stack(model, z + x + y, reference_attention)
        assert (st.z - z_res).abs().max() > 0.1


# ---------------------------------------------------------------------------- gradient flow
def test_states_are_detached_between_steps(tiny_config):
    cfg = tiny_config(T_recursion=2)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    st0 = model.supervision_step(idx, targets=tgt, step=0)
    assert st0.loss.requires_grad
    for state in (st0.y, st0.z):
        assert state.grad_fn is None and not state.requires_grad
    # even a state that asks for gradients gets none: the T-1 recursions run without them
    y_in = st0.y.clone().requires_grad_()
    z_in = st0.z.clone().requires_grad_()
    st1 = model.supervision_step(idx, y_in, z_in, tgt, step=1, prev_loss=st0.loss)
    st1.objective.backward()
    assert y_in.grad is None and z_in.grad is None
    assert model.lm_head.weight.grad is not None


def test_steps_backpropagate_independently_with_one_recursion(tiny_config, per_step_train):
    """T_recursion=1: the graded recursion starts from the previous step's state. If that state
    were still attached, step 2's backward would run into step 1's freed graph and fail."""
    model = build(tiny_config(T_recursion=1, N_sup=3))
    idx = torch.randint(0, 64, (2, 16))
    losses = per_step_train(model, idx, torch.randint(0, 64, (2, 16)))
    assert len(losses) == 3


def test_detach_false_lets_a_later_step_reach_back_with_one_recursion(tiny_config):
    """The study's --backprop-across-steps (outside the contract): with T_recursion 1 and
    detach=False, step 2's loss has a gradient with respect to step 1's states."""
    model = build(tiny_config(T_recursion=1, N_sup=2))
    idx = torch.randint(0, 64, (2, 16))
    st0 = model.supervision_step(idx, step=0, detach=False)
    assert st0.y.requires_grad and st0.z.requires_grad
    st0.y.retain_grad()
    st1 = model.supervision_step(idx, st0.y, st0.z, torch.randint(0, 64, (2, 16)), step=1)
    st1.objective.backward()
    assert st0.y.grad is not None and st0.y.grad.abs().sum() > 0


def test_only_the_last_recursion_is_graded(tiny_config):
    cfg = tiny_config(T_recursion=3, n_loops=2)
    model = build(cfg)
    seen: list[bool] = []
    backward_calls: list[int] = []

    def count_input(module, args):
        h = args[0]
        seen.append(h.requires_grad)
        if h.requires_grad:
            h.register_hook(lambda g: backward_calls.append(1))

    handle = model.stack.register_forward_pre_hook(count_input)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    st = model.supervision_step(idx, targets=torch.randint(0, cfg.vocab_size, (2, 16)))
    st.objective.backward()
    handle.remove()
    per_recursion = cfg.n_loops + 1
    assert seen == [False] * (2 * per_recursion) + [True] * per_recursion
    assert len(backward_calls) == per_recursion


@pytest.mark.parametrize("state_init", ["fixed", "input"])
def test_step_gradients_equal_reference_with_manual_no_grad_recursions(tiny_config, state_init):
    cfg = tiny_config(T_recursion=3, N_sup=2, state_init=state_init, zero_init_out=False)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))

    model.supervision_step(idx, targets=tgt, step=0).loss.backward()
    got = grads(model)

    def reference(graded_recursions: int) -> dict:
        model.zero_grad(set_to_none=True)
        x = F.rms_norm(model.tok_emb(idx), (cfg.n_embd,), eps=cfg.norm_eps)
        y, z = model.init_state(x)
        with torch.no_grad():
            for _ in range(cfg.T_recursion - graded_recursions):
                y, z = model.latent_recursion(x, y, z)
        for _ in range(graded_recursions):
            y, z = model.latent_recursion(x, y, z)
        logits = model.lm_head(model.final_norm(y))
        logits = cfg.logit_softcap * torch.tanh(logits / cfg.logit_softcap)
        F.cross_entropy(logits.flatten(0, 1), tgt.flatten()).backward()
        return grads(model)

    assert_same_grads(got, reference(1))
    # grading every recursion gives other gradients: the comparison above can fail
    everything = reference(cfg.T_recursion)
    assert not torch.allclose(got["stack.blocks.0.attn.q.weight"],
                              everything["stack.blocks.0.attn.q.weight"], rtol=1e-3)
    # the initial states are buffers, not parameters (with T >= 2 they could never learn)
    assert not any(n.startswith("init_state") for n in got)
    assert got["tok_emb.weight"] is not None


# ------------------------------------------------------- per-step backward == one backward
@pytest.mark.parametrize("overrides", [
    {},
    {"halting": True, "norm_style": "post"},
    {"T_recursion": 1, "state_init": "input", "norm_style": "pre"},
])
def test_per_step_backward_equals_one_backward(tiny_config, per_step_train, overrides):
    # random output projections: from the zero init every step gives the same loss at first,
    # and the improvement reward (checked below) would never be active
    cfg = tiny_config(improvement_reward_scale=1.0, zero_init_out=False, **overrides)
    model = build(cfg)
    if cfg.halting:  # a non-zero halting head, so that its gradient path is exercised
        torch.nn.init.normal_(model.halt_head.weight, std=0.1)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt[0, :3] = -1  # ignored positions

    out = model(idx, tgt)
    out.loss.backward()
    whole = grads(model)
    model.zero_grad(set_to_none=True)
    losses = per_step_train(model, idx, tgt)
    torch.testing.assert_close(torch.tensor(losses, dtype=torch.float64),
                               torch.stack(out.step_losses).detach(), rtol=1e-12, atol=0)
    assert_same_grads(per_step := grads(model), whole)
    # the improvement reward is active somewhere, so its per-step split is exercised too
    assert any(b > a for a, b in pairwise(losses))
    assert all(g is not None for g in per_step.values())


@pytest.mark.parametrize("overrides", [{}, {"T_recursion": 1, "halting": True}])
def test_per_step_backward_equals_one_backward_with_the_exit_gate(tiny_config, overrides):
    """exit_gate: each step's backward (its LM loss weighted by sg(p_s), the gate's share
    through the carried running sum) gives the gradients of one backward of the whole objective
    Σ_s p_s·L_s − β·H(p), written out here from the steps' logits and a fresh gate on the
    detached states (not from the model's per-step objectives)."""
    cfg = tiny_config(exit_gate=True, exit_entropy_beta=0.3, N_sup=4, zero_init_out=False,
                      **overrides)
    model = build(cfg)
    torch.nn.init.normal_(model.exit_gate.weight, std=0.5)
    torch.nn.init.constant_(model.exit_gate.bias, -0.2)
    if cfg.halting:
        torch.nn.init.normal_(model.halt_head.weight, std=0.1)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt[0, :3] = -1

    y = z = prev = None
    for s in range(cfg.N_sup):  # the trainer's path
        st = model.supervision_step(idx, y, z, tgt, step=s, prev_loss=prev)
        st.objective.backward()
        y, z, prev = st.y, st.z, st.carry
    per_step = grads(model)
    model.zero_grad(set_to_none=True)

    valid = tgt != -1
    y = z = None
    ces, lams, halts = [], [], []
    for s in range(cfg.N_sup):  # one graph, no targets: the model computes no objective
        st = model.supervision_step(idx, y, z, step=s)
        ces.append(F.cross_entropy(st.logits.flatten(0, 1), tgt.flatten(), ignore_index=-1,
                                   reduction="none").view_as(tgt))
        if s < cfg.N_sup - 1:
            lams.append(torch.sigmoid(model.exit_gate(st.y).squeeze(-1)
                                      - math.log(cfg.N_sup - 1 - s)))
        if cfg.halting:
            halts.append(halting_loss(st.halt_logits, st.logits, tgt))
        y, z = st.y, st.z
    stay, p = 1.0, []
    for lam in lams:
        p.append(lam * stay)
        stay = stay * (1 - lam)
    p.append(stay)
    per_token = sum(ps * ce + cfg.exit_entropy_beta * ps * ps.log()
                    for ps, ce in zip(p, ces, strict=True))
    whole = per_token[valid].mean() + sum(cfg.halt_loss_weight / cfg.N_sup * h for h in halts)
    whole.backward()
    assert_same_grads(per_step, grads(model))
    assert per_step["exit_gate.weight"].abs().sum() > 0
    # the hand-set step weights give other gradients: the comparison can fail
    model.zero_grad(set_to_none=True)
    plain = build(cfg.replace(exit_gate=False, improvement_reward_scale=0.0))
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("exit_gate")})
    y = z = None
    for s in range(cfg.N_sup):
        st = plain.supervision_step(idx, y, z, tgt, step=s)
        st.objective.backward()
        y, z = st.y, st.z
    name = "lm_head.weight"
    assert not torch.allclose(dict(plain.named_parameters())[name].grad, per_step[name],
                              rtol=1e-3)


def test_activation_checkpointing_gives_the_same_gradients(tiny_config, per_step_train):
    cfg = tiny_config(T_recursion=2, halting=True)
    model = build(cfg)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    plain_losses = per_step_train(model, idx, tgt)
    plain = grads(model)
    model.zero_grad(set_to_none=True)
    calls = []

    def ckpt(fn, *args):
        calls.append(1)
        return checkpoint(fn, *args, use_reentrant=False)

    model.set_activation_checkpointing(ckpt)
    assert per_step_train(model, idx, tgt) == plain_losses
    assert_same_grads(grads(model), plain)
    # only graded applications are checkpointed: (n_loops + 1) per step
    assert len(calls) == (cfg.n_loops + 1) * cfg.N_sup


# ----------------------------------------------------------------------- the total objective
@pytest.mark.parametrize("halting", [False, True])
def test_loss_is_weighted_sum_plus_reward(tiny_config, halting):
    cfg = tiny_config(improvement_reward_scale=0.7, supervision_weight_base=3.0, halting=halting,
                      halt_loss_weight=0.3)
    model = build(cfg)
    if halting:
        torch.nn.init.normal_(model.halt_head.weight, std=0.5)
    idx = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt = torch.randint(0, cfg.vocab_size, (2, 16))
    tgt[1, -4:] = -1
    with torch.no_grad():
        out = model(idx, tgt)
        L = out.step_losses
        assert len(L) == cfg.N_sup == len(out.step_logits) and out.halt_steps == cfg.N_sup
        valid = tgt != -1
        for s, logits in enumerate(out.step_logits):
            torch.testing.assert_close(L[s], F.cross_entropy(logits[valid], tgt[valid]))
        w = step_weights(cfg.N_sup, 3.0)
        expected = sum(ws * Ls for ws, Ls in zip(w, L, strict=True))
        expected = expected + 0.7 * sum(torch.relu(b - a) for a, b in pairwise(L))
        if halting:
            bce = []
            y = z = None
            for s in range(cfg.N_sup):
                st = model.supervision_step(idx, y, z, step=s)
                y, z = st.y, st.z
                right = (st.logits.argmax(-1) == tgt).double()
                bce.append(F.binary_cross_entropy_with_logits(st.halt_logits[valid],
                                                              right[valid]))
            expected = expected + 0.3 * torch.stack(bce).mean()
        torch.testing.assert_close(out.loss, expected, rtol=1e-12, atol=1e-12)


def test_recursion_off_is_one_pass_of_the_stack(tiny_config):
    """recursion=False: the plain GPT of the same parameters - one supervision step, one pass
    of the stack on x, no no-grad passes, no initial states."""
    cfg = tiny_config(recursion=False, n_loops=3, T_recursion=2, N_sup=4)
    assert (cfg.n_loops, cfg.T_recursion, cfg.N_sup, cfg.N_sup_inference) == (1, 1, 1, 1)
    assert cfg.effective_depth == cfg.gradient_depth == cfg.n_layer
    model = RecursiveGPT(cfg)
    assert model.init_state is None
    idx = torch.randint(0, cfg.vocab_size, (2, 12))
    out = model(idx, idx)
    x = F.rms_norm(model.tok_emb(idx), (cfg.n_embd,), eps=cfg.norm_eps)
    T = idx.size(1)
    h = model.stack(x, model.rope_cos[:T], model.rope_sin[:T])
    ref = model.lm_head(model.final_norm(h))
    ref = cfg.logit_softcap * torch.tanh(ref / cfg.logit_softcap)
    assert len(out.step_logits) == len(out.step_losses) == 1
    torch.testing.assert_close(out.logits, ref)
    torch.testing.assert_close(out.loss, F.cross_entropy(ref.flatten(0, 1), idx.flatten()))
    # exactly the parameters of the recursive model of that shape
    rec = tiny_config(n_loops=3, T_recursion=2, N_sup=4)
    assert rec.num_params(non_embedding=False) == cfg.num_params(non_embedding=False)
