"""The CPU side of the GPU path: what presets A-D run by default on a GPU (bf16, torch.compile of
the shared stack, SDPA's fused kernels with GQA), checked where a CPU can check it.

- the attention call the model makes is one CUDA's flash kernel accepts (the only fused kernel
  that takes GQA): bf16, no explicit mask, causal on square q/k, head_dim <= 256 and a multiple
  of 8, last dimension contiguous. A call it refuses falls back to the math kernel, silently, at
  memory quadratic in the sequence. On CPU the profiler also shows the fused kernel running;
- the compiled stack matches eager (losses and gradients, tolerance stated), compiles to one
  graph without breaks, and does not recompile from one supervision step or batch to the next;
- bf16 autocast trains with fp32 master weights and stays within a stated tolerance of fp32.
Configs are tiny: compiling on 2 shared cores is the slow part.
"""

from __future__ import annotations

import copy
import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def record_sdpa(monkeypatch) -> list[dict]:
    """Wrap torch's scaled_dot_product_attention; every call's tensors and flags are recorded
    (the real kernel still runs)."""
    calls: list[dict] = []
    real = F.scaled_dot_product_attention

    def recorded(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                 enable_gqa=False):
        calls.append({"q": q, "k": k, "v": v, "attn_mask": attn_mask, "dropout_p": dropout_p,
                      "is_causal": is_causal, "scale": scale, "enable_gqa": enable_gqa})
        return real(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal,
                    scale=scale, enable_gqa=enable_gqa)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recorded)
    return calls


def flash_refusals(call: dict) -> list[str]:
    """Why CUDA's flash kernel (sm80+, torch's sdp_utils checks) would refuse this call; empty
    when it accepts. Memory-efficient attention takes no enable_gqa, so with GQA flash is the
    only fused choice."""
    q, k, v = call["q"], call["k"], call["v"]
    why = []
    if call["attn_mask"] is not None:
        why.append("an explicit attn_mask (flash takes is_causal only)")
    if call["dropout_p"] != 0.0:
        why.append("dropout")
    if {t.dtype for t in (q, k, v)} - {torch.bfloat16, torch.float16}:
        why.append(f"dtype {q.dtype}/{k.dtype}/{v.dtype}, not bf16/fp16")
    if len({q.dtype, k.dtype, v.dtype}) != 1:
        why.append("q, k, v of different dtypes")
    if any(t.dim() != 4 for t in (q, k, v)):
        why.append("not 4-D (B, H, T, D)")
    d = q.size(-1)
    if d > 256 or d % 8 or k.size(-1) != d or v.size(-1) != d:
        why.append(f"head_dim {d} (flash: <= 256, a multiple of 8, equal for q, k, v)")
    if any(t.stride(-1) != 1 for t in (q, k, v)):
        why.append("last dimension not contiguous")
    if call["is_causal"] and q.size(-2) != k.size(-2):
        why.append("is_causal with q and k of different lengths")
    hq, hk = q.size(1), k.size(1)
    if hq != hk and not (call["enable_gqa"] and hq % hk == 0):
        why.append(f"{hq} query heads over {hk} kv heads without enable_gqa")
    return why


def gqa_config(tiny_config, **kw):
    return tiny_config(n_embd=64, n_head=4, n_kv_head=2, N_sup=2, **kw)


@pytest.mark.parametrize("preset", ["tiny", "A", "B", "C", "D"])
def test_the_training_attention_call_is_one_flash_accepts(preset, tiny_config, monkeypatch):
    """Under DeepSpeed's bf16 the module's weights are bf16 (engine.module.bfloat16()); the
    presets' head layout (A: 12 heads over 4 kv heads, head_dim 64) on a short sequence."""
    from model import GPTConfig, RecursiveGPT

    shape = dict(vocab_size=64, sequence_len=32, N_sup=2, T_recursion=1, n_loops=1, n_layer=1)
    cfg = GPTConfig.preset(preset, **shape)
    model = RecursiveGPT(cfg).bfloat16()
    calls = record_sdpa(monkeypatch)
    idx = torch.randint(0, 64, (1, 32))
    model.supervision_step(idx, targets=idx).objective.backward()
    assert calls and calls[0]["enable_gqa"] == (cfg.n_kv_head != cfg.n_head)
    for call in calls:
        assert flash_refusals(call) == [], flash_refusals(call)


def test_the_flash_check_can_fail(tiny_config, monkeypatch):
    """Negative controls: the cache path's explicit mask, fp32, a head layout without GQA."""
    q = torch.randn(1, 4, 8, 16, dtype=torch.bfloat16)
    k = torch.randn(1, 2, 8, 16, dtype=torch.bfloat16)
    good = {"q": q, "k": k, "v": k, "attn_mask": None, "dropout_p": 0.0, "is_causal": True,
            "scale": None, "enable_gqa": True}
    assert flash_refusals(good) == []
    mask = torch.ones(8, 8, dtype=torch.bool).tril()
    assert flash_refusals({**good, "attn_mask": mask, "is_causal": False})
    assert flash_refusals({**good, "q": q.float(), "k": k.float(), "v": k.float()})
    assert flash_refusals({**good, "enable_gqa": False})
    assert flash_refusals({**good, "q": q.transpose(-1, -2).contiguous().transpose(-1, -2)})
    assert flash_refusals({**good, "q": torch.randn(1, 4, 8, 12, dtype=torch.bfloat16)})


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_fused_kernel_runs_not_math(dtype, tiny_config):
    """On CPU, torch's fused flash kernel runs the model's GQA attention (the profiler shows the
    aten op), in fp32 and bf16, forward and backward: no fallback to the math kernel."""
    from gpu import attention_kernels

    from model import RecursiveGPT

    model = RecursiveGPT(gqa_config(tiny_config)).to(dtype)
    idx = torch.randint(0, 64, (2, 32))
    ran = attention_kernels(
        lambda: model.supervision_step(idx, targets=idx).objective.backward())
    assert ran == ["flash"], ran


# ----------------------------------------------------------------------------- torch.compile
@pytest.fixture(scope="module")
def compiled_run():
    """The same tiny model eager and with its stack compiled as parallelize does
    (model.stack.compile(), inductor) inside torch's activation checkpointing, two batches of
    per-step training each: losses and gradients per batch, and the number of graphs dynamo
    compiled after each supervision step."""
    from torch._dynamo.utils import counters

    from model import GPTConfig, RecursiveGPT

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    cfg = GPTConfig.preset("tiny", vocab_size=64, sequence_len=32, n_embd=64, n_head=4,
                           n_kv_head=2, N_sup=3)
    eager = RecursiveGPT(cfg)
    compiled = copy.deepcopy(eager)
    compiled.stack.compile()
    # as presets A-D train on a GPU: the compiled stack inside activation checkpointing
    compiled.set_activation_checkpointing(functools.partial(checkpoint, use_reentrant=False))
    g = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 64, (2, 33), generator=g) for _ in range(2)]
    out = {"eager": [], "compiled": [], "graphs": []}
    for name, model in (("eager", eager), ("compiled", compiled)):
        for seq in batches:
            model.zero_grad()
            y = z = prev = None
            losses = []
            for s in range(cfg.N_sup):
                st = model.supervision_step(seq[:, :-1], y, z, seq[:, 1:], step=s,
                                            prev_loss=prev, keep_logits=False)
                st.objective.backward()
                y, z, prev = st.y, st.z, st.loss.detach()
                losses.append(st.loss.item())
                if name == "compiled":
                    out["graphs"].append(counters["stats"]["unique_graphs"])
            grads = {n: p.grad.clone() for n, p in model.named_parameters()}
            out[name].append((losses, grads))
    out["explain"] = torch._dynamo.explain(eager.stack)(
        torch.randn(2, 32, 64), eager.rope_cos[:32], eager.rope_sin[:32])
    torch._dynamo.reset()
    return out


def test_the_compiled_stack_matches_eager(compiled_run):
    """Losses within 1e-5 relative, gradients within 1e-4 relative + 1e-6 absolute (fp32;
    inductor fuses and reorders reductions, so not bit for bit)."""
    for (le, ge), (lc, gc) in zip(compiled_run["eager"], compiled_run["compiled"], strict=True):
        torch.testing.assert_close(torch.tensor(lc), torch.tensor(le), rtol=1e-5, atol=0)
        assert ge.keys() == gc.keys()
        for n in ge:
            torch.testing.assert_close(gc[n], ge[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_compiled_stack_does_not_recompile_per_step(compiled_run):
    """The first supervision step compiles the stack (a no-grad and a graded variant, the
    latter also recomputed under checkpointing: dynamo guards on grad mode); nothing compiles
    again for the next steps or the next batch."""
    graphs = compiled_run["graphs"]
    assert 1 <= graphs[0] <= 3, graphs
    assert graphs == [graphs[0]] * len(graphs), f"recompiled: graphs after each step {graphs}"


def test_the_stack_compiles_to_one_graph_without_breaks(compiled_run):
    ex = compiled_run["explain"]
    assert ex.graph_break_count == 0, ex.break_reasons
    assert ex.graph_count == 1


# ----------------------------------------------------------------------------- bf16
def test_rms_norm_and_rope_in_bf16_stay_accurate():
    """Under DeepSpeed's bf16 the norms and RoPE tables are bf16 too. F.rms_norm reduces in
    fp32 and rounds once (equal to upcast, normalise, round), and bf16 RoPE over a 1024-token
    table (preset A-C's sequence) rotates within 1% of fp32 at every position: no fp32 copies
    are needed for either."""
    from model.layers import apply_rope, rope_tables

    x = torch.randn(2, 64, 1536) * 30
    w = torch.rand(1536) + 0.5
    got = F.rms_norm(x.bfloat16(), (1536,), w.bfloat16(), 1e-6)
    want = F.rms_norm(x.bfloat16().float(), (1536,), w.bfloat16().float(), 1e-6).bfloat16()
    assert torch.equal(got, want)
    cos, sin = rope_tables(1024, 64, 10000.0)
    q = torch.randn(1, 2, 1024, 64)
    ref = apply_rope(q, cos, sin)
    low = apply_rope(q.bfloat16(), cos.bfloat16(), sin.bfloat16()).float()
    rel = ((low - ref).norm(dim=-1) / ref.norm(dim=-1)).max()
    assert rel < 0.01, rel


def test_bf16_autocast_trains_with_fp32_master_weights(tiny_config):
    """30 AdamW steps on one batch, fp32 against bf16 autocast (weights, gradients and the
    optimizer state stay fp32: the master weights): the loss curves agree within 3% relative
    at every step and both fall; the first step's gradients point the same way (cosine > 0.99).
    """
    from model import RecursiveGPT
    from tests.helpers import per_step_backward

    cfg = gqa_config(tiny_config)
    seq = torch.randint(0, 64, (4, 33), generator=torch.Generator().manual_seed(2))
    curves, first_grads = {}, {}
    for name in ("fp32", "bf16"):
        torch.manual_seed(0)
        model = RecursiveGPT(cfg)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for i in range(30):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=name == "bf16"):
                losses = per_step_backward(model, seq[:, :-1], seq[:, 1:])
            if i == 0:
                first_grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()])
            assert all(p.dtype == torch.float32 and p.grad.dtype == torch.float32
                       for p in model.parameters())
            opt.step()
            opt.zero_grad()
            curve.append(losses[-1])
        assert all(s.dtype == torch.float32 for st in opt.state.values() for s in st.values()
                   if s.dim() > 0)
        curves[name] = torch.tensor(curve)
    a, b = curves["fp32"], curves["bf16"]
    assert a[-1] < 0.8 * a[0] and b[-1] < 0.8 * b[0], (a, b)
    torch.testing.assert_close(b, a, rtol=0.03, atol=0)
    cos = F.cosine_similarity(first_grads["fp32"], first_grads["bf16"], dim=0)
    assert cos > 0.99, cos
